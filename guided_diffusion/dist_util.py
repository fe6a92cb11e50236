"""
Process-group setup that works the same under ``mpiexec -n N``, under
``torchrun --nproc_per_node N`` and as a plain ``python script.py``.

Call :func:`setup_dist` once at the start of a script; every other function
here is also usable before it (or without it) and then describes a single
process: rank 0, world size 1. The group is destroyed by :func:`cleanup`, which
also runs by itself when the interpreter exits.
"""

import atexit
import contextlib
import datetime
import os
import pickle
import re
import socket

import torch as th
import torch.distributed as dist

# This module's collectives take ``group=group.WORLD`` as a default argument,
# evaluated when it is first imported; torch._dynamo imports it, and
# DistributedDataParallel imports torch._dynamo. Imported while a group exists,
# it would hold that group for the life of the process, so that gloo's threads
# outlive the exit handlers (see _release_groups). Imported here, before any
# group exists, its defaults are None.
import torch.distributed.nn.functional  # noqa: F401

# Rendezvous only: a rank that never shows up (wrong -n, a crashed peer) fails
# the start instead of hanging. Collectives keep the long default below so a
# rank that is busy for a while (checkpointing, evaluation) is not killed.
INIT_TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long processes that meet after unequal work wait for each other (patient_group).
PATIENT_TIMEOUT = datetime.timedelta(days=7)

# Variables that MPI launchers set in every process they start.
_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")

# This process's rank among those on its machine, from the launcher; setup_dist
# sets it before the group exists, since the group is started on its GPU.
_local_rank = 0
# Lines for the run's log that setup_dist found before any logger existed.
_notes = []
_cleanup_registered = False
# Groups that cleanup() destroyed, held until _release_groups() at exit.
_retired_groups = []
# Set inside alone(): this process works as a group of one within a larger group.
_alone = False
_neighbours = 1  # the processes on this machine, within alone()


def setup_dist(init_timeout_s=INIT_TIMEOUT_S):
    """
    Join (or create) the default process group. Calling it again is a no-op.
    The group is destroyed by :func:`cleanup`, at the latest at exit.

    Ranks come from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), else from MPI when an MPI launcher is detected,
    else the process runs alone as a group of one. The backend is "nccl" when
    CUDA is available, else "gloo". Each process binds the GPU
    ``local_rank % device_count`` before the group starts, from the launcher's own
    local rank. Under MPI, when OMP_NUM_THREADS is not set, each process takes its
    share of the machine's CPU cores (see :func:`setup_notes`).

    :param init_timeout_s: seconds to wait for every rank to join before
        giving up with an error.
    """
    global _local_rank, _cleanup_registered, _notes
    if dist.is_initialized():
        return
    if not _cleanup_registered:
        # Exit handlers run last in, first out, all before the interpreter starts
        # to shut down and before mpi4py's MPI_Finalize (a C-level Py_AtExit
        # hook): cleanup, then _release_groups, on every exit path.
        atexit.register(_release_groups)
        atexit.register(cleanup)
        _cleanup_registered = True
    timeout = datetime.timedelta(seconds=init_timeout_s)
    _notes = []
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        # torchrun sets OMP_NUM_THREADS=1 itself, unless the user set it.
        _local_rank = int(os.environ.get("LOCAL_RANK", 0))
        store = _rendezvous("env://", rank, world_size, timeout)
    elif any(name in os.environ for name in _MPI_ENV_VARS):
        init_method, rank, world_size, _local_rank, local_size = _address_from_mpi()
        _notes = _share_cpu_threads(local_size)
        store = _rendezvous(init_method, rank, world_size, timeout)
    else:
        # An in-process store: a group of one needs no socket and cannot hang.
        rank, world_size, _local_rank = 0, 1, 0
        store = dist.HashStore()
        store.set_timeout(timeout)

    # The local rank is known from the launcher, so dev() is this process's GPU
    # already: NCCL's communicator and the model must be on the same one.
    device = dev()
    use_cuda = device.type == "cuda"
    if use_cuda:
        th.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if use_cuda else None,
    )
    # Later lookups in the store (NCCL connects lazily per peer) must not
    # inherit the short start-up deadline.
    store.set_timeout(COLLECTIVE_TIMEOUT)


def _rendezvous(init_method, rank, world_size, timeout):
    try:
        store, _, _ = next(
            dist.rendezvous(
                init_method, rank=rank, world_size=world_size, timeout=timeout
            )
        )
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"rank {rank} of {world_size} could not start the process group through "
            f"{init_method} within {timeout.total_seconds():g} s: check that every "
            "rank was started (the -n / --nproc_per_node count) and that "
            "MASTER_ADDR/MASTER_PORT (torchrun) or the hosts (mpiexec) are reachable"
        ) from err
    return store


