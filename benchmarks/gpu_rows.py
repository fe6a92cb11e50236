"""
The GPU rows of benchmarks/RESULTS.md in one prepared run, made to fit 8 minutes on
one H100 (``--budget_s``). The rows run one after the other in a process the run
watches; each has its own time limit and is printed, and appended to the results
file, as soon as it is measured, so that a run cut short still reports what it got.
A row that fails or runs past its limit is reported as such, and the rows after it
go on in a fresh process.

    bash benchmarks/gpu_rows.sh                        # on a machine with a CUDA GPU
    bash benchmarks/gpu_rows.sh --dry_run --results ''   # anywhere, in seconds
    bash benchmarks/gpu_rows.sh --only noise,syncs     # some rows again

The rows, in order:

* ``train_*``: the paper configuration's training step (TrainLoop.run_step, batch
  6, the paper's per-rank batch) in images/s and as a fraction of the GPU's dense
  bf16 peak, for fp32 (IEEE, the project's default), fp32 with TF32, fp16, bf16,
  bf16 with sdpa, channels_last and the fused optimiser, and last the same with
  torch.compile (a limit of its own, and whatever the budget has left);
* ``sample_*``: one network call on a 64-tile, 256 px scene batch with the paper's
  model through samplers.Denoiser: tiles/s and peak memory, fp32 and bf16 with levers;
* ``noise``: a tiny model, a seed and two names on the CPU and on the GPU: the noise
  the per-image generators give, to the bit, and the decoded images of DDPM, DDIM
  and DPM-Solver++ within GREY_LEVEL_TOLERANCE (TF32 off) or
  TF32_GREY_LEVEL_TOLERANCE (TF32 on);
* ``syncs``: host syncs per training step and per sampler step, counted as the
  warnings of torch.cuda.set_sync_debug_mode("warn");
* ``sdpa``: which scaled_dot_product_attention kernel ran for each sequence length
  of the paper's U-Net with use_sdpa (torch.profiler).

``--dry_run`` runs every row on the CPU with the tiny model (compile and fp16 left
out, the sync count skipped: each says so; the CPU against itself in place of the
GPU), so that a typo does not cost a lent GPU's minutes; tests/test_gpu_rows.py
runs it.
"""

import argparse
import collections
import copy
import gc
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import common
import numpy as np
import torch as th

# Forward FLOPs of the paper's U-Net (common.CONFIGS["paper"], 6 input channels) for
# one 256 px image, counted once on the CPU with unet_forward_flops (FlopCounterMode
# over a batch-1 forward in float32; a multiply-add is 2 FLOPs): convolutions
# 664.39 G, attention products 1.01 G, linear layers 0.03 G. GroupNorm, SiLU and
# additions are not counted, as usual for a model-FLOPs utilisation.
# tests/test_gpu_rows.py counts it again.
PAPER_FORWARD_FLOPS = 665_429_606_400
# A training step is a forward and a backward pass, the backward about twice the
# forward (gradients of the activations and of the weights): 3 forwards per image.
TRAIN_STEP_FORWARDS = 3

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, looked up by the name
# torch.cuda.get_device_name gives ("NVIDIA H100 80GB HBM3" is the SXM board), most
# specific first. NVIDIA's datasheet gives the figures with sparsity (H100 SXM 1,979,
# H100 PCIe 1,513) and says dense is half (as tabled at
# https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html); dense H100 SXM
# 989.4 at https://glennklockwood.com/garden/processors/h100; the H200 (SXM) is the
# same GH100 at the same clocks with more memory, dense bf16 ~989
# (https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html). NVL boards
# run at lower clocks and are left out: their fraction of the peak reads "n/a".
BF16_PEAK_TFLOPS = (
    (("H100", "PCIe"), 756.5),
    (("H100",), 989.4),
    (("H200",), 989.4),
)

# Largest difference, in grey levels of the decoded uint8 images, allowed between
# the CPU and the GPU for the same weights, seed and name (the noise itself must be
# equal to the bit). With TF32 off, float32 kernels that sum in other orders move
# the images by about 1e-4 grey level (measured on the CPU by summing the
# convolutions and matrix products in float64 instead), so a difference is a pixel
# that flips at a rounding boundary: at most 1 level. With TF32 (a 10-bit
# mantissa, simulated on the CPU by rounding the inputs of every convolution and
# matrix product) DDPM, DDIM and DPM-Solver++ at 8 to 50 steps moved by at most
# 0.03 grey level before rounding, 1 level after it on 0.4 % of pixels; 2 levels
# leave room for cuDNN's own algorithm choices under benchmark mode.
GREY_LEVEL_TOLERANCE = 1
TF32_GREY_LEVEL_TOLERANCE = 2

