"""
The web page's response time, as a user sees it: from the click on Translate to
the result image on the page, in a real Chromium, on a freshly started page
(python scripts/app.py) with the bundled model and DPM-Solver++ at 20 steps:

* an example at the model's size (32 x 32), the first request (the model is
  loaded then) and again with another seed;
* a 256 x 256 upload (a generated scene), translated as a whole scene in tiles.

    python benchmarks/bench_app.py                   # about 5 minutes on 2 CPU cores
    python benchmarks/bench_app.py --results ''      # print only

It also reports how long the page took to start (from the command to its printed
address) and the time the page itself reports for each request. Needs the app
extra and Chromium (pip install -e '.[app]'; apt-get install -y chromium).
"""

import argparse
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import common

REPO = os.path.dirname(common.BENCH_DIR)
EXAMPLE = "fields_32.tif"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(work_dir, timeout=300):
    """
    ``python scripts/app.py`` on a free port.

    :return: (the process, its address, seconds from the command to the address).
    """
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "scripts", "app.py"), "--port",
         str(free_port()), "--work_dir", work_dir],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise RuntimeError("scripts/app.py printed no address:\n" + "".join(seen)) from None
        seen.append(line)
        if line.startswith("The page is at "):
            return proc, line.split()[4], time.perf_counter() - began


def timed_click(page, timeout_ms):
    """
    Click Translate and wait for the new result image to be loaded (a result the
    same as the one shown has the same address: change the seed between clicks).

    :return: (seconds from the click to the image, the page's own time in seconds).
    """
    before = page.evaluate(
        "() => { const i = document.querySelector('#result-view img'); return i ? i.src : ''; }"
    )
    began = time.perf_counter()
    page.click("#translate")
    page.wait_for_function(
        """before => {
            const i = document.querySelector('#result-view img');
            return i && i.src && i.src !== before && i.complete && i.naturalWidth > 0;
        }""",
        arg=before, timeout=timeout_ms,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    text = page.locator("#info").inner_text()
    own = re.search(r"in ([0-9.]+) s", text)
    return seconds, float(own.group(1)) if own else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="the side of the upload (px)")
    parser.add_argument("--results", default=common.DEFAULT_RESULTS,
                        help="the file the section is appended to ('' for none)")  # fmt: skip
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium"),
                        help="the Chromium binary (default: $CHROMIUM, else chromium on PATH)")  # fmt: skip
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("error: no Chromium: apt-get install -y chromium, or give --chromium PATH")
    from playwright.sync_api import sync_playwright

    from guided_diffusion.demo.sen12ms import make_scene

    work = tempfile.mkdtemp(prefix="bench-app-")
    try:
        scene = make_scene(work, height=args.size, width=args.size, seed=0,
                           name=f"upload_{args.size}")["sar"]  # fmt: skip
        proc, url, startup = start_page(os.path.join(work, "page"))
        rows = []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(url)
                page.get_by_role("button", name=EXAMPLE).click()  # the example
                page.locator("#sar-view img").wait_for(timeout=120_000)
                for seed, label in ((0, "first request (model loaded)"),
                                    (1, "again, seed 1 (a new image)")):  # fmt: skip
                    page.locator("#seed input").fill(str(seed))
                    seconds, own = timed_click(page, 600_000)
                    rows.append([f"example {EXAMPLE}, 32 x 32, {label}", "patch",
                                 f"{seconds:.2f}", f"{own:.2f}"])  # fmt: skip
                page.locator("#sar-upload button[aria-label=Clear]").click()  # the example
                page.locator("#sar-upload input[type=file]").set_input_files(scene)
                page.wait_for_function(
                    "name => document.querySelector('#info').innerText.includes(name)",
                    arg=os.path.basename(scene), timeout=120_000,
                )  # fmt: skip
                seconds, own = timed_click(page, 3_600_000)
                rows.append([f"upload {args.size} x {args.size}", "scene (tiles)",
                             f"{seconds:.2f}", f"{own:.2f}"])  # fmt: skip
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = common.markdown_table(
        ["request", "route", "click to image (s)", "the page's own time (s)"], rows
    )
    common.report(
        "The web page's response time",
        table,
        [
            f"python scripts/app.py started in {startup:.1f} s (the command to its "
            "printed address); the requests follow on that fresh page, in this order",
            "model: the bundled assets/scene_model/model.pt (32 px); DPM-Solver++ "
            "(dpm++2m), 20 steps, seed 0 (but the second row); the upload is make_scene(seed=0) of "
            "guided_diffusion/demo/sen12ms.py, translated with translate_scene.py's "
            "defaults (overlap 16, tiles moved every step) and the page's 64 tiles per "
            "network call",
            "click to image: Playwright clicks Translate in headless Chromium and waits "
            "until the new result image has loaded; the page's own time is the one it "
            "prints, from the request's start in the worker to the result",
        ],
        args.results,
    )


if __name__ == "__main__":
    main()