def _address_from_mpi():
    """
    Use MPI only to agree on a TCP address for torch's own rendezvous.

    :return: (init_method, rank, world_size, local_rank, local_size).
    """
    # Imported here so that a plain process never needs an MPI library.
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    local_rank, local_size = _local_rank_from_mpi(comm, MPI)
    hostnames = comm.allgather(socket.gethostname())
    if rank == 0:
        # On one machine the loopback interface always works, whatever the
        # hostname resolves to; across machines the peers resolve rank 0's name.
        host = "127.0.0.1" if len(set(hostnames)) == 1 else hostnames[0]
        address = (host, _free_port())
    else:
        address = None
    host, port = comm.bcast(address, root=0)
    return f"tcp://{host}:{port}", rank, world_size, local_rank, local_size


def _local_rank_from_mpi(comm, MPI):
    """
    :return: (local_rank, local_size): this process's rank among the ranks on its
        machine, and their number.
    """
    # MPICH's Hydra, then Open MPI; other launchers (srun, Intel MPI) are asked
    # through a split of the world by shared memory, a collective every rank joins
    # (all ranks are started by the same launcher, so all take the same branch).
    for rank_name, size_name in (
        ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ):
        if rank_name in os.environ and size_name in os.environ:
            return int(os.environ[rank_name]), int(os.environ[size_name])
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    return local_rank, local_size


