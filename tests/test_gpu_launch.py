"""
The multi-GPU launch on a machine faked in this process: 4 GPUs as torch sees them,
and torchrun's or an MPI launcher's environment.

Nothing real starts: CUDA's calls, the process group and mpi4py are replaced by
fakes that record what dist_util asks of them. The reference facts are the
launchers' own: the process with local rank L on a machine with G GPUs computes
on ``cuda:(L % G)``, and must say so to CUDA and NCCL before the group starts.
"""

import sys
import types

import pytest
import torch as th
import torch.distributed as dist

from guided_diffusion import dist_util
from guided_diffusion.train_util import TrainLoop

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "OMP_NUM_THREADS")  # fmt: skip
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "TORCHELASTIC_")


class FakeStore:
    def set_timeout(self, timeout):
        self.timeout = timeout


class FakeMachine:
    """
    A machine with ``gpus`` GPUs and ``cores`` CPU cores, as torch sees it, that
    records CUDA's current device, the group's start and the thread count set.
    """

    def __init__(self, monkeypatch, gpus=4, cores=32):
        self.current = th.device("cuda", 0)  # CUDA's current device until set_device
        self.set_device_calls = []
        self.group = None
        self.threads = []
        monkeypatch.setattr(th.cuda, "is_available", lambda: True)
        monkeypatch.setattr(th.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(th.cuda, "set_device", self.set_device)
        monkeypatch.setattr(th.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.group is not None)
        monkeypatch.setattr(dist, "init_process_group", self.init_process_group)
        monkeypatch.setattr(dist_util, "_rendezvous", lambda *args: FakeStore())
        monkeypatch.setattr(th, "set_num_threads", self.threads.append)
        monkeypatch.setattr(th, "get_num_threads", lambda: cores)  # torch's default
        monkeypatch.setattr("os.cpu_count", lambda: cores)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
        # dist_util's own state, restored after the test; no exit handlers.
        monkeypatch.setattr(dist_util, "_local_rank", 0)
        monkeypatch.setattr(dist_util, "_notes", [])
        monkeypatch.setattr(dist_util, "_cleanup_registered", True)
        for name in list(dist_util.os.environ):
            if name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES):
                monkeypatch.delenv(name)

    def set_device(self, device):
        self.current = th.device(device)
        self.set_device_calls.append(self.current)

    def current_stream(self, device=None):
        return FakeStream(self.current if device is None else th.device(device))

    def init_process_group(self, **kwargs):
        self.group = kwargs


class FakeStream:
    def __init__(self, device):
        self.device = device


class FakeEvent:
    """th.cuda.Event: record() without a stream records on the current stream."""

    def __init__(self, machine):
        self.machine = machine
        self.stream = None

    def record(self, stream=None):
        self.stream = stream if stream is not None else self.machine.current_stream()


