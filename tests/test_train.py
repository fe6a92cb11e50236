"""
Training: launchers, rank independence, resume, crash safety and the paper's flags.

The reference facts: two ranks at batch B follow the trajectory of one process at
batch 2B (disjoint shards and averaged gradients); N steps straight equal N/2 steps,
a resume and N/2 steps; a save interrupted at any point leaves the previous
checkpoint complete.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import dist_util, logger, train_util
from guided_diffusion.image_datasets import load_data
from guided_diffusion.io import checkpoints
from guided_diffusion.script_util import create_model_and_diffusion

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "image_train.py")

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    diffusion_steps=50,
)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """20 pairs of 20x20 images (more than three batches of 4): SAR = grey of the optical."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for sub in ("sar", "opt"):
        (root / sub).mkdir()
    for i in range(20):
        opt = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(opt).save(root / "opt" / f"{i}.png")
        Image.fromarray(opt.mean(-1).astype(np.uint8)).save(root / "sar" / f"{i}.png")
    return root


def run_script(args, env_extra, timeout=240, launcher=()):
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, sys.executable, TRAIN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def data_flags(pairs_dir):
    return [
        f"--data_dir_sar={pairs_dir / 'sar'}",
        f"--data_dir_opt={pairs_dir / 'opt'}",
    ]


def load(path):
    return th.load(path, weights_only=True)


