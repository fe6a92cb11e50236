"""
The GPU paths, checked without a GPU: the model runs on the ``meta`` device
under tests/device_check.py's DeviceCheck, which refuses an operation on
tensors of two devices and counts host reads and host-to-device copies.

* device mismatches: a training step (fp32, fp16, bf16), a step of every
  registered sampler, a scene's band update and the page's patch route;
* the sync budget: one host read per training step that does not log (the
  finiteness check), none and no blocking copy to the device per sampler step;
* device discipline: every tensor factory in guided_diffusion/ takes its device
  from a tensor or from dist_util.dev(), or is a host-side site listed here;
* the SDPA path hands the fused kernel contiguous (B, heads, T, ch) inputs.
"""

import ast
import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from conftest import TINY_FLAGS, tiny_model_and_diffusion
from device_check import DeviceCheck, DeviceMismatch, MetaGenerator

from guided_diffusion import dist_util, train_util
from guided_diffusion.base import samplers

META = th.device("meta")
PACKAGE = Path(__file__).resolve().parent.parent / "guided_diffusion"


@pytest.fixture
def on_meta(monkeypatch):
    """dist_util.dev() is the meta device. PyTorch offers neither generators nor
    autocast there: a generator asked for on meta is a MetaGenerator, and
    autocast on meta is a no-op, so a bf16 run checks everything around
    autocast's own casts."""
    monkeypatch.setattr(dist_util, "dev", lambda: META)
    monkeypatch.setattr(th, "Generator", MetaGenerator)
    real_autocast = th.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == "meta":
            return contextlib.nullcontext()
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(th, "autocast", autocast)
    return META


# -- the checker itself -----------------------------------------------------------


def test_meta_alone_lets_a_cpu_tensor_through():
    # Why the checker exists: these mistakes pass on meta without it.
    conv = th.nn.Conv2d(3, 4, 3).to(META)
    assert conv(th.zeros(1, 3, 8, 8)).device.type == "cpu"
    assert th.arange(5.0)[th.zeros(2, dtype=th.long, device=META)].shape == (2,)


@pytest.mark.parametrize(
    "planted",
    [
        lambda: th.nn.Conv2d(3, 4, 3).to(META)(th.zeros(1, 3, 8, 8)),
        lambda: th.arange(5.0)[th.zeros(2, dtype=th.long, device=META)],
        lambda: th.zeros(3, device=META) + th.ones(3),
    ],
    ids=["convolution", "index", "addition"],
)
def test_checker_catches_a_planted_cpu_tensor(planted):
    with pytest.raises(DeviceMismatch, match="two devices"), DeviceCheck():
        planted()


def test_checker_catches_a_generator_on_another_device():
    with pytest.raises(DeviceMismatch, match="generator"), DeviceCheck():
        th.randn(3, generator=th.Generator(), device=META)
    with DeviceCheck():
        th.randn(3, generator=MetaGenerator(device=META), device=META)


def test_checker_allows_host_scalars_and_counts_host_traffic():
    x = th.zeros(3, device=META)
    with DeviceCheck() as check:
        x * th.tensor(2.0)  # a 0-d CPU tensor is a kernel's scalar argument
        assert check.snapshot() == dict.fromkeys(check.snapshot(), 0)
        assert bool(th.isfinite(x.sum()))  # a host read, answered True
        x.sum().item()
        x.tolist()
        x.cpu()
        x.to("cpu", non_blocking=True)
        th.arange(3).to(META)
        th.arange(3).to(META, non_blocking=True)
        x.new_tensor(0.5)
        th.tensor([1.0], device=META)
    assert check.snapshot() == {
        "host_reads": 4,
        "blocking_uploads": 3,
        "non_blocking_uploads": 1,
        "non_blocking_downloads": 1,
    }


# -- training ---------------------------------------------------------------------


def meta_loop(tmp_path, monkeypatch, fused_optim=False, **options):
    """
    A TrainLoop of the tiny model on meta, its logger writing to tmp_path.

    :param fused_optim: the multi-tensor grad norm and EMA; AdamW's fused kernel
        has no meta version, so its multi-tensor kernel stands in.
    """
    from guided_diffusion import logger

    if fused_optim:
        kernel = {"fused": None, "foreach": True}
        monkeypatch.setattr(train_util.TrainLoop, "_optim_kernel", lambda self: kernel)

    logger.configure(dir=str(tmp_path), format_strs="log")
    model, diffusion = tiny_model_and_diffusion(use_fp16=options.get("use_fp16", False))
    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=2, microbatch=-1,
        lr=1e-4, ema_rate="0.9", log_interval=10**6, save_interval=10**6,
        resume_checkpoint="", fused_optim=fused_optim, **options,
    )  # fmt: skip
    channels = model.in_channels
    batch = th.zeros(2, channels, TINY_FLAGS["image_size"], TINY_FLAGS["image_size"])
    return loop, batch


