"""Tests of guided_diffusion.respace: which steps are kept, and what the model sees."""

import numpy as np
import pytest
import torch as th
from conftest import (
    FixedOutputModel,
    RecordingModel,
    randomize_,
    tiny_model_and_diffusion,
)

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

C = 3
BASE_STEPS = 50


def _kwargs(num_steps=BASE_STEPS, **overrides):
    options = dict(
        betas=gd.get_named_beta_schedule("linear", num_steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    options.update(overrides)
    return options


def _spaced(section_counts, num_steps=BASE_STEPS, **overrides):
    return SpacedDiffusion(
        space_timesteps(num_steps, section_counts), **_kwargs(num_steps, **overrides)
    )


def _data(n, size=4):
    gen = th.Generator().manual_seed(0)
    x_start = th.rand(n, C, size, size, generator=gen) * 2 - 1
    sar = th.randn(n, 3, size, size, generator=gen) + 5.0
    noise = th.randn(n, C, size, size, generator=gen)
    return x_start, sar, noise


# ---------------------------------------------------------------- space_timesteps


def test_single_section_is_evenly_spaced_from_first_to_last():
    kept = sorted(space_timesteps(100, "10"))
    assert kept == list(range(0, 100, 11))  # stride (100 - 1) / (10 - 1) = 11


def test_keeping_every_step():
    assert space_timesteps(37, "37") == set(range(37))
    assert space_timesteps(37, [37]) == set(range(37))


def test_sections_split_the_range():
    kept = space_timesteps(300, "10,20,30")
    assert len(kept) == 60
    counts = [sum(lo <= k < lo + 100 for k in kept) for lo in (0, 100, 200)]
    assert counts == [10, 20, 30]
    # Each section starts at its first step and ends at its last.
    assert {0, 99, 100, 199, 200, 299} <= kept


def test_uneven_sections_give_the_remainder_to_the_first():
    # 10 steps in 3 sections: sizes 4, 3, 3.
    assert space_timesteps(10, "2,2,2") == {0, 3, 4, 6, 7, 9}


def test_one_step_section_keeps_its_first_step():
    assert space_timesteps(50, "1") == {0}


@pytest.mark.parametrize(
    "num_steps,count,stride", [(100, 10, 10), (50, 25, 2), (1000, 250, 4), (100, 7, 15)]
)
def test_ddim_uses_an_even_stride(num_steps, count, stride):
    assert space_timesteps(num_steps, f"ddim{count}") == set(
        range(0, num_steps, stride)
    )


def test_impossible_ddim_count_is_rejected_with_a_clear_message():
    # No integer stride gives exactly 30 of 100 steps (stride 3 gives 34, 4 gives 25).
    with pytest.raises(ValueError, match="ddim30"):
        space_timesteps(100, "ddim30")


@pytest.mark.parametrize("request_", ["21", "5,11", "60"])
def test_section_larger_than_its_range_is_rejected(request_):
    with pytest.raises(ValueError):
        space_timesteps(20, request_)


# ---------------------------------------------------------------- SpacedDiffusion


def test_keeping_all_steps_reproduces_the_base_schedule():
    base = gd.GaussianDiffusion(**_kwargs())
    spaced = _spaced(str(BASE_STEPS))
    np.testing.assert_allclose(spaced.betas, base.betas, rtol=1e-10, atol=0)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(
        spaced.posterior_variance, base.posterior_variance, rtol=1e-9
    )
    assert list(spaced.timestep_map) == list(range(BASE_STEPS))
    assert spaced.original_num_steps == BASE_STEPS
    assert spaced.num_timesteps == BASE_STEPS


@pytest.mark.parametrize("section_counts", ["10", "ddim10", "5,3,2"])
def test_respaced_alphas_cumprod_match_the_base_at_kept_steps(section_counts):
    base = gd.GaussianDiffusion(**_kwargs())
    kept = sorted(space_timesteps(BASE_STEPS, section_counts))
    spaced = _spaced(section_counts)
    assert [int(i) for i in spaced.timestep_map] == kept
    assert spaced.num_timesteps == len(kept)
    assert spaced.original_num_steps == BASE_STEPS
    np.testing.assert_allclose(
        spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12
    )
    # and therefore the spaced q(x_t | x_0) is the base one at the kept step
    x_start, _, noise = _data(len(kept))
    spaced_t = th.arange(len(kept))
    th.testing.assert_close(
        spaced.q_sample(x_start, spaced_t, noise=noise),
        base.q_sample(x_start, th.tensor(kept), noise=noise),
    )


def test_ideal_model_recovers_x_start_through_respacing():
    spaced = _spaced("10")
    x_start, sar, noise = _data(10)
    t = th.arange(10)
    x_t = spaced.q_sample(x_start, t, noise=noise)
    out = spaced.p_mean_variance(
        FixedOutputModel(noise), x_t, t, clip_denoised=False, condition=sar
    )
    th.testing.assert_close(out["pred_xstart"], x_start, rtol=0, atol=2e-4)


# ---------------------------------------------------------------- what the model sees


def _original_t_per_call(calls):
    return [call["t"].tolist() for call in calls]


def _check_condition(calls, sar):
    assert calls
    for call in calls:
        assert call["x"].shape[1] == C + sar.shape[1]
        assert th.equal(call["x"][:, C:], sar)


def test_sampling_loops_call_the_model_with_original_indices():
    spaced = _spaced("5")
    kept = [int(i) for i in spaced.timestep_map]
    x_start, sar, noise = _data(2)
    expected = [[k, k] for k in reversed(kept)]

    for loop in ("p_sample_loop", "ddim_sample_loop"):
        model = RecordingModel(C)
        getattr(spaced, loop)(model, noise.shape, noise=noise, condition=sar)
        assert _original_t_per_call(model.calls) == expected, loop
        _check_condition(model.calls, sar)

    model = RecordingModel(C)
    spaced.ddim_reverse_sample(model, x_start, th.tensor([0, 3]), condition=sar)
    assert _original_t_per_call(model.calls) == [[kept[0], kept[3]]]
    _check_condition(model.calls, sar)

    model = RecordingModel(C)
    spaced.calc_bpd_loop(model, x_start, condition=sar)
    assert sorted(call["t"][0].item() for call in model.calls) == kept
    _check_condition(model.calls, sar)

    # A second run must not map the indices twice.
    model = RecordingModel(C)
    spaced.p_sample_loop(model, noise.shape, noise=noise, condition=sar)
    spaced.p_sample_loop(model, noise.shape, noise=noise, condition=sar)
    assert _original_t_per_call(model.calls) == expected * 2


@pytest.mark.parametrize("loss_type", list(gd.LossType))
def test_training_calls_the_model_with_original_indices(loss_type):
    learned = loss_type.is_vb()
    spaced = _spaced(
        "10",
        loss_type=loss_type,
        model_var_type=gd.ModelVarType.LEARNED_RANGE
        if learned
        else gd.ModelVarType.FIXED_LARGE,
    )
    kept = [int(i) for i in spaced.timestep_map]
    x_start, sar, noise = _data(3)
    t = th.tensor([0, 4, 9])
    model = RecordingModel(2 * C if learned else C)
    losses = spaced.training_losses(model, x_start, sar, t, noise=noise)
    assert th.isfinite(losses["loss"]).all()
    assert _original_t_per_call(model.calls)[0] == [kept[0], kept[4], kept[9]]
    _check_condition(model.calls, sar)
    th.testing.assert_close(
        model.calls[0]["x"][:, :C], spaced.q_sample(x_start, t, noise=noise)
    )


def test_rescaled_timesteps_are_original_indices_on_a_1000_scale():
    spaced = _spaced("5", rescale_timesteps=True)
    kept = [int(i) for i in spaced.timestep_map]
    _, sar, noise = _data(2)
    model = RecordingModel(C)
    spaced.ddim_sample_loop(model, noise.shape, noise=noise, condition=sar)
    seen = [call["t"][0].item() for call in model.calls]
    expected = [k * 1000.0 / BASE_STEPS for k in reversed(kept)]
    assert seen == pytest.approx(expected)


def test_cond_fn_sees_original_indices():
    spaced = _spaced("5")
    kept = [int(i) for i in spaced.timestep_map]
    _, sar, noise = _data(2)
    seen = []

    def cond_fn(x, t, **kwargs):
        seen.append(t[0].item())
        return th.zeros_like(x)

    spaced.p_sample_loop(
        RecordingModel(C), noise.shape, noise=noise, condition=sar, cond_fn=cond_fn
    )
    assert seen == list(reversed(kept))


# ---------------------------------------------------------------- the real model


@pytest.mark.parametrize(
    "respacing,loop", [("ddim25", "ddim_sample_loop"), ("25", "p_sample_loop")]
)
def test_respaced_sampling_with_the_unet(respacing, loop):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing=respacing)
    assert isinstance(diffusion, SpacedDiffusion)
    assert diffusion.num_timesteps == 25 and diffusion.original_num_steps == 50
    randomize_(model, seed=2)
    th.manual_seed(0)
    sar = th.rand(2, 3, 32, 32) * 2 - 1
    shape = (2, C, 32, 32)
    with th.no_grad():
        sample = getattr(diffusion, loop)(model, shape, condition=sar)
    assert sample.shape == shape
    assert th.isfinite(sample).all()
    # Both loops end with the clipped x_0 prediction.
    assert sample.min() >= -1 and sample.max() <= 1
