"""
The page in a real headless Chromium driven by Playwright: ``python
scripts/app.py`` starts and prints its address; a user uploads a SAR file,
clicks Translate, sees the result (its size right, not blank) and downloads it;
with Samples at 2 the samples' mean and spread appear beside it.
The screenshot the README shows is taken here: written to assets/app.png when
UPDATE_ASSETS=1, else to a temporary folder.

Playwright cannot download its own browser here, so the test drives the system's
Chromium (Debian: apt-get install -y chromium), or the one $CHROMIUM names.
"""

import contextlib
import io
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

pytest.importorskip(
    "gradio", reason="the page needs the app extra: pip install -e '.[app]'"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[app]'")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install it with 'apt-get install -y chromium' (Debian, Ubuntu), "
    "or set CHROMIUM to a Chromium or Chrome binary",
)
SCREENSHOT = ROOT / "assets" / "app.png"
# the README's picture: the page as it opens, at a laptop's width
VIEWPORT = {"width": 1280, "height": 860}


@contextlib.contextmanager
def serve(work, *flags):
    """``python scripts/app.py`` on a free port: (its address, its output so far)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "app.py"), "--port", str(free_port()),
         "--work_dir", str(work), *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x) for x in proc.stdout], daemon=True
    ).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=180)
            seen.append(line)
            if line.startswith("The page is at "):
                yield line.split()[4], seen
                break
    except queue.Empty:
        pytest.fail("scripts/app.py printed no address in 180 s:\n" + "".join(seen))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("page")) as address:
        yield address


def test_upload_translate_see_and_download(served, tmp_path):
    url, printed = served
    assert url.startswith("http://127.0.0.1:")
    assert any("scene_model (bundled demo)" in line for line in printed)
    upload = tmp_path / "my_sar.tif"
    shutil.copy(ROOT / "assets" / "examples" / "river_32.tif", upload)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.locator("#sar-upload input[type=file]").set_input_files(str(upload))
            page.locator("#sar-view img").wait_for(timeout=60_000)  # the SAR, previewed
            page.click("#translate")
            result = page.locator("#result-view img")
            result.wait_for(timeout=120_000)
            page.wait_for_function(
                "() => document.querySelector('#result-view img').complete"
            )
            size = result.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert size == [32, 32]
            shown = result.evaluate(
                """img => {
                    const c = document.createElement('canvas');
                    c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const g = c.getContext('2d');
                    g.drawImage(img, 0, 0);
                    return Array.from(g.getImageData(0, 0, c.width, c.height).data);
                }"""
            )
            rgba = np.array(shown, np.uint8).reshape(32, 32, 4)
            assert rgba[..., :3].std() > 5 and len(np.unique(rgba[..., :3])) > 20
            assert "Translated 32 x 32 pixels" in page.locator("#info").inner_text()
            link = page.locator("#downloads a[href$='my_sar_optical.png']")
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            got = np.asarray(Image.open(saved).convert("RGB"))
            assert np.array_equal(got, rgba[..., :3])  # the file is the image shown
            # two samples: their mean and the spread picture appear beside the result
            assert not page.locator("#mean-view").is_visible()
            samples = page.locator("#samples input[type=number]")
            samples.fill("2")
            samples.press("Enter")
            page.click("#translate")
            page.locator("#spread-view img").wait_for(timeout=120_000)
            mean = page.locator("#mean-view img")
            mean.wait_for(timeout=10_000)
            page.wait_for_function(
                "() => document.querySelector('#mean-view img').complete"
            )
            assert mean.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [
                32,
                32,
            ]
            assert "2 samples" in page.locator("#info").inner_text()
            page.locator("#downloads a[href$='my_sar_optical_spread.npz']").wait_for()
            page.mouse.move(0, 0)
            shot = page.screenshot(full_page=False)
        finally:
            browser.close()
    picture = Image.open(io.BytesIO(shot))
    assert picture.size == (VIEWPORT["width"], VIEWPORT["height"])
    target = (
        SCREENSHOT if os.environ.get("UPDATE_ASSETS") == "1" else tmp_path / "app.png"
    )
    picture.save(target, optimize=True)


def test_a_file_the_model_cannot_read_shows_one_message(served, tmp_path):
    url, _ = served
    png = tmp_path / "s1_one_band.png"  # one band; the bundled model reads two
    Image.fromarray(np.full((32, 32), 90, np.uint8), "L").save(png)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.locator("#sar-upload input[type=file]").set_input_files(str(png))
            page.locator("#info", has_text="1 band").wait_for(timeout=60_000)
            page.click("#translate")
            answered = page.locator("#info", has_text="Not translated")
            answered.or_(page.locator(".toast-body")).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1000)  # anything else the answer shows, shown
            errors = page.get_by_text("Error", exact=True)
            shown = [errors.nth(i).is_visible() for i in range(errors.count())]
            assert sum(shown) == 0, f"{sum(shown)} 'Error' labels"
            assert page.get_by_text("Not translated").count() == 1
        finally:
            browser.close()


def scene_of(path, size):
    """A size x size SAR scene made of the bundled scene example, repeated."""
    import rasterio

    with rasterio.open(ROOT / "assets" / "examples" / "scene_64x96.tif") as src:
        bands, profile = src.read(), src.profile
    reps = (1, -(-size // bands.shape[1]), -(-size // bands.shape[2]))
    profile.update(width=size, height=size)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.tile(bands, reps)[:, :size, :size])
    return path


def test_two_users_one_cancels_the_other_gets_the_worker(tmp_path_factory, tmp_path):
    # a page limited to uploads of 1 MB
    long = scene_of(tmp_path / "long_scene.tif", 256)  # about 100 s at 20 steps
    huge = tmp_path / "huge.tif"
    huge.write_bytes(long.read_bytes() + bytes(2**20))
    shared = serve(tmp_path_factory.mktemp("shared"), "--max_upload_mb", "1")
    with shared as (url, printed), sync_api.sync_playwright() as p:
        assert any("limits per request: uploads up to 1 MB" in line for line in printed)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            first, second = browser.new_page(), browser.new_page()
            for page in (first, second):
                page.goto(url)
            # an upload over the limit is refused as it arrives, the limit named
            first.locator("#sar-upload input[type=file]").set_input_files(str(huge))
            first.get_by_text("exceed the maximum allowed size").wait_for(
                timeout=10_000
            )
            first.reload()
            # the first user starts a long scene ...
            first.locator("#sar-upload input[type=file]").set_input_files(str(long))
            first.locator("#sar-view img").wait_for(timeout=60_000)
            first.click("#translate")
            first.get_by_text("step 1/20").first.wait_for(timeout=60_000)
            # ... the second a small image, which waits its turn in the queue
            second.locator("#sar-upload input[type=file]").set_input_files(
                str(ROOT / "assets" / "examples" / "river_32.tif")
            )
            second.locator("#sar-view img").wait_for(timeout=60_000)
            second.click("#translate")
            second.get_by_text("queue: 1/1").first.wait_for(timeout=30_000)
            # the first cancels: the second's image comes, the first says so
            first.click("#cancel")
            first.locator("#info", has_text="Cancelled").wait_for(timeout=10_000)
            second.locator("#result-view img").wait_for(timeout=120_000)
            # the first request's own answer: stopped within a network call
            first.locator("#info", has_text="Not translated. Cancelled after").wait_for(
                timeout=10_000
            )
            assert "Translated 32 x 32 pixels" in second.locator("#info").inner_text()
            errors = first.get_by_text("Error", exact=True)
            assert sum(errors.nth(i).is_visible() for i in range(errors.count())) == 0
            assert first.locator("#result-view img").count() == 0
        finally:
            browser.close()