TRAINING_PATHS = {
    "fp32": {},
    "fp32-fused_optim": {"fused_optim": True},
    "fp16": {"use_fp16": True},
    "bf16": {"use_bf16": True},
    "loss-second-moment": {"schedule_sampler": "loss-second-moment"},
}


@pytest.mark.parametrize("options", TRAINING_PATHS.values(), ids=TRAINING_PATHS)
def test_training_step_on_a_second_device(on_meta, tmp_path, monkeypatch, options):
    loop, batch = meta_loop(tmp_path, monkeypatch, **options)
    assert loop.mp_trainer.master_params[0].device == META
    with DeviceCheck() as check:
        loop.run_step(batch, {})  # the first step makes the optimizer's state
        check.reset()
        loop.run_step(batch, {})
        step, reads = check.snapshot(), list(check.reads)
        check.reset()
        loop._flush_logs()
        logging = check.snapshot()
    # A step that does not log reads one value on the host, whether the gradient
    # is finite; the step's host-drawn timesteps and weights and the batch go to
    # the device without waiting.
    assert step["host_reads"] == 1, reads
    assert step["blocking_uploads"] == 0
    # Logging reads the values it logs (apart from the steps' budget).
    assert logging["host_reads"] > 0
    assert loop.step == 2


# -- sampling ---------------------------------------------------------------------


def meta_denoiser(**flags):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="5", **flags)
    model.to(META).eval()
    size = TINY_FLAGS["image_size"]
    sar = th.zeros(2, model.in_channels - 3, size, size, device=META)
    return samplers.Denoiser(diffusion, model, sar), size


# The generators a sampler may be given: none (the global generator), one per
# image on the host (the scripts' choice: the same noise on any device), or one
# on the device.
GENERATORS = {
    "global": lambda: None,
    "per_image_host": lambda: [th.Generator().manual_seed(i) for i in range(2)],
}


@pytest.mark.parametrize("generators", GENERATORS.values(), ids=GENERATORS)
@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_step_on_a_second_device(name, generators):
    denoiser, size = meta_denoiser()
    x = th.zeros(2, 3, size, size, device=META)
    steps = samplers.SAMPLERS[name](
        denoiser, x, samplers.descending(denoiser), generator=generators()
    )
    with DeviceCheck() as check:
        next(steps)  # the first step copies the schedule's tables to the device
        check.reset()
        out = next(steps)
    assert out["sample"].device == META
    # No step waits for the device: no host read, and noise drawn on the host
    # reaches it with a non-blocking copy, prepared ahead.
    assert check.host_reads == 0, check.reads
    assert check.blocking_uploads == 0


def test_ddim_encoding_step_on_a_second_device():
    denoiser, size = meta_denoiser()
    steps = samplers.ddim_reverse(
        denoiser, th.zeros(2, 3, size, size, device=META), range(4)
    )
    with DeviceCheck() as check:
        next(steps)
        check.reset()
        next(steps)
    assert check.host_reads == 0, check.reads
    assert check.blocking_uploads == 0


def test_scene_band_update_with_the_network_on_a_second_device():
    from guided_diffusion.translation.scene import SceneArrays, SceneSampler

    model, diffusion = tiny_model_and_diffusion(timestep_respacing="3")
    model.to(META).eval()
    size = TINY_FLAGS["image_size"]

    # As scene_translation.sample_scene does: tiles to the device, predictions
    # back to the host, where the scene's arrays live on purpose.
    def denoise(xs, sar, t):
        denoiser = samplers.Denoiser(diffusion, model, sar.to(META))
        out = denoiser(xs.to(META), t)
        return {"pred_xstart": out["pred_xstart"].float().cpu()}

    arrays = SceneArrays()
    arrays.create("sar", model.in_channels - 3, size + 8, size + 8)
    job = SceneSampler(
        arrays,
        dict(denoise=denoise, tile=size, overlap=8, batch_size=4),
        diffusion,
        "ddim",
        {},
        seed=0,
    )
    job.start()
    with DeviceCheck():
        job.step_once()
    assert job.step == 1


