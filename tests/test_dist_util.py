"""dist_util: process groups under no launcher, mpiexec and torchrun; safe loading."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch as th

from guided_diffusion import dist_util

# Run by each process: checks the pre-setup defaults (single process only),
# sets up twice, then reports what every collective produced and how many
# threads are left for the exit handlers that run after dist_util's, once
# cleanup ran and the DistributedDataParallel model is gone (as in
# scripts/image_train.py, which calls cleanup while its model is alive).
WORKER = r"""
import atexit, json, os, sys
import torch as th
from torch.nn.parallel import DistributedDataParallel as DDP
from guided_diffusion import dist_util

if sys.argv[1] == "mpi":
    from mpi4py import MPI  # MPI's own threads start here, not with the group

def threads():
    return len(os.listdir("/proc/self/task"))  # this process's threads (Linux)

def main():
    pre = None
    if sys.argv[1] == "single":
        pre = dict(
            rank=dist_util.get_rank(),
            world_size=dist_util.get_world_size(),
            local_rank=dist_util.get_local_rank(),
            main=dist_util.is_main_process(),
            broadcast=dist_util.broadcast_object("x"),
            gathered=dist_util.all_gather_object("x"),
        )
        dist_util.barrier()

    dist_util.setup_dist()
    dist_util.setup_dist()
    rank = dist_util.get_rank()

    total = th.tensor([float(rank + 1)], device=dist_util.dev())
    th.distributed.all_reduce(total)
    th.manual_seed(100 + rank)
    params = [th.randn(4, 3), th.randn(5)]
    before = [p.tolist() for p in params]
    dist_util.sync_params(params)
    dist_util.barrier()
    # DDP imports torch._dynamo, and its reducer holds the group; a backward
    # pass runs its gradient all-reduce.
    ddp = DDP(th.nn.Linear(3, 2))
    ddp(th.ones(4, 3)).sum().backward()
    report = dict(
        pre=pre,
        rank=rank,
        world_size=dist_util.get_world_size(),
        local_rank=dist_util.get_local_rank(),
        main=dist_util.is_main_process(),
        device=str(dist_util.dev()),
        backend=th.distributed.get_backend(),
        total=total.item(),
        broadcast=dist_util.broadcast_object({"from": rank}),
        gathered=dist_util.all_gather_object(rank * 10),
        before=before,
        after=[p.tolist() for p in params],
        threads_during=threads(),
    )
    dist_util.cleanup()
    dist_util.cleanup()
    report["initialized_after_cleanup"] = th.distributed.is_initialized()
    return report

def write_report():
    report.update(threads_before=threads_before, threads_at_exit=threads())
    # One file per rank: lines that two ranks print to one pipe can interleave.
    with open(f"report-{report['rank']}.json", "w") as f:
        json.dump(report, f)

threads_before = threads()
atexit.register(write_report)  # before setup_dist: runs after dist_util's handlers
report = main()
"""

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "TORCHELASTIC_")


def _clean_env():
    """The test's environment without any launcher's variables, single-threaded."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_workers(tmp_path, launcher, mode, timeout):
    """Run WORKER under ``launcher`` (the command that starts Python) and parse its reports."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [*launcher, str(script), mode],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = [json.loads(path.read_text()) for path in tmp_path.glob("report-*.json")]
    return sorted(reports, key=lambda r: r["rank"])


def test_single_process_needs_no_launcher(tmp_path):
    (report,) = _run_workers(tmp_path, [sys.executable], "single", timeout=60)
    assert report["pre"] == dict(
        rank=0, world_size=1, local_rank=0, main=True, broadcast="x", gathered=["x"]
    )
    assert report["rank"] == 0 and report["world_size"] == 1 and report["main"]
    assert report["device"] == "cpu" and report["backend"] == "gloo"
    assert report["total"] == 1.0
    assert report["broadcast"] == {"from": 0}
    assert report["gathered"] == [0]
    assert report["after"] == report["before"]
    assert not report["initialized_after_cleanup"]
    _check_threads_stopped(report)


def _check_threads_stopped(report):
    """The group ran threads of its own; none is left when later exit handlers run."""
    assert report["threads_during"] > report["threads_before"]
    assert report["threads_at_exit"] == report["threads_before"]


def _check_two_ranks(reports):
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert [r["main"] for r in reports] == [True, False]
    assert all(r["backend"] == "gloo" and r["device"] == "cpu" for r in reports)
    assert [r["total"] for r in reports] == [3.0, 3.0]
    assert [r["broadcast"] for r in reports] == [{"from": 0}, {"from": 0}]
    assert [r["gathered"] for r in reports] == [[0, 10], [0, 10]]
    # Different seeds gave different values; sync_params made rank 1 take rank 0's.
    assert reports[0]["before"] != reports[1]["before"]
    assert reports[1]["after"] == reports[0]["before"]
    assert reports[0]["after"] == reports[0]["before"]
    for report in reports:
        assert not report["initialized_after_cleanup"]
        _check_threads_stopped(report)


@pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)
def test_two_ranks_under_mpiexec(tmp_path):
    reports = _run_workers(
        tmp_path, ["mpiexec", "-n", "2", sys.executable], "mpi", timeout=120
    )
    _check_two_ranks(reports)


def test_two_ranks_under_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    reports = _run_workers(
        tmp_path, [*torchrun, "--nproc_per_node", "2"], "torchrun", timeout=120
    )
    _check_two_ranks(reports)


# A script that never calls cleanup. Its own exit handler, registered before
# setup_dist, runs after dist_util's (atexit is last in, first out), so it sees
# what is left when MPI and the interpreter start to shut down.
FORGETFUL = r"""
import atexit, json, os
import torch as th
from torch.nn.parallel import DistributedDataParallel as DDP
from guided_diffusion import dist_util

