"""
Tests of DPM-Solver++(2M) (guided_diffusion.base.samplers), and a common base that
every sampler registered in guided_diffusion.base.samplers.SAMPLERS passes through
the tiny U-Net (tests/test_sampler_contract.py holds the samplers' contract).

The solver is checked against the exact solution of the probability-flow ODE
for Gaussian data, where the exact noise and data predictors have closed forms.
"""

import numpy as np
import pytest
import torch as th
from conftest import (
    GaussianEpsModel,
    RecordingModel,
    randomize_,
    tiny_model_and_diffusion,
)

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.base import samplers
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def dpm_solver_sample_loop(diffusion, model, shape, **kwargs):
    return diffusion.sample_loop(model, shape, "dpm++2m", **kwargs)


def dpm_solver_sample_loop_progressive(diffusion, model, shape, **kwargs):
    return diffusion.sample_loop_progressive(model, shape, "dpm++2m", **kwargs)


# The Gaussian toy problem: x_0 ~ N(MU, S^2) in every dimension, on the
# 1000-step linear schedule.
MU, S = 0.3, 0.5
BASE_STEPS = 1000


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _spaced(respacing, base_steps=BASE_STEPS, **kwargs):
    options = dict(
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    options.update(kwargs)
    return SpacedDiffusion(
        space_timesteps(base_steps, respacing),
        betas=gd.get_named_beta_schedule("linear", base_steps),
        **options,
    )


class GaussianXStartModel(th.nn.Module):
    """
    The exact data predictor for x_0 ~ N(mu, s^2):
    E[x_0 | x_t] = mu + s^2 sqrt(abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar),
    looked up at the ORIGINAL timestep indices it receives.
    """

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.alphas_cumprod = th.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        self.mu = mu
        self.s = s

    def forward(self, x, t, **kwargs):
        abar = self.alphas_cumprod[t.long()].view(-1, *([1] * (x.dim() - 1)))
        x64 = x.double()
        x0 = self.mu + self.s**2 * abar.sqrt() * (x64 - abar.sqrt() * self.mu) / (
            abar * self.s**2 + 1 - abar
        )
        return x0.to(x.dtype)


class LearnedVarianceModel(th.nn.Module):
    """Wraps a model and appends a variance half that a sampler must ignore."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        return th.cat([out, th.full_like(out, 0.7)], dim=1)


def _toy_problem(seed=0):
    """x_T and the exact ODE solution from it: the standardised value is kept."""
    base_abar = np.cumprod(1 - gd.get_named_beta_schedule("linear", BASE_STEPS))
    x_T = th.randn(4, 3, 8, 8, generator=th.Generator().manual_seed(seed))
    abar_T = base_abar[-1]
    z = (x_T.double() - np.sqrt(abar_T) * MU) / np.sqrt(abar_T * S**2 + 1 - abar_T)
    return base_abar, x_T, MU + S * z


def _toy_model(mean_type, base_abar):
    if mean_type == gd.ModelMeanType.EPSILON:
        return GaussianEpsModel(base_abar, MU, S)
    return GaussianXStartModel(base_abar, MU, S)


def _errors(sampler, mean_type, step_counts):
    base_abar, x_T, exact = _toy_problem()
    model = _toy_model(mean_type, base_abar)
    errors = {}
    for steps in step_counts:
        diffusion = _spaced(str(steps), model_mean_type=mean_type)
        out = sampler(diffusion, model, x_T.shape, noise=x_T, clip_denoised=False)
        errors[steps] = _rel_err(out.double(), exact)
    return errors


def _ddim(diffusion, model, shape, **kwargs):
    return diffusion.ddim_sample_loop(model, shape, **kwargs)


# ---------------------------------------------------------------- the toy problem


@pytest.mark.parametrize(
    "mean_type", [gd.ModelMeanType.EPSILON, gd.ModelMeanType.START_X]
)
def test_converges_to_the_exact_ode_solution_faster_than_ddim(mean_type):
    counts = [5, 10, 20, 50]
    solver = _errors(dpm_solver_sample_loop, mean_type, counts)
    ddim = _errors(_ddim, mean_type, counts)
    print(f"{mean_type.name} relative error of the sample at t = 0")
    for steps in counts:
        print(
            f"  {steps:3d} steps: dpm++2m {solver[steps]:.2e}  ddim {ddim[steps]:.2e}"
        )
    assert all(solver[a] > solver[b] for a, b in zip(counts, counts[1:])), solver
    assert solver[50] < 1e-2
    # Second order pays off once there are a few second-order updates.
    for steps in (10, 20, 50):
        assert solver[steps] < ddim[steps], (steps, solver, ddim)
    assert solver[50] < ddim[50] / 10


def _dpm_solver_2m_reference(abar, x_T, data_prediction, second_order=True):
    """
    DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, in float64 numpy, on the grid
    t_0 = K-1, ..., t_{K-1} = 0 of K kept timesteps and a last update into the data
    (alpha 1, sigma 0, lambda +inf).

    The updates into timestep 0 and into the data are first order (the solver's
    documented "lower order final"); ``second_order=False`` makes every update
    first order, which is DDIM.

    :param abar: alphas_cumprod at the K kept timesteps, ascending in t.
    :param x_T: the start, numpy float64.
    :param data_prediction: a function (x, k) -> x_theta(x, t_k) for kept index k.
    :return: a list of (x_{t_i}, x_theta(x_{t_{i-1}})) per update, as numpy arrays.
    """
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    x, previous, updates = x_T, None, []
    for k in reversed(range(len(abar))):
        x0 = data_prediction(x, k)
        if k == 0:
            # h = +inf: sigma_{t_i} / sigma_{t_{i-1}} = 0 and -(e^{-h} - 1) = 1.
            x = x0
        else:
            h = lam[k - 1] - lam[k]
            d = x0
            if second_order and previous is not None and k > 1:
                r = previous[1] / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0]
            x = sigma[k - 1] / sigma[k] * x - alpha[k - 1] * np.expm1(-h) * d
            previous = (x0, h)
        updates.append((x, x0))
    return updates


@pytest.mark.parametrize(
    "mean_type", [gd.ModelMeanType.EPSILON, gd.ModelMeanType.START_X]
)
def test_every_update_follows_algorithm_2_computed_by_hand(mean_type):
    """
    Every yielded sample and data prediction equals a float64 numpy run of
    Lu et al. 2022, Algorithm 2 (x_{t_i} = sigma_i / sigma_{i-1} x - alpha_i
    (e^{-h_i} - 1) D_i with D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i)
    x_theta(t_{i-2})), fed the exact data predictor of the Gaussian toy problem.
    """
    base_abar, x_T, _ = _toy_problem(seed=1)
    kept = sorted(space_timesteps(BASE_STEPS, "10"))
    abar = base_abar[kept]

    def exact_x0(x, k):
        a = base_abar[kept[k]]
        return MU + S**2 * np.sqrt(a) * (x - np.sqrt(a) * MU) / (a * S**2 + 1 - a)

    x_T64 = x_T.double().numpy()
    reference = _dpm_solver_2m_reference(abar, x_T64, exact_x0)
    first_order = _dpm_solver_2m_reference(abar, x_T64, exact_x0, second_order=False)
    steps = list(
        dpm_solver_sample_loop_progressive(
            _spaced("10", model_mean_type=mean_type),
            _toy_model(mean_type, base_abar),
            x_T.shape,
            noise=x_T,
            clip_denoised=False,
        )
    )
    assert len(steps) == len(reference) == 10
    for i, (step, (sample, x0)) in enumerate(zip(steps, reference)):
        # float32 sampling against float64 arithmetic: turning eps into x_0 at
        # timestep 999 multiplies float32 rounding by sqrt(1 / abar - 1) ~ 160.
        th.testing.assert_close(
            step["pred_xstart"].double(), th.from_numpy(x0), rtol=1e-4, atol=1e-4
        )
        th.testing.assert_close(
            step["sample"].double(),
            th.from_numpy(sample),
            rtol=1e-4,
            atol=1e-4,
            msg=lambda m, i=i: f"update {i}: {m}",
        )
    # The second-order corrections move the path far beyond the tolerance.
    gap = max(np.abs(a[0] - b[0]).max() for a, b in zip(reference, first_order))
    assert gap > 1e-2, gap
    # The last update (into lambda = +inf) returns the data prediction at timestep 0.
    th.testing.assert_close(
        steps[-1]["sample"], steps[-1]["pred_xstart"], rtol=0, atol=0
    )


def test_the_variance_half_of_a_learned_variance_model_is_ignored():
    base_abar, x_T, _ = _toy_problem(seed=2)
    eps_model = GaussianEpsModel(base_abar, MU, S)
    plain = dpm_solver_sample_loop(
        _spaced("10"), eps_model, x_T.shape, noise=x_T, clip_denoised=False
    )
    learned = dpm_solver_sample_loop(
        _spaced("10", model_var_type=gd.ModelVarType.LEARNED_RANGE),
        LearnedVarianceModel(eps_model),
        x_T.shape,
        noise=x_T,
        clip_denoised=False,
    )
    th.testing.assert_close(learned, plain, rtol=0, atol=0)


def test_clip_denoised_and_denoised_fn_act_on_every_data_prediction():
    base_abar, x_T, _ = _toy_problem(seed=3)
    model = GaussianEpsModel(base_abar, MU, S)
    diffusion = _spaced("10")
    # MU + 2 S = 1.3: some of the data lies beyond 1 unless it is clipped.
    unclipped = dpm_solver_sample_loop(
        diffusion, model, x_T.shape, noise=x_T, clip_denoised=False
    )
    assert unclipped.abs().max() > 1.0
    clipped = list(
        dpm_solver_sample_loop_progressive(diffusion, model, x_T.shape, noise=x_T)
    )
    assert all(out["pred_xstart"].abs().max() <= 1.0 for out in clipped)
    # denoised_fn comes first, then the clip: every prediction ends up at 1.
    shifted = list(
        dpm_solver_sample_loop_progressive(
            diffusion, model, x_T.shape, noise=x_T, denoised_fn=lambda x: x + 10
        )
    )
    assert all(th.all(out["pred_xstart"] == 1.0) for out in shifted)
    assert th.all(shifted[-1]["sample"] == 1.0)


# ---------------------------------------------------------------- the condition and the noise


def test_the_condition_reaches_the_model_at_every_step():
    diffusion = _spaced("5", base_steps=50)
    model = RecordingModel(out_channels=3)
    gen = th.Generator().manual_seed(4)
    sar = th.randn(2, 3, 4, 4, generator=gen)
    x_T = th.randn(2, 3, 4, 4, generator=gen)
    steps = list(
        dpm_solver_sample_loop_progressive(
            diffusion, model, x_T.shape, noise=x_T, condition=sar
        )
    )
    assert len(model.calls) == len(steps) == 5
    x_t = x_T
    for call, out in zip(model.calls, steps):
        assert call["x"].shape == (2, 6, 4, 4)
        th.testing.assert_close(call["x"][:, :3], x_t, rtol=0, atol=0)
        th.testing.assert_close(call["x"][:, 3:], sar, rtol=0, atol=0)
        x_t = out["sample"]
    # The model sees the base process's timestep indices, from the top down.
    seen = [call["t"].tolist() for call in model.calls]
    assert seen == [[t, t] for t in sorted(diffusion.timestep_map, reverse=True)]
    assert seen[0] == [49, 49] and seen[-1] == [0, 0]


def _tiny_unet(respacing, size=16, seed=5):
    """The tiny U-Net with random weights; at 16x16 (attention at 8x8) by default."""
    model, diffusion = tiny_model_and_diffusion(
        timestep_respacing=respacing,
        image_size=size,
        attention_resolutions=str(size // 2),
    )
    randomize_(model, seed=seed)
    return model.eval(), diffusion


def test_without_noise_the_start_is_drawn_from_the_global_generator():
    model, diffusion = _tiny_unet("4")
    sar = th.randn(1, 3, 16, 16, generator=th.Generator().manual_seed(6))
    th.manual_seed(7)
    drawn = dpm_solver_sample_loop(diffusion, model, (1, 3, 16, 16), condition=sar)
    th.manual_seed(7)
    x_T = th.randn(1, 3, 16, 16)
    given = dpm_solver_sample_loop(
        diffusion, model, (1, 3, 16, 16), noise=x_T, condition=sar
    )
    th.testing.assert_close(drawn, given, rtol=0, atol=0)


def test_a_sample_depends_on_its_own_generator_only():
    model, diffusion = _tiny_unet("4")
    gen = th.Generator().manual_seed(8)
    sar = th.randn(2, 3, 16, 16, generator=gen)

    def generators(*seeds):
        return [th.Generator().manual_seed(s) for s in seeds]

    pair = dpm_solver_sample_loop(
        diffusion, model, (2, 3, 16, 16), condition=sar, generator=generators(10, 11)
    )
    alone = dpm_solver_sample_loop(
        diffusion, model, (1, 3, 16, 16), condition=sar[:1], generator=generators(10)
    )
    th.testing.assert_close(pair[:1], alone, rtol=1e-4, atol=1e-5)
    assert _rel_err(pair[1], pair[0]) > 0.1


def test_runs_the_tiny_unet_with_20_model_evaluations():
    model, diffusion = _tiny_unet("20", size=32)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[1]))
    sar = th.randn(1, 3, 32, 32, generator=th.Generator().manual_seed(9))
    out = dpm_solver_sample_loop(diffusion, model, (1, 3, 32, 32), condition=sar)
    assert out.shape == (1, 3, 32, 32)
    assert len(calls) == 20
    # The last update returns the clipped data prediction at timestep 0.
    assert th.isfinite(out).all() and out.abs().max() <= 1.0


# ---------------------------------------------------------------- a common base for samplers


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_sampler_shape_determinism_and_finite_output(name):
    # every registered sampler, run as the project runs one: x_T and every later
    # draw from the per-image generators
    model, diffusion = _tiny_unet("4")
    sar = th.randn(2, 3, 16, 16, generator=th.Generator().manual_seed(12))
    denoiser = samplers.Denoiser(diffusion, model, sar)

    def run(*seeds):
        gens = [th.Generator().manual_seed(s) for s in seeds]
        x_T = samplers.noise_of_shape((2, 3, 16, 16), gens, "cpu")
        return samplers.run(name, denoiser, x_T, generator=gens)

    first = run(20, 21)
    assert first.shape == (2, 3, 16, 16)
    assert th.isfinite(first).all()
    th.testing.assert_close(run(20, 21), first, rtol=0, atol=0)
    assert _rel_err(run(22, 23), first) > 0.1