def rel_error(a, b):
    """||a - b|| / ||b|| over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    den = sum((b[k].double() ** 2).sum() for k in a)
    return float((num / den) ** 0.5)


def assert_state_dicts_close(a, b, tol=1e-4):
    # Adam turns round-off in near-zero gradients into steps of up to lr on single
    # elements, so the whole parameter vector is compared, not each element.
    assert rel_error(a, b) < tol


# -- launchers ----------------------------------------------------------------------


def test_two_ranks_equal_one_process_at_twice_the_batch(
    pairs_dir, tmp_path, run_in_process
):
    """mpiexec -n 2 and torchrun at batch 2 == one process at batch 4, with shuffle and flips."""
    common = [*data_flags(pairs_dir), *TINY_FLAGS, "--lr=1e-3", "--max_steps=3", "--save_interval=3",
              "--random_flip=True", "--num_workers=0", "--ema_rate=0.9"]  # fmt: skip
    single = tmp_path / "single"
    run_script([*common, "--batch_size=4"], {"OPENAI_LOGDIR": str(single)})
    mpi = tmp_path / "mpi"
    run_script(
        [*common, "--batch_size=2"],
        {"OPENAI_LOGDIR": str(mpi)},
        launcher=["mpiexec", "-n", "2"],
    )
    torchrun = tmp_path / "torchrun"
    run_script(
        [*common, "--batch_size=2"],
        {"OPENAI_LOGDIR": str(torchrun)},
        launcher=[
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--no-python",
        ],
    )
    # Only a yardstick for the tolerance, so it runs in this process.
    other_data = tmp_path / "other_data"
    proc = run_in_process(
        TRAIN, [*common, "--batch_size=2"], env={"OPENAI_LOGDIR": other_data}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = load(single / "model000003.pt")
    # The tolerance tells runs apart: half the examples give a clearly different model.
    assert rel_error(load(other_data / "model000003.pt"), reference) > 100 * 1e-4
    for run in (mpi, torchrun):
        assert_state_dicts_close(load(run / "model000003.pt"), reference)
        assert_state_dicts_close(
            load(run / "ema_0.9_000003.pt"), load(single / "ema_0.9_000003.pt")
        )
        state = load(run / "state000003.pt")
        assert state["global_batch"] == 4 and state["step"] == 3


def test_two_ranks_with_dropout_resume_equals_straight_run(pairs_dir, tmp_path):
    """
    Dropout draws from each rank's global generator: after a resume, rank 1's
    stream must continue as it would have, not only rank 0's.
    """
    common = [*data_flags(pairs_dir), *TINY_FLAGS, "--dropout=0.3", "--lr=1e-3", "--batch_size=2",
              "--num_workers=0", "--save_interval=2", "--max_steps=4"]  # fmt: skip
    mpiexec = ["mpiexec", "-n", "2"]
    straight = tmp_path / "straight"
    run_script(common, {"OPENAI_LOGDIR": str(straight)}, launcher=mpiexec)
    resumed = tmp_path / "resumed"
    run_script(
        [*common, f"--resume_checkpoint={straight / 'model000002.pt'}"],
        {"OPENAI_LOGDIR": str(resumed)},
        launcher=mpiexec,
    )
    for name in ("model000004.pt", "ema_0.9999_000004.pt"):
        expected, got = load(straight / name), load(resumed / name)
        assert all(th.equal(got[k], expected[k]) for k in expected), name


@pytest.fixture(scope="module")
def validated_run(pairs_dir, tmp_path_factory):
    """
    One plain process, two steps, validating after each: the run that both
    test_plain_process_writes_run_folder and
    test_validation_during_training_writes_grid_and_scores read (one launch).

    :return: (the run folder, the finished process).
    """
    root = tmp_path_factory.mktemp("validated")
    val_dir = make_val_dir(pairs_dir, root / "val")
    logdir = root / "run"
    proc = run_script(
        [*data_flags(pairs_dir), *TINY_FLAGS, "--batch_size=2", "--max_steps=2", "--save_interval=100",
         "--log_interval=1", "--num_workers=0", f"--val_data_dir={val_dir}", "--val_interval=1",
         "--val_num=2", "--val_timestep_respacing=5"],
        {"OPENAI_LOGDIR": str(logdir)},
    )  # fmt: skip
    return logdir, proc


def test_plain_process_writes_run_folder(validated_run):
    logdir, proc = validated_run
    assert proc.stdout.splitlines()[0] == f"Logging to {logdir}"
    names = set(os.listdir(logdir))
    # A final checkpoint on normal exit, though save_interval was never reached.
    assert {
        "model000002.pt",
        "ema_0.9999_000002.pt",
        "opt000002.pt",
        "state000002.pt",
    } <= names
    assert {"config.json", "progress.csv", "log.txt"} <= names
    header = (logdir / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("step", "samples", "loss", "mse", "grad_norm", "lr", "loss_q0"):
        assert key in header
    # TF32 changes the numbers: the run's choice is recorded and said.
    assert json.loads((logdir / "config.json").read_text())["use_tf32"] is False
    assert "TF32 off" in (logdir / "log.txt").read_text()


# -- in-process training for resume tests ---------------------------------------------


def make_loop(pairs_dir, logdir, resume="", max_steps=6, save_interval=3, **kwargs):
    dist_util.setup_dist()
    logger.configure(dir=str(logdir), format_strs=["log", "csv"], append=bool(resume))
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**TINY)

    def data(start_batch):
        return load_data(
            data_dir_sar=str(pairs_dir / "sar"), data_dir_opt=str(pairs_dir / "opt"),
            batch_size=4, image_size=16, random_flip=True, start_batch=start_batch, num_workers=0,
        )  # fmt: skip

    options = dict(
        batch_size=4, microbatch=-1, lr=1e-3, ema_rate="0.9,0.5", log_interval=100,
        save_interval=save_interval, resume_checkpoint=resume, max_steps=max_steps,
    )  # fmt: skip
    options.update(kwargs)
    return train_util.TrainLoop(model=model, diffusion=diffusion, data=data, **options)


def checkpoint_files(folder, step):
    return {
        "model": load(folder / f"model{step:06d}.pt"),
        "ema": load(folder / f"ema_0.9_{step:06d}.pt"),
        "ema2": load(folder / f"ema_0.5_{step:06d}.pt"),
        "opt": load(folder / f"opt{step:06d}.pt")["state"],
    }


def assert_same_checkpoint(a, b):
    for key in ("model", "ema", "ema2"):
        assert_state_dicts_close(a[key], b[key], tol=1e-5)
    for idx in a["opt"]:
        for name in ("exp_avg", "exp_avg_sq"):
            th.testing.assert_close(
                a["opt"][idx][name], b["opt"][idx][name], rtol=1e-4, atol=1e-9
            )


@pytest.fixture(scope="module")
def straight_runs(pairs_dir, tmp_path_factory):
    """
    Six steps without interruption (5 batches per epoch: crosses an epoch), with
    the given TrainLoop options; each set of options is trained once per module.
    """
    done = {}

    def run(**options):
        key = tuple(sorted(options.items()))
        if key not in done:
            folder = tmp_path_factory.mktemp("straight")
            make_loop(pairs_dir, folder, **options).run_loop()
            done[key] = checkpoint_files(folder, 6)
        return done[key]

    return run


@pytest.fixture(scope="module")
def straight_run(straight_runs):
    return straight_runs()


# With annealing, the learning rate of step 3 (the first after the resume) is 5/8
# of the base rate: a resume that restarts it at the base rate takes a step of
# the wrong size.
@pytest.mark.parametrize(
    "options", [{}, {"lr_anneal_steps": 8}], ids=["plain", "lr_anneal"]
)
def test_resume_equals_straight_run(pairs_dir, tmp_path, straight_runs, options):
    make_loop(pairs_dir, tmp_path, max_steps=3, **options).run_loop()
    loop = make_loop(pairs_dir, tmp_path, resume="auto", **options)
    assert loop.step == 3 and loop.data_position == 3
    loop.run_loop()
    assert_same_checkpoint(checkpoint_files(tmp_path, 6), straight_runs(**options))
    # progress.csv was appended to: one row per dump of both runs.
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + the final dump of each run


def test_resume_from_explicit_ema_file(pairs_dir, tmp_path, straight_run):
    make_loop(pairs_dir, tmp_path, max_steps=3).run_loop()
    loop = make_loop(
        pairs_dir, tmp_path / "other", resume=str(tmp_path / "ema_0.9_000003.pt")
    )
    assert loop.step == 3
    loop.run_loop()
    assert_same_checkpoint(checkpoint_files(tmp_path / "other", 6), straight_run)


class InjectedFailure(Exception):
    pass


@pytest.mark.parametrize("file_index", range(5))  # model, ema 0.9, ema 0.5, opt, state
@pytest.mark.parametrize("when", ["before", "after"])
def test_failure_during_save_keeps_previous_checkpoint(
    pairs_dir, tmp_path, monkeypatch, straight_run, file_index, when
):
    real_save = train_util.save_atomic
    calls = []

    def failing_save(obj, path):
        calls.append(path)
        # The first save (step 3) succeeds; the second (step 6) fails at one point.
        if len(calls) == 5 + file_index + 1:
            if when == "before":
                raise InjectedFailure(path)
            real_save(obj, path)
            raise InjectedFailure(path)
        real_save(obj, path)

    monkeypatch.setattr(train_util, "save_atomic", failing_save)
    with pytest.raises(InjectedFailure):
        make_loop(pairs_dir, tmp_path, max_steps=6).run_loop()
    monkeypatch.setattr(train_util, "save_atomic", real_save)

    state_written = file_index == 4 and when == "after"
    expected = 6 if state_written else 3
    assert checkpoints.find_resume_checkpoint(str(tmp_path)) == str(
        tmp_path / f"model{expected:06d}.pt"
    )
    loop = make_loop(pairs_dir, tmp_path, resume="auto", max_steps=6)
    assert loop.step == expected
    loop.run_loop()
    assert_same_checkpoint(checkpoint_files(tmp_path, 6), straight_run)


def test_checkpoint_of_original_code_resumes(pairs_dir, tmp_path):
    """No state file: the step comes from the name and the weights load strictly."""
    model, _ = create_model_and_diffusion(**TINY)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    th.save(model.state_dict(), tmp_path / "model000050.pt")
    loop = make_loop(
        pairs_dir,
        tmp_path / "new",
        resume=str(tmp_path / "model000050.pt"),
        max_steps=51,
    )
    assert loop.step == 50
    assert (
        rel_error(loop.mp_trainer.master_params_to_state_dict(), model.state_dict())
        == 0
    )
    loop.run_loop()
    assert (tmp_path / "new" / "state000051.pt").exists()


@pytest.fixture(scope="module")
def one_step_runs(pairs_dir, tmp_path_factory):
    """A checkpoint after one step, by fused_optim: the fused kernel's and AdamW's default."""
    folders = {}
    for fused in (True, False):
        folders[fused] = tmp_path_factory.mktemp(f"fused_{fused}")
        make_loop(
            pairs_dir, folders[fused], max_steps=1, save_interval=1, fused_optim=fused
        ).run_loop()
    return folders


@pytest.mark.parametrize("saved_fused", [True, False])
@pytest.mark.parametrize("fused_optim", [False, True])
def test_optimizer_state_resumes_where_adamw_reads_it(
    pairs_dir, tmp_path, monkeypatch, one_step_runs, saved_fused, fused_optim
):
    """
    Resumed with the model on another device ("meta" here, a GPU in use), AdamW's
    moments go to the parameters' device; its step counters stay on the host, where
    the for-each and per-tensor kernels read them at every step, unless the fused
    kernel runs, which reads them on the device (PyTorch's note "special device
    hosting for step"). Whatever kernel the checkpoint was saved with.
    """
    monkeypatch.setattr(dist_util, "dev", lambda: th.device("meta"))
    loop = make_loop(
        pairs_dir,
        tmp_path,
        resume=str(one_step_runs[saved_fused] / "model000001.pt"),
        fused_optim=fused_optim,
    )
    assert loop.step == 1
    states = list(loop.opt.state.values())
    assert len(states) == len(loop.mp_trainer.master_params)
    step_device = th.device("meta") if fused_optim else th.device("cpu")
    for state in states:
        assert state["step"].device == step_device
        assert (
            state["exp_avg"].device == state["exp_avg_sq"].device == th.device("meta")
        )
    assert all(g["fused"] == (fused_optim or None) for g in loop.opt.param_groups)


def test_wrong_model_flags_give_clear_error(pairs_dir, tmp_path):
    other, _ = create_model_and_diffusion(**{**TINY, "num_channels": 64})
    th.save(other.state_dict(), tmp_path / "model000010.pt")
    with pytest.raises(ValueError, match="does not fit a model built from these flags"):
        make_loop(pairs_dir, tmp_path / "new", resume=str(tmp_path / "model000010.pt"))


def test_keep_checkpoints_prunes_old_ones(pairs_dir, tmp_path):
    make_loop(
        pairs_dir, tmp_path, max_steps=6, save_interval=2, keep_checkpoints=2
    ).run_loop()
    assert sorted(checkpoints.list_checkpoints(str(tmp_path))) == [4, 6]


def test_microbatches_match_full_batch(pairs_dir, tmp_path):
    make_loop(pairs_dir, tmp_path / "full", max_steps=2).run_loop()
    make_loop(pairs_dir, tmp_path / "micro", max_steps=2, microbatch=1).run_loop()
    assert_state_dicts_close(
        load(tmp_path / "micro" / "model000002.pt"),
        load(tmp_path / "full" / "model000002.pt"),
    )


def test_nonfinite_losses_skip_steps_then_stop(pairs_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_util, "MAX_NONFINITE_STEPS", 4)
    loop = make_loop(pairs_dir, tmp_path, max_steps=100)
    before = [p.detach().clone() for p in loop.model.parameters()]
    real = loop.diffusion.training_losses

    def nan_losses(*args, **kwargs):
        out = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()}

    monkeypatch.setattr(loop.diffusion, "training_losses", nan_losses)
    with pytest.raises(FloatingPointError, match="not finite for 4 steps in a row"):
        loop.run_loop()
    assert loop.skipped_steps == train_util.MAX_NONFINITE_STEPS
    for p, q in zip(before, loop.model.parameters()):
        assert th.equal(p, q)


# -- real processes: SIGKILL and SIGINT -----------------------------------------------------


def start_training(pairs_dir, logdir, extra, launcher=()):
    env = {
        **os.environ,
        "OPENAI_LOGDIR": str(logdir),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        *data_flags(pairs_dir),
        *TINY_FLAGS,
        "--batch_size=2",
        "--num_workers=0",
        *extra,
    ]
    return subprocess.Popen(
        [*launcher, sys.executable, TRAIN, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(
                f"training ended or timed out: {proc.stdout.read()[-2000:]}"
            )
        time.sleep(0.2)


def test_sigkill_then_auto_resume(pairs_dir, tmp_path):
    proc = start_training(
        pairs_dir, tmp_path, ["--save_interval=2", "--max_steps=100000"]
    )
    try:
        wait_for(lambda: (tmp_path / "state000004.pt").exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    step = int(
        Path(checkpoints.find_resume_checkpoint(str(tmp_path))).stem[len("model") :]
    )
    assert step >= 4
    proc = run_script(
        [*data_flags(pairs_dir), *TINY_FLAGS, "--batch_size=2", "--num_workers=0", "--save_interval=2",
         "--resume_checkpoint=auto", f"--max_steps={step + 2}"],
        {"OPENAI_LOGDIR": str(tmp_path)},
    )  # fmt: skip
    assert f"(step {step})" in proc.stdout
    assert (tmp_path / f"state{step + 2:06d}.pt").exists()


def test_sigint_saves_and_exits(pairs_dir, tmp_path):
    proc = start_training(
        pairs_dir,
        tmp_path,
        ["--save_interval=1000", "--max_steps=100000", "--log_interval=1"],
    )
    try:
        wait_for(
            lambda: (
                (tmp_path / "progress.csv").exists()
                and (tmp_path / "progress.csv").stat().st_size > 0
            ),
            proc,
        )
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "SIGINT received" in out
    saved = checkpoints.list_checkpoints(str(tmp_path))
    assert len(saved) == 1 and "state" in next(iter(saved.values()))


def rank_pids(launcher_pid):
    """
    The training processes a launcher started, by rank (PMI_RANK in their
    environment), found among its descendants in /proc.
    """
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # the process ended meanwhile
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    ranks, todo = {}, [launcher_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if TRAIN.encode() in cmdline:
                for item in environ:
                    if item.startswith(b"PMI_RANK="):
                        ranks[int(item[len("PMI_RANK=") :])] = pid
    return ranks


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_sigterm_on_one_rank_stops_both_at_the_same_step(pairs_dir, tmp_path):
    """A signal to rank 1 alone: rank 0 stops at the same step and saves a complete checkpoint."""
    proc = start_training(
        pairs_dir,
        tmp_path,
        ["--save_interval=1000", "--max_steps=100000", "--log_interval=1"],
        launcher=["mpiexec", "-n", "2"],
    )
    try:
        wait_for(
            lambda: (
                (tmp_path / "progress.csv").exists()
                and (tmp_path / "progress.csv").stat().st_size > 0
            ),
            proc,
        )
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # A rank that left the loop at another step would leave its peer waiting in a
    # collective that never completes: an error or a hang, not a clean exit.
    assert proc.returncode == 0, out[-2000:]
    stopped = re.search(r"stopping at step (\d+) \(signal on another rank\)", out)
    assert stopped, out[-2000:]
    step = int(stopped.group(1))
    assert checkpoints.list_checkpoints(str(tmp_path)) == {
        step: {"model", "ema", "opt", "state"}
    }
    assert load(tmp_path / f"state{step:06d}.pt")["step"] == step


def step_sync_worker(logdir):
    """
    Run under ``mpiexec -n 2``: train a few steps and write, as one JSON file per
    rank (two ranks' prints can share a line of mpiexec's output), the all-reduces
    per step, DDP's gradient buckets, and the step at which
    the loop stopped when rank 1 alone got a SIGTERM at the start of step 7.
    """
    from torch.profiler import ProfilerActivity, profile

    dist_util.setup_dist()
    logger.configure(dir=logdir, format_strs=["log"])
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**TINY)
    batch = th.rand(2, 6, 16, 16) * 2 - 1

    def data(start_batch):
        while True:
            yield batch, {}

    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1, lr=1e-4,
        ema_rate="0.9", log_interval=1000, save_interval=1000, resume_checkpoint="", max_steps=2,
    )  # fmt: skip
    loop.run_loop()  # DDP settles its gradient buckets after the first step
    loop.cfg.max_steps = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.run_loop()
    all_reduces = sum(event.name == "gloo:all_reduce" for event in prof.events())
    buckets = loop.ddp_model._get_ddp_logging_data()["rebuilt_bucket_sizes"]

    real_run_step = loop.run_step

    def run_step(batch, cond):
        if loop.rank == 1 and loop.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        real_run_step(batch, cond)

    loop.run_step = run_step
    loop.cfg.max_steps = 100
    loop.run_loop()
    result = dict(
        rank=loop.rank,
        all_reduces_per_step=all_reduces / 3,
        buckets=len(str(buckets).split(",")),
        stopped_at=loop.step,
    )
    (Path(logdir) / f"result{loop.rank}.json").write_text(json.dumps(result))
    dist_util.cleanup()


def test_stop_check_adds_no_collective_to_a_step(tmp_path):
    """
    Two ranks: a step all-reduces only its gradient buckets, yet a signal on one
    rank still stops both at the step it arrived in.
    """
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, __file__, "step_sync_worker", str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [
        json.loads(path.read_text()) for path in sorted(tmp_path.glob("result*.json"))
    ]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["all_reduces_per_step"] == r["buckets"], r
        # The signal arrived before step 7's gradients were reduced.
        assert r["stopped_at"] == 7, r


# -- the paper's configuration -------------------------------------------------------


def test_paper_flags_build_and_take_one_step(tmp_path):
    """
    The published configuration (256 px, 128 channels, 3 res blocks, 2000 steps), batch 1.

    The model is the one these flags build; its step is taken on a 64 px image: the
    U-Net is convolutional and no branch of it depends on the input's size (64 px
    still reaches every level, 2x2 at the deepest), and a 256 px step costs 16 times
    as much, over two minutes of this suite on two CPU cores. The 256 px step itself
    is what benchmarks/bench_train.py --configs paper times.
    """
    dist_util.setup_dist()
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        image_size=256, num_channels=128, num_res_blocks=3, learn_sigma=False, diffusion_steps=2000,
        noise_schedule="linear",
    )  # fmt: skip
    assert model.image_size == 256 and len(model.channel_mult) == 6  # the six levels
    batch = th.rand(1, 6, 64, 64) * 2 - 1

    def data(start_batch):
        while True:
            yield batch, {}

    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=1, microbatch=-1, lr=1e-4,
        ema_rate="0.9999", log_interval=1, save_interval=10**6, resume_checkpoint="", max_steps=1,
    )  # fmt: skip
    # Only the zero-initialised output layer gets a gradient on the first step.
    before = model.out[2].weight.detach().clone()
    loop.run_loop()
    assert loop.step == 1 and loop.skipped_steps == 0
    assert not th.equal(before, model.out[2].weight)
    assert (tmp_path / "model000001.pt").exists()


def test_train_sh_runs_with_overrides(pairs_dir, tmp_path):
    env = {
        **os.environ,
        "DATA_DIR_SAR": str(pairs_dir / "sar"),
        "DATA_DIR_OPT": str(pairs_dir / "opt"),
        "NUM_GPUS": "1",
        "OPENAI_LOGDIR": str(tmp_path / "run"),
        "MODEL_FLAGS": " ".join(
            f"--{k} {v}" for k, v in TINY.items() if k != "diffusion_steps"
        ),
        "DIFFUSION_FLAGS": "--diffusion_steps 50",
        "TRAIN_FLAGS": "--batch_size 2 --num_workers 0 --resume_checkpoint auto",
    }
    for expected_step in (1, 2):  # the second run continues the first
        proc = subprocess.run(
            ["bash", str(REPO / "train.sh"), "--max_steps", str(expected_step)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (tmp_path / "run" / f"state{expected_step:06d}.pt").exists()
    env["DATA_DIR_SAR"] = str(tmp_path / "missing")
    proc = subprocess.run(
        ["bash", str(REPO / "train.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "DATA_DIR_SAR" in proc.stderr


def test_data_error_is_one_line_without_traceback(pairs_dir, tmp_path, run_in_process):
    sar = tmp_path / "sar"
    sar.mkdir()
    for name in os.listdir(pairs_dir / "sar"):
        (sar / name).write_bytes((pairs_dir / "sar" / name).read_bytes())
    (sar / "orphan_77.png").write_bytes((pairs_dir / "sar" / "0.png").read_bytes())
    # In this process (the script's own handler): every other test here that
    # starts image_train.py is a real launch.
    proc = run_in_process(
        TRAIN,
        [f"--data_dir_sar={sar}", f"--data_dir_opt={pairs_dir / 'opt'}", *TINY_FLAGS],
        env={"OPENAI_LOGDIR": tmp_path / "run"},
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "orphan_77.png" in proc.stderr.strip().splitlines()[-1]


def test_fp16_trains_saves_float32_and_resumes_loss_scale(pairs_dir, tmp_path):
    loop = make_loop(
        pairs_dir,
        tmp_path,
        max_steps=2,
        save_interval=2,
        use_fp16=True,
        fp16_scale_growth=0.5,
    )
    assert loop.model.dtype == th.float16
    loop.run_loop()
    saved = load(tmp_path / "model000002.pt")
    assert all(v.dtype == th.float32 for v in saved.values())
    assert float(load(tmp_path / "state000002.pt")["lg_loss_scale"]) == 20.0 + 2 * 0.5
    # The fp32 master weights, not the fp16 copies, are what gets saved.
    master = loop.mp_trainer.master_params_to_state_dict()
    assert rel_error(saved, master) == 0
    resumed = make_loop(pairs_dir, tmp_path, resume="auto", max_steps=4, use_fp16=True)
    assert resumed.mp_trainer.lg_loss_scale == 21.0


def test_fp16_overflow_lowers_the_loss_scale_and_skips(pairs_dir, tmp_path):
    loop = make_loop(pairs_dir, tmp_path, max_steps=1, use_fp16=True)
    loop.mp_trainer.lg_loss_scale = 200.0  # 2**200 overflows any float32 gradient
    before = [p.detach().clone() for p in loop.mp_trainer.master_params]
    loop.run_loop()
    assert loop.mp_trainer.lg_loss_scale == 199.0 and loop.skipped_steps == 1
    assert all(th.equal(a, b) for a, b in zip(before, loop.mp_trainer.master_params))


@pytest.mark.parametrize("use_tf32", [True, False])
def test_training_sets_tf32_and_cudnn_benchmark(pairs_dir, tmp_path, use_tf32):
    """Training has fixed shapes, so cuDNN's benchmark mode is on; TF32 as the flag says."""
    # The settings are the process's: the test leaves them as it found them (by
    # hand: pytest 9.2's monkeypatch cannot restore these backend attributes).
    places = [
        (th.backends.cudnn, "benchmark"),
        (th.backends.cuda.matmul, "fp32_precision"),
        (th.backends.cudnn.conv, "fp32_precision"),
    ]
    saved = [getattr(module, name) for module, name in places]
    th.backends.cudnn.benchmark = False
    try:
        make_loop(pairs_dir, tmp_path, use_tf32=use_tf32)
        precision = "tf32" if use_tf32 else "ieee"
        assert th.backends.cuda.matmul.fp32_precision == precision
        assert th.backends.cudnn.conv.fp32_precision == precision
        assert th.backends.cudnn.benchmark
    finally:
        for (module, name), value in zip(places, saved):
            setattr(module, name, value)
    said = "TF32 on" if use_tf32 else "TF32 off"
    assert said in (tmp_path / "log.txt").read_text()


