"""
Tests of the speed levers of training and sampling.

The reference is the slow path (fp32, contiguous memory, einsum attention, no
compile, loops over the parameters for AdamW, the gradient norm and the EMA):
with every weight randomised, each fp32 lever gives the
same gradients, parameters and samples within 1e-5 relative error, and bfloat16
samples stay within 2 %. Logging at dump time hands the logger the numbers that
logging at every step did. The benchmarks' --quick runs complete and print their
tables without touching benchmarks/RESULTS.md.

torch.compile takes minutes on two CPU cores: its equivalence test is marked slow
and runs with ``python -m pytest -m slow``.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import TINY_FLAGS, randomize_, tiny_model_and_diffusion
from PIL import Image

from guided_diffusion import dist_util, logger, train_util
from guided_diffusion.nn import update_ema
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.translation.sampling import (
    make_generators,
    prepare_model,
    translate,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BATCH = 4
LR = 1e-4
TOL = 1e-5
TRAIN_CHANNELS = 64  # see make_loop


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """
    One intra-op thread for this module: on two cores shared with other work,
    OpenMP threads that wait for a busy core make a step many times slower, and
    the comparisons here do not depend on the thread count.
    """
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)


def rel_err(a, b):
    """||a - b|| / ||b|| over tensors or lists of tensors, in float64."""
    if isinstance(a, th.Tensor):
        a, b = [a], [b]
    num = sum(((x.detach().double() - y.detach().double()) ** 2).sum() for x, y in zip(a, b))
    den = sum((y.detach().double() ** 2).sum() for y in b)
    return float((num / den) ** 0.5)


def make_batch(seed=0):
    gen = th.Generator().manual_seed(seed)
    return th.rand(BATCH, 6, 32, 32, generator=gen) * 2 - 1


def make_loop(tmp_path, use_sdpa=False, **options):
    """A TrainLoop on the tiny U-Net with randomised weights (the same for every call)."""
    dist_util.setup_dist()
    logger.configure(dir=str(tmp_path), format_strs=[])
    # 64 channels, not 32: with 32 every GroupNorm group is one channel, which cancels
    # the bias of the convolution before it. That bias's true gradient is then 0, and
    # Adam turns the round-off left in it into steps of up to lr, so the comparison
    # would measure noise.
    model, diffusion = tiny_model_and_diffusion(
        num_channels=TRAIN_CHANNELS, use_sdpa=use_sdpa
    )
    randomize_(model, seed=3)
    settings = dict(
        batch_size=BATCH, microbatch=-1, lr=LR, ema_rate="0.9", log_interval=100,
        save_interval=100, resume_checkpoint="", fused_optim=False,
    )  # fmt: skip
    settings.update(options)
    return train_util.TrainLoop(model=model, diffusion=diffusion, data=None, **settings)


def train_two_steps(loop, steps=2):
    """
    Two optimizer steps on fixed batches (or ``steps``).

    :return: (the gradients of the first step, the parameters and the first EMA
        after the last), all float32 copies.
    """
    grads = []
    optimize = loop.mp_trainer.optimize

    def recording_optimize(opt, **kwargs):
        if not grads:
            grads.extend(p.grad.detach().clone() for p in loop.mp_trainer.master_params)
        return optimize(opt, **kwargs)

    loop.mp_trainer.optimize = recording_optimize
    for step in range(steps):
        loop.run_step(make_batch(seed=step), {})
    params = [p.detach().clone() for p in loop.mp_trainer.master_params]
    ema = [p.detach().clone() for p in loop.ema_params[0]]
    return grads, params, ema


@pytest.fixture(scope="module")
def slow_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    loop = make_loop(folder)
    initial = [p.detach().clone() for p in loop.mp_trainer.master_params]
    return initial, train_two_steps(loop)


def assert_matches_slow_path(slow_path, lever_run):
    initial, (grads, params, ema) = slow_path
    lever_grads, lever_params, lever_ema = lever_run
    # The steps move the weights far more than the tolerance, so agreement within
    # it is a statement about the steps, not about the starting point.
    assert rel_err(params, initial) > 100 * TOL
    assert rel_err(lever_grads, grads) < TOL
    assert rel_err(lever_params, params) < TOL
    assert rel_err(lever_ema, ema) < TOL


FP32_LEVERS = [
    pytest.param(dict(channels_last=True), id="channels_last"),
    pytest.param(dict(fused_optim=True), id="fused_optim"),
    pytest.param(dict(use_sdpa=True), id="sdpa"),
    pytest.param(
        dict(channels_last=True, fused_optim=True, use_sdpa=True), id="together"
    ),
]


@pytest.mark.parametrize("levers", FP32_LEVERS)
def test_fp32_lever_matches_the_slow_path(tmp_path, slow_path, levers):
    loop = make_loop(tmp_path, **levers)
    if levers.get("channels_last"):
        weight = loop.model.input_blocks[0][0].weight
        assert weight.is_contiguous(memory_format=th.channels_last)
    assert_matches_slow_path(slow_path, train_two_steps(loop))


@pytest.mark.slow  # torch.compile takes minutes on a CPU: python -m pytest -m slow
def test_compile_matches_the_slow_path(tmp_path, slow_path):
    loop = make_loop(tmp_path, compile=True)
    assert loop.forward_model is not loop.model
    assert_matches_slow_path(slow_path, train_two_steps(loop))


def test_bf16_training_step_stays_close_to_fp32(tmp_path, slow_path):
    _, (grads, _, _) = slow_path
    # Only the first step's gradients are compared: one step, not two (a bfloat16
    # step on a CPU without bfloat16 arithmetic takes ten times an fp32 one).
    bf16_grads, _, _ = train_two_steps(make_loop(tmp_path, use_bf16=True), steps=1)
    assert 1e-4 < rel_err(bf16_grads, grads) < 0.02  # bfloat16 was used, and is close


@pytest.mark.parametrize("levers", [dict(compile=True), dict(channels_last=True)])
def test_checkpoints_keep_plain_names_and_layout(tmp_path, levers):
    # Wrapping in torch.compile is lazy: saving before any step compiles nothing.
    loop = make_loop(tmp_path, **levers)
    loop.save()
    reference, _ = tiny_model_and_diffusion(num_channels=TRAIN_CHANNELS)
    for name in ("model000000.pt", "ema_0.9_000000.pt"):
        state = th.load(tmp_path / name, weights_only=True)
        assert list(state) == list(reference.state_dict())
        assert all(v.is_contiguous() for v in state.values())
        reference.load_state_dict(state, strict=True)


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_optimizer_kernel_follows_this_runs_flag_after_resume(tmp_path, first, second):
    loop = make_loop(tmp_path, fused_optim=first)
    assert bool(loop.opt.param_groups[0]["fused"]) == first
    loop.run_step(make_batch(), {})
    loop.save()
    # The saved optimizer state carries the first run's kernel flags; the resumed
    # run must take the step with the kernel its own flag names.
    resumed = make_loop(tmp_path, fused_optim=second, resume_checkpoint="auto")
    assert resumed.step == 1
    assert bool(resumed.opt.param_groups[0]["fused"]) == second
    resumed.run_step(make_batch(seed=1), {})
    straight = make_loop(tmp_path / "straight", fused_optim=second)
    for step in range(2):
        straight.run_step(make_batch(seed=step), {})
    assert (
        rel_err(resumed.mp_trainer.master_params, straight.mp_trainer.master_params)
        < TOL
    )


def test_foreach_ema_and_loop_give_the_closed_form():
    gen = th.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 3, 3)]
    target = [th.randn(s, generator=gen) for s in shapes]
    source = [th.randn(s, generator=gen) for s in shapes]
    expected = [0.99 * t.double() + 0.01 * s.double() for t, s in zip(target, source)]
    for use_foreach in (True, False):
        params = [t.clone() for t in target]
        update_ema(params, source, rate=0.99, use_foreach=use_foreach)
        for p, e in zip(params, expected):
            th.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("max_pending", [None, 1], ids=["at-dump", "bounded"])
def test_logged_values_are_those_of_the_steps(tmp_path, monkeypatch, max_pending):
    """Kept on the device and logged at dump time: the means of the steps' own values."""
    if max_pending:  # handed to the logger after every step, as with a long interval
        monkeypatch.setattr(train_util, "MAX_PENDING_LOGS", max_pending)
    loop = make_loop(tmp_path, log_interval=2, max_steps=3, save_interval=10**6)
    steps = []  # per step: timesteps, per-example losses, grad norm
    training_losses = loop.diffusion.training_losses
    optimize = loop.mp_trainer.optimize

    def recording_losses(model, x_start, condition, t, **kwargs):
        out = training_losses(model, x_start, condition, t, **kwargs)
        steps.append(
            {"t": t.clone(), **{k: v.detach().clone() for k, v in out.items()}}
        )
        return out

    def recording_optimize(opt, **kwargs):
        took_step, grad_norm = optimize(opt, **kwargs)
        steps[-1]["grad_norm"] = float(grad_norm)
        return took_step, grad_norm

    monkeypatch.setattr(loop.diffusion, "training_losses", recording_losses)
    loop.mp_trainer.optimize = recording_optimize
    dumps, pending_after_step = [], []
    dumpkvs = logger.get_current().dumpkvs
    monkeypatch.setattr(
        logger.get_current(), "dumpkvs", lambda: dumps.append(dumpkvs())
    )
    run_step = loop.run_step

    def watched_step(batch, cond):
        run_step(batch, cond)
        pending_after_step.append(set(logger.get_current().sums))

    loop.run_step = watched_step
    batches = (make_batch(seed) for seed in itertools.count())
    loop.data = lambda start: ((b, {}) for b in batches)
    loop.run_loop()

    if not max_pending:
        # Nothing reached the logger's means between dumps: no value was read per step.
        assert pending_after_step == [set(), set(), set()]
    else:
        assert all("loss" in keys for keys in pending_after_step)
    assert len(dumps) == 2  # at step 2 (steps 1-2) and at the end (step 3)
    T = loop.diffusion.num_timesteps
    for dumped, window, last_step in zip(dumps, [steps[:2], steps[2:]], [2, 3]):
        expected = {}
        for key in ("loss", "mse"):
            expected[key] = np.mean([s[key].double().mean().item() for s in window])
            for q in range(4):
                values = [
                    v.item()
                    for s in window
                    for t, v in zip(s["t"], s[key])
                    if int(4 * t.item() / T) == q
                ]
                if values:
                    expected[f"{key}_q{q}"] = np.mean(values)
        expected["grad_norm"] = np.mean([s["grad_norm"] for s in window])
        plain = {"step", "samples", "lr", "images_per_s"}
        assert set(dumped) - plain == set(expected)
        for key, value in expected.items():
            assert dumped[key] == pytest.approx(value, rel=1e-6), key
        assert dumped["step"] == last_step


