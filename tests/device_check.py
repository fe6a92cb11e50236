"""
Device mistakes and host syncs, caught on a machine without a GPU.

A test runs the model on PyTorch's ``meta`` device (tensors with shapes and
dtypes but no data) inside :class:`DeviceCheck`, which stands in for a GPU:

* an operation whose tensor arguments sit on two devices raises
  :class:`DeviceMismatch` (a 0-dimensional CPU tensor aside: a device kernel
  takes it as a scalar argument, as CUDA does). Neither device alone shows
  this on a CPU-only torch: a convolution with meta weights accepts a CPU
  input, and a CPU table indexed by a meta index passes;
* every read of a device value on the host (``.item()``, ``bool(t)``,
  ``.tolist()``, ``.cpu()``: ``aten._local_scalar_dense`` and copies to the
  CPU) is counted and answered with a stand-in value, since a meta tensor has
  none (see :class:`DeviceCheck` for which);
* every copy from the host to the device is counted, blocking and non-blocking
  apart: on a GPU a blocking one waits for the work queued before it, a
  non-blocking one from pinned memory does not. Copies made by
  ``th.tensor(..., device=)``, ``th.as_tensor`` and ``Tensor.new_tensor``,
  which do not pass through the dispatcher, are counted at the Python call.
"""

import contextlib

import torch as th
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = th.ops.aten

# Operations that move data between devices on purpose; counted, never refused.
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default}
# Factories that copy Python or numpy data to the device they are given.
_DATA_FACTORIES = {th.tensor, th.as_tensor}


class DeviceMismatch(RuntimeError):
    """One operation got tensors on two devices."""


def _is_host_scalar(t):
    return t.device.type == "cpu" and t.dim() == 0


def _devices(tensors):
    return {t.device for t in tensors if not _is_host_scalar(t)}


class _Counts:
    """What a run did between the host and the device."""

    def __init__(self):
        self.host_reads = 0
        self.blocking_uploads = 0
        self.non_blocking_uploads = 0
        self.non_blocking_downloads = 0
        self.reads = []  # a short description of each host read, for messages

    def as_dict(self):
        return {
            "host_reads": self.host_reads,
            "blocking_uploads": self.blocking_uploads,
            "non_blocking_uploads": self.non_blocking_uploads,
            "non_blocking_downloads": self.non_blocking_downloads,
        }


class _DispatchCheck(TorchDispatchMode):
    def __init__(self, counts, scalar):
        super().__init__()
        self.counts = counts
        self.scalar = scalar

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [
            a for a in tree_flatten((args, kwargs))[0] if isinstance(a, th.Tensor)
        ]
        if func is aten._local_scalar_dense.default:
            (x,) = args
            if x.device.type == "cpu":
                return func(*args, **kwargs)
            self.counts.host_reads += 1
            self.counts.reads.append(f"{x.dtype} value read with .item()")
            return self.scalar(x.dtype)
        if func in _COPIES:
            return self._copy(func, args, kwargs)
        devices = _devices(tensors)
        if len(devices) > 1:
            shown = ", ".join(
                f"{tuple(t.shape)} on {t.device}"
                for t in tensors
                if not _is_host_scalar(t)
            )
            raise DeviceMismatch(f"{func} got tensors on two devices: {shown}")
        return func(*args, **kwargs)

    def _copy(self, func, args, kwargs):
        if func is aten._to_copy.default:
            src = args[0]
            target = kwargs.get("device") or src.device
            non_blocking = kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            dst, src = args[:2]
            target = dst.device
            non_blocking = (
                args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            )
        else:  # _copy_from(src, dst, non_blocking)
            src, dst = args[:2]
            target = dst.device
            non_blocking = (
                args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            )
        target = th.device(target)
        if src.device == target:
            return func(*args, **kwargs)
        if src.device.type == "cpu":
            if non_blocking:
                self.counts.non_blocking_uploads += 1
            else:
                self.counts.blocking_uploads += 1
            return func(*args, **kwargs)
        if target.type != "cpu":
            raise DeviceMismatch(f"{func} copies from {src.device} to {target}")
        # to the host: a meta tensor has no values to copy, so zeros stand in
        if non_blocking:
            self.counts.non_blocking_downloads += 1
        else:
            self.counts.host_reads += 1
            self.counts.reads.append(f"{tuple(src.shape)} copied to the host")
        if func is aten._to_copy.default:
            dtype = kwargs.get("dtype") or src.dtype
            return th.zeros(src.shape, dtype=dtype, device="cpu")
        return dst