TRAIN_BATCH = 6  # the paper's per-rank batch (DESIGN section 1, train.sh)
SCENE_TILES = 64  # tiles per network call of a scene and of the web page
DRY_RUN_TILES = 8
BUDGET_S = 480  # the whole run; the compile row gets what the others leave
MIN_ROW_S = 30  # a row with less than this left of the budget is not started
SEED = 0
NAMES = ("scene_a/tile_0000.tif", "scene_a/tile_0001.tif")
RESULT_PREFIX = "RESULT "


class Row:
    """
    One row of the run.

    :param name: its name for --only.
    :param what: the first column: what is measured.
    :param setting: the second column: the variant.
    :param limit_s: its time limit in seconds (the budget may cut it shorter).
    :param options: keyword arguments of its function, as JSON.
    :param dry_run: "run", or why the dry run leaves it out.
    """

    def __init__(self, name, what, setting, limit_s, options, dry_run="run"):
        self.name = name
        self.what = what
        self.setting = setting
        self.limit_s = limit_s
        self.options = options
        self.dry_run = dry_run


ROWS = [
    Row(
        "train_fp32",
        "training step",
        "fp32 (IEEE, TF32 off)",
        90,
        dict(precision="fp32"),
    ),
    Row("train_tf32", "training step", "fp32 with TF32", 60, dict(precision="tf32")),
    Row(
        "train_fp16",
        "training step",
        "fp16, loss scaling",
        60,
        dict(precision="fp16"),
        dry_run="float16 convolutions take seconds per step of the tiny model on a CPU",
    ),
    Row("train_bf16", "training step", "bf16", 60, dict(precision="bf16")),
    Row(
        "train_levers",
        "training step",
        "bf16, sdpa, channels_last, fused optim",
        60,
        dict(precision="bf16", levers=["sdpa", "channels_last", "fused_optim"]),
    ),
    Row("sample_fp32", "scene batch", "fp32", 60, dict(precision="fp32")),
    Row(
        "sample_levers",
        "scene batch",
        "bf16, sdpa, channels_last",
        60,
        dict(precision="bf16", levers=["sdpa", "channels_last"]),
    ),
    Row("noise", "CPU against GPU", f"seed {SEED}, {len(NAMES)} names", 60, {}),
    Row("syncs", "host syncs", "sync debug mode", 60, {}),
    Row("sdpa", "SDPA kernel", "use_sdpa, batch 2", 45, {}),
    Row(
        "train_compile",
        "training step",
        "bf16, every lever, compile",
        300,
        dict(
            precision="bf16", levers=["sdpa", "channels_last", "fused_optim", "compile"]
        ),
        dry_run="compiling takes minutes on a CPU",
    ),
]
ROW_NAMES = [row.name for row in ROWS]


# -- figures shared with the tests -----------------------------------------------------