# -- sampling ----------------------------------------------------------------------------


def sample(model, levers=(), use_bf16=False):
    _, diffusion = tiny_model_and_diffusion(timestep_respacing="5")
    sar = th.rand(2, 3, 32, 32, generator=th.Generator().manual_seed(1)) * 2 - 1
    return translate(
        prepare_model(model, channels_last="channels_last" in levers),
        diffusion,
        sar,
        sampler="dpm++2m",
        generators=make_generators(0, ["a.png", "b.png"]),
        use_bf16=use_bf16,
    )


@pytest.fixture(scope="module")
def slow_samples():
    model, _ = tiny_model_and_diffusion()
    return sample(randomize_(model, seed=5))


def test_sampling_with_fp32_levers_matches_the_slow_path(slow_samples):
    model, _ = tiny_model_and_diffusion(use_sdpa=True)
    out = sample(randomize_(model, seed=5), levers=("channels_last",))
    assert model.out[2].weight.is_contiguous(memory_format=th.channels_last)
    assert rel_err(out, slow_samples) < TOL


def test_sampling_in_bf16_stays_within_two_percent(slow_samples):
    model, _ = tiny_model_and_diffusion()
    out = sample(randomize_(model, seed=5), use_bf16=True)
    assert out.dtype == th.float32
    assert 1e-4 < rel_err(out, slow_samples) < 0.02


