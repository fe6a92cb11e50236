"""
The page on a machine a lab shares (guided_diffusion/page/app.py, scripts/app.py),
through gradio_client with the bundled model: each limit refused with its message
and the command that does the work instead (which runs); Cancel stops a request
within one network call, removes its files and lets the next user's request run;
the time limit stops a request, at once when its pace shows it would overrun; the
work folder keeps within its size; serving beyond this machine logs who can reach
the page; --auth keeps out a client without the password.
"""

import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip(
    "gradio", reason="the page needs the app extra: pip install -e '.[app]'"
)
pytest.importorskip("gradio_client", reason="pip install -e '.[app]'")

from gradio_client import Client, handle_file  # noqa: E402

from guided_diffusion.page import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "fields_32.tif"
SCENE = ROOT / "assets" / "examples" / "scene_64x96.tif"
MODEL = "scene_model (bundled demo)"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing"),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# tight limits, so that the bundled model's examples meet them: the 64 x 96 scene
# example is over the pixels, a 100 kB upload over the size
LIMITS = app.Limits(upload_mb=0.1, pixels=64 * 64, sample_steps=10, seconds=600)


def serve(translator, **options):
    blocks = app.build_page(translator)
    url = app.launch(blocks, translator, port=free_port(), **options)
    return blocks, url


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    translator = app.Translator(
        app.find_models(), work_dir=str(tmp_path_factory.mktemp("page")), limits=LIMITS
    )
    blocks, url = serve(translator)
    yield url, translator
    blocks.close()


def ask(client, path, steps=4, samples=1, sampler="DPM-Solver++"):
    """The Translate button's request: (SAR, result, mean, spread, text, files)."""
    return client.predict(handle_file(str(path)), MODEL, sampler, steps, 3, samples,
                          api_name="/translate")  # fmt: skip


def requests_in(translator):
    return sorted(p.name for p in Path(translator.work_dir).glob("request-*"))


def quoted_command(text):
    """The command between backquotes in a message."""
    return text.split("`")[1]


def test_each_limit_is_refused_with_its_message_and_its_command_works(page, tmp_path):
    url, translator = page
    client = Client(url, verbose=False)
    before = requests_in(translator)

    # more pixels than the page translates: the scene script's command instead
    *outputs, text, files = ask(client, SCENE, steps=2)
    assert outputs == [None] * 4 and files is None
    assert text.startswith(
        "**Not translated.** scene_64x96.tif is 96 x 64 = 6,144 pixels"
    )
    assert "more than the 4,096 the page translates per request (--max_pixels)" in text
    command = shlex.split(quoted_command(text))
    assert command[:2] == ["python", "scripts/translate_scene.py"]
    assert command[command.index("--input") + 1] == "scene_64x96.tif"
    # the command does the work, as printed, with the file beside it
    (tmp_path / "scene_64x96.tif").write_bytes(SCENE.read_bytes())
    command[command.index("--model_path") + 1] = str(
        ROOT / command[command.index("--model_path") + 1]
    )
    command[1] = str(ROOT / command[1])
    run = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "OUT.tif").stat().st_size > 0

    # samples x steps over the limit
    *_, text, _ = ask(client, EXAMPLE, steps=6, samples=2)
    assert (
        "2 samples x 6 steps is 12 network calls per image, more than the page's 10 "
        "(--max_sample_steps)" in text
    )
    assert "--samples_per_input 2" in quoted_command(text)

    # an upload larger than the page takes: refused by Gradio as it arrives ...
    big = tmp_path / "big.tif"
    big.write_bytes(SCENE.read_bytes() + bytes(100_000))
    with pytest.raises(Exception, match="maximum file size of 104857 bytes"):
        ask(client, big)
    # ... and by the translator for a file that reaches it another way
    with pytest.raises(app.PageError, match=r"big.tif is 0.126 MB, more than the 0.1 MB "
                       r"the page takes \(--max_upload_mb\); translate it"):  # fmt: skip
        translator.translate(str(big), MODEL, "dpm++2m", 4, 0)
    assert requests_in(translator) == before  # refusals leave no folder
    # the page goes on
    _, result, *_ = ask(client, EXAMPLE)
    assert result is not None


class Slow(app.th.nn.Module):
    """The model, each call taking at least ``seconds``."""

    def __init__(self, model, seconds):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.model(*args, **kwargs)