def unet_forward_flops(flags, device="meta"):
    """
    FLOPs of one U-Net forward pass on one image, as FlopCounterMode counts them.

    :param flags: model flags for create_model_and_diffusion (common.CONFIGS).
    :param device: "meta" counts from the shapes alone (the paper's model in a
        second); "cpu" runs the pass (seconds).
    :return: an int.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from guided_diffusion.script_util import create_model_and_diffusion

    with th.device(device):
        model, _ = create_model_and_diffusion(**flags)
    size = flags["image_size"]
    x = th.zeros(1, 6, size, size, device=device)
    t = th.zeros(1, dtype=th.long, device=device)
    with FlopCounterMode(display=False) as counter, th.no_grad():
        model(x, t)
    return counter.get_total_flops()


def bf16_peak_tflops(device_name):
    """The dense bf16 peak of a GPU named ``device_name``, or None when not tabled."""
    if "NVL" in device_name:
        return None
    for words, peak in BF16_PEAK_TFLOPS:
        if all(word in device_name for word in words):
            return peak
    return None


def share_of_peak(tflops, device_name):
    """
    TFLOP/s as a share of a GPU's dense bf16 peak, as text.

    :param device_name: torch.cuda.get_device_name's, or None on a CPU.
    """
    if device_name is None:
        return "n/a on a CPU"
    top = bf16_peak_tflops(device_name)
    if top is None:
        return f"n/a (no bf16 peak tabled for {device_name})"
    return f"{100 * tflops / top:.1f}% of {device_name}'s bf16 peak"


def sdpa_backend(op_name):
    """The backend an aten scaled_dot_product op name stands for, or None."""
    kernels = (
        ("flash_attention_for_cpu", "flash (CPU)"),
        ("flash_attention", "flash"),
        ("efficient_attention", "memory-efficient"),
        ("cudnn_attention", "cuDNN"),
        ("attention_math", "math"),
        ("overrideable", "overrideable"),
    )
    if not op_name.startswith("aten::_scaled_dot_product"):
        return None
    for key, backend in kernels:
        if key in op_name:
            return backend
    return op_name


# -- the rows, measured in the rows' process ---------------------------------------------


def setup(dry_run):
    """The device of a row's process and the model config it measures."""
    from guided_diffusion import dist_util

    dist_util.setup_dist()
    device = th.device("cpu") if dry_run else dist_util.dev()
    return device, ("tiny" if dry_run else "paper")


def numerics(use_tf32=False):
    """TF32 as asked, cuDNN's benchmark mode on (fixed shapes, as in training)."""
    from guided_diffusion import dist_util

    dist_util.configure_numerics(use_tf32=use_tf32, cudnn_benchmark=True)


def peak_memory(device):
    """
    Peak memory from now on: on a GPU, torch.cuda.max_memory_allocated less what
    was allocated before (so that anything an earlier row left does not count), on
    a CPU the process's peak resident set (reset through /proc/self/clear_refs on
    Linux).

    :return: a function that reads the peak in MiB.
    """
    before = th.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0
    memory = common.PeakMemory(device)
    memory.start_window()

    def read():
        life, window = memory.read()
        return (life if window is None else window) - before

    return read


def make_loop(config, device, batch_size, precision="fp32", levers=(), seed=0):
    """
    A TrainLoop on ``config`` with a variant's settings, and a batch for it (on the
    host, as the data loader gives it).

    :param precision: "fp32" (IEEE), "tf32" (float32 with TF32), "fp16" or "bf16".
    :param levers: names of common.LEVERS to switch on.
    """
    from guided_diffusion.script_util import create_model_and_diffusion
    from guided_diffusion.train_util import TrainLoop

    th.manual_seed(seed)
    # Built on the device: initialising the paper's weights on a CPU takes seconds.
    with th.device(device):
        model, diffusion = create_model_and_diffusion(
            **common.CONFIGS[config],
            use_sdpa="sdpa" in levers,
            use_fp16=precision == "fp16",
        )
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=None,  # run_step is given the batches
        batch_size=batch_size,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10**9,
        save_interval=10**9,
        resume_checkpoint="",
        use_fp16=precision == "fp16",
        use_bf16=precision == "bf16",
        use_tf32=precision == "tf32",  # TrainLoop applies it, cuDNN benchmark mode on
        channels_last="channels_last" in levers,
        compile="compile" in levers,
        fused_optim="fused_optim" in levers,
    )
    size = common.CONFIGS[config]["image_size"]
    gen = th.Generator().manual_seed(seed)
    batch = th.rand(batch_size, 6, size, size, generator=gen) * 2 - 1
    return loop, batch


def train_row(dry_run, precision, levers=()):
    """Images/s of training steps, TFLOP/s and the fraction of the bf16 peak."""
    device, config = setup(dry_run)
    batch_size = 2 if dry_run else TRAIN_BATCH
    warmup, steps = (1, 1) if dry_run else (3, 10)
    peak = peak_memory(device)
    loop, batch = make_loop(config, device, batch_size, precision, levers)
    start = time.perf_counter()
    for _ in range(warmup):
        loop.run_step(batch, {})
    common.synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loop.run_step(batch, {})
    common.synchronize(device)
    step_s = (time.perf_counter() - start) / steps

    flops = (
        PAPER_FORWARD_FLOPS
        if config == "paper"
        else unet_forward_flops(common.CONFIGS[config])
    )
    images_per_s = batch_size / step_s
    tflops = images_per_s * TRAIN_STEP_FORWARDS * flops / 1e12
    name = th.cuda.get_device_name(device) if device.type == "cuda" else None
    text = (
        f"{images_per_s:.2f} images/s ({step_s:.3f} s per step of {batch_size}); "
        f"{tflops:.3g} TFLOP/s, {share_of_peak(tflops, name)}; peak {peak():.0f} MiB; "
        f"warm-up: {warmup} step{'' if warmup == 1 else 's'} in {warmup_s:.1f} s"
    )
    return [(None, text)], {"images_per_s": images_per_s, "tflops": tflops}