def threads():
    return len(os.listdir("/proc/self/task"))

threads_before = threads()

def report():
    with open("report.json", "w") as f:
        json.dump(
            dict(
                initialized=th.distributed.is_initialized(),
                threads_before=threads_before,
                threads_during=threads_during,
                threads_at_exit=threads(),
            ),
            f,
        )

atexit.register(report)
dist_util.setup_dist()
ddp = DDP(th.nn.Linear(3, 2))
ddp(th.ones(4, 3)).sum().backward()
del ddp
threads_during = threads()
"""


def test_group_is_destroyed_at_exit_without_cleanup(tmp_path):
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["initialized"]
    _check_threads_stopped(report)


def test_load_state_dict_round_trip(tmp_path):
    state = {
        "weight": th.randn(3, 4),
        "bias": th.arange(5),
        "nested": {"step": th.tensor(7)},
    }
    path = tmp_path / "model000010.pt"
    th.save(state, path)
    loaded = dist_util.load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert th.equal(loaded["weight"], state["weight"])
    assert th.equal(loaded["bias"], state["bias"])
    assert th.equal(loaded["nested"]["step"], state["nested"]["step"])


class _Opaque:
    """A class that a weights-only load must not instantiate."""


def test_load_state_dict_refuses_python_objects(tmp_path):
    path = tmp_path / "pickled.pt"
    th.save({"weight": th.ones(2), "extra": _Opaque()}, path)
    with pytest.raises(ValueError, match="Python objects") as info:
        dist_util.load_state_dict(path)
    assert str(path) in str(info.value)
    assert "_Opaque" in str(info.value)


def test_load_state_dict_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        dist_util.load_state_dict(missing)

    truncated = tmp_path / "truncated.pt"
    th.save({"weight": th.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.pt"):
        dist_util.load_state_dict(truncated)


# Run by each of two ranks: a step of rank 0's for all that fails, then one that
# writes a file (slowly, so that a rank that did not wait would miss it), then the
# count of the processes on this machine, outside and inside alone(3).
ON_MAIN = r"""
import faulthandler, json, os, time
from guided_diffusion import dist_util

# a rank left waiting ends itself (each launcher starts its ranks in groups of
# their own, which killing the launcher does not reach)
faulthandler.dump_traceback_later(40, exit=True)
dist_util.setup_dist()
rank = dist_util.get_rank()
report = dict(rank=rank)

def fail():
    with open(f"ran-{rank}", "a") as f:
        f.write("fail\n")
    raise ValueError("the product has no VV band")

def make():
    time.sleep(1)
    with open("made.txt", "w") as f:
        f.write("made by rank 0")

try:
    dist_util.on_main_process(fail)
except Exception as err:
    report["error"] = [type(err).__name__, str(err),
                       isinstance(err, dist_util.FailedElsewhere)]
dist_util.on_main_process(make)
report["seen"] = open("made.txt").read() if os.path.exists("made.txt") else None
report["machine"] = dist_util.processes_on_this_machine()
with dist_util.alone(3):
    report["alone"] = dist_util.processes_on_this_machine()
report["after"] = dist_util.processes_on_this_machine()
with open(f"on-main-{rank}.json", "w") as f:
    json.dump(report, f)
dist_util.cleanup()
"""


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_on_main_process_takes_the_same_way_out_on_every_rank(tmp_path, launcher):
    if shutil.which(launcher) is None and launcher == "mpiexec":
        pytest.skip("no mpiexec (pip install mpich)")
    script = tmp_path / "on_main.py"
    script.write_text(ON_MAIN)
    start = dict(
        torchrun=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "2"],
        mpiexec=["mpiexec", "-n", "2", sys.executable],
    )[launcher]  # fmt: skip
    with open(tmp_path / "output.txt", "w") as output:
        proc = subprocess.run([*start, str(script)], cwd=tmp_path, env=_clean_env(),
                              stdout=output, stderr=subprocess.STDOUT, timeout=90)  # fmt: skip
    assert proc.returncode == 0, (tmp_path / "output.txt").read_text()[-3000:]
    reports = [json.loads((tmp_path / f"on-main-{r}.json").read_text()) for r in (0, 1)]
    # rank 0 ran the step, once, and raised its own error; rank 1 heard of it
    assert (tmp_path / "ran-0").read_text() == "fail\n"
    assert not (tmp_path / "ran-1").exists()
    assert reports[0]["error"] == ["ValueError", "the product has no VV band", False]
    assert reports[1]["error"] == [
        "FailedElsewhere", "on rank 0: the product has no VV band", True
    ]
    # rank 1 came out of the call after rank 0's file was written
    assert [r["seen"] for r in reports] == ["made by rank 0"] * 2
    assert [r["machine"] for r in reports] == [2, 2]
    assert [r["alone"] for r in reports] == [3, 3]
    assert [r["after"] for r in reports] == [2, 2]
