"""
Tests of benchmarks/gpu_rows.sh, the prepared run for a lent GPU: its dry run on
the CPU prints and appends every row with numbers (and leaves RESULTS.md alone),
without CUDA and without --dry_run it stops with one line, the FLOP count written
in it is the one the counter gives, and a row that runs past its limit is cut off
with everything it started.
"""

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch as th

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import gpu_rows  # noqa: E402

DRY_RUN_TIMEOUT_S = 300  # about 10 s of CPU; much more on two shared, busy cores


def table_rows(text):
    """(what, setting, result) of every row of the Markdown tables in ``text``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "what":
            rows.append(tuple(cells[:3]))
    return rows


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_dry_run_prints_every_row_with_numbers(tmp_path):
    results = tmp_path / "rows.md"
    before = digest(BENCH / "RESULTS.md")
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_rows.sh"), "--dry_run", "--results", str(results)],
        cwd=tmp_path,  # not the repository: nothing may depend on the working folder
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=DRY_RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digest(BENCH / "RESULTS.md") == before
    written = results.read_text()
    assert "## GPU rows: dry run on the CPU" in written
    assert re.search(r"Run finished in \d+ s\.", written)
    rows = table_rows(written)
    # What was appended to the file is what was printed.
    assert rows == table_rows(proc.stdout)

    def results_of(row_name):
        row = gpu_rows.ROWS[gpu_rows.ROW_NAMES.index(row_name)]
        found = [
            r[2]
            for r in rows
            if r[0] == row.what
            and (r[1] == row.setting or r[1].startswith(row.setting + ": "))
        ]
        assert found, f"no line for row {row_name} in\n{written}"
        return found

    number = r"\d+(\.\d+)?"
    for name in ("train_fp32", "train_tf32", "train_bf16", "train_levers"):
        (text,) = results_of(name)
        assert re.search(rf"^{number} images/s \({number} s per step of 2\)", text), (
            text
        )
        assert re.search(rf"peak {number} MiB", text), text
    for name in ("sample_fp32", "sample_levers"):
        (text,) = results_of(name)
        assert re.search(rf"^{number} tiles/s .*; peak {number} MiB$", text), text
    for name, why in (("train_fp16", "float16"), ("train_compile", "compiling")):
        (text,) = results_of(name)
        assert text.startswith("skipped in the dry run: ") and why in text, text

    # The CPU against itself: the same seed and names give the same numbers and
    # images, to the bit.
    noise, images, images_tf32 = results_of("noise")
    n_numbers = 2 * 3 * 32 * 32 * 10  # x_T and 9 steps of two 3 x 32 x 32 images
    assert noise.startswith(f"{n_numbers} numbers") and ": 0 differ in any bit" in noise
    assert "max grey-level difference ddpm 0, ddim 0, dpm++2m 0: within" in images
    assert images_tf32.startswith("max grey-level difference ddpm 0, ddim 0, dpm++2m 0")

    syncs = results_of("syncs")
    assert len(syncs) == 5  # two training variants, three samplers
    assert all(
        re.match(r"skipped \(the sync debug mode needs CUDA\): \d+ ", s) for s in syncs
    )

    # The tiny model attends at 16 x 16: a sequence of 256, one kernel per call.
    for text in results_of("sdpa"):
        assert re.fullmatch(r"T = 256: [a-zA-Z (),-]+ \(x\d+\)", text), text


@pytest.mark.skipif(th.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    results = tmp_path / "rows.md"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_rows.sh"), "--results", str(results)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dry_run" in lines[0] and "GPU" in lines[0]
    assert not results.exists()


def test_unknown_row_names_the_flag(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_rows.py"), "--only", "train_fp32,nosuch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--only: unknown row nosuch" in proc.stderr and "sdpa" in proc.stderr


def test_paper_forward_flops_is_what_the_counter_gives():
    # The constant was counted on the CPU with real tensors; the meta device counts
    # from the shapes alone, in a second.
    assert gpu_rows.unet_forward_flops(common.CONFIGS["paper"]) == (
        gpu_rows.PAPER_FORWARD_FLOPS
    )
    tiny = common.CONFIGS["tiny"]
    assert gpu_rows.unet_forward_flops(tiny, "meta") == gpu_rows.unet_forward_flops(
        tiny, "cpu"
    )


def test_a_training_step_is_three_forwards():
    """TRAIN_STEP_FORWARDS against the counter over a forward and a backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from guided_diffusion.script_util import create_model_and_diffusion

    flags = common.CONFIGS["tiny"]
    with th.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    size = flags["image_size"]
    x = th.zeros(1, 6, size, size, device="meta")
    t = th.zeros(1, dtype=th.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, t).sum().backward()
    ratio = counter.get_total_flops() / gpu_rows.unet_forward_flops(flags)
    # The input needs no gradient, so the first convolution's backward is half.
    assert gpu_rows.TRAIN_STEP_FORWARDS - 0.05 < ratio <= gpu_rows.TRAIN_STEP_FORWARDS