def sample_row(dry_run, precision, levers=()):
    """One network call on a batch of scene tiles: tiles/s and peak memory."""
    from guided_diffusion.base import samplers
    from guided_diffusion.script_util import create_model_and_diffusion
    from guided_diffusion.translation.sampling import Bfloat16Model, prepare_model

    device, config = setup(dry_run)
    numerics()
    tiles = DRY_RUN_TILES if dry_run else SCENE_TILES
    warmup, calls = (1, 1) if dry_run else (2, 5)
    peak = peak_memory(device)
    th.manual_seed(0)
    with th.device(device):
        model, diffusion = create_model_and_diffusion(
            **common.CONFIGS[config], timestep_respacing="20", use_sdpa="sdpa" in levers
        )
    model = prepare_model(model.eval(), channels_last="channels_last" in levers)
    net = Bfloat16Model(model) if precision == "bf16" else model
    size = common.CONFIGS[config]["image_size"]
    gen = th.Generator().manual_seed(0)
    sar = (th.rand(tiles, 3, size, size, generator=gen) * 2 - 1).to(device)
    x = th.randn(tiles, 3, size, size, generator=gen).to(device)
    denoiser = samplers.Denoiser(diffusion, net, condition=sar)
    t = diffusion.num_timesteps // 2
    for _ in range(warmup):
        denoiser(x, t)
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        denoiser(x, t)
    common.synchronize(device)
    call_s = (time.perf_counter() - start) / calls
    text = (
        f"{tiles / call_s:.1f} tiles/s ({1000 * call_s:.0f} ms per call of {tiles} "
        f"tiles of {size} px); peak {peak():.0f} MiB"
    )
    return [(None, text)], {"tiles_per_s": tiles / call_s}