@pytest.fixture
def slow_calls(page, monkeypatch):
    """Each network call of the page's model takes 0.2 s: a request is long."""
    cache = page[1].cache
    get = cache.get
    monkeypatch.setattr(cache, "get", lambda job, flags: Slow(get(job, flags), 0.2))


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_cancel_stops_within_one_call_removes_the_files_and_frees_the_worker(
    page, slow_calls, monkeypatch
):
    url, translator = page
    calls = []
    check = app.Control.check

    def counted(control):
        check(control)  # a call is counted once the control lets it through
        calls.append(control.cancelled)

    monkeypatch.setattr(app.Control, "check", counted)
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    before = requests_in(translator)
    long = first.submit(handle_file(str(EXAMPLE)), MODEL, "DDIM", 10, 0, 1,
                        api_name="/translate")  # fmt: skip
    wait_for(lambda: len(calls) >= 2)  # the first user's request is running
    short = second.submit(handle_file(str(EXAMPLE)), MODEL, "DPM-Solver++", 2, 0, 1,
                          api_name="/translate")  # fmt: skip
    time.sleep(0.3)
    assert not short.done()  # it waits for the worker
    running = requests_in(translator)
    assert len(running) == len(before) + 1
    said = first.predict(api_name="/cancel")
    assert said.startswith("**Cancelled.**")
    # the second user's request runs to its end once the first has stopped
    _, result, *_, text, files = short.result(timeout=60)
    assert result is not None and "Translated 32 x 32 pixels" in text
    *outputs, text, _ = long.result(timeout=60)  # the first user's answer
    assert outputs == [None] * 4 and "Not translated.** Cancelled after" in text
    assert calls.count(True) == 0  # no network call after the cancel
    assert len(calls) < 10 + 2  # the first request did not finish
    kept = requests_in(translator)
    assert running[-1] not in kept  # the cancelled request's files are gone
    assert len(kept) == len(before) + 1  # the second's are kept
    # cancelling with nothing running says so
    assert first.predict(api_name="/cancel").startswith("Nothing to cancel")


def test_a_request_out_of_time_is_stopped_with_the_command_instead(
    page, slow_calls, monkeypatch
):
    url, translator = page
    client = Client(url, verbose=False)
    before = requests_in(translator)
    monkeypatch.setattr(translator, "limits", replace(translator.limits, seconds=0.5))
    *outputs, text, _ = ask(client, EXAMPLE, steps=10, sampler="DDIM")
    assert outputs == [None] * 4
    assert "Stopped" in text and "--max_seconds" in text
    assert "python scripts/translate_scene.py --input fields_32.tif" in text
    assert requests_in(translator) == before


def test_the_pace_stops_a_request_that_would_overrun_at_once(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: now[0])
    control = app.Control(seconds=60, todo="do this")
    now[0] = 110.0  # 10 s to the first call (loading the model)
    control.check()
    control.progress(1, 100)  # 1 %: too early to judge the pace
    now[0] = 112.0
    control.check()
    control.progress(10, 100)  # 10 % in 6 s since the first call: 10 + 60 = 70 s
    now[0] = 116.0
    control.check()  # 70 s is within 1.25 x 60
    control.progress(10, 100)
    now[0] = 119.0  # 10 + 90 = 100 s
    with pytest.raises(app.Stopped, match="would take about 2 min, more than the page's "
                       r"limit of 60 s per request \(--max_seconds\); do this"):  # fmt: skip
        control.check()
    now[0] = 200.0
    with pytest.raises(app.Stopped, match="Stopped after 100 s"):
        control.check()


def test_the_work_folder_keeps_within_its_size(tmp_path):
    translator = app.Translator(app.find_models(), work_dir=str(tmp_path / "work"))
    work = Path(translator.work_dir)
    for seed in range(3):
        translator.translate(str(EXAMPLE), MODEL, "dpm++2m", 2, seed)
    sizes = {p.name: app.folder_bytes(p) for p in work.glob("request-*")}
    assert len(sizes) == 3 and min(sizes.values()) > 0
    job = translator.job(
        "patch", str(EXAMPLE), translator.models[MODEL], "dpm++2m", 2, 0
    )
    need = app.request_bytes(job, 32, 32)
    # room for the next request and the newest one before it, not two: the
    # oldest go first
    room = need + sizes["request-000003"] + min(sizes.values()) - 1
    translator.limits = replace(translator.limits, work_gb=room / 1e9)
    translator.translate(str(EXAMPLE), MODEL, "dpm++2m", 2, 3)
    assert sorted(p.name for p in work.glob("request-*")) == [
        "request-000003", "request-000004"]  # fmt: skip
    # with room for all, nothing goes
    size = app.folder_bytes(work / "request-000004")
    translator.limits = replace(
        translator.limits, work_gb=(need + size + sizes["request-000003"]) / 1e9
    )
    translator.translate(str(EXAMPLE), MODEL, "dpm++2m", 2, 4)
    assert sorted(p.name for p in work.glob("request-*")) == [
        "request-000003", "request-000004", "request-000005"]  # fmt: skip
    # a request that alone would not fit is refused, naming the flag
    scene = translator.job("scene", str(SCENE), translator.models[MODEL], "dpm++2m", 2, 0,
                           folder=translator.work_dir)  # fmt: skip
    translator.limits = replace(translator.limits,
                                work_gb=app.request_bytes(scene, 64, 96) / 2 / 1e9)  # fmt: skip
    with pytest.raises(app.PageError, match=r"of the page's work folder, more than its .* GB "
                       r"\(--max_work_gb\); translate it"):  # fmt: skip
        translator.translate(str(SCENE), MODEL, "dpm++2m", 2, 0)


