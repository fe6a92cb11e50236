"""
The web page's response time, as a user sees it: from the click on Translate to
the result image on the page, in a real Chromium, on a freshly started page
(python scripts/app.py) with the bundled model and DPM-Solver++ at 20 steps:

* an example at the model's size (32 x 32), the first request (the model is
  loaded then) and again with another seed;
* a 256 x 256 upload (a generated scene), translated as a whole scene in tiles;

and the same with the bundled distilled student (assets/scene_student, the
consistency sampler at 2 calls, chosen in the page's Model list), when it is there.

    python benchmarks/bench_app.py                   # about 5 minutes on 2 CPU cores
    python benchmarks/bench_app.py --results ''      # print only
    python benchmarks/bench_app.py --part shared     # the shared page alone, 1 minute

With --part shared (or all), the page as a lab shares it, two users in two
browser tabs at once: the first starts the 256 x 256 upload (minutes), the second
an example, which waits its turn; the first cancels. Measured: how soon the
second user's image comes after the Cancel click, how soon the first user's
request says it stopped, and how soon an upload over --max_upload_mb (2 MB and
300 MB against a limit of 1 MB) is refused; then the page serves the next request.

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
# (the page's name, the file, the sampler and steps the page picks for it)
MODELS = [
    ("scene_model (bundled demo)",
     os.path.join(REPO, "assets", "scene_model", "model.pt"), "DPM-Solver++", 20),
    ("scene_student (bundled demo, distilled student)",
     os.path.join(REPO, "assets", "scene_student", "model.pt"), "Consistency", 2),
]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(work_dir, *flags, timeout=300):
    """
    ``python scripts/app.py`` on a free port.

    :return: (the process, its address, seconds from the command to the address).
    """
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "scripts", "app.py"), "--port",
         str(free_port()), "--work_dir", work_dir, *flags],
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


def shared(args, scene, work):
    """Two users at once, one cancelling, and an upload over the limit: the rows."""
    from playwright.sync_api import sync_playwright

    # sparse files: their size on the page, nothing on the disk
    oversized = {}
    for megabytes in (2, 300):
        oversized[megabytes] = os.path.join(work, f"scene_{megabytes}mb.tif")
        with open(oversized[megabytes], "wb") as f:
            f.truncate(megabytes * 2**20)
    proc, url, _ = start_page(os.path.join(work, "shared"), "--max_upload_mb", "1")
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            first, second = browser.new_page(), browser.new_page()
            for page in (first, second):
                page.goto(url)
            for megabytes, path in oversized.items():
                began = time.perf_counter()
                first.locator("#sar-upload input[type=file]").set_input_files(path)
                first.get_by_text("exceed the maximum allowed size").wait_for(timeout=60_000)
                rows.append([f"an upload of {megabytes} MB (limit 1 MB) refused",
                             f"{time.perf_counter() - began:.2f}"])  # fmt: skip
                first.reload()
            first.locator("#sar-upload input[type=file]").set_input_files(scene)
            first.locator("#sar-view img").wait_for(timeout=120_000)
            first.click("#translate")
            first.get_by_text("step 2/20").first.wait_for(timeout=600_000)
            second.get_by_role("button", name=EXAMPLE).click()
            second.locator("#sar-view img").wait_for(timeout=120_000)
            second.click("#translate")
            second.get_by_text("queue: 1/1").first.wait_for(timeout=60_000)
            began = time.perf_counter()
            first.click("#cancel")
            first.locator("#info", has_text="Not translated. Cancelled after").wait_for(
                timeout=600_000
            )
            stopped = time.perf_counter() - began
            second.locator("#result-view img").wait_for(timeout=600_000)
            second.wait_for_function(
                "() => document.querySelector('#result-view img').complete"
            )
            came = time.perf_counter() - began
            rows.append(["Cancel click to the first user's 'Cancelled' answer", f"{stopped:.2f}"])
            rows.append(["Cancel click to the waiting user's image (32 x 32, 20 steps)",
                         f"{came:.2f}"])  # fmt: skip
            first.get_by_role("button", name=EXAMPLE).click()
            first.locator("#sar-view img").wait_for(timeout=120_000)
            seconds, _ = timed_click(first, 600_000)
            rows.append(["the first user's next request, click to image", f"{seconds:.2f}"])
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def response_rows(browser, url, scene, model, args):
    """The example twice and the upload with one bundled model, on a new tab."""
    name, _, sampler, steps = model
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(url)
    page.locator("#model input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function(
        "n => document.querySelector('#steps input[type=number]').value == n",
        arg=str(steps), timeout=60_000,
    )  # fmt: skip
    what = f"{name}, {sampler} {steps}"
    rows = []
    page.get_by_role("button", name=EXAMPLE).click()  # the example
    page.locator("#sar-view img").wait_for(timeout=120_000)
    for seed, label in ((0, "first request (model loaded)"),
                        (1, "again, seed 1 (a new image)")):  # fmt: skip
        page.locator("#seed input").fill(str(seed))
        seconds, own = timed_click(page, 600_000)
        rows.append([what, f"example {EXAMPLE}, 32 x 32, {label}", "patch",
                     f"{seconds:.2f}", f"{own:.2f}"])  # fmt: skip
    page.locator("#sar-upload button[aria-label=Clear]").click()  # the example
    page.locator("#sar-upload input[type=file]").set_input_files(scene)
    page.wait_for_function(
        "name => document.querySelector('#info').innerText.includes(name)",
        arg=os.path.basename(scene), timeout=120_000,
    )  # fmt: skip
    seconds, own = timed_click(page, 3_600_000)
    rows.append([what, f"upload {args.size} x {args.size}", "scene (tiles)",
                 f"{seconds:.2f}", f"{own:.2f}"])  # fmt: skip
    page.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--part", default="all", choices=["response", "shared", "all"])
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
        if args.part in ("shared", "all"):
            report_shared(shared(args, scene, work), args)
        if args.part == "shared":
            return
        proc, url, startup = start_page(os.path.join(work, "page"))
        rows = []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                for model in MODELS:
                    if not os.path.isfile(model[1]):
                        continue
                    rows += response_rows(browser, url, scene, model, args)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = common.markdown_table(
        ["model", "request", "route", "click to image (s)", "the page's own time (s)"], rows
    )
    common.report(
        "The web page's response time",
        table,
        [
            f"python scripts/app.py started in {startup:.1f} s (the command to its "
            "printed address); the requests follow on that fresh page, in this order",
            "models: the bundled assets/scene_model/model.pt (32 px) with DPM-Solver++ "
            "(dpm++2m) at 20 steps, and its distilled student assets/scene_student/model.pt "
            "with the consistency sampler at 2 calls (the page's choices for each), each "
            "on its own tab; seed 0 (but the second row of each); the upload is make_scene(seed=0) of "
            "guided_diffusion/demo/sen12ms.py, translated with translate_scene.py's "
            "defaults (overlap 16, tiles moved every step) and the page's 64 tiles per "
            "network call",
            "click to image: Playwright clicks Translate in headless Chromium and waits "
            "until the new result image has loaded; the page's own time is the one it "
            "prints, from the request's start in the worker to the result",
        ],
        args.results,
    )


def report_shared(rows, args):
    common.report(
        "The web page shared: a cancel, a wait, an upload too large",
        common.markdown_table(["what", "seconds"], rows),
        [
            "python scripts/app.py --max_upload_mb 1 (its other limits at their "
            "defaults) and the bundled model, "
            "DPM-Solver++ 20 steps; two tabs of one headless Chromium: the first "
            f"starts a {args.size} x {args.size} upload (about 100 s) and cancels it "
            f"at step 2, while the second's request for the example {EXAMPLE} waits "
            "in the queue",
            "an upload over --max_upload_mb is refused by the page before it is sent "
            "(Gradio's limit): the time, from Playwright setting the file to the "
            "refusal shown, does not grow with the file's size; the first row is the "
            "tab's first upload",
        ],
        args.results,
    )


if __name__ == "__main__":
    main()
