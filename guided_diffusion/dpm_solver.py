"""
DPM-Solver++(2M): a second-order multistep solver of the probability-flow ODE
(Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2), on the model's own discrete schedule.

The solver is deterministic given x_T and second order in the log-SNR step, so
it needs far fewer model evaluations than ancestral sampling. The number of
evaluations is the diffusion's ``num_timesteps``: build the diffusion with
``--timestep_respacing 20`` for 20 evaluations; the time grid is its timesteps
T-1, ..., 0, followed by a last update from timestep 0 to the clean data. Every model call goes through ``diffusion.p_mean_variance``,
so eps- and x_start-predicting models (with or without a learned variance, whose
half is ignored) work alike and the SAR condition is attached in the one helper
that all samplers share.
"""

import numpy as np
import torch as th

from .gaussian_diffusion import resolve_device


def dpm_solver_sample_loop(
    diffusion,
    model,
    shape,
    noise=None,
    clip_denoised=True,
    denoised_fn=None,
    model_kwargs=None,
    device=None,
    progress=False,
    condition=None,
    generator=None,
):
    """
    Generate samples with DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2).

    :param diffusion: the (respaced) GaussianDiffusion whose timesteps T-1, ..., 0
        are the solver's time grid; one model evaluation per timestep.
    :param model: the model, called through the diffusion with the condition.
    :param shape: the shape of the samples, (N, C, H, W).
    :param noise: the starting x_T; drawn as :meth:`p_sample_loop` draws it if None.
    :param clip_denoised: clip every data prediction to [-1, 1].
    :param denoised_fn: applied to every data prediction before clipping.
    :param model_kwargs: extra keyword arguments for the model.
    :param device: the device to sample on (default: the model's).
    :param progress: show a progress bar.
    :param condition: the clean SAR images, (N, C_sar, H, W), or None.
    :param generator: the source of the starting noise, see
        :func:`~guided_diffusion.gaussian_diffusion.noise_like`; the solver itself
        draws no further random numbers.
    :return: a tensor of samples of ``shape``.
    """
    for out in dpm_solver_sample_loop_progressive(
        diffusion,
        model,
        shape,
        noise=noise,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        model_kwargs=model_kwargs,
        device=device,
        progress=progress,
        condition=condition,
        generator=generator,
    ):
        sample = out["sample"]
    return sample


def dpm_solver_sample_loop_progressive(
    diffusion,
    model,
    shape,
    noise=None,
    clip_denoised=True,
    denoised_fn=None,
    model_kwargs=None,
    device=None,
    progress=False,
    condition=None,
    generator=None,
):
    """
    Like :func:`dpm_solver_sample_loop`, but yield a dict per step: "sample" (x at
    the next timestep; the clean data after the last step) and "pred_xstart" (the
    data prediction at the current timestep).
    """
    device = resolve_device(device, model, noise, condition)
    alpha, sigma, lam = _schedule_tables(diffusion, device)
    # The multistep history: the previous data prediction and step size, (N, 1, ...).
    history = {}

    def step(x, t):
        # The update goes from t_{i-1} (timestep t, table position t + 1) to t_i
        # (timestep t - 1, or the clean data after timestep 0: position t).
        start, end = t + 1, t

        def per_sample(values):
            return values.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, ...)

        # 1. The data prediction x_theta(x_{t_{i-1}}, t_{i-1}).
        x0 = diffusion.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            condition=condition,
        )["pred_xstart"]
        # 2. h_i = lambda_{t_i} - lambda_{t_{i-1}}; +inf on the last update.
        h = per_sample(lam[end]) - per_sample(lam[start])
        # 3. D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i) x_theta(t_{i-2}),
        #    r_i = h_{i-1} / h_i. First order (D_i = x_theta(t_{i-1})) on the first
        #    update, which has no history, and on the last two (lower order final):
        #    on a grid even in t, the interval into timestep 0 is several times
        #    longer in lambda than the one before it, so the linear extrapolation
        #    overshoots there, and into the data r_i = 0 (the update then returns
        #    x_theta at timestep 0).
        if history:
            half_inv_r = th.where(per_sample(t <= 1), 0.0, h / (2 * history["h"]))
            d = x0 + half_inv_r.to(x.dtype) * (x0 - history["x0"])
        else:
            d = x0
        # 4. x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}}
        #              - alpha_{t_i} (e^{-h_i} - 1) D_i
        sigma_ratio = per_sample(sigma[end]) / per_sample(sigma[start])
        data_coef = -per_sample(alpha[end]) * th.expm1(-h)
        sample = sigma_ratio.to(x.dtype) * x + data_coef.to(x.dtype) * d
        history.update(x0=x0, h=h)
        return {"sample": sample, "pred_xstart": x0}

    yield from diffusion.sample_loop_progressive(
        step,
        shape,
        noise=noise,
        device=device,
        progress=progress,
        generator=generator,
    )


def _schedule_tables(diffusion, device):
    """
    alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]) and
    lambda_t = log(alpha_t / sigma_t) of the diffusion's discrete schedule.

    Position 0 is the clean data (alpha 1, sigma 0, lambda +inf) and position t + 1
    is timestep t, so that every step, the last included, reads its end point at
    the index of its timestep.

    :return: three 1-D tensors of length num_timesteps + 1 on ``device``, float64
        where the device has it.
    """
    alphas_cumprod = np.append(1.0, diffusion.alphas_cumprod)
    alpha = np.sqrt(alphas_cumprod)
    sigma = np.sqrt(1.0 - alphas_cumprod)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    dtype = th.float32 if device.type == "mps" else th.float64
    return tuple(
        th.as_tensor(a, dtype=dtype, device=device) for a in (alpha, sigma, lam)
    )
