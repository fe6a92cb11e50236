"""
guided-diffusion's sampling methods, kept for code written against the original.

:class:`OriginalSampling` gives :class:`~.gaussian_diffusion.GaussianDiffusion`
the calls of guided-diffusion's ``GaussianDiffusion``: the single steps
(``p_sample``, ``ddim_sample``, ``ddim_reverse_sample``), the loops
(``p_sample_loop``, ``ddim_sample_loop``, ``ddim_reverse_sample_loop``) and
their progressive forms, with the original's arguments plus the SAR
``condition`` and the noise ``generator``. ``sample_loop`` is the same loop for
any sampler of :data:`~.samplers.SAMPLERS`, chosen by name.

It is a thin layer apart from the process: every call builds a
:class:`~.samplers.Denoiser` and runs the algorithm of :mod:`.samplers`, so the
original's calls and the project's sample alike, to the bit. The project's own
code calls the samplers directly (:func:`.samplers.run`).
"""

import torch as th

from .base import samplers


def _progress(steps, total, show):
    """The steps, counted by a progress bar when ``show``."""
    if not show:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=total, desc="sampling", unit="step", leave=False)


def _last(steps):
    """The "sample" of the last of the steps."""
    final = None
    for out in steps:
        final = out
    return final["sample"]


def resolve_device(device, model, noise, condition):
    """The device to sample on: as given, else the model's, the noise's or the condition's."""
    if device is not None:
        return th.device(device)
    if isinstance(model, th.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    for tensor in (noise, condition):
        if tensor is not None:
            return tensor.device
    return th.device("cpu")


class OriginalSampling:
    """
    guided-diffusion's sampling calls, for a class that has the process: its
    ``num_timesteps``, ``alphas_cumprod`` tables (``_extract``) and
    ``p_mean_variance``, as :class:`~.gaussian_diffusion.GaussianDiffusion` has.
    """

    def _denoiser(self, model, condition, clip_denoised, denoised_fn, cond_fn, model_kwargs, guidance):  # fmt: skip
        return samplers.Denoiser(
            self,
            model,
            condition,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            guidance=guidance,
        )

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        condition=None,
        generator=None,
    ):
        """
        One ancestral DDPM step: sample x_{t-1} from the model at x_t.

        :param t: a (N,) tensor of timesteps, one per image.
        :param generator: the noise source, see :func:`~.samplers.noise_like`.
        :return: a dict with "sample" (x_{t-1}) and "pred_xstart".
        """
        denoiser = self._denoiser(
            model, condition, clip_denoised, denoised_fn, cond_fn, model_kwargs, "mean"
        )
        out = denoiser(x, t)
        z = samplers.noise_like(x, generator)
        sample = samplers.ancestral_step(out, z, self._nonzero(t, x))
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        condition=None,
        generator=None,
    ):
        """
        One DDIM step (Song et al. 2020, eq. 12): x_t -> x_{t-1}.

        :param eta: 0 for the deterministic sampler, 1 for DDPM-like noise.
        """
        denoiser = self._denoiser(
            model, condition, clip_denoised, denoised_fn, cond_fn, model_kwargs, "score"
        )
        out = denoiser(x, t)
        z = samplers.noise_like(x, generator)
        abar = self._extract("alphas_cumprod", t, x.shape)
        abar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sample = samplers.ddim_step(out, z, abar, abar_prev, eta, self._nonzero(t, x))
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        condition=None,
    ):
        """One deterministic reverse DDIM step (the ODE run forwards): x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM step is deterministic: eta must be 0")
        denoiser = self._denoiser(
            model, condition, clip_denoised, denoised_fn, None, model_kwargs, "score"
        )
        out = denoiser(x, t)
        abar_next = self._extract("alphas_cumprod_next", t, x.shape)
        return {
            "sample": samplers.ddim_reverse_step(out, abar_next),
            "pred_xstart": out["pred_xstart"],
        }

    @staticmethod
    def _nonzero(t, x):
        """1 where a step has noise to add, 0 where it ends in the data: (N, 1, ...)."""
        return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))

    def sample_loop_progressive(
        self,
        model,
        shape,
        sampler="ddpm",
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        condition=None,
        generator=None,
        options=None,
    ):
        """
        Run a sampler of :data:`~.samplers.SAMPLERS` by name from x_T down to the data,
        yielding every step's dict ("sample", "pred_xstart").

        :param sampler: the sampler's name ("ddpm", "ddim", "dpm++2m", ...).
        :param noise: the start x_T; drawn from ``generator`` if None (from the global
            generator with ``th.randn(*shape)``, the draw other implementations make).
        :param options: the sampler's options, e.g. {"eta": 0.5} for DDIM.
        Other parameters as for :meth:`p_sample_loop`.
        """
        guidance = "mean" if sampler == "ddpm" else "score"
        denoiser = self._denoiser(
            model,
            condition,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            guidance,
        )
        device = resolve_device(device, model, noise, condition)
        x_T = (
            noise
            if noise is not None
            else samplers.noise_of_shape(shape, generator, device)
        )
        options = samplers.check_options(sampler, options or {})
        steps = samplers.SAMPLERS[sampler](
            denoiser, x_T, samplers.descending(denoiser), generator=generator, **options
        )
        yield from _progress(steps, self.num_timesteps, progress)

    def sample_loop(
        self,
        model,
        shape,
        sampler="ddpm",
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        condition=None,
        generator=None,
        options=None,
    ):
        """Like :meth:`sample_loop_progressive`, but return the final sample only."""
        return _last(
            self.sample_loop_progressive(
                model, shape, sampler, noise, clip_denoised, denoised_fn, cond_fn,
                model_kwargs, device, progress, condition, generator, options,
            )
        )  # fmt: skip

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        condition=None,
        generator=None,
    ):
        """
        Generate samples with ancestral DDPM sampling.

        :param shape: the shape of the samples, (N, C, H, W).
        :param condition: the clean SAR images, (N, C_sar, H, W).
        :param generator: the noise source, see :func:`~.samplers.noise_like`.
        :return: a tensor of samples of ``shape``.
        """
        return _last(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                model_kwargs, device, progress, condition, generator,
            )
        )  # fmt: skip

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        condition=None,
        generator=None,
    ):
        """Like :meth:`p_sample_loop`, but yield the dict of every step."""
        return self.sample_loop_progressive(
            model, shape, "ddpm", noise, clip_denoised, denoised_fn, cond_fn,
            model_kwargs, device, progress, condition, generator,
        )  # fmt: skip

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        condition=None,
        generator=None,
    ):
        """Generate samples with DDIM; see :meth:`p_sample_loop` for the arguments."""
        return _last(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                model_kwargs, device, progress, eta, condition, generator,
            )
        )  # fmt: skip

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        condition=None,
        generator=None,
    ):
        """Like :meth:`ddim_sample_loop`, but yield the dict of every step."""
        return self.sample_loop_progressive(
            model, shape, "ddim", noise, clip_denoised, denoised_fn, cond_fn,
            model_kwargs, device, progress, condition, generator, {"eta": eta},
        )  # fmt: skip

    def ddim_reverse_sample_loop(
        self,
        model,
        x_start,
        clip_denoised=False,
        denoised_fn=None,
        model_kwargs=None,
        condition=None,
        progress=False,
    ):
        """
        Encode images into the DDIM latent x_T by running the deterministic ODE forwards.

        :return: the latent, of x_start's shape.
        """
        denoiser = self._denoiser(
            model, condition, clip_denoised, denoised_fn, None, model_kwargs, "score"
        )
        steps = samplers.ddim_reverse(denoiser, x_start, range(self.num_timesteps))
        return _last(_progress(steps, self.num_timesteps, progress))
