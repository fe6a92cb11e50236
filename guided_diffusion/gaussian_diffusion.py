"""
Gaussian diffusion for conditional image generation (DDPM, improved DDPM, DDIM).

The optical image ``x_start`` is diffused; the SAR image ``condition`` never is.
The model predicts the noise, x_0 or v (:class:`ModelMeanType`); every use of its
output goes through :meth:`GaussianDiffusion.p_mean_variance`, which turns each
into the prediction of x_0, except the training loss, which compares it with its
own target (optionally Min-SNR-gamma weighted, :func:`mse_loss_weights`).
Every call of the network goes through :meth:`GaussianDiffusion._model_output`,
which concatenates the clean condition to the noisy image (noisy optical first,
SAR second): training, DDPM, DDIM, the likelihood and the fast solvers all share it.
The samplers are in :mod:`.samplers`; guided-diffusion's sampling methods, kept
for code written against the original, in :mod:`.original_sampling`.

Schedule coefficients are computed once in float64 (numpy, as guided-diffusion
does, so the numbers agree bit for bit) and cached as tensors per device.
"""

import enum
import math

import numpy as np
import torch as th

from .base.samplers import noise_like, noise_of_shape  # noqa: F401  (their home before)
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .original_sampling import OriginalSampling


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    The beta schedule of a name, as a float64 numpy array.

    "linear" is the DDPM schedule scaled so that any number of steps spans the same
    noise levels as 1000 steps; "cosine" is improved DDPM's.

    :param schedule_name: "linear" or "cosine".
    :param num_diffusion_timesteps: the number of diffusion steps T.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        if beta_end >= 1.0:
            raise ValueError(
                f"--diffusion_steps {num_diffusion_timesteps} is too few for the linear schedule "
                "(its last beta would reach 1); use more than 20 steps or --noise_schedule cosine"
            )
        return np.linspace(
            beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise schedule {schedule_name!r}: use --noise_schedule linear or cosine"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(t), t in [0, 1], into betas.

    :param alpha_bar: the cumulative product of (1 - beta) as a function of t.
    :param max_beta: the largest beta allowed; keeps the last steps finite.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise
    # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans and Ho 2022,
    # "Progressive Distillation for Fast Sampling of Diffusion Models")
    VELOCITY = enum.auto()


# The --predict choices and the model output each names.
PREDICTION_TARGETS = {
    "eps": ModelMeanType.EPSILON,
    "x_start": ModelMeanType.START_X,
    "v": ModelMeanType.VELOCITY,
}


class ModelVarType(enum.Enum):
    """
    The variance of p(x_{t-1} | x_t): fixed (small = the true posterior variance,
    large = beta_t), or learned as a log value or as an interpolation between the two.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = (
        enum.auto()
    )  # MSE on the prediction (plus the VB term when learning the variance)
    RESCALED_MSE = enum.auto()  # the same with the VB term scaled as for RESCALED_KL
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VB scaled by T, comparable to the MSE loss

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion(OriginalSampling):
    """
    Utilities for training and sampling conditional diffusion models.

    The process itself (its schedule, q, the model's p, the losses and the bound)
    is here; guided-diffusion's sampling calls (``p_sample_loop``, ``ddim_sample_loop``
    and the rest) come from :class:`~.original_sampling.OriginalSampling`.

    :param betas: a 1-D numpy array of betas for each diffusion step, from T=0 up.
    :param model_mean_type: a ModelMeanType: what the model outputs.
    :param model_var_type: a ModelVarType: how the variance is found.
    :param loss_type: a LossType: the training loss.
    :param rescale_timesteps: feed the model floats in [0, 1000) instead of step
        indices, so that models trained with different T see the same range.
    :param snr_gamma: Min-SNR-gamma weighting of the MSE loss (Hang et al. 2023,
        "Efficient Diffusion Training via Min-SNR Weighting Strategy"); None or 0:
        off, every timestep's MSE counts as it is. See :func:`mse_loss_weights`.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
        snr_gamma=None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.snr_gamma = _check_snr_gamma(snr_gamma, model_mean_type, loss_type)

        # Use float64 for accuracy; tensors are made from these once per device.
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        if self.num_timesteps < 1:
            raise ValueError("a diffusion process needs at least 1 step")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # The forward process q(x_t | x_0) and its inversion.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # The posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the
        # log is clipped by repeating the value at t = 1.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # the variance at t = 0 is 0: its log is clipped to t = 1's, or, in a process of
        # one step (a distilled student sampled in one call), to that step's beta
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(
            np.append(first, self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - self.alphas_cumprod)
        )

        # The reverse process: fixed "large" variance (beta_t, with the posterior's
        # value at t = 0 so the log stays finite), the learned range's upper end, and
        # the inversion of the posterior mean for PREVIOUS_X models.
        self.fixed_large_variance = np.append(first, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.log_betas = np.log(betas)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = (
            self.posterior_mean_coef2 / self.posterior_mean_coef1
        )

        # The loss weight per timestep (Min-SNR-gamma), or None when off.
        self.mse_loss_weight = (
            None
            if self.snr_gamma is None
            else mse_loss_weights(self.alphas_cumprod, self.snr_gamma, model_mean_type)
        )

        self._tables = {}

    # -- coefficient lookup -------------------------------------------------------

    def _extract(self, name, t, broadcast_shape):
        """
        Look up the float64 table ``name`` at timesteps ``t`` and broadcast it.

        :param name: an attribute name, e.g. "alphas_cumprod".
        :param t: a tensor of timestep indices, (N,).
        :param broadcast_shape: a shape (N, ...) to broadcast the (N,) values to.
        :return: a float32 tensor of ``broadcast_shape``.
        """
        table = self._table(name, t.device)
        res = table[t].float()
        while len(res.shape) < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    def _table(self, name, device):
        key = (name, device)
        table = self._tables.get(key)
        if table is None:
            values = getattr(self, name)
            # float64 where the device supports it, so values are cast to float32
            # only after the lookup, as guided-diffusion does.
            dtype = th.float32 if device.type == "mps" else th.float64
            table = th.as_tensor(values, dtype=dtype, device=device)
            self._tables[key] = table
        return table

    # -- the forward process ------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :param x_start: the noiseless images, (N, C, H, W).
        :param t: the number of diffusion steps minus one, (N,).
        :return: a tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Diffuse the data t + 1 steps: sample from q(x_t | x_0).

        :param noise: the Gaussian noise to use; drawn with th.randn_like if None.
        :return: x_t, of x_start's shape.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def fixed_variance(self, t, shape):
        """
        The variance of p(x_{t-1} | x_t) of a model that does not learn it.

        :return: (variance, log_variance), float32 tensors of ``shape``.
        """
        names = {
            ModelVarType.FIXED_LARGE: (
                "fixed_large_variance",
                "fixed_large_log_variance",
            ),
            ModelVarType.FIXED_SMALL: (
                "posterior_variance",
                "posterior_log_variance_clipped",
            ),
        }[self.model_var_type]
        return self._extract(names[0], t, shape), self._extract(names[1], t, shape)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The diffusion posterior q(x_{t-1} | x_t, x_0).

        :return: a tuple (mean, variance, log_variance_clipped).
        """
        assert x_start.shape == x_t.shape
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract(
            "posterior_log_variance_clipped", t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # -- the model and the reverse process ----------------------------------------

    def _model_output(self, model, x_t, t, condition=None, model_kwargs=None):
        """
        Call the network on the noisy image and the clean condition.

        This is the one place where the SAR condition meets the model: the input is
        ``cat([x_t, condition], dim=1)``, noisy optical channels first.

        :param x_t: the noisy images, (N, C, H, W).
        :param t: timestep indices, (N,).
        :param condition: the clean SAR images, (N, C_sar, H, W), or None.
        :return: the raw model output, (N, C or 2C, H, W).
        """
        if model_kwargs is None:
            model_kwargs = {}
        model_in = (
            x_t if condition is None else th.cat([x_t, condition.to(x_t.dtype)], dim=1)
        )
        return model(model_in, self._scale_timesteps(t), **model_kwargs)

    def p_mean_variance(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        condition=None,
    ):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: the model, called as model(cat([x_t, condition]), t, **model_kwargs).
        :param x: the (N, C, H, W) tensor at time t.
        :param t: a (N,) tensor of timesteps.
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :param condition: the clean SAR images, or None for an unconditional model.
        :return: a dict with "mean", "variance", "log_variance" and "pred_xstart".
        """
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = self._model_output(model, x, t, condition, model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = th.exp(model_log_variance)
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                # The model outputs values in [-1, 1] that interpolate the log variance.
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = th.exp(model_log_variance)
        else:
            model_variance, model_log_variance = self.fixed_variance(t, x.shape)

        def process_xstart(x):
            if denoised_fn is not None:
                x = denoised_fn(x)
            if clip_denoised:
                return x.clamp(-1, 1)
            return x

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(
                self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
            )
            model_mean = model_output
        elif self.model_mean_type in (
            ModelMeanType.START_X,
            ModelMeanType.EPSILON,
            ModelMeanType.VELOCITY,
        ):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_v(x_t=x, t=t, v=model_output)
                )
            else:
                pred_xstart = process_xstart(
                    self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
                )
            model_mean, _, _ = self.q_posterior_mean_variance(
                x_start=pred_xstart, x_t=x, t=t
            )
        else:
            raise NotImplementedError(self.model_mean_type)

        assert (
            model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        )
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_v(self, x_t, t, v):
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        assert x_t.shape == v.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * v
        )

    def _predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        assert x_t.shape == v.shape
        return (
            self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * x_t
            + self._extract("sqrt_alphas_cumprod", t, x_t.shape) * v
        )

    def _v_from_xstart_and_eps(self, x_start, t, eps):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0: what a v model is trained on."""
        assert x_start.shape == eps.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * eps
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * x_start
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        assert x_t.shape == xprev.shape
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the mean by the gradient of a log-probability, cond_fn(x, t) = grad log p(y|x)
        (Sohl-Dickstein et al. 2015).
        """
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the score by the gradient of a log-probability, for DDIM
        (Song et al. 2020, score-based conditioning).
        """
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(
            x, self._scale_timesteps(t), **(model_kwargs or {})
        )
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(
            x_start=out["pred_xstart"], x_t=x, t=t
        )
        return out

    # -- training -----------------------------------------------------------------

    def training_losses(
        self, model, x_start, condition, t, model_kwargs=None, noise=None
    ):
        """
        Training losses for one step.

        :param model: the model, called as model(cat([x_t, condition]), t, **model_kwargs).
        :param x_start: the clean optical images, (N, C, H, W), in [-1, 1].
        :param condition: the clean SAR images, (N, C_sar, H, W), never noised.
        :param t: a batch of timestep indices, (N,).
        :param noise: the Gaussian noise to add; th.randn_like(x_start) if None.
        :return: a dict of (N,) tensors: "loss", and "mse" / "vb" where they apply.
            "mse" is the plain mean squared error on the model's target (eps, x_0,
            v or x_{t-1}); "loss" is it times the Min-SNR-gamma weight of each
            example's timestep when ``snr_gamma`` is on (see
            :func:`mse_loss_weights`), plus the VB term, which is never weighted.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
                condition=condition,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = self._model_output(model, x_t, t, condition, model_kwargs)

            if self.model_var_type in (
                ModelVarType.LEARNED,
                ModelVarType.LEARNED_RANGE,
            ):
                B, C = x_t.shape[:2]
                assert model_output.shape == (B, C * 2, *x_t.shape[2:])
                model_output, model_var_values = th.split(model_output, C, dim=1)
                # The VB term learns the variance only: the mean gets no gradient from it.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for equivalence with the original paper's
                    # "Loss.RESCALED_KL" term without compounding it with T.
                    terms["vb"] *= self.num_timesteps / 1000.0

            target = {
                ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(
                    x_start=x_start, x_t=x_t, t=t
                )[0],
                ModelMeanType.START_X: lambda: x_start,
                ModelMeanType.EPSILON: lambda: noise,
                ModelMeanType.VELOCITY: lambda: self._v_from_xstart_and_eps(
                    x_start, t, noise
                ),
            }[self.model_mean_type]()
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            mse = terms["mse"]
            if self.mse_loss_weight is not None:
                # a weight per example, by its timestep; an importance sampler of
                # timesteps (resample.py) then sees and balances the weighted loss,
                # the one the gradient follows
                mse = mse * self._table("mse_loss_weight", t.device)[t].to(mse.dtype)
            terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    # -- the variational bound ----------------------------------------------------

    def _vb_terms_bpd(
        self,
        model,
        x_start,
        x_t,
        t,
        clip_denoised=True,
        model_kwargs=None,
        condition=None,
    ):
        """
        One term of the variational bound, in bits per dimension: KL(q(x_{t-1}|x_t,x_0)
        || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL -log p(x_0|x_1) at t = 0.

        :return: a dict with "output" (an (N,) tensor) and "pred_xstart".
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model,
            x_t,
            t,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            condition=condition,
        )
        kl = normal_kl(
            true_mean, true_log_variance_clipped, out["mean"], out["log_variance"]
        )
        kl = mean_flat(kl) / np.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)

        output = th.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _prior_bpd(self, x_start):
        """
        The prior term KL(q(x_T|x_0) || N(0, I)) in bits per dimension; it does not
        depend on the model and is close to zero for a well designed schedule.

        :return: an (N,) tensor.
        """
        batch_size = x_start.shape[0]
        t = th.full(
            (batch_size,), self.num_timesteps - 1, device=x_start.device, dtype=th.long
        )
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(
            mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0
        )
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model,
        x_start,
        clip_denoised=True,
        model_kwargs=None,
        condition=None,
        progress=False,
    ):
        """
        The whole variational bound in bits per dimension, and related quantities.

        :param x_start: the clean optical images, (N, C, H, W).
        :param condition: the clean SAR images.
        :return: a dict of "total_bpd" (N,), "prior_bpd" (N,), and "vb", "xstart_mse",
            "mse" (N, T): each term per timestep.
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="bpd", unit="step", leave=False)
        for t in indices:
            # filled on the device: a list made into a tensor there is a copy from
            # the host, which waits for the work queued before it, at every step
            t_batch = th.full((batch_size,), t, device=device, dtype=th.long)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                    condition=condition,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def mse_loss_weights(alphas_cumprod, snr_gamma, model_mean_type):
    """
    The Min-SNR-gamma weight of each timestep's MSE (Hang et al. 2023), for the
    model's target.

    With SNR(t) = abar_t / (1 - abar_t), the weight of an MSE on x_0 is
    min(SNR, gamma). The same x_0 error makes the eps error sqrt(SNR) times and
    the v error sqrt(SNR + 1) times as large (x_t fixed: eps = (x_t - sqrt(abar)
    x_0) / sqrt(1 - abar), v = (sqrt(abar) x_t - x_0) / sqrt(1 - abar)), so the
    weights are

    * eps: min(SNR, gamma) / SNR,
    * x_0: min(SNR, gamma),
    * v: min(SNR, gamma) / (SNR + 1),

    and for the same x_0 error the three weighted losses are equal, each
    min(SNR, gamma) |x_0 error|^2: one objective, whatever the model outputs.

    gamma = inf gives back, for every target, the unweighted eps loss (Ho et al.'s
    L_simple, SNR |x_0 error|^2): for eps that is its own unweighted loss, for x_0
    it is its MSE times SNR, for v its MSE times SNR / (SNR + 1) = abar. Dividing
    each target's weights by their gamma = inf limit instead would give every
    target back its own unweighted loss at gamma = inf, but would make the three
    objectives differ by the factors SNR and SNR + 1 at every other gamma: the
    property that defines the weighting (one objective, three parametrisations)
    would be lost, so it is not done. Training without the weighting (``snr_gamma`` off)
    is each target's own unweighted loss.

    :param alphas_cumprod: abar of the (respaced) schedule, float64 numpy array.
    :param snr_gamma: gamma > 0; math.inf is allowed.
    :param model_mean_type: ModelMeanType.EPSILON, START_X or VELOCITY.
    :return: a float64 numpy array of weights, one per timestep.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    snr = abar / (1.0 - abar)
    clipped = np.minimum(snr, snr_gamma)
    # the weight of an x_0 error, divided by what that error costs in the target
    return clipped / MIN_SNR_TARGETS[model_mean_type](snr)


# ModelMeanType -> SNR -> (the target's squared error) / (the x_0 squared error).
MIN_SNR_TARGETS = {
    ModelMeanType.EPSILON: lambda snr: snr,
    ModelMeanType.START_X: lambda snr: np.ones_like(snr),
    ModelMeanType.VELOCITY: lambda snr: snr + 1.0,
}


def _check_snr_gamma(snr_gamma, model_mean_type, loss_type):
    """snr_gamma as the diffusion keeps it: None when off, else a float > 0."""
    if snr_gamma is None or snr_gamma == 0:
        return None
    snr_gamma = float(snr_gamma)
    if not snr_gamma > 0:  # negative or nan
        raise ValueError(
            f"--snr_gamma {snr_gamma}: give a positive gamma (the paper uses 5), "
            "inf, or 0 for no weighting"
        )
    if loss_type.is_vb():
        raise ValueError(
            f"--snr_gamma {snr_gamma} weights the MSE loss, but --use_kl True trains "
            "on the variational bound alone: give one"
        )
    if model_mean_type not in MIN_SNR_TARGETS:
        raise ValueError(
            f"Min-SNR weighting is defined for the eps, x_start and v targets, "
            f"not {model_mean_type.name}"
        )
    return snr_gamma