def test_fp16_and_bf16_together_are_refused(pairs_dir, tmp_path, run_in_process):
    """Two precisions at once: one line that names both flags, before a run folder exists."""
    with pytest.raises(ValueError, match="--use_fp16.*--use_bf16"):
        make_loop(pairs_dir, tmp_path / "loop", use_fp16=True, use_bf16=True)
    proc = run_in_process(
        TRAIN,
        [*data_flags(pairs_dir), *TINY_FLAGS, "--use_fp16=True", "--use_bf16=True"],
        env={"OPENAI_LOGDIR": tmp_path / "run"},
    )
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert "--use_fp16" in line and "--use_bf16" in line
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_trains_close_to_fp32(pairs_dir, tmp_path):
    make_loop(pairs_dir, tmp_path / "fp32", max_steps=2).run_loop()
    make_loop(pairs_dir, tmp_path / "bf16", max_steps=2, use_bf16=True).run_loop()
    fp32, bf16 = (
        load(tmp_path / "fp32" / "model000002.pt"),
        load(tmp_path / "bf16" / "model000002.pt"),
    )
    assert all(v.dtype == th.float32 for v in bf16.values())
    assert rel_error(bf16, fp32) < 0.02


def make_val_dir(pairs_dir, val_dir):
    """A validation folder (sar/ and opt/) with the first three training pairs."""
    for sub in ("sar", "opt"):
        (val_dir / sub).mkdir(parents=True)
        for i in range(3):
            (val_dir / sub / f"{i}.png").write_bytes(
                (pairs_dir / sub / f"{i}.png").read_bytes()
            )
    return val_dir