# -- benchmarks --------------------------------------------------------------------------


def run_benchmark(script, *args, timeout=120):
    # One thread per process, as in the module (see one_thread).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text):
    """The first cells of the data rows of the Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [line.split("|")[1].strip() for line in lines[2:]]


def test_benchmark_variant_names_select_their_levers():
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.remove(str(BENCH))
    levers = ("sdpa", "channels_last", "bf16", "compile")
    assert common.variant_levers("slow", levers) == set()
    assert common.variant_levers("bf16", levers) == {"bf16"}
    assert common.variant_levers("all", levers) == set(levers)
    assert common.variant_levers("all", levers, skip_compile=True) == set(levers) - {
        "compile"
    }
    assert common.variant_levers("all-channels_last", levers, skip_compile=True) == {
        "sdpa",
        "bf16",
    }
    for bad in ("fast", "all-fast", "all-"):
        with pytest.raises(ValueError, match="unknown variant"):
            common.variant_levers(bad, levers)


@pytest.fixture(scope="module")
def results_md_state():
    path = BENCH / "RESULTS.md"
    return path.exists() and path.stat().st_mtime_ns


# Each variant runs in a process of its own, and the bfloat16 ones are ten times
# slower than fp32 on a CPU without bfloat16 arithmetic: --quick's tiny model also
# runs at batch 1, with no warm-up, and sampling with one timed evaluation and a
# 2-step solver instead of 20 (minutes of the suite on two cores, now seconds).
LESS_WORK = ("--batch_size", "1", "--warmup", "0")


@pytest.mark.parametrize(
    "script, variants, less_work",
    [
        (
            "bench_train.py",
            [
                *("slow", "sdpa", "channels_last", "bf16", "fused_optim", "all"),
                "all-channels_last",
            ],
            LESS_WORK,
        ),
        (
            "bench_sample.py",
            ["slow", "sdpa", "channels_last", "bf16", "all", "all-channels_last"],
            (*LESS_WORK, "--evals", "1", "--solver_steps", "2"),
        ),
    ],
)
def test_speed_benchmarks_quick_run(
    tmp_path, script, variants, less_work, results_md_state
):
    results = tmp_path / "results.md"
    out = run_benchmark(script, *less_work, "--results", str(results))
    assert table_rows(out) == variants
    assert "failed" not in out
    assert table_rows(results.read_text()) == variants
    path = BENCH / "RESULTS.md"
    assert (path.exists() and path.stat().st_mtime_ns) == results_md_state


def test_quality_benchmark_quick_run(tmp_path, results_md_state):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model, _ = create_model_and_diffusion(**TINY_FLAGS)
    th.save(randomize_(model).state_dict(), run_dir / "ema_0.9_000010.pt")
    (run_dir / "config.json").write_text(json.dumps(TINY_FLAGS))
    rng = np.random.default_rng(0)
    for i in range(3):
        for kind in ("sar", "opt"):
            (tmp_path / "test" / kind).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "test" / kind / f"{i}.png")
    results = tmp_path / "results.md"
    out = run_benchmark(
        "bench_quality.py",
        "--model_path", str(run_dir / "ema_0.9_000010.pt"),
        "--data_dir", str(tmp_path / "test"),
        "--results", str(results),
    )  # fmt: skip
    assert table_rows(out) == ["ddpm", "ddim", "dpm++2m"]
    assert table_rows(results.read_text()) == ["ddpm", "ddim", "dpm++2m"]
    path = BENCH / "RESULTS.md"
    assert (path.exists() and path.stat().st_mtime_ns) == results_md_state


# ~20 s on two idle cores: the bundled scene model distilled 2 steps in 4 runs,
# then 10 teacher rows and 16 student rows on 2 generated test patches.
@pytest.mark.slow
def test_distillation_benchmark_quick_run(tmp_path, results_md_state):
    results = tmp_path / "results.md"
    out = run_benchmark(
        "bench_distill.py", "--work_dir", str(tmp_path / "work"), "--results", str(results),
        timeout=300,
    )  # fmt: skip
    tables = results.read_text().split("\n## ")[1:]  # after the file's heading
    assert len(tables) == 2  # the cost, then the scores
    runs = ["student"] * 2 + ["student + adversarial term"] * 2 + ["teacher's training"]
    assert table_rows(tables[0]) == runs
    rows = table_rows(tables[1])
    assert rows[:10] == ["teacher dpm++2m"] * 4 + ["teacher ddim"] * 4 + [
        "teacher dpm++2m", "teacher ddim"
    ]  # fmt: skip
    # per variant and step count: the two seeds, then their mean
    assert len(rows) == 10 + 2 * 4 * 3
    for variant in ("plain", "adv"):
        for seed in (0, 1):
            state = json.loads((tmp_path / "work" / f"{variant}_seed{seed}" / "bench_state.json").read_text())
            assert state["step"] == 2 and state["done"]
    assert (tmp_path / "work" / "figure.png").is_file()
    assert "wrote" in out
    path = BENCH / "RESULTS.md"
    assert (path.exists() and path.stat().st_mtime_ns) == results_md_state


def test_a_failed_variant_is_a_table_row():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH))
    ok = {
        "images_per_s": 2.0,
        "s_per_step": 0.5,
        "peak_mib": 100.0,
        "window_peak_mib": 90.0,
    }
    rows = bench_train.table_rows(
        {"slow": [ok], "compile": [{"error": "no C compiler"}]}, skip_compile=False
    )
    assert rows[0][:5] == ["slow", "-", "2.000", "2.000-2.000", "1.00x"]
    assert rows[1][0] == "compile" and rows[1][2] == "failed"
    assert rows[1][-1] == "no C compiler"