def _share_cpu_threads(local_size):
    """
    Give this process its share of the machine's cores when the user has not set
    OMP_NUM_THREADS: mpiexec sets nothing, and ``local_size`` processes that each
    start a thread per core would fight over them.

    :param local_size: the number of processes on this machine.
    :return: the lines to log (none when nothing was changed).
    """
    if "OMP_NUM_THREADS" in os.environ or local_size <= 1:
        return []
    cores = os.cpu_count() or 1
    # Never more than torch would start for one process, nor than the cores a
    # launcher that pins each rank left it.
    limit = th.get_num_threads()
    if hasattr(os, "sched_getaffinity"):
        limit = min(limit, len(os.sched_getaffinity(0)))
    threads = max(1, min(limit, cores // local_size))
    th.set_num_threads(threads)
    return [
        f"{threads} CPU thread{'s' if threads > 1 else ''} per process: "
        f"OMP_NUM_THREADS is not set, and {local_size} processes share this "
        f"machine's {cores} cores (set OMP_NUM_THREADS to choose)"
    ]


def setup_notes():
    """
    What :func:`setup_dist` decided that the run's log should say (the CPU threads
    of each process under MPI), as lines; setup_dist runs before a logger exists.
    """
    return list(_notes)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _is_multi_process():
    return get_world_size() > 1


@contextlib.contextmanager
def alone(neighbours=1):
    """
    Within it this process runs as if it were the only one: :func:`get_rank` 0,
    :func:`get_world_size` 1, :func:`is_main_process` True, and the collectives
    here (:func:`barrier`, :func:`broadcast_object`, :func:`all_gather_object`,
    :func:`sync_params`) return at once; so each rank can run a whole job of its own
    (a scene of an archive) while the group lives on for what the ranks do
    together after it. The device stays this process's (:func:`dev`).

    :param neighbours: the processes on this machine, this one included, each
        running a job of its own (:func:`processes_on_this_machine`, taken before:
        it is a collective), for what they share (the memory).
    """
    global _alone, _neighbours
    before = _alone, _neighbours
    _alone, _neighbours = True, neighbours
    try:
        yield
    finally:
        _alone, _neighbours = before


def processes_on_this_machine():
    """
    The processes of the group on this machine (by host name), this one included:
    a collective every process calls; within :func:`alone`, the count it was given.
    """
    if _alone:
        return _neighbours
    here = socket.gethostname()
    return sum(name == here for name in all_gather_object(here))


class FailedElsewhere(RuntimeError):
    """A step that one process ran for all of them failed there (its one line)."""


def on_main_process(work):
    """
    Run ``work()`` on the main process while the others wait, and take the same way
    out on every process: its error is raised where it happened and, as
    :class:`FailedElsewhere` naming the rank, on the others (a bare barrier after it
    would leave them waiting for a process that raised).
    """
    error = None
    if is_main_process():
        try:
            work()
        except Exception as err:  # every error: the others must hear of it
            error = err
    found = problem_anywhere(None if error is None else str(error) or type(error).__name__)
    if error is not None:
        raise error
    if found is not None:
        raise FailedElsewhere(f"on rank {found[0]}: {found[1]}")


def dev():
    """
    The device this process computes on: ``cuda:(local_rank % device_count)``
    when CUDA is available, else the CPU. The local rank is the launcher's, known
    from the start of :func:`setup_dist` (0 before it).
    """
    if th.cuda.is_available():
        return th.device("cuda", _local_rank % th.cuda.device_count())
    return th.device("cpu")


def configure_numerics(*, use_tf32=False, cudnn_benchmark=False):
    """
    Set how float32 arithmetic runs on CUDA devices, for this process (a no-op for
    the numbers on a CPU).

    :param use_tf32: TensorFloat-32 in float32 matrix products and convolutions
        (Ampere or newer): faster, with a 10-bit mantissa. False gives IEEE float32
        in both; note that PyTorch's own default lets convolutions use TF32.
    :param cudnn_benchmark: let cuDNN time its algorithms at the first call of each
        input shape and keep the fastest: right for runs whose shapes do not change
        (training, a folder at a fixed batch size), a cost at every new shape.
    """
    precision = "tf32" if use_tf32 else "ieee"
    if hasattr(th.backends.cuda.matmul, "fp32_precision"):  # PyTorch 2.9 and newer
        th.backends.cuda.matmul.fp32_precision = precision
        th.backends.cudnn.conv.fp32_precision = precision
    else:
        th.backends.cuda.matmul.allow_tf32 = use_tf32
        th.backends.cudnn.allow_tf32 = use_tf32
    th.backends.cudnn.benchmark = bool(cudnn_benchmark)


def get_rank():
    """Global rank of this process (0 before :func:`setup_dist` and inside :func:`alone`)."""
    if _alone:
        return 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_world_size():
    """Number of processes in the group (1 before :func:`setup_dist` and inside
    :func:`alone`)."""
    if _alone:
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_local_rank():
    """Rank of this process among those on the same machine."""
    return _local_rank if dist.is_available() and dist.is_initialized() else 0


def is_main_process():
    """True on rank 0, the process that writes files and prints."""
    return get_rank() == 0


def barrier():
    """Wait until every rank gets here (no-op for a single process)."""
    if _is_multi_process():
        dist.barrier()


def cleanup():
    """
    Destroy the process group, if any; :func:`setup_dist` may be called again.

    Safe to call more than once, and called at exit if a script does not. No
    collective can run after it; the group's threads stop when the exit
    handlers run, before the interpreter shuts down.
    """
    global _local_rank, _notes
    if dist.is_available() and dist.is_initialized():
        _retired_groups.append(dist.group.WORLD)
        dist.destroy_process_group()
    _local_rank = 0
    _notes = []


def _release_groups():
    """
    Drop the groups :func:`cleanup` destroyed, after the script dropped its own
    references (a DistributedDataParallel model) and before shutdown.

    Whoever drops the last reference to a group runs its destructor, which joins
    gloo's worker threads; such a thread may be waiting for the GIL, to free the
    Python tensors of a collective it finished. The DDP model's reducer keeps
    the GIL while it joins (a deadlock); the Python group object releases it
    first, so ours must be the last reference. Later, during interpreter
    shutdown, that thread would be ended inside the tensor's destructor
    ("terminate called without an active exception").
    """
    _retired_groups.clear()


def load_state_dict(path, map_location="cpu"):
    """
    Load a checkpoint that holds only tensors and plain containers.

    Every rank reads the file itself. Files that need arbitrary Python objects
    are refused, since unpickling them can run any code.

    :param path: the checkpoint file.
    :param map_location: where to put the tensors, as in :func:`torch.load`.
    :return: the loaded object, usually a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: check the path "
            "(--resume_checkpoint, --model_path) and the current directory"
        )
    try:
        return th.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise _unreadable(path, err) from err
        raise ValueError(
            f"{path} stores Python objects, not just tensors (it needs "
            f"{found.group(1)}): it cannot be loaded safely. If you trust its "
            "origin, load it once with torch.load(path, weights_only=False) and "
            "save only the state dict (th.save(model.state_dict(), path))."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path, err):
    return ValueError(
        f"{path} could not be read as a PyTorch checkpoint "
        f"({type(err).__name__}: {str(err).splitlines()[0]}): it may be truncated, "
        "still being written, or not a file made by torch.save; copy or save it again"
    )


def sync_params(params):
    """
    Copy rank 0's values into every rank's tensors, in place.

    :param params: an iterable of tensors (e.g. ``model.parameters()``).
    """
    if not _is_multi_process():
        return
    with th.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def broadcast_object(obj):
    """
    :param obj: any picklable object; only rank 0's value matters.
    :return: rank 0's ``obj`` on every rank.
    """
    if not _is_multi_process():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, group=None):
    """
    :param obj: any picklable object.
    :param group: the group to gather over (:func:`patient_group`); None: all
        processes, within :data:`COLLECTIVE_TIMEOUT`.
    :return: a list with every rank's ``obj``, indexed by rank.
    """
    if not _is_multi_process():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def patient_group():
    """
    Every process, in a group whose collectives wait up to :data:`PATIENT_TIMEOUT`
    (on gloo, so objects never pass through a GPU): for processes that meet after
    unequal work, such as ranks that translated different scenes of an archive
    alone, where the default group's :data:`COLLECTIVE_TIMEOUT` would end the run
    of a rank that waits for a long scene elsewhere. A collective: every process
    calls it. None for a single process.
    """
    if not _is_multi_process():
        return None
    return dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)


def problem_anywhere(problem):
    """
    What went wrong on any rank, so that all of them take the same way out of a job
    (one rank raising while the others wait in a collective would hang them).
    A collective: every rank calls it, with None when all went well on it.

    :param problem: this rank's one-line message, or None.
    :return: None when every rank gave None; else (rank, message) of the first rank
        that gave one.
    """
    for rank, seen in enumerate(all_gather_object(problem)):
        if seen is not None:
            return rank, seen
    return None