class _FirstInput(th.nn.Module):
    """A stand-in for the U-Net that keeps its first input's x_t and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.x_T = None

    def forward(self, x, t, **kwargs):
        if self.x_T is None:
            self.x_T = x[:, :3].detach().to("cpu", copy=True)
        return th.zeros_like(x[:, :3])


class _NoiseOut:
    """
    A denoiser whose DDPM step returns that step's noise itself: mean 0 and variance
    1 make x_{t-1} = 0 + 1 * z exactly, whatever the device's arithmetic.
    """

    def __init__(self, steps):
        self.alphas_cumprod = np.linspace(0.99, 0.01, steps)

    def __call__(self, x, t):
        zeros = th.zeros_like(x)
        return {
            "mean": zeros,
            "variance": th.ones_like(x),
            "log_variance": zeros,
            "pred_xstart": zeros,
            "eps": zeros,
        }


def drawn_noise(device, diffusion):
    """
    The noise the per-image generators give on ``device``: x_T as translate draws
    it, then the noise of every DDPM step but the last (masked out there).

    :return: a float32 CPU tensor of every number, concatenated.
    """
    from guided_diffusion.base import samplers
    from guided_diffusion.translation.sampling import make_generators, translate

    size = 32
    sar = th.zeros(len(NAMES), 3, size, size, device=device)
    probe = _FirstInput()
    translate(
        probe, diffusion, sar, sampler="ddim", generators=make_generators(SEED, NAMES)
    )
    steps, seen = 10, []
    samplers.run(
        "ddpm",
        _NoiseOut(steps),
        th.zeros(len(NAMES), 3, size, size, device=device),
        range(steps - 1, -1, -1),
        generator=make_generators(SEED, NAMES),
        callback=lambda i, out: seen.append(out["sample"].to("cpu")),
    )
    return th.cat([probe.x_T.flatten(), *(s.flatten() for s in seen[:-1])])


def noise_row(dry_run):
    """The same noise to the bit, and images within tolerance, on the CPU and the GPU."""
    from guided_diffusion.script_util import create_model_and_diffusion
    from guided_diffusion.translation.sampling import (
        make_generators,
        to_uint8,
        translate,
    )

    device, _ = setup(dry_run)
    numerics(use_tf32=False)
    cpu = th.device("cpu")
    other = "CPU again (dry run)" if dry_run else th.cuda.get_device_name(device)
    model, diffusion = create_model_and_diffusion(
        **common.CONFIGS["tiny"], timestep_respacing="10"
    )
    # Random weights: the output layers start at zero, which would make every
    # sampler's result the same and the comparison trivial.
    gen = th.Generator().manual_seed(1)
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn(p.shape, generator=gen) * 0.05)

    a, b = drawn_noise(cpu, diffusion), drawn_noise(device, diffusion)
    differing = int((a.view(th.int32) != b.view(th.int32)).sum())
    lines = [
        (
            "noise",
            f"{a.numel()} numbers (x_T and 9 DDPM steps of {len(NAMES)} images), CPU "
            f"against {other}: {differing} differ in any bit",
        )
    ]
    sar = th.rand(len(NAMES), 3, 32, 32, generator=gen) * 2 - 1
    on_device = copy.deepcopy(model).to(device)

    def images(net, where, sampler):
        out = translate(
            net,
            diffusion,
            sar.to(where),
            sampler=sampler,
            generators=make_generators(SEED, NAMES),
        )
        return to_uint8(out).astype(np.int16)

    sampler_names = ("ddpm", "ddim", "dpm++2m")
    on_cpu = {s: images(model, cpu, s) for s in sampler_names}
    figures = {"differing_noise": differing}
    # TF32 on is for information; it changes nothing on a CPU, where the dry run
    # runs it all the same to check the code.
    for use_tf32 in (False, True):
        numerics(use_tf32=use_tf32)
        worst = {
            s: int(np.abs(on_cpu[s] - images(on_device, device, s)).max())
            for s in sampler_names
        }
        figures.update(
            {f"{s}{'_tf32' if use_tf32 else ''}": v for s, v in worst.items()}
        )
        parts = ", ".join(f"{s} {v}" for s, v in worst.items())
        limit = TF32_GREY_LEVEL_TOLERANCE if use_tf32 else GREY_LEVEL_TOLERANCE
        verdict = "within" if max(worst.values()) <= limit else "OUTSIDE"
        note = "; TF32 has no effect on a CPU" if use_tf32 and dry_run else ""
        lines.append(
            (
                f"images, TF32 {'on' if use_tf32 else 'off'}",
                f"max grey-level difference {parts}: {verdict} the tolerance of "
                f"{limit} (10 steps, 32 px, {len(NAMES)} images{note})",
            )
        )
    return lines, figures


class SyncCounter:
    """
    Counts the host syncs that torch.cuda.set_sync_debug_mode("warn") reports, and
    the lines of code they come from; counts nothing where ``active`` is False.
    """

    def __init__(self, active):
        self.active = active
        self._catch = warnings.catch_warnings(record=True)
        self.records = []

    def __enter__(self):
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        if self.active:
            th.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.active:
            th.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def _syncs(self):
        return [r for r in self.records if "synchroniz" in str(r.message)]

    def count(self):
        """Syncs so far."""
        return len(self._syncs())

    def sites(self, top=3):
        """The lines the most syncs came from, as text."""
        lines = collections.Counter(
            f"{os.path.basename(r.filename)}:{r.lineno}" for r in self._syncs()
        )
        return ", ".join(f"{site} x{n}" for site, n in lines.most_common(top))


def _per_step(counts, counter, what):
    """
    A sentence on the syncs of each step.

    :param counts: syncs in each training step, or the running total after each
        sampler step (the first of which includes the run's set-up).
    """
    if not counter.active:
        plural = "" if len(counts) == 1 else "s"
        return f"skipped (the sync debug mode needs CUDA): {len(counts)} {what}{plural} ran"
    if what == "sampler step":
        steps = np.diff(counts)
        text = (
            f"{int(np.median(steps))} per {what} (max {int(steps.max())} over the "
            f"{len(steps)} after the first); {counts[0]} in the first, set-up included"
        )
    else:
        text = f"{int(np.median(counts))} per {what} (max {max(counts)} over {len(counts)})"
    sites = counter.sites()
    return text + (f"; from {sites}" if sites else "")


def syncs_row(dry_run):
    """Host syncs per training step and per sampler step, on the tiny model."""
    from guided_diffusion.base import samplers
    from guided_diffusion.script_util import create_model_and_diffusion
    from guided_diffusion.translation.sampling import make_generators

    device, _ = setup(dry_run)
    numerics()
    counting = device.type == "cuda"
    # The dry run only checks that the steps run: nothing is counted on a CPU.
    warmup, steps = (1, 1) if dry_run else (2, 5)
    lines, figures = [], {}
    for label, precision, levers in (
        ("training step, fp32", "fp32", ()),
        (
            "training step, bf16, levers",
            "bf16",
            ("sdpa", "channels_last", "fused_optim"),
        ),
    ):
        loop, batch = make_loop("tiny", device, 2, precision, levers)
        for _ in range(warmup):  # the first steps allocate and choose kernels
            loop.run_step(batch, {})
        counts = []
        with SyncCounter(counting) as counter:
            for _ in range(steps):
                before = counter.count()
                loop.run_step(batch, {})
                counts.append(counter.count() - before)
        lines.append((label, _per_step(counts, counter, "step")))
        figures[label] = counts

    with th.device(device):
        model, diffusion = create_model_and_diffusion(
            **common.CONFIGS["tiny"], timestep_respacing="10"
        )
    model.eval()
    sar = th.zeros(len(NAMES), 3, 32, 32, device=device)
    denoiser = samplers.Denoiser(diffusion, model, condition=sar)
    for name in ("ddpm", "ddim", "dpm++2m"):
        x_T = th.randn(len(NAMES), 3, 32, 32, device=device)
        if not dry_run:
            samplers.run(name, denoiser, x_T, generator=make_generators(SEED, NAMES))
        counts = []
        with SyncCounter(counting) as counter:
            samplers.run(
                name,
                denoiser,
                x_T,
                generator=make_generators(SEED, NAMES),
                callback=lambda i, out, seen=counts, c=counter: seen.append(c.count()),
            )
        lines.append(
            (f"sampler step, {name}", _per_step(counts, counter, "sampler step"))
        )
        figures[name] = counts
    return lines, figures


def sdpa_row(dry_run):
    """Which scaled_dot_product_attention kernel ran, for each sequence length."""
    from torch.profiler import ProfilerActivity, profile

    from guided_diffusion.script_util import create_model_and_diffusion

    device, config = setup(dry_run)
    numerics()
    with th.device(device):
        model, _ = create_model_and_diffusion(**common.CONFIGS[config], use_sdpa=True)
    model.eval()
    size = common.CONFIGS[config]["image_size"]
    x = th.randn(2, 6, size, size, device=device)
    t = th.zeros(2, dtype=th.long, device=device)
    lines, figures = [], {}
    for label, use_bf16 in (("fp32", False), ("bf16", True)):
        autocast = th.autocast(device.type, dtype=th.bfloat16, enabled=use_bf16)
        with th.no_grad(), autocast:
            model(x, t)  # warm-up
            # The aten ops are recorded on the host side whatever the device.
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model(x, t)
        kernels = collections.Counter()
        for event in prof.events():
            backend = sdpa_backend(event.name)
            if backend:
                shape = event.input_shapes[0] if event.input_shapes else []
                length = shape[-2] if len(shape) >= 2 else "?"
                kernels[(length, backend)] += 1
        text = "; ".join(
            f"T = {length}: {backend} (x{n})"
            for (length, backend), n in sorted(kernels.items(), key=str)
        )
        lines.append((label, text or "no scaled_dot_product_attention call seen"))
        figures[label] = {f"{k[0]}": k[1] for k in kernels}
    return lines, figures


ROW_FUNCTIONS = {
    "train": train_row,
    "sample": sample_row,
    "noise": noise_row,
    "syncs": syncs_row,
    "sdpa": sdpa_row,
}


def measure_rows(names, dry_run):
    """
    In the rows' process: measure each row in turn and print its result as one
    marked line as soon as it is measured, {"row": name, ...} with "lines" and
    "figures", or "error".
    """
    _die_with_parent()
    if dry_run:
        # The tiny model gains nothing from a second thread, and on cores that other
        # work shares, OpenMP threads waiting for each other make it many times slower.
        th.set_num_threads(1)
    for name in names:
        row = ROWS[ROW_NAMES.index(name)]
        function = ROW_FUNCTIONS[name.split("_")[0]]
        try:
            lines, figures = function(dry_run, **row.options)
            result = {"row": name, "lines": lines, "figures": figures}
        except Exception as err:
            import traceback

            traceback.print_exc()
            result = {"row": name, "error": common.short_error(err)}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        # Free the row's model and optimiser before the next row measures memory.
        gc.collect()
        if th.cuda.is_available():
            th.cuda.empty_cache()


def _die_with_parent():
    """
    Have Linux kill this process when the run that started it dies (killed by a
    device's time limit, say), so that no row goes on holding the GPU: the process
    leads a session of its own, out of reach of signals to the run's group.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the run died before the line above
        sys.exit(1)


# -- the run ----------------------------------------------------------------------------


def rows_command(names, dry_run):
    """The command of a process that measures the rows ``names`` in turn."""
    command = [sys.executable, os.path.abspath(__file__), "--rows", ",".join(names)]
    return command + (["--dry_run"] if dry_run else [])


class RowsProcess:
    """
    A process that measures rows in turn (one start, one CUDA context, for all of
    them), read line by line so that each row's result is taken as it comes.

    It leads a session of its own, so that :meth:`kill` ends it with everything it
    started (torch.compile's workers, which hold its output open).

    :param command: the process's command (see :func:`rows_command`).
    """

    def __init__(self, command):
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the process closed its output: it ended

    def result(self, name, timeout):
        """
        The result of row ``name``: the dict the process printed, or {"error": why}
        when it ran past ``timeout`` seconds (the process is then killed) or ended
        without printing it.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.kill()
                return {"error": f"timed out after {timeout:.0f} s (its limit)"}
            if line is None:
                self.proc.wait()
                return {
                    "error": f"exit code {self.proc.returncode}: {self.last_error()}"
                }
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
                if result.get("row") == name:
                    return result

    def last_error(self, lines=1):
        """The last lines the process wrote to stderr."""
        self.stderr.seek(0)
        text = [t for t in self.stderr.read().splitlines() if t.strip()]
        return "\n".join(text[-lines:]) if text else "no output"

    def kill(self):
        """End the process and whatever it started, if it is still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cell(text):
    """Text safe in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


class Results:
    """Prints lines and appends them to the results file at once (none for '')."""

    def __init__(self, path):
        self.path = path

    def write(self, *lines):
        text = "\n".join(lines)
        print(text, flush=True)
        if self.path:
            new = not os.path.exists(self.path)
            with open(self.path, "a", encoding="utf-8") as f:
                if new:
                    f.write("# Benchmark results\n\n")
                f.write(text + "\n")


def header(rows, device_name, budget_s):
    """
    The section's title, machine, command and notes, and the table's head.

    :param rows: the rows that will run.
    :param device_name: the GPU's name (torch.cuda.get_device_name), or None for
        the dry run.
    :param budget_s: the seconds the run may take.
    """
    command = " ".join(
        shlex.quote(a) for a in ["bash", "benchmarks/gpu_rows.sh", *sys.argv[1:]]
    )
    if device_name is None:
        title = "GPU rows: dry run on the CPU (the tiny model; not a GPU's figures)"
        model = (
            "tiny config ("
            + ", ".join(f"{k} {v}" for k, v in common.CONFIGS["tiny"].items())
            + ")"
        )
    else:
        peak = bf16_peak_tflops(device_name)
        title = f"GPU rows: {device_name}"
        model = (
            "paper config ("
            + ", ".join(f"{k} {v}" for k, v in common.CONFIGS["paper"].items())
            + f"), forward {PAPER_FORWARD_FLOPS / 1e9:.1f} GFLOP per image (counted on "
            f"the CPU, gpu_rows.PAPER_FORWARD_FLOPS), a training step {TRAIN_STEP_FORWARDS} "
            f"forwards; dense bf16 peak of this GPU: "
            + (f"{peak} TFLOP/s" if peak else "not tabled")
        )
    return [
        "",
        f"## {title}",
        "",
        f"Machine: {common.machine_description()}.  ",
        f"Command: `{command}`",
        "",
        f"- model: {model}",
        f"- training step: TrainLoop.run_step, batch {2 if device_name is None else TRAIN_BATCH}, "
        "cuDNN benchmark mode on; rows other than 'every lever' take the slow path "
        "(einsum attention, NCHW, per-parameter AdamW and EMA)",
        f"- scene batch: one samplers.Denoiser call on {DRY_RUN_TILES if device_name is None else SCENE_TILES} "
        "tiles; peak MiB (both kinds of row): torch.cuda.max_memory_allocated from "
        "the model's creation on, weights included, less what was allocated before "
        "(on a CPU the process's peak resident memory)",
        f"- CPU against GPU: the noise equal to the bit; images may differ by at most "
        f"{GREY_LEVEL_TOLERANCE} grey level with TF32 off, {TF32_GREY_LEVEL_TOLERANCE} "
        "with TF32 on",
        "- the rows run one after the other in one process, each under its own limit "
        "(a fresh process for the rows after one that fails or runs past it); the "
        f"first row's seconds include the start (imports, CUDA); {budget_s:.0f} s "
        f"for the run; rows: {', '.join(row.name for row in rows)}",
        "",
        "| what | setting | result | s (limit) |",
        "|---|---|---|---|",
    ]


def main():
    args = parse_args()
    if args.rows:
        measure_rows(args.rows.split(","), args.dry_run)
        return 0
    if not args.dry_run and not th.cuda.is_available():
        print(
            "benchmarks/gpu_rows.sh: no CUDA GPU visible; run it on a GPU machine, "
            "or with --dry_run to check the script on this CPU",
            file=sys.stderr,
        )
        return 2
    # A polite kill of the run (SIGTERM, SIGHUP) ends it through the finally below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    rows = [row for row in ROWS if row.name in args.only]
    results = Results(args.results)
    device_name = None if args.dry_run else th.cuda.get_device_name()
    results.write(*header(rows, device_name, args.budget_s))
    start = time.monotonic()
    todo = list(rows)
    process = None
    try:
        while todo:
            row = todo.pop(0)
            if args.dry_run and row.dry_run != "run":
                results.write(
                    f"| {row.what} | {row.setting} | skipped in the dry run: {row.dry_run} | 0 |"
                )
                continue
            left = args.budget_s - (time.monotonic() - start)
            if left < MIN_ROW_S:
                results.write(
                    f"| {row.what} | {row.setting} | not run: {max(left, 0):.0f} s of the "
                    f"{args.budget_s:.0f} s budget left | 0 |"
                )
                continue
            if process is None:
                names = [r.name for r in [row, *todo]]
                if args.dry_run:
                    names = [
                        n for n in names if ROWS[ROW_NAMES.index(n)].dry_run == "run"
                    ]
                process = RowsProcess(rows_command(names, args.dry_run))
            limit = min(row.limit_s, left)
            began = time.monotonic()
            result = process.result(row.name, limit)
            took = f"{time.monotonic() - began:.0f} ({limit:.0f})"
            if "error" in result:
                # The traceback on the console, the reason in the table; the rows left
                # get a fresh process.
                print(process.last_error(lines=15), file=sys.stderr)
                process.kill()
                process = None
                results.write(
                    f"| {row.what} | {row.setting} | failed: {cell(result['error'])} | {took} |"
                )
                continue
            for label, text in result["lines"]:
                setting = row.setting if label is None else f"{row.setting}: {label}"
                results.write(
                    f"| {row.what} | {cell(setting)} | {cell(text)} | {took} |"
                )
    finally:
        # Ctrl-C or the end: leave no process behind on the GPU.
        if process is not None:
            process.kill()
    results.write("", f"Run finished in {time.monotonic() - start:.0f} s.", "")
    return 0


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="the tiny model on the CPU, compile and the sync count left out: seconds",
    )
    parser.add_argument(
        "--results",
        default=common.DEFAULT_RESULTS,
        help="append the rows here as they are measured ('' for nowhere)",
    )
    parser.add_argument(
        "--only", default=",".join(ROW_NAMES), help="comma-separated rows to run"
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=BUDGET_S,
        help="seconds for the whole run; a row is not started with less than "
        f"{MIN_ROW_S} s left",
    )
    # Set by the run in the process that measures the rows.
    parser.add_argument("--rows", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in ROW_NAMES]
    if unknown or not only:
        parser.error(
            f"--only: unknown row {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(ROW_NAMES)
        )
    args.only = only
    return args


if __name__ == "__main__":
    sys.exit(main())