def test_validation_during_training_writes_grid_and_scores(validated_run):
    logdir, _ = validated_run
    grid = Image.open(logdir / "val_000002.png")
    # Two rows (pairs) of three 16-pixel columns (SAR | generated | ground truth), 2-pixel gaps.
    assert grid.size == (3 * 16 + 2 * 2, 2 * 16 + 2)
    rows = (logdir / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert 0 < float(last["val_ssim"]) <= 1 and float(last["val_psnr"]) > 0


def validator_count_worker(count_file, *train_args):
    """
    Run under ``mpiexec -n 2``: image_train.py with ``train_args``, where every
    construction of a Validator appends the rank that made it to ``count_file``.
    """
    import runpy

    from guided_diffusion.evaluation import validation

    real_init = validation.Validator.__init__

    def counting_init(self, **kwargs):
        with open(count_file, "a") as f:
            f.write(f"{dist_util.get_rank()}\n")
        real_init(self, **kwargs)

    validation.Validator.__init__ = counting_init
    sys.argv = [TRAIN, *train_args]
    runpy.run_path(TRAIN, run_name="__main__")


def test_two_ranks_build_the_validator_on_rank_0_only(pairs_dir, tmp_path):
    """Only rank 0 validates, so only rank 0 holds the validator's second model."""
    val_dir = make_val_dir(pairs_dir, tmp_path / "val")
    logdir = tmp_path / "run"
    count_file = tmp_path / "validators.txt"
    args = [*data_flags(pairs_dir), *TINY_FLAGS, "--batch_size=2", "--max_steps=2", "--num_workers=0",
            f"--val_data_dir={val_dir}", "--val_interval=1", "--val_num=2", "--val_timestep_respacing=5",
            "--log_interval=1"]  # fmt: skip
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, __file__, "validator_count_worker", str(count_file), *args],
        env={**os.environ, "OPENAI_LOGDIR": str(logdir), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert count_file.read_text().split() == ["0"]
    # Rank 0 validated at both steps while rank 1 went on training.
    assert (logdir / "val_000001.png").exists() and (logdir / "val_000002.png").exists()
    rows = (logdir / "progress.csv").read_text().splitlines()
    assert "val_ssim" in rows[0].split(",")


def test_two_ranks_stop_on_an_unusable_validation_folder(pairs_dir, tmp_path):
    """Rank 0 alone reads the validation folder; its error stops rank 1 too, without a hang."""
    val_dir = make_val_dir(pairs_dir, tmp_path / "val")
    for path in (val_dir / "opt").iterdir():
        path.unlink()  # validation needs the ground truth
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, TRAIN, *data_flags(pairs_dir), *TINY_FLAGS,
         "--max_steps=1", "--num_workers=0", f"--val_data_dir={val_dir}"],
        env={**os.environ, "OPENAI_LOGDIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode != 0
    # Each rank prints rank 0's message, which names the folder (mpiexec forwards
    # the two ranks' stderr as it comes, so two lines may reach the pipe interleaved)
    message = f"error: optical folder {val_dir / 'opt'} holds no images"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


if __name__ == "__main__":
    # mpiexec starts this file as the worker of a test that needs several ranks.
    workers = {
        "step_sync_worker": step_sync_worker,
        "validator_count_worker": validator_count_worker,
    }
    workers[sys.argv[1]](*sys.argv[2:])


def test_annealed_learning_rate_by_hand(pairs_dir, tmp_path):
    """
    --lr_anneal_steps N: the step that starts at step s (0-based) runs at
    lr (1 - s / N), and the run stops at N; the rates in progress.csv against that
    formula (the resume tests compare two runs of the same code, which a schedule
    that never anneals passes).
    """
    import csv

    make_loop(pairs_dir, tmp_path, max_steps=0, lr_anneal_steps=4, log_interval=1).run_loop()
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        started_at = int(float(row["step"])) - 1
        assert float(row["lr"]) == pytest.approx(1e-3 * (1 - started_at / 4))
