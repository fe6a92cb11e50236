"""Tests of guided_diffusion.gaussian_diffusion against closed forms and round trips."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch as th
from conftest import (
    FixedOutputModel,
    GaussianEpsModel,
    RecordingModel,
    linear_diffusion,
    randomize_,
    tiny_model_and_diffusion,
)

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

C = 3  # optical channels
# The linear schedule needs more than 20 steps (its last beta is 0.02 * 1000 / steps).
T = 50
SAR_C = 3  # SAR channels, the paper's default


def _bcast(values, ndim=4):
    """Numpy per-example values -> float64 tensor of shape (N, 1, ..., 1)."""
    return th.as_tensor(np.asarray(values, dtype=np.float64)).view(
        -1, *([1] * (ndim - 1))
    )


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _data(n, size=4, seed=0):
    """x_start in [-1, 1], a SAR condition with values far from it, and noise."""
    gen = th.Generator().manual_seed(seed)
    x_start = th.rand(n, C, size, size, generator=gen) * 2 - 1
    sar = th.randn(n, SAR_C, size, size, generator=gen) + 5.0
    noise = th.randn(n, C, size, size, generator=gen)
    return x_start, sar, noise


class MixingModel(th.nn.Module):
    """A cheap deterministic model whose output depends on x_t, the condition and t."""

    def __init__(self, out_channels=C):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, t, **kwargs):
        t = t.float().view(-1, 1, 1, 1)
        noisy, cond = x[:, :C], x[:, C:]
        out = th.tanh(0.7 * noisy + 0.1 * cond.mean(dim=1, keepdim=True) + 0.01 * t)
        if self.out_channels == 2 * C:
            out = th.cat([out, th.tanh(noisy)], dim=1)
        return out


def _linear_schedule(num_steps=T):
    """
    betas, alphas_cumprod and alphas_cumprod_prev of the linear schedule from its
    definition (evenly spaced betas from 1e-4 s to 0.02 s, s = 1000 / steps),
    computed here in float64 rather than read from the diffusion.
    """
    scale = 1000 / num_steps
    betas = np.linspace(1e-4 * scale, 0.02 * scale, num_steps)
    abar = np.cumprod(1 - betas)
    return betas, abar, np.append(1.0, abar[:-1])


def _hand_xstart_from_eps(model, x, sar, i, abar):
    """Clipped x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), in float64."""
    t = th.full((x.shape[0],), i)
    eps = model(th.cat([x, sar], dim=1), t).double()
    x0 = (x.double() - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
    return x0.clamp(-1, 1)


def _assert_condition_seen(calls, sar, channels=C):
    assert calls, "the model was never called"
    for call in calls:
        x = call["x"]
        assert x.shape[1] == channels + sar.shape[1]
        assert th.equal(x[:, channels:], sar), "SAR condition must follow x_t unchanged"


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("num_steps", [50, 1000, 2000])
def test_linear_schedule_is_scaled_linspace(num_steps):
    betas = gd.get_named_beta_schedule("linear", num_steps)
    scale = 1000 / num_steps
    expected = np.linspace(0.0001 * scale, 0.02 * scale, num_steps, dtype=np.float64)
    assert betas.dtype == np.float64
    assert betas.shape == (num_steps,)
    np.testing.assert_allclose(betas, expected, rtol=1e-15, atol=0)


def test_cosine_schedule_follows_alpha_bar():
    num_steps = 50
    betas = gd.get_named_beta_schedule("cosine", num_steps)

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
        for i in range(num_steps)
    ]
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[-1] == pytest.approx(0.999)


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = gd.betas_for_alpha_bar(4, lambda u: 1.0 - u, max_beta=0.5)
    # 1 - abar(u2)/abar(u1) for u = 0, .25, .5, .75, 1: .25, 1/3, .5, 1 -> clipped
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.5], rtol=1e-12)


def test_unknown_schedule_is_rejected():
    with pytest.raises((NotImplementedError, ValueError), match="nonexistent"):
        gd.get_named_beta_schedule("nonexistent", 10)


def test_loss_type_is_vb():
    assert gd.LossType.KL.is_vb() and gd.LossType.RESCALED_KL.is_vb()
    assert not gd.LossType.MSE.is_vb() and not gd.LossType.RESCALED_MSE.is_vb()


def test_coefficient_tables_match_schedule():
    diffusion = linear_diffusion(T)
    betas = gd.get_named_beta_schedule("linear", T)
    abar = np.array([np.prod(1 - betas[: i + 1]) for i in range(T)])
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(diffusion.alphas_cumprod, abar, rtol=1e-13)
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev, abar_prev, rtol=1e-13)
    np.testing.assert_allclose(diffusion.alphas_cumprod_next, np.append(abar[1:], 0.0))
    np.testing.assert_allclose(diffusion.sqrt_alphas_cumprod, np.sqrt(abar))
    np.testing.assert_allclose(
        diffusion.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar)
    )
    np.testing.assert_allclose(diffusion.log_one_minus_alphas_cumprod, np.log(1 - abar))
    np.testing.assert_allclose(diffusion.sqrt_recip_alphas_cumprod, 1 / np.sqrt(abar))
    np.testing.assert_allclose(
        diffusion.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1)
    )
    assert diffusion.num_timesteps == T
    for name in [
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]:
        assert getattr(diffusion, name).dtype == np.float64, name


# ---------------------------------------------------------------- q(x_t | x_0)


def test_q_mean_variance_closed_form():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    betas = gd.get_named_beta_schedule("linear", num_steps)
    x_start, _, _ = _data(num_steps)
    t = th.arange(num_steps)
    mean, variance, log_variance = diffusion.q_mean_variance(x_start, t)
    abar = np.array([np.prod(1 - betas[: i + 1]) for i in range(num_steps)])
    th.testing.assert_close(mean.double(), _bcast(np.sqrt(abar)) * x_start.double())
    expected_var = _bcast(1 - abar).expand(-1, *x_start.shape[1:])
    th.testing.assert_close(variance.double().expand_as(expected_var), expected_var)
    th.testing.assert_close(
        log_variance.double().expand_as(expected_var),
        expected_var.log(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_q_sample_moments():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    n = 20000
    th.manual_seed(0)
    x_start = th.full((num_steps, 1, n, 1), 0.6)
    x_t = diffusion.q_sample(x_start, th.arange(num_steps))
    abar = diffusion.alphas_cumprod
    mean = x_t.double().mean(dim=(1, 2, 3)).numpy()
    var = x_t.double().var(dim=(1, 2, 3)).numpy()
    # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance.
    assert np.all(np.abs(mean - 0.6 * np.sqrt(abar)) < 5 * np.sqrt((1 - abar) / n))
    assert np.all(np.abs(var - (1 - abar)) < 5 * (1 - abar) * np.sqrt(2 / n))


def test_q_sample_uses_given_noise():
    diffusion = linear_diffusion(T)
    x_start, _, noise = _data(T)
    t = th.arange(T)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    abar = _bcast(diffusion.alphas_cumprod)
    expected = abar.sqrt() * x_start.double() + (1 - abar).sqrt() * noise.double()
    th.testing.assert_close(x_t.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- posterior


def test_posterior_matches_bayes_rule():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    betas = gd.get_named_beta_schedule("linear", num_steps)
    x_start, _, _ = _data(num_steps)
    x_t = th.randn_like(x_start)
    t = th.arange(num_steps)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)

    # Product of q(x_t | x_{t-1}) = N(sqrt(1-b_t) x_{t-1}, b_t) and
    # q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) in x_{t-1}.
    abar_prev = np.array([np.prod(1 - betas[:i]) for i in range(num_steps)])
    for i in range(1, num_steps):
        precision = (1 - betas[i]) / betas[i] + 1 / (1 - abar_prev[i])
        var = 1 / precision
        mu = var * (
            math.sqrt(1 - betas[i]) / betas[i] * x_t[i].double()
            + math.sqrt(abar_prev[i]) / (1 - abar_prev[i]) * x_start[i].double()
        )
        th.testing.assert_close(mean[i].double(), mu, rtol=1e-5, atol=1e-5)
        assert th.allclose(
            variance[i].double(), th.tensor(var, dtype=th.float64), rtol=1e-5
        )
        assert th.allclose(
            log_variance[i].double(),
            th.tensor(math.log(var), dtype=th.float64),
            rtol=1e-5,
        )
    # At t = 0 the posterior is a point mass at x_0; its log variance is clipped
    # to the t = 1 value so that it stays finite.
    th.testing.assert_close(mean[0], x_start[0], rtol=1e-5, atol=1e-6)
    assert th.all(variance[0] == 0)
    assert th.allclose(
        log_variance[0].double(),
        th.tensor(math.log(diffusion.posterior_variance[1]), dtype=th.float64),
    )


def test_predict_xstart_from_eps_inverts_q_sample():
    diffusion = linear_diffusion(T)
    x_start, _, noise = _data(T)
    t = th.arange(T)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    th.testing.assert_close(
        diffusion._predict_xstart_from_eps(x_t, t, noise), x_start, rtol=0, atol=1e-4
    )
    th.testing.assert_close(
        diffusion._predict_eps_from_xstart(x_t, t, x_start), noise, rtol=0, atol=1e-4
    )


# ---------------------------------------------------------------- p(x_{t-1} | x_t)


@pytest.mark.parametrize(
    "var_type",
    [
        gd.ModelVarType.FIXED_SMALL,
        gd.ModelVarType.FIXED_LARGE,
        gd.ModelVarType.LEARNED,
        gd.ModelVarType.LEARNED_RANGE,
    ],
)
@pytest.mark.parametrize(
    "mean_type",
    [gd.ModelMeanType.EPSILON, gd.ModelMeanType.START_X, gd.ModelMeanType.PREVIOUS_X],
)
def test_ideal_model_recovers_x_start_at_every_t(mean_type, var_type):
    num_steps = T
    diffusion = linear_diffusion(
        num_steps, model_mean_type=mean_type, model_var_type=var_type
    )
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    true_mean, _, _ = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    target = {
        gd.ModelMeanType.EPSILON: noise,
        gd.ModelMeanType.START_X: x_start,
        gd.ModelMeanType.PREVIOUS_X: true_mean,
    }[mean_type]
    if var_type in (gd.ModelVarType.LEARNED, gd.ModelVarType.LEARNED_RANGE):
        target = th.cat([target, th.zeros_like(target)], dim=1)
    out = diffusion.p_mean_variance(
        FixedOutputModel(target), x_t, t, clip_denoised=False, condition=sar
    )
    # Recovering x_0 amplifies float32 rounding at the last step: by
    # 1 / sqrt(abar_T) ~ 360 from eps, by 1 / posterior_mean_coef1 ~ 700 from x_{t-1}.
    atol = 5e-4 if mean_type == gd.ModelMeanType.PREVIOUS_X else 1e-4
    th.testing.assert_close(out["pred_xstart"], x_start, rtol=0, atol=atol)
    th.testing.assert_close(out["mean"], true_mean, rtol=0, atol=1e-4)
    assert out["variance"].shape[0] == num_steps
    assert out["log_variance"].shape[0] == num_steps


def test_fixed_variances():
    num_steps = T
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    model = FixedOutputModel(noise)
    small = linear_diffusion(num_steps, model_var_type=gd.ModelVarType.FIXED_SMALL)
    out = small.p_mean_variance(model, x_start, t, condition=sar)
    expected = _bcast(small.posterior_variance).float().expand_as(x_start)
    th.testing.assert_close(out["variance"].expand_as(x_start), expected)
    expected_log = (
        _bcast(small.posterior_log_variance_clipped).float().expand_as(x_start)
    )
    th.testing.assert_close(out["log_variance"].expand_as(x_start), expected_log)

    large = linear_diffusion(num_steps, model_var_type=gd.ModelVarType.FIXED_LARGE)
    out = large.p_mean_variance(model, x_start, t, condition=sar)
    # guided-diffusion's choice: beta_t, with the first entry replaced by the
    # t = 1 posterior variance so that the decoder likelihood stays finite.
    betas = np.append(large.posterior_variance[1], large.betas[1:])
    expected = _bcast(betas).float().expand_as(x_start)
    th.testing.assert_close(out["variance"].expand_as(x_start), expected)
    th.testing.assert_close(out["log_variance"].expand_as(x_start), expected.log())


def test_learned_variances():
    num_steps = T
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    v = th.rand_like(x_start) * 2 - 1
    model = FixedOutputModel(th.cat([noise, v], dim=1))

    learned = linear_diffusion(num_steps, model_var_type=gd.ModelVarType.LEARNED)
    out = learned.p_mean_variance(model, x_start, t, condition=sar)
    th.testing.assert_close(out["log_variance"], v)
    th.testing.assert_close(out["variance"], v.exp())

    ranged = linear_diffusion(num_steps, model_var_type=gd.ModelVarType.LEARNED_RANGE)
    out = ranged.p_mean_variance(model, x_start, t, condition=sar)
    frac = (v.double() + 1) / 2
    min_log = _bcast(ranged.posterior_log_variance_clipped)
    max_log = _bcast(np.log(ranged.betas))
    expected = frac * max_log + (1 - frac) * min_log
    th.testing.assert_close(
        out["log_variance"].double(), expected, rtol=1e-5, atol=1e-5
    )
    th.testing.assert_close(
        out["variance"].double(), expected.exp(), rtol=1e-5, atol=1e-7
    )


def test_clip_and_denoised_fn_act_on_pred_xstart():
    num_steps = T
    diffusion = linear_diffusion(num_steps, model_mean_type=gd.ModelMeanType.START_X)
    x_start, sar, _ = _data(num_steps)
    x_start = x_start * 3  # beyond [-1, 1]
    t = th.arange(num_steps)
    model = FixedOutputModel(x_start)
    clipped = diffusion.p_mean_variance(
        model, x_start, t, clip_denoised=True, condition=sar
    )
    th.testing.assert_close(clipped["pred_xstart"], x_start.clamp(-1, 1))
    halved = diffusion.p_mean_variance(
        model,
        x_start,
        t,
        clip_denoised=False,
        denoised_fn=lambda x: x / 2,
        condition=sar,
    )
    th.testing.assert_close(halved["pred_xstart"], x_start / 2)


# ---------------------------------------------------------------- DDPM sampling


def test_p_sample_loop_draws_noise_in_the_standard_order():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    _, sar, _ = _data(2, seed=1)
    model = MixingModel()
    shape = (2, C, 4, 4)

    th.manual_seed(123)
    sample = diffusion.p_sample_loop(model, shape, condition=sar)

    # Reference: th.randn(*shape) for x_T, then one th.randn_like per step,
    # including t = 0 where the noise is masked out.
    th.manual_seed(123)
    x = th.randn(*shape)
    for i in reversed(range(num_steps)):
        t = th.full((shape[0],), i, dtype=th.long)
        out = diffusion.p_mean_variance(model, x, t, condition=sar)
        noise = th.randn_like(x)
        x = out["mean"] + (i > 0) * th.exp(0.5 * out["log_variance"]) * noise
    assert sample.shape == shape
    th.testing.assert_close(sample, x, rtol=0, atol=1e-6)

    th.manual_seed(123)
    again = diffusion.p_sample_loop(model, shape, condition=sar)
    assert th.equal(sample, again)


def test_p_sample_at_t0_returns_the_mean():
    diffusion = linear_diffusion(T)
    x_start, sar, _ = _data(2)
    t = th.zeros(2, dtype=th.long)
    model = MixingModel()
    out = diffusion.p_sample(model, x_start, t, condition=sar)
    ref = diffusion.p_mean_variance(model, x_start, t, condition=sar)
    th.testing.assert_close(out["sample"], ref["mean"])
    th.testing.assert_close(out["pred_xstart"], ref["pred_xstart"])


def test_progressive_loop_yields_every_ancestral_step_computed_by_hand():
    """
    Every yielded step is Ho et al. 2020's ancestral step, written out in float64
    from the previous yielded sample: x_0 from eps (clipped), the posterior mean
    mu = (beta_t sqrt(abar_{t-1}) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) x_t) / (1 - abar_t),
    x_{t-1} = mu + sqrt(beta_t) z (the fixed "large" variance) with z the next draw
    of the global generator, and x_{-1} = mu at t = 0. p_sample_loop returns the last.
    """
    diffusion = linear_diffusion(T)
    betas, abar, abar_prev = _linear_schedule()
    _, sar, noise = _data(2)
    model = MixingModel()
    th.manual_seed(0)
    steps = list(
        diffusion.p_sample_loop_progressive(
            model, noise.shape, noise=noise, condition=sar
        )
    )
    th.manual_seed(0)
    draws = [th.randn(noise.shape).double() for _ in range(T)]
    assert len(steps) == T
    x = noise
    for i, step, z in zip(reversed(range(T)), steps, draws):
        x0 = _hand_xstart_from_eps(model, x, sar, i, abar)
        mean = (
            betas[i] * math.sqrt(abar_prev[i]) * x0
            + (1 - abar_prev[i]) * math.sqrt(1 - betas[i]) * x.double()
        ) / (1 - abar[i])
        expected = mean + math.sqrt(betas[i]) * z if i > 0 else mean
        # float32 against float64: x_0 from eps amplifies rounding by 1 / sqrt(abar).
        th.testing.assert_close(step["pred_xstart"].double(), x0, rtol=0, atol=1e-4)
        th.testing.assert_close(step["sample"].double(), expected, rtol=0, atol=1e-4)
        x = step["sample"]
    th.manual_seed(0)
    final = diffusion.p_sample_loop(model, noise.shape, noise=noise, condition=sar)
    th.testing.assert_close(final.double(), expected, rtol=0, atol=1e-4)


def test_cond_fn_shifts_the_mean_by_variance_times_gradient():
    diffusion = linear_diffusion(T, model_var_type=gd.ModelVarType.FIXED_SMALL)
    x_start, sar, _ = _data(2)
    t = th.tensor([3, 7])
    model = MixingModel()
    gradient = th.full_like(x_start, 0.3)

    th.manual_seed(5)
    plain = diffusion.p_sample(model, x_start, t, condition=sar)["sample"]
    th.manual_seed(5)
    guided = diffusion.p_sample(
        model, x_start, t, condition=sar, cond_fn=lambda x, t, **kwargs: gradient
    )["sample"]
    variance = _bcast(diffusion.posterior_variance[t.numpy()]).float()
    th.testing.assert_close(guided - plain, variance * gradient, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- DDIM


def test_ddim_steps_of_an_ideal_model_stay_on_the_noise_path():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    model = FixedOutputModel(noise)
    abar_prev = _bcast(diffusion.alphas_cumprod_prev)
    abar_next = _bcast(diffusion.alphas_cumprod_next)

    prev = diffusion.ddim_sample(
        model, x_t, t, clip_denoised=False, eta=0.0, condition=sar
    )
    expected = (
        abar_prev.sqrt() * x_start.double() + (1 - abar_prev).sqrt() * noise.double()
    )
    th.testing.assert_close(prev["sample"].double(), expected, rtol=0, atol=1e-4)
    th.testing.assert_close(prev["pred_xstart"], x_start, rtol=0, atol=1e-4)

    nxt = diffusion.ddim_reverse_sample(
        model, x_t, t, clip_denoised=False, condition=sar
    )
    expected = (
        abar_next.sqrt() * x_start.double() + (1 - abar_next).sqrt() * noise.double()
    )
    th.testing.assert_close(nxt["sample"].double(), expected, rtol=0, atol=1e-4)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    diffusion = linear_diffusion(T)
    _, sar, noise = _data(2)
    model = MixingModel()
    runs = []
    for seed in (0, 1):
        th.manual_seed(seed)
        runs.append(
            diffusion.ddim_sample_loop(
                model, noise.shape, noise=noise, condition=sar, eta=0.0
            )
        )
    assert runs[0].shape == noise.shape
    assert th.equal(runs[0], runs[1])

    stochastic = []
    for seed in (0, 1):
        th.manual_seed(seed)
        stochastic.append(
            diffusion.ddim_sample_loop(
                model, noise.shape, noise=noise, condition=sar, eta=1.0
            )
        )
    assert not th.allclose(stochastic[0], stochastic[1])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_progressive_yields_every_step_of_eq_12_computed_by_hand(eta):
    """
    Every yielded step is Song et al. 2020, eq. 12, written out in float64 from the
    previous yielded sample: x_0 from eps (clipped), eps recomputed from that x_0,
    x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z
    with sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
    (eq. 16) and z the next draw of the global generator. ddim_sample_loop returns
    the last.
    """
    diffusion = linear_diffusion(T)
    _, abar, abar_prev = _linear_schedule()
    _, sar, noise = _data(2)
    model = MixingModel()
    kwargs = dict(noise=noise, condition=sar, eta=eta)
    th.manual_seed(0)
    steps = list(diffusion.ddim_sample_loop_progressive(model, noise.shape, **kwargs))
    th.manual_seed(0)
    draws = [th.randn(noise.shape).double() for _ in range(T)]
    assert len(steps) == T
    x = noise
    for i, step, z in zip(reversed(range(T)), steps, draws):
        x0 = _hand_xstart_from_eps(model, x, sar, i, abar)
        eps = (x.double() - math.sqrt(abar[i]) * x0) / math.sqrt(1 - abar[i])
        sigma = (
            eta
            * math.sqrt((1 - abar_prev[i]) / (1 - abar[i]))
            * math.sqrt(1 - abar[i] / abar_prev[i])
        )
        expected = (
            math.sqrt(abar_prev[i]) * x0
            + math.sqrt(1 - abar_prev[i] - sigma**2) * eps
            + sigma * z
        )
        th.testing.assert_close(step["pred_xstart"].double(), x0, rtol=0, atol=1e-4)
        th.testing.assert_close(step["sample"].double(), expected, rtol=0, atol=1e-4)
        x = step["sample"]
    th.manual_seed(0)
    final = diffusion.ddim_sample_loop(model, noise.shape, **kwargs)
    th.testing.assert_close(final.double(), expected, rtol=0, atol=1e-4)


def test_ddim_round_trip_on_gaussian_data_improves_with_steps():
    base_steps = 1000
    betas = gd.get_named_beta_schedule("linear", base_steps)
    base = gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    mu, s = 0.3, 0.5
    gen = th.Generator().manual_seed(0)
    x_start = mu + s * th.randn(4, C, 8, 8, generator=gen)

    errors, encoding_errors = [], []
    for steps in (10, 50, 200):
        diffusion = SpacedDiffusion(
            space_timesteps(base_steps, str(steps)),
            betas=betas,
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=gd.ModelVarType.FIXED_LARGE,
            loss_type=gd.LossType.MSE,
        )
        model = GaussianEpsModel(base.alphas_cumprod, mu, s)
        x = x_start
        for i in range(steps):
            t = th.full((x.shape[0],), i, dtype=th.long)
            x = diffusion.ddim_reverse_sample(model, x, t, clip_denoised=False)[
                "sample"
            ]
        # For Gaussian data the exact DDIM ODE maps x_0 to (x_0 - mu) / s.
        encoding_errors.append(_rel_err(x, (x_start - mu) / s))
        recovered = diffusion.ddim_sample_loop(
            model, x.shape, noise=x, clip_denoised=False
        )
        errors.append(_rel_err(recovered, x_start))
        # The model must be called with original indices, the ones it was built for.
        seen = set(th.cat(model.seen_t).tolist())
        assert seen == {int(i) for i in diffusion.timestep_map}
    # A float64 numpy run of the same algorithm gives round-trip errors of
    # 0.41, 0.094, 0.025 and encoding errors of 0.28, 0.056, 0.014: both fall
    # roughly as 1 / steps.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 5 * errors[2] and errors[2] < 0.05, errors
    assert encoding_errors[0] > encoding_errors[1] > encoding_errors[2], encoding_errors
    assert encoding_errors[2] < 0.03, encoding_errors


# ---------------------------------------------------------------- training


ALL_COMBINATIONS = list(
    itertools.product(gd.ModelMeanType, gd.ModelVarType, gd.LossType)
)


@pytest.fixture(scope="module")
def tiny_unets():
    """Randomised tiny U-Nets, keyed by learn_sigma, with their initial weights."""
    nets = {}
    for learned in (False, True):
        model, _ = tiny_model_and_diffusion(learn_sigma=learned)
        randomize_(model, seed=int(learned))
        nets[learned] = (model, copy.deepcopy(model.state_dict()))
    return nets


@pytest.mark.parametrize(
    "mean_type,var_type,loss_type",
    ALL_COMBINATIONS,
    ids=[f"{m.name}-{v.name}-{lt.name}" for m, v, lt in ALL_COMBINATIONS],
)
def test_every_combination_trains_one_step(tiny_unets, mean_type, var_type, loss_type):
    learned = var_type in (gd.ModelVarType.LEARNED, gd.ModelVarType.LEARNED_RANGE)
    model, initial = tiny_unets[learned]
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    diffusion = linear_diffusion(
        T, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type
    )
    th.manual_seed(0)
    # The U-Net is fully convolutional: 16x16 inputs exercise every block at a
    # quarter of the cost of its nominal 32x32.
    x_start = th.rand(2, C, 16, 16) * 2 - 1
    sar = th.rand(2, SAR_C, 16, 16) * 2 - 1
    t = th.tensor([0, T - 1])
    optimizer = th.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    losses = diffusion.training_losses(model, x_start, sar, t)
    if loss_type.is_vb():
        expected_keys = {"loss"}
    else:
        expected_keys = {"loss", "mse", "vb"} if learned else {"loss", "mse"}
    assert set(losses) == expected_keys
    for value in losses.values():
        assert value.shape == (2,)
        assert th.isfinite(value).all()
    if not loss_type.is_vb():
        extra = losses["vb"] if learned else 0
        th.testing.assert_close(losses["loss"], losses["mse"] + extra)

    losses["loss"].mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert th.isfinite(param.grad).all(), name
    optimizer.step()
    assert any(not th.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("mean_type", list(gd.ModelMeanType))
def test_mse_target_per_mean_type(mean_type):
    """
    The MSE is the mean of (target - output)^2 per example, with the target written
    out here: the noise (eps), x_0, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, or
    the posterior mean of x_{t-1} given x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    """
    num_steps = T
    diffusion = linear_diffusion(num_steps, model_mean_type=mean_type)
    betas, abar, abar_prev = _linear_schedule(num_steps)
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    output = 0.25  # a model that outputs 0 could not tell target - output from +
    losses = diffusion.training_losses(
        RecordingModel(C, fill=output), x_start, sar, t, noise=noise
    )
    x0, eps = x_start.double(), noise.double()
    x_t = _bcast(np.sqrt(abar)) * x0 + _bcast(np.sqrt(1 - abar)) * eps
    posterior_mean = (
        _bcast(betas * np.sqrt(abar_prev)) * x0
        + _bcast((1 - abar_prev) * np.sqrt(1 - betas)) * x_t
    ) / _bcast(1 - abar)
    target = {
        gd.ModelMeanType.EPSILON: eps,
        gd.ModelMeanType.START_X: x0,
        gd.ModelMeanType.PREVIOUS_X: posterior_mean,
        gd.ModelMeanType.VELOCITY: _bcast(np.sqrt(abar)) * eps
        - _bcast(np.sqrt(1 - abar)) * x0,
    }[mean_type]
    expected = ((target - output) ** 2).mean(dim=(1, 2, 3))
    th.testing.assert_close(losses["mse"].double(), expected, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(losses["loss"], losses["mse"])


def test_vb_terms_vanish_for_the_true_posterior():
    num_steps = T
    diffusion = linear_diffusion(num_steps, model_var_type=gd.ModelVarType.FIXED_SMALL)
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    out = diffusion._vb_terms_bpd(
        FixedOutputModel(noise), x_start, x_t, t, clip_denoised=False, condition=sar
    )
    # Exact mean and posterior variance: KL(q || p) = 0 for t > 0.
    th.testing.assert_close(
        out["output"][1:], th.zeros(num_steps - 1), rtol=0, atol=1e-4
    )
    # t = 0 is the decoder's negative log-likelihood in bits: positive and finite.
    assert th.isfinite(out["output"][0]) and out["output"][0] > 0
    th.testing.assert_close(out["pred_xstart"], x_start, rtol=0, atol=1e-4)


def test_vb_losses_and_their_rescaling():
    num_steps = T
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    model = MixingModel(out_channels=2 * C)
    results = {}
    for loss_type in gd.LossType:
        diffusion = linear_diffusion(
            num_steps, model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=loss_type
        )
        results[loss_type] = diffusion.training_losses(
            model, x_start, sar, t, noise=noise
        )

    x_t = diffusion.q_sample(x_start, t, noise=noise)
    vb = diffusion._vb_terms_bpd(
        model, x_start, x_t, t, clip_denoised=False, condition=sar
    )["output"]
    th.testing.assert_close(results[gd.LossType.KL]["loss"], vb, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(
        results[gd.LossType.RESCALED_KL]["loss"], vb * num_steps, rtol=1e-5, atol=1e-6
    )
    th.testing.assert_close(results[gd.LossType.MSE]["vb"], vb, rtol=1e-5, atol=1e-6)
    # RESCALED_MSE keeps the vb term on the scale of a 1000-step schedule.
    th.testing.assert_close(
        results[gd.LossType.RESCALED_MSE]["vb"],
        vb * num_steps / 1000.0,
        rtol=1e-5,
        atol=1e-6,
    )
    th.testing.assert_close(
        results[gd.LossType.MSE]["mse"], results[gd.LossType.RESCALED_MSE]["mse"]
    )


def test_vb_term_does_not_train_the_mean():
    num_steps = T
    diffusion = linear_diffusion(
        num_steps, model_var_type=gd.ModelVarType.LEARNED_RANGE
    )
    x_start, sar, noise = _data(num_steps)
    t = th.arange(num_steps)
    mean_part = th.zeros(num_steps, C, 4, 4, requires_grad=True)
    var_part = th.zeros(num_steps, C, 4, 4, requires_grad=True)

    def model(x, t, **kwargs):
        return th.cat([mean_part, var_part], dim=1)

    losses = diffusion.training_losses(model, x_start, sar, t, noise=noise)
    losses["vb"].sum().backward()
    assert mean_part.grad is None or th.all(mean_part.grad == 0)
    assert var_part.grad is not None and var_part.grad.abs().sum() > 0


def test_prior_bpd_closed_form():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    x_start, _, _ = _data(3)
    abar_T = diffusion.alphas_cumprod[-1]
    mean = math.sqrt(abar_T) * x_start.double()
    var = 1 - abar_T
    kl = 0.5 * (var + mean**2 - 1 - math.log(var))
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    th.testing.assert_close(
        diffusion._prior_bpd(x_start).double(), expected, rtol=1e-4, atol=1e-7
    )


def test_calc_bpd_loop_adds_up():
    num_steps = T
    diffusion = linear_diffusion(
        num_steps, model_var_type=gd.ModelVarType.LEARNED_RANGE
    )
    x_start, sar, _ = _data(2)
    th.manual_seed(0)
    out = diffusion.calc_bpd_loop(MixingModel(2 * C), x_start, condition=sar)
    assert out["vb"].shape == (2, num_steps)
    assert out["xstart_mse"].shape == (2, num_steps)
    assert out["mse"].shape == (2, num_steps)
    assert out["prior_bpd"].shape == (2,)
    th.testing.assert_close(out["prior_bpd"], diffusion._prior_bpd(x_start))
    th.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    assert th.isfinite(out["total_bpd"]).all()


def test_mean_flat():
    x = th.arange(24.0).view(2, 3, 4)
    th.testing.assert_close(gd.mean_flat(x), th.tensor([5.5, 17.5]))


# ---------------------------------------------------------------- the condition


def _check_training_inputs(model, diffusion, x_start, sar, t, noise):
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    _assert_condition_seen(model.calls, sar)
    for call in model.calls:
        th.testing.assert_close(call["x"][:, :C], x_t, rtol=0, atol=0)
        assert th.equal(call["t"], t)


@pytest.mark.parametrize("loss_type", list(gd.LossType))
@pytest.mark.parametrize("learned", [False, True])
def test_condition_reaches_model_in_training(loss_type, learned):
    var_type = gd.ModelVarType.LEARNED_RANGE if learned else gd.ModelVarType.FIXED_LARGE
    diffusion = linear_diffusion(T, model_var_type=var_type, loss_type=loss_type)
    x_start, sar, noise = _data(4)
    t = th.tensor([0, 3, 6, 9])
    model = RecordingModel(2 * C if learned else C)
    diffusion.training_losses(
        model, x_start, sar, t, model_kwargs={"y": 1}, noise=noise
    )
    _check_training_inputs(model, diffusion, x_start, sar, t, noise)
    assert all(call["kwargs"] == {"y": 1} for call in model.calls)


def test_condition_reaches_model_in_every_sampling_loop():
    num_steps = T
    diffusion = linear_diffusion(num_steps)
    x_start, sar, noise = _data(2)
    expected_t = [th.full((2,), i) for i in reversed(range(num_steps))]

    model = RecordingModel(C)
    diffusion.p_sample_loop(model, noise.shape, noise=noise, condition=sar)
    _assert_condition_seen(model.calls, sar)
    assert [c["t"].tolist() for c in model.calls] == [t.tolist() for t in expected_t]

    model = RecordingModel(C)
    diffusion.ddim_sample_loop(model, noise.shape, noise=noise, condition=sar)
    _assert_condition_seen(model.calls, sar)
    assert [c["t"].tolist() for c in model.calls] == [t.tolist() for t in expected_t]

    model = RecordingModel(C)
    diffusion.ddim_reverse_sample(model, x_start, th.tensor([0, 2]), condition=sar)
    _assert_condition_seen(model.calls, sar)

    model = RecordingModel(C)
    diffusion.calc_bpd_loop(model, x_start, condition=sar)
    _assert_condition_seen(model.calls, sar)
    assert sorted(c["t"][0].item() for c in model.calls) == list(range(num_steps))

    model = RecordingModel(C)
    diffusion.p_mean_variance(model, x_start, th.tensor([1, 4]), condition=sar)
    _assert_condition_seen(model.calls, sar)


def test_without_condition_the_model_sees_x_t_only():
    diffusion = linear_diffusion(T)
    _, _, noise = _data(2)
    model = RecordingModel(C)
    diffusion.p_sample_loop(model, noise.shape, noise=noise)
    assert all(call["x"].shape[1] == C for call in model.calls)
    th.testing.assert_close(model.calls[0]["x"], noise, rtol=0, atol=0)


def test_rescale_timesteps_scales_to_1000():
    diffusion = linear_diffusion(T, rescale_timesteps=True)
    x_start, sar, noise = _data(3)
    model = RecordingModel(C)
    diffusion.training_losses(model, x_start, sar, th.tensor([0, 25, 49]), noise=noise)
    th.testing.assert_close(model.calls[0]["t"].float(), th.tensor([0.0, 500.0, 980.0]))


# ---------------------------------------------------------------- per-sample noise


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_generator_list_makes_samples_independent_of_batch(loop):
    diffusion = linear_diffusion(T)
    _, sar, _ = _data(2, seed=3)
    model = MixingModel()
    kwargs = dict(eta=1.0) if loop == "ddim_sample_loop" else {}
    run = getattr(diffusion, loop)

    def gens(*seeds):
        return [th.Generator().manual_seed(s) for s in seeds]

    pair = run(model, (2, C, 4, 4), condition=sar, generator=gens(10, 11), **kwargs)
    first = run(model, (1, C, 4, 4), condition=sar[:1], generator=gens(10), **kwargs)
    second = run(model, (1, C, 4, 4), condition=sar[1:], generator=gens(11), **kwargs)
    th.testing.assert_close(pair[:1], first, rtol=1e-5, atol=1e-6)
    th.testing.assert_close(pair[1:], second, rtol=1e-5, atol=1e-6)

    # The global generator must not leak into a seeded sample.
    th.manual_seed(0)
    a = run(model, (1, C, 4, 4), condition=sar[:1], generator=gens(10), **kwargs)
    th.manual_seed(1)
    b = run(model, (1, C, 4, 4), condition=sar[:1], generator=gens(10), **kwargs)
    assert th.equal(a, b)
    other = run(model, (1, C, 4, 4), condition=sar[:1], generator=gens(12), **kwargs)
    assert not th.allclose(first, other)


def test_single_generator_is_reproducible():
    diffusion = linear_diffusion(T)
    _, sar, _ = _data(2)
    model = MixingModel()
    a = diffusion.p_sample_loop(
        model, (2, C, 4, 4), condition=sar, generator=th.Generator().manual_seed(4)
    )
    b = diffusion.p_sample_loop(
        model, (2, C, 4, 4), condition=sar, generator=th.Generator().manual_seed(4)
    )
    c = diffusion.p_sample_loop(
        model, (2, C, 4, 4), condition=sar, generator=th.Generator().manual_seed(5)
    )
    assert th.equal(a, b)
    assert not th.allclose(a, c)


def test_real_unet_round_trip_through_training_and_sampling():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="5")
    randomize_(model, seed=1)
    th.manual_seed(0)
    x_start = th.rand(2, C, 32, 32) * 2 - 1
    sar = th.rand(2, SAR_C, 32, 32) * 2 - 1
    losses = diffusion.training_losses(model, x_start, sar, th.tensor([1, 4]))
    assert th.isfinite(losses["loss"]).all()
    with th.no_grad():
        sample = diffusion.p_sample_loop(model, x_start.shape, condition=sar)
    assert sample.shape == x_start.shape
    # The last DDPM step returns the clipped x_0 prediction.
    assert sample.min() >= -1 and sample.max() <= 1
    assert sample.std() > 0.01