def test_serving_beyond_this_machine_says_who_can_reach_it(capsys):
    assert app.reach_warning("127.0.0.1", 7860, None) is None
    assert app.reach_warning("::1", 7860, None) is None
    assert app.reach_warning("localhost", 7860, None) is None
    line = app.reach_warning("0.0.0.0", 7860, None)
    assert "anyone who can reach any interface of this machine on port 7860" in line
    assert "no authentication" in line and "--auth USER:PASS" in line
    with_auth = app.reach_warning("10.0.0.5", 80, [("lab", "pw")])
    assert "10.0.0.5" in with_auth and "asks for a user and password (lab)" in with_auth
    assert "pw" not in with_auth
    # the page launched on every interface logs the line and serves
    translator = app.Translator(app.find_models(), work_dir=None)
    blocks, url = serve(translator, host="0.0.0.0")
    try:
        assert "no authentication" in capsys.readouterr().out
        port = url.rstrip("/").rsplit(":", 1)[1]
        Client(f"http://127.0.0.1:{port}/", verbose=False).view_api(print_info=False)
    finally:
        blocks.close()


def test_auth_keeps_out_a_client_without_the_password():
    translator = app.Translator(app.find_models(), work_dir=None)
    blocks, url = serve(translator, auth=[("lab", "s3cret")])
    try:
        with pytest.raises(Exception):  # noqa: B017  # gradio_client's own wording
            Client(url, verbose=False)
        with pytest.raises(Exception):  # noqa: B017
            Client(url, auth=("lab", "wrong"), verbose=False)
        client = Client(url, auth=("lab", "s3cret"), verbose=False)
        _, result, *_ = ask(client, EXAMPLE, steps=2)
        assert result is not None
    finally:
        blocks.close()


def test_the_scripts_flags_for_a_shared_page(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import app as script
    finally:
        sys.path.pop(0)
    args = script.parse_args(
        ["--max_pixels", "1000", "--max_seconds", "30", "--auth", "a:b"]
    )
    assert args.limits == app.Limits(pixels=1000, seconds=30)
    assert args.auth == [("a", "b")]
    users = tmp_path / "users.txt"
    users.write_text("# the lab\nann:one:two\nbob:three\n")
    assert script.parse_args(["--auth_file", str(users)]).auth == [
        ("ann", "one:two"), ("bob", "three")]  # fmt: skip
    for argv, said in [
        (["--auth", "nocolon"], "--auth: give USER:PASS"),
        (["--auth_file", str(tmp_path / "none.txt")], "--auth_file"),
        (["--max_pixels", "0"], "--max_pixels 0: give a number above 0"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert said in capsys.readouterr().err
    assert app.Limits().resolved("cpu").pixels == app.MAX_PIXELS_CPU
    assert app.Limits().resolved("cuda").pixels == app.MAX_PIXELS_GPU
    assert app.Limits(upload_mb=1.5).upload_bytes == 1_572_864


def test_a_request_cancelled_while_it_waits_does_not_run(page):
    _, translator = page
    before = requests_in(translator)
    translator.expect("tab-1")  # the Translate button, before the queue
    assert translator.cancel("tab-1")  # Cancel while it waits
    with pytest.raises(app.PageError, match="Cancelled before it started"):
        translator.translate(str(EXAMPLE), MODEL, "dpm++2m", 2, 0, session="tab-1")
    assert requests_in(translator) == before
    assert not translator.cancel("tab-1")  # nothing left to cancel
    # the session's next request runs
    assert translator.translate(
        str(EXAMPLE), MODEL, "dpm++2m", 2, 0, session="tab-1"
    ).png