@pytest.mark.parametrize(
    "route, size", [("patch", TINY_FLAGS["image_size"]), ("scene", 40)]
)
def test_page_routes_with_the_model_on_a_second_device(
    on_meta, tiny_checkpoint, tmp_path, route, size
):
    pytest.importorskip("rasterio")
    from guided_diffusion.page import app

    sar = tmp_path / "upload.tif"
    write_sar_patch(sar, size)
    translator = app.Translator({"tiny": str(tiny_checkpoint)}, work_dir=str(tmp_path))
    # the result is all zeros (meta holds no values): what is checked is that
    # every operation of the route found its tensors on one device
    with DeviceCheck():
        result = translator.translate(str(sar), "tiny", "ddim", 2, seed=0)
    assert result.route == route
    (model,) = translator.cache._models.values()
    assert next(model.parameters()).device == META


def write_sar_patch(path, size):
    import rasterio

    values = np.random.default_rng(0).integers(0, 256, (3, size, size))
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values.astype(np.uint8))


# -- the attention kernel -----------------------------------------------------------


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_gets_contiguous_4d_inputs_off_the_cpu(monkeypatch, new_order):
    from guided_diffusion import unet

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([(tuple(z.shape), z.is_contiguous()) for z in (q, k, v)])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", spy)
    heads = 2
    model, _ = tiny_model_and_diffusion(
        use_sdpa=True, num_heads=heads, use_new_attention_order=new_order
    )
    model.to(META)
    size, batch = TINY_FLAGS["image_size"], 3
    x = th.zeros(batch, model.in_channels, size, size, device=META)
    with th.no_grad():
        model(x, th.zeros(batch, dtype=th.long, device=META))
    assert seen, "no attention call went through scaled_dot_product_attention"
    lengths = set()
    for call in seen:
        for shape, contiguous in call:
            assert len(shape) == 4 and contiguous, call
            assert shape[:2] == (batch, heads), call
            lengths.add(shape[2])
    assert lengths == {(size // 2) ** 2}  # every attention block is at 16 x 16


def test_likelihood_loop_on_a_second_device():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="4")
    model.to(META).eval()
    size = TINY_FLAGS["image_size"]
    x_start = th.zeros(2, 3, size, size, device=META)
    sar = th.zeros(2, model.in_channels - 3, size, size, device=META)
    with DeviceCheck() as check:
        diffusion.calc_bpd_loop(model, x_start, condition=sar)  # tables to the device
        check.reset()
        out = diffusion.calc_bpd_loop(model, x_start, condition=sar)
    assert out["total_bpd"].device == META
    assert check.host_reads == 0, check.reads
    assert check.blocking_uploads == 0


# -- device discipline ------------------------------------------------------------

# The functions that make a tensor (or a generator) from nothing but their
# arguments: each must be told its device. *_like and x.new_* take x's.
FACTORIES = {
    "zeros", "ones", "full", "empty", "eye", "arange", "linspace", "logspace",
    "rand", "randn", "randint", "randperm", "normal", "tensor", "as_tensor",
    "from_numpy", "Generator",
}  # fmt: skip

# (module, function, factory) -> why the tensor is made on the host on purpose.
HOST_SITES = {
    ("image_datasets.py", "_collate", "from_numpy"):
        "a batch is assembled on the host; the training loop copies it without blocking",
    ("resample.py", "LossSecondMomentResampler.state_dict", "from_numpy"):
        "the loss history is saved with the checkpoint, from the host",
    ("base/samplers.py", "ddim", "tensor"):
        "abar as 0-d host tensors, which device kernels take as scalar arguments",
    ("base/samplers.py", "ddim_reverse", "tensor"):
        "abar as a 0-d host tensor, which device kernels take as a scalar argument",
    ("base/samplers.py", "noise_of_shape", "empty"):
        "the host buffer that per-image generators draw into",
    ("base/samplers.py", "noise_of_shape", "randn"):
        "per-image noise drawn on the host: the same numbers on any device",
    ("translation/sampling.py", "to_uint8", "as_tensor"): "images become 8-bit files on the host",
    ("translation/samples.py", "grey_levels", "as_tensor"): "grey levels of files, on the host",
    ("evaluation/validation.py", "Validator.__init__", "from_numpy"):
        "the validation pairs, loaded once on the host",
    ("train_util.py", "TrainLoop.__init__", "zeros"):
        "the stop flag's host copy, pinned on CUDA, filled without blocking",
    ("translation/scene.py", "SceneArrays.read", "from_numpy"): "the scene's arrays live on the host",
    ("translation/scene.py", "TileFuser.total", "from_numpy"): "the scene's arrays live on the host",
    ("translation/scene.py", "TileFuser.__call__", "from_numpy"): "the scene's arrays live on the host",
    ("translation/scene.py", "TileFuser.__call__", "zeros"): "the scene's arrays live on the host",
    ("translation/scene.py", "_BandPrediction.__call__", "full"):
        "the band update runs on the host, with the scene's arrays",
    ("translation/scene.py", "SceneSampler.start", "Generator"):
        "each band's noise is drawn on the host, with the scene's arrays",
    ("translation/scene.py", "SceneSampler.resume", "Generator"):
        "each band's noise is drawn on the host, with the scene's arrays",
    ("translation/scene_translation.py", "sample_scene.should_stop", "tensor"):
        "a host flag; all_reduce takes it to the device and back",
    ("translation/scene_inputs.py", "resampled_rows.rows", "from_numpy"):
        "the scene's rows are read on the host",
    ("base/consistency.py", "ConsistencyModel.__init__", "as_tensor"):
        "the schedule, a buffer: it moves with the module (and is indexed on x's device)",
    ("distillation.py", "ConsistencyDistillation.__init__", "from_numpy"):
        "the schedule, once; each step indexes it on the images' device",
}  # fmt: skip


def _names_the_cpu(node):
    """device="cpu", th.device("cpu") or "cpu" as an argument."""
    if isinstance(node, ast.Constant):
        return node.value in ("cpu", None)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "device"
        and any(_names_the_cpu(a) for a in node.args)
    )