def _check_generators(func, args, kwargs, tensors):
    """
    A random function draws on its generator's device: CUDA refuses a CPU
    generator. Checked at the Python call, where a :class:`MetaGenerator` is
    still itself (the dispatcher sees a new wrapper of it).
    """
    generators = [a for a in (*args, *kwargs.values()) if isinstance(a, th.Generator)]
    if not generators:
        return
    device = kwargs.get("device")
    devices = {th.device(device)} if device is not None else _devices(tensors)
    for g in generators:
        if devices and {generator_device(g)} != {th.device(d) for d in devices}:
            raise DeviceMismatch(
                f"{func} draws on {devices.pop()} from a generator on {generator_device(g)}"
            )


def generator_device(g):
    """The device a generator stands for (see :class:`MetaGenerator`)."""
    return getattr(g, "stands_for", g.device)


class MetaGenerator(th.Generator):
    """
    ``th.Generator`` for tests that put dist_util.dev() on meta, where PyTorch
    has no generator: one asked for on meta draws on the host and counts, for
    the checker, as a generator on meta.
    """

    def __new__(cls, device=None):
        on_meta = device is not None and th.device(device).type == "meta"
        g = super().__new__(cls, device="cpu" if on_meta else (device or "cpu"))
        if on_meta:
            g.stands_for = th.device("meta")
        return g

    def __init__(self, device=None):
        pass


class _FunctionCheck(TorchFunctionMode):
    """Counts the host-to-device copies that bypass the dispatcher."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [
            a for a in tree_flatten((args, kwargs))[0] if isinstance(a, th.Tensor)
        ]
        _check_generators(func, args, kwargs, tensors)
        if func in _DATA_FACTORIES or func is th.Tensor.new_tensor:
            if func is th.Tensor.new_tensor:
                data, device = args[1], kwargs.get("device") or args[0].device
            else:
                data, device = args[0], kwargs.get("device")
            already_there = isinstance(data, th.Tensor) and (
                device is None or data.device == th.device(device)
            )
            if (
                device is not None
                and th.device(device).type != "cpu"
                and not already_there
            ):
                self.counts.blocking_uploads += 1
        return func(*args, **kwargs)


def _default_scalar(dtype):
    # True keeps a finiteness check passing; 0 reads as "no stop flag" and as a
    # valid index
    if dtype == th.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return 0.0
    return 0


class DeviceCheck(contextlib.AbstractContextManager):
    """
    Refuse operations on tensors of two devices; count host reads and copies.

    Use it with the model and its inputs on ``th.device("meta")``::

        with DeviceCheck() as check:
            model(x_meta, t_meta)
        assert check.host_reads == 0

    :param scalar: dtype -> the Python value a host read of a device value
        returns (a meta tensor has none): by default True for a bool, else 0.
    """

    def __init__(self, scalar=_default_scalar):
        self.counts = _Counts()
        self._scalar = scalar
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_FunctionCheck(self.counts))
        self._stack.enter_context(_DispatchCheck(self.counts, self._scalar))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def reset(self):
        """Start counting again from zero."""
        self.counts.__init__()

    def __getattr__(self, name):
        # host_reads, blocking_uploads, ...: the counts so far
        if name in ("counts", "_scalar", "_stack"):
            raise AttributeError(name)
        return getattr(self.counts, name)

    def snapshot(self):
        """The counts so far, as a dict."""
        return self.counts.as_dict()