class FakeComm:
    """
    mpi4py's COMM_WORLD for one rank. ``local`` is (local rank, local size) as
    the shared-memory split finds it; None where the launcher's variables must
    be enough (the split is a collective that every rank would have to join).
    """

    def __init__(self, rank, size, local):
        self.rank, self.size, self.local = rank, size, local

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, obj):
        return ["node0"] * (self.size // 2) + ["node1"] * (self.size - self.size // 2)

    def bcast(self, obj, root=0):
        return ("node0", 29500)

    def Split_type(self, split_type):
        assert split_type == "shared", split_type
        assert self.local is not None, "split asked although the launcher says"
        return FakeNodeComm(*self.local)


class FakeNodeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Free(self):
        pass


def fake_mpi(monkeypatch, comm):
    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = comm
    mpi.COMM_TYPE_SHARED = "shared"
    package = types.ModuleType("mpi4py")
    package.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


# Rank 6 or 7 of 8 on two machines of 4 GPUs each, with local rank 2 or 3 (a rank
# bound to cuda:0 would pass with local rank 0).
LAUNCHES = {
    "torchrun": dict(
        env=dict(
            RANK="7",
            WORLD_SIZE="8",
            LOCAL_RANK="3",
            LOCAL_WORLD_SIZE="4",
            OMP_NUM_THREADS="1",
        ),  # fmt: skip
        rank=7,
        local_rank=3,
    ),
    "mpich": dict(
        env=dict(PMI_RANK="6", PMI_SIZE="8", MPI_LOCALRANKID="2", MPI_LOCALNRANKS="4"),
        comm=FakeComm(6, 8, local=None),
        rank=6,
        local_rank=2,
    ),
    "openmpi": dict(
        env=dict(
            OMPI_COMM_WORLD_RANK="7",
            OMPI_COMM_WORLD_SIZE="8",
            OMPI_COMM_WORLD_LOCAL_RANK="3",
            OMPI_COMM_WORLD_LOCAL_SIZE="4",
        ),  # fmt: skip
        comm=FakeComm(7, 8, local=None),
        rank=7,
        local_rank=3,
    ),
    # A PMI launcher that does not say the local rank (srun, Intel MPI).
    "mpi_split": dict(
        env=dict(PMI_RANK="6", PMI_SIZE="8"),
        comm=FakeComm(6, 8, local=(2, 4)),
        rank=6,
        local_rank=2,
    ),
}


def launch(monkeypatch, name, **machine):
    """Fake a machine and the launcher ``name``'s environment; return the machine."""
    fake = FakeMachine(monkeypatch, **machine)
    launch = LAUNCHES[name]
    for key, value in launch["env"].items():
        monkeypatch.setenv(key, value)
    if "comm" in launch:
        fake_mpi(monkeypatch, launch["comm"])
    return fake


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_local_rank_binds_its_own_gpu_before_nccl_starts(monkeypatch, name):
    machine = launch(monkeypatch, name)
    local = th.device("cuda", LAUNCHES[name]["local_rank"])
    dist_util.setup_dist()
    assert machine.set_device_calls == [local]
    assert machine.group["backend"] == "nccl"
    assert machine.group["device_id"] == local
    assert machine.group["rank"] == LAUNCHES[name]["rank"]
    assert machine.group["world_size"] == 8
    assert dist_util.dev() == local
    assert dist_util.get_local_rank() == local.index


def test_local_rank_wraps_around_the_visible_gpus(monkeypatch):
    """A launcher that shows each rank only its own GPU (CUDA_VISIBLE_DEVICES): cuda:0."""
    machine = launch(monkeypatch, "openmpi", gpus=1)
    dist_util.setup_dist()
    assert machine.set_device_calls == [th.device("cuda", 0)]
    assert machine.group["device_id"] == th.device("cuda", 0)
    assert dist_util.dev() == th.device("cuda", 0)


def test_stop_flag_event_is_recorded_on_the_stream_of_the_copy(monkeypatch):
    """
    The event that says the stop flag reached the host is recorded on the stream of
    the device the copy runs on. With the binding right, the current stream is that
    device's; naming the device keeps it so when the current device is changed
    later (by a library, or a validator on another GPU).
    """
    machine = launch(monkeypatch, "torchrun")
    dist_util.setup_dist()
    loop = TrainLoop.__new__(TrainLoop)  # only what the stop flag's copy touches
    loop.device = dist_util.dev()
    loop._reduced_stop_flag = th.ones(1)
    loop._stop_flag_host = th.zeros(1)
    loop._stop_flag_copied = FakeEvent(machine)
    loop._queue_stop_flag_copy()
    assert loop._stop_flag_host.item() == 1.0
    assert loop._stop_flag_copied.stream.device == th.device("cuda", 3)
    th.cuda.set_device(th.device("cuda", 0))
    loop._queue_stop_flag_copy()
    assert loop._stop_flag_copied.stream.device == th.device("cuda", 3)


# -- CPU threads: each rank's share of the machine's cores --------------------------


@pytest.mark.parametrize("name", ["mpich", "openmpi", "mpi_split"])
def test_mpi_ranks_share_the_cores(monkeypatch, name):
    """4 ranks on a 32-core machine, OMP_NUM_THREADS unset: 8 threads each, said once."""
    machine = launch(monkeypatch, name)
    dist_util.setup_dist()
    assert machine.threads == [8]
    (note,) = dist_util.setup_notes()
    assert "8 CPU threads" in note and "OMP_NUM_THREADS" in note


def test_mpi_ranks_get_at_least_one_thread(monkeypatch):
    machine = launch(monkeypatch, "openmpi", cores=2)
    dist_util.setup_dist()
    assert machine.threads == [1]


def test_mpi_ranks_keep_a_users_thread_count(monkeypatch):
    machine = launch(monkeypatch, "mpich")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    dist_util.setup_dist()
    assert machine.threads == [] and dist_util.setup_notes() == []


def test_torchrun_thread_count_is_left_to_torchrun(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 itself, which torch read at import."""
    machine = launch(monkeypatch, "torchrun")
    dist_util.setup_dist()
    assert machine.threads == [] and dist_util.setup_notes() == []
