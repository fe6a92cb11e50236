"""
Where the samplers' noise is drawn (guided_diffusion.base.samplers.noise_of_shape): per-image
generators give the same numbers as drawing each image alone, on any target device;
noise for another device reaches it through a non-blocking copy from pinned memory, so
the host never waits for the device's queued work; and no generator is advanced for
noise that is multiplied by zero (DDIM at eta = 0 and its last step), so DDIM at eta = 0
draws nothing on the host at all. A scene job saved mid-run with eta > 0 continues to
the same bits.
"""

import numpy as np
import pytest
import torch as th
from torch.utils._python_dispatch import TorchDispatchMode

from guided_diffusion.base import samplers
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.translation.sampling import make_generators
from guided_diffusion.translation.scene import SceneArrays, SceneSampler

NAMES = ["a.png", "b.png", "c.png"]


class Shrink:
    """
    A denoiser without a network (x_0 = x_t / 2, and the rest from it): enough for
    every sampler's arithmetic, and it runs on the ``meta`` device.
    """

    def __init__(self, diffusion):
        self.alphas_cumprod = diffusion.alphas_cumprod

    def __call__(self, x, t):
        x0 = 0.5 * x
        return {
            "pred_xstart": x0, "eps": x - x0, "mean": 0.9 * x,
            "log_variance": th.full_like(x, -3.0),
        }  # fmt: skip


@pytest.fixture(scope="module")
def denoiser():
    return Shrink(create_gaussian_diffusion(steps=1000, timestep_respacing="6"))


def _expected(shape, generators, dtype=th.float32):
    """The per-image noise as it was first written: each image drawn alone, stacked."""
    return th.stack([th.randn(shape[1:], generator=g, dtype=dtype) for g in generators])


def _states(generators):
    return [g.get_state() for g in generators]


def _advanced(seed, shape, draws):
    """The states of make_generators(seed, NAMES) after ``draws`` draws of ``shape``."""
    gens = make_generators(seed, NAMES)
    for _ in range(draws):
        _expected(shape, gens)
    return _states(gens)


def _same_states(a, b):
    return len(a) == len(b) and all(th.equal(x, y) for x, y in zip(a, b))


# -- the numbers ------------------------------------------------------------------------


