"""
What every sampler in guided_diffusion.base.samplers.SAMPLERS promises (the module's
docstring), checked for each one registered: a new sampler is tested by
registering it.

* the same generators give the same run, to the bit;
* a run continued from any step (the state, the generator and ``history`` after
  that step) gives the whole run, to the bit;
* it yields one dict per timestep, with "sample" and "pred_xstart" of x's shape
  and dtype;
* the generator is its only source of noise: with per-image generators the global
  generator is neither read nor advanced, and an image's result depends on its own
  generator alone.

The denoiser is exact and cheap: the noise predictor of Gaussian data
(conftest.GaussianEpsModel) on the 1000-step linear schedule respaced to 8 steps.
"""

import pytest
import torch as th
from conftest import GaussianEpsModel, linear_diffusion

from guided_diffusion.base import samplers
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

STEPS = 8
SHAPE = (2, 3, 4, 4)
# Options other than the defaults that take a sampler down another path (DDIM draws
# noise only at eta > 0). Every registered sampler is tested at its defaults as well,
# so a sampler needs no entry here to be tested.
MORE_OPTIONS = {"ddim": [{"eta": 1.0}], "dpm++2m": [{"lower_order_final": 1}]}
CASES = [
    pytest.param(name, options, id=f"{name}-{options}" if options else name)
    for name in samplers.SAMPLERS
    for options in [{}, *MORE_OPTIONS.get(name, [])]
]


@pytest.fixture(scope="module")
def denoiser():
    base = linear_diffusion(1000)
    diffusion = SpacedDiffusion(
        space_timesteps(1000, str(STEPS)), betas=base.betas,
        model_mean_type=base.model_mean_type, model_var_type=base.model_var_type,
        loss_type=base.loss_type,
    )  # fmt: skip
    model = GaussianEpsModel(base.alphas_cumprod, 0.3, 0.5)
    return samplers.Denoiser(diffusion, model)


def generators(*seeds):
    return [th.Generator().manual_seed(s) for s in seeds]


def x_T(dtype=th.float32):
    return samplers.noise_of_shape(SHAPE, th.Generator().manual_seed(9), "cpu", dtype)


def steps_of(name, denoiser, x, timesteps=None, **kwargs):
    """Every dict the sampler yields, as a list."""
    if timesteps is None:
        timesteps = samplers.descending(denoiser)
    return list(samplers.SAMPLERS[name](denoiser, x, timesteps, **kwargs))


@pytest.mark.parametrize(("name", "options"), CASES)
def test_the_same_generators_give_the_same_run(denoiser, name, options):
    for make in (lambda: generators(1, 2), lambda: th.Generator().manual_seed(1)):
        first = steps_of(name, denoiser, x_T(), generator=make(), **options)
        again = steps_of(name, denoiser, x_T(), generator=make(), **options)
        for a, b in zip(first, again, strict=True):
            assert th.equal(a["sample"], b["sample"])
            assert th.equal(a["pred_xstart"], b["pred_xstart"])


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("stop", range(1, STEPS))
def test_a_run_continued_after_any_step_is_the_whole_run(denoiser, name, options, stop):
    timesteps = list(samplers.descending(denoiser))
    whole = samplers.run(name, denoiser, x_T(), generator=generators(1, 2), **options)
    gens = generators(1, 2)
    steps = samplers.SAMPLERS[name](
        denoiser, x_T(), timesteps, generator=gens, **options
    )
    seen = [next(steps) for _ in range(stop)]
    steps.close()
    # the generators as they were after step `stop`, in new objects (as a saved job
    # restores them)
    later = [th.Generator().set_state(g.get_state()) for g in gens]
    history = {"t": timesteps[stop - 1], "pred_xstart": seen[-1]["pred_xstart"]}
    rest = samplers.run(name, denoiser, seen[-1]["sample"], timesteps[stop:],
                        generator=later, history=history, **options)  # fmt: skip
    assert th.equal(rest, whole)


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("dtype", [th.float32, th.float64])
def test_one_dict_per_timestep_of_xs_shape_and_dtype(denoiser, name, options, dtype):
    x = x_T(dtype)
    for timesteps in (samplers.descending(denoiser), range(STEPS // 2 - 1, -1, -1)):
        out = steps_of(
            name, denoiser, x, timesteps, generator=generators(1, 2), **options
        )
        assert len(out) == len(timesteps)
        for step in out:
            for key in ("sample", "pred_xstart"):
                assert step[key].shape == x.shape and step[key].dtype == dtype, key
                assert th.isfinite(step[key]).all()


@pytest.mark.parametrize(("name", "options"), CASES)
def test_the_generator_is_the_only_source_of_noise(denoiser, name, options):
    with th.random.fork_rng(devices=[]):
        th.manual_seed(0)
        before = th.get_rng_state()
        first = samplers.run(
            name, denoiser, x_T(), generator=generators(1, 2), **options
        )
        # the global generator was not advanced ...
        assert th.equal(th.get_rng_state(), before)
        # ... nor read: another global state gives the same run
        th.manual_seed(12345)
        again = samplers.run(
            name, denoiser, x_T(), generator=generators(1, 2), **options
        )
    assert th.equal(again, first)
    # an image's result depends on its own generator, not on its batch mate's
    other = samplers.run(name, denoiser, x_T(), generator=generators(1, 7), **options)
    assert th.equal(other[0], first[0])