def _takes_a_device(call, parents):
    """
    Whether a factory call is told a device other than the CPU: ``device=`` or,
    for data made on the host, a ``.to(device)`` that it goes on to (through
    other methods such as ``.long()``).
    """
    for keyword in call.keywords:
        if keyword.arg == "device":
            return not _names_the_cpu(keyword.value)
    node = call
    while isinstance(parents.get(node), ast.Attribute):
        method = parents[node]
        node = parents.get(method)
        if not isinstance(node, ast.Call):
            return False
        if method.attr == "to":
            where = node.args[:1] + [
                k.value for k in node.keywords if k.arg == "device"
            ]
            return bool(where) and not _names_the_cpu(where[0])
    return False


def factory_sites():
    """(module, function, factory, line) of every factory call in guided_diffusion/
    that is not told a device."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {
            child: node
            for node in ast.walk(tree)
            for child in ast.iter_child_nodes(node)
        }
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if not (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id in ("th", "torch")
                and func.attr in FACTORIES
            ):
                continue
            if _takes_a_device(node, parents):
                continue
            scope, parent = [], node
            while parent in parents:
                parent = parents[parent]
                if isinstance(parent, (ast.FunctionDef, ast.ClassDef)):
                    scope.append(parent.name)
            name = str(path.relative_to(PACKAGE))
            found.append((name, ".".join(reversed(scope)), func.attr, node.lineno))
    return found


def test_every_tensor_factory_names_its_device_or_is_a_host_site():
    sites = factory_sites()
    unlisted = [site for site in sites if site[:3] not in HOST_SITES]
    assert not unlisted, (
        "tensors made on the host: take the device from an input tensor "
        "(x.new_*, *_like, device=x.device) or from dist_util.dev(), or list the "
        f"site in HOST_SITES with its reason: {unlisted}"
    )
    # the list stays short: a site that is gone leaves it
    assert set(HOST_SITES) <= {site[:3] for site in sites}


def test_discipline_check_sees_a_host_tensor_and_accepts_a_device():
    source = """
def f(x, device):
    a = th.zeros(3)
    b = th.zeros(3, device="cpu")
    c = th.arange(3).to("cpu")
    d = th.zeros(3, device=x.device)
    e = th.from_numpy(y).long().to(device)
    g = th.Generator(device=th.device("cpu"))
"""
    tree = ast.parse(source)
    parents = {
        child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
    }
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in FACTORIES
    ]  # fmt: skip
    taken = {
        ast.unparse(c).split("(")[0] + str(c.lineno): _takes_a_device(c, parents)
        for c in calls
    }
    assert taken == {
        "th.zeros3": False, "th.zeros4": False, "th.arange5": False,
        "th.zeros6": True, "th.from_numpy7": True, "th.Generator8": False,
    }  # fmt: skip