# per image: 1 and 15 elements (below 16 torch's normal sampler takes its scalar
# path), 16, 17, odd and even sizes above
@pytest.mark.parametrize(
    "shape", [(3, 1, 1, 1), (3, 1, 3, 5), (3, 1, 4, 4), (3, 1, 1, 17), (3, 3, 9, 11),
              (3, 3, 32, 32)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [th.float32, th.float64, th.bfloat16])
def test_per_image_noise_is_each_image_drawn_alone_to_the_bit(shape, dtype):
    gens = make_generators(5, NAMES)
    got = samplers.noise_of_shape(shape, gens, "cpu", dtype)
    reference = make_generators(5, NAMES)
    want = _expected(shape, reference, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert th.equal(got, want)
    # and each generator is left where drawing its image alone leaves it
    assert _same_states(_states(gens), _states(reference))


@pytest.mark.parametrize("shape", [(1, 1, 1, 7), (2, 3, 9, 11)])
def test_one_generator_draws_the_whole_batch_as_one_randn(shape):
    got = samplers.noise_of_shape(shape, th.Generator().manual_seed(4), "cpu")
    want = th.randn(*shape, generator=th.Generator().manual_seed(4))
    assert th.equal(got, want)


def test_a_generator_per_image_is_required():
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        samplers.noise_of_shape((3, 3, 4, 4), make_generators(0, NAMES[:2]), "cpu")


# -- the copy to the device -----------------------------------------------------------


class CopyLog(TorchDispatchMode):
    """
    Records every copy between devices (aten._to_copy, aten.copy_) as (source,
    target, non_blocking, source tensor), and every host buffer requested pinned.
    A pinned request is served unpinned, so that a CPU-only torch can go on.
    """

    def __init__(self):
        super().__init__()
        self.copies, self.pinned = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("pin_memory"):
            self.pinned += 1
            kwargs["pin_memory"] = False
        if func is th.ops.aten._to_copy.default and "device" in kwargs:
            src, target = args[0], th.device(kwargs["device"])
            if src.device != target:
                non_blocking = kwargs.get("non_blocking", False)
                self.copies.append((src.device, target, non_blocking, src.clone()))
        elif func is th.ops.aten.copy_.default and args[0].device != args[1].device:
            non_blocking = (
                args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            )
            self.copies.append(
                (args[1].device, args[0].device, non_blocking, args[1].clone())
            )
        return func(*args, **kwargs)


def test_noise_for_another_device_is_copied_without_blocking():
    # x on `meta` stands for a GPU: the draw is on the host, the one copy must not
    # block (a blocking copy makes the host wait for all the device's queued work)
    shape = (3, 3, 9, 11)
    with CopyLog() as log:
        z = samplers.noise_like(
            th.empty(shape, device="meta"), make_generators(2, NAMES)
        )
    assert z.device.type == "meta" and z.shape == shape
    assert [(s.type, t.type, nb) for s, t, nb, _ in log.copies] == [
        ("cpu", "meta", True)
    ]
    # and what went to the device is the noise, to the bit
    assert th.equal(log.copies[0][3], _expected(shape, make_generators(2, NAMES)))


# 6 steps: DDPM draws at each; DDIM with noise at each but the last (into the data),
# DDIM at eta = 0 never
@pytest.mark.parametrize(
    "name, options, copies",
    [("ddpm", {}, 6), ("ddim", {"eta": 0.5}, 5), ("ddim", {"eta": 0.0}, 0)],
)
def test_every_noise_copy_of_a_sampler_run_is_non_blocking(
    denoiser, name, options, copies
):
    x_T = th.empty(3, 3, 8, 8, device="meta")
    with CopyLog() as log:
        samplers.run(
            name, denoiser, x_T, generator=make_generators(0, NAMES), **options
        )
    seen = [c[:3] for c in log.copies]
    assert len(seen) == copies and all(nb for _, _, nb in seen), seen


def test_noise_for_a_gpu_is_drawn_into_pinned_memory():
    # a non-blocking copy from pageable memory still waits for the device: the host
    # buffer must be pinned (page-locked), and only for CUDA (a CPU-only torch cannot pin)
    shape = (3, 3, 9, 11)
    if th.cuda.is_available():
        z = samplers.noise_of_shape(shape, make_generators(2, NAMES), "cuda")
        assert th.equal(z.cpu(), _expected(shape, make_generators(2, NAMES)))
        return
    with CopyLog() as log:
        samplers.noise_of_shape(shape, make_generators(2, NAMES), "cpu")
        samplers.noise_of_shape(shape, make_generators(2, NAMES), "meta")
        assert log.pinned == 0
        # on a CPU-only torch the copy to "cuda" fails, after the draw into the buffer
        with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda"):
            samplers.noise_of_shape(shape, make_generators(2, NAMES), "cuda")
    assert log.pinned == 1


# -- no draw where the noise is multiplied by zero ------------------------------------


def test_ddim_at_eta_zero_advances_no_generator(denoiser):
    x_T = _expected((3, 3, 8, 8), make_generators(9, NAMES))
    gens = make_generators(1, NAMES)
    before = _states(gens)
    per_image = samplers.run("ddim", denoiser, x_T, generator=gens, eta=0.0)
    assert _same_states(_states(gens), before)
    one = th.Generator().manual_seed(1)
    before = one.get_state()
    samplers.run("ddim", denoiser, x_T, generator=one, eta=0.0)
    assert th.equal(one.get_state(), before)
    # the image is the one a run that draws (the global generator's) gives
    assert th.equal(per_image, samplers.run("ddim", denoiser, x_T, eta=0.0))


def test_ddim_with_noise_draws_once_per_step_that_uses_it(denoiser):
    # 6 steps; the last ends in the data, where the noise is masked
    shape = (3, 3, 8, 8)
    x_T = _expected(shape, make_generators(9, NAMES))
    gens = make_generators(1, NAMES)
    samplers.run("ddim", denoiser, x_T, generator=gens, eta=0.5)
    assert _same_states(_states(gens), _advanced(1, shape, 5))


def test_ddim_with_the_global_generator_draws_at_every_step_as_guided_diffusion(
    denoiser,
):
    # the documented choice: the global stream stays where guided-diffusion's DDIM
    # leaves it (one randn_like per step, at any eta), so a script's next draw agrees
    x_T = th.zeros(2, 3, 8, 8)
    for eta in (0.0, 0.5):
        th.manual_seed(11)
        samplers.run("ddim", denoiser, x_T, eta=eta)
        after = th.get_rng_state()
        th.manual_seed(11)
        for _ in range(6):
            th.randn_like(x_T)
        assert th.equal(after, th.get_rng_state()), eta


def test_ddpm_still_draws_at_every_step(denoiser):
    # guided-diffusion's DDPM order: one draw per step, t = 0 included
    shape = (3, 3, 8, 8)
    gens = make_generators(1, NAMES)
    samplers.run(
        "ddpm", denoiser, _expected(shape, make_generators(9, NAMES)), generator=gens
    )
    assert _same_states(_states(gens), _advanced(1, shape, 6))


# -- scenes ---------------------------------------------------------------------------


def _scene(options, folder=None):
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim5")
    height, width = 130, 48  # three bands of the update
    arrays = SceneArrays(folder)
    arrays.create("sar", 3, height, width)
    fuser_args = dict(denoise=lambda xs, sar, t: {"pred_xstart": 0.5 * xs}, tile=32,
                      overlap=16, batch_size=4)  # fmt: skip
    return SceneSampler(
        arrays, fuser_args, diffusion, "ddim", options, 7, shift_tiles=True
    )


def _scene_x(job):
    return job.arrays.read("x", (0, job.arrays.shapes["x"][1]))


def test_a_scene_at_eta_zero_saves_the_generators_as_they_were_after_x_T(tmp_path):
    job = _scene({"eta": 0.0})
    job.start()
    after_start = _states(job.generators)
    job.run(folder=tmp_path, save_every=2)
    saved = th.load(tmp_path / "generators-000005.pt")
    assert _same_states(saved, after_start)


@pytest.mark.parametrize("stop", [2, 4])
def test_a_noisy_scene_saved_mid_run_continues_to_the_same_bits(tmp_path, stop):
    whole = _scene({"eta": 0.7})
    whole.start()
    whole.run()
    first = _scene({"eta": 0.7})
    first.start()
    first.run(folder=tmp_path, should_stop=lambda: first.step == stop)
    second = _scene({"eta": 0.7})
    assert second.saved_step(tmp_path) == stop
    second.resume(tmp_path)
    second.run()
    assert np.array_equal(_scene_x(second).numpy(), _scene_x(whole).numpy())
    assert _same_states(_states(second.generators), _states(whole.generators))