def test_bf16_peak_is_looked_up_by_device_name():
    assert gpu_rows.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert gpu_rows.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_rows.bf16_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_rows.bf16_peak_tflops("NVIDIA H100 NVL") is None
    assert gpu_rows.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") is None
    assert gpu_rows.share_of_peak(98.94, "NVIDIA H100 80GB HBM3") == (
        "10.0% of NVIDIA H100 80GB HBM3's bf16 peak"
    )
    assert gpu_rows.share_of_peak(98.94, None) == "n/a on a CPU"
    assert gpu_rows.share_of_peak(98.94, "NVIDIA A100-SXM4-80GB").startswith("n/a")


def test_header_of_a_gpu_run_gives_the_flops_and_the_peak():
    # The dry run writes the CPU's header; this is the one a GPU run writes.
    lines = gpu_rows.header(gpu_rows.ROWS, "NVIDIA H200", 480)
    text = "\n".join(lines)
    assert "## GPU rows: NVIDIA H200" in lines
    assert "forward 665.4 GFLOP per image" in text and "989.4 TFLOP/s" in text
    assert "batch 6," in text and "call on 64 tiles" in text
    assert lines[-2:] == [
        "| what | setting | result | s (limit) |",
        "|---|---|---|---|",
    ]


def _sync_warning():
    """The warning torch.cuda.set_sync_debug_mode("warn") gives; return its line."""
    warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    return sys._getframe().f_lineno - 1


def test_sync_counter_counts_the_sync_warnings_by_line():
    # Raised by hand: the mode itself needs CUDA.
    counter = gpu_rows.SyncCounter(active=False)
    counts, running = [], []
    with counter:
        for step in range(3):
            before = counter.count()
            for _ in range(step + 1):
                line = _sync_warning()
            warnings.warn("an unrelated warning", stacklevel=1)
            counts.append(counter.count() - before)
            running.append(counter.count())
    assert counts == [1, 2, 3]
    counter.active = True  # read as if counted under the mode
    assert gpu_rows._per_step(counts, counter, "step") == (
        f"2 per step (max 3 over 3); from test_gpu_rows.py:{line} x6"
    )
    assert gpu_rows._per_step(running, counter, "sampler step").startswith(
        "2 per sampler step (max 3 over the 2 after the first); 1 in the first, "
        "set-up included"
    )


@pytest.mark.parametrize(
    "backend, expected", [("MATH", "math"), ("FLASH_ATTENTION", "flash (CPU)")]
)
def test_sdpa_backend_names_the_kernel_that_ran(backend, expected):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention
    from torch.profiler import ProfilerActivity, profile

    q = th.randn(1, 2, 16, 8)
    with (
        sdpa_kernel(getattr(SDPBackend, backend)),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        scaled_dot_product_attention(q, q, q)
    found = {gpu_rows.sdpa_backend(e.name) for e in prof.events()} - {None}
    assert found == {expected}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent (killed) no longer waits for it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_row_past_its_limit_is_cut_off_with_what_it_started(tmp_path):
    # A row's process that reports row "a", then starts a child holding its output
    # open (as torch.compile's workers do) and never reports row "b".
    script = textwrap.dedent(
        f"""
        import json, subprocess, sys, time
        print({gpu_rows.RESULT_PREFIX!r} + json.dumps({{"row": "a", "lines": []}}), flush=True)
        child = subprocess.Popen(["sleep", "120"])
        print("child", child.pid, flush=True)
        time.sleep(120)
        """
    )
    process = gpu_rows.RowsProcess([sys.executable, "-c", script])
    try:
        assert process.result("a", timeout=60) == {"row": "a", "lines": []}
        pid = int(process.lines.get(timeout=60).split()[1])
        start = time.monotonic()
        assert process.result("b", timeout=1) == {
            "error": "timed out after 1 s (its limit)"
        }
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        process.kill()


def test_a_row_process_that_dies_is_reported_with_its_last_words():
    script = "import sys; print('boom: the row broke', file=sys.stderr); sys.exit(3)"
    process = gpu_rows.RowsProcess([sys.executable, "-c", script])
    assert process.result("a", timeout=60) == {
        "error": "exit code 3: boom: the row broke"
    }
