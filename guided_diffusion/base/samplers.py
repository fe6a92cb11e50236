"""
Samplers of the reverse diffusion process, all with one signature.

A sampler is a generator function

    sampler(denoiser, x, timesteps, *, generator=None, history=None, **options)

that starts from ``x`` (x_T, shape (N, C, H, W)), visits ``timesteps`` (indices
into the denoiser's schedule, in the order given: descending from T - 1 to 0 for
sampling) and yields after every step a dict with "sample" (the state after the
step; the clean image after the last one) and "pred_xstart" (that step's
prediction of x_0). ``generator`` is the source of every random number it draws
(see :func:`noise_like`). ``options`` are the sampler's own (DDIM's eta,
DPM-Solver++'s order and final-step rule).

A run can be continued from any step: give the sampler the state after step k as
``x``, the timesteps from step k + 1 on, the generator as it was after step k,
and ``history``, {"t": step k's timestep, "pred_xstart": step k's prediction},
for a multistep sampler (DPM-Solver++ reuses the previous prediction; DDPM and
DDIM ignore it). The continued run then gives what the whole run gives, to the
bit. Scenes use this to save and resume long jobs, and to update a scene band
by band (guided_diffusion/translation/scene.py).

``denoiser(x_t, t)`` is a :class:`Denoiser`: the network with the SAR condition,
the clipping and the timestep respacing bound inside it, returning what
``GaussianDiffusion.p_mean_variance`` returns plus the implied noise. A sampler
sees tensors and numbers only, never a model, a tile, a rank or a file, so
anything that maps (x_t, t) to those predictions (a tiled scene, a toy with an
exact answer) can be sampled by every sampler.

:func:`run` drives a sampler, chosen by name from :data:`SAMPLERS`, to the end.
This module imports nothing from the rest of the package.
"""

import inspect
import math

import torch as th

# Sampler name -> generator function; filled by @register.
SAMPLERS = {}
# The samplers of distilled students (base/consistency.py); the others sample
# diffusion models.
STUDENT_SAMPLERS = set()


def register(name, *, students=False):
    """
    Add a sampler to :data:`SAMPLERS` under ``name``.

    :param students: it samples distilled students (consistency models), not
        diffusion models.
    """

    def add(fn):
        SAMPLERS[name] = fn
        if students:
            STUDENT_SAMPLERS.add(name)
        return fn

    return add


def samplers_for(student):
    """The registered samplers of a distilled student (True) or of a diffusion model
    (False), in their registered order."""
    return [n for n in SAMPLERS if (n in STUDENT_SAMPLERS) == bool(student)]


def sampler_options(name):
    """
    The options of a registered sampler and their defaults: its keyword-only
    parameters other than ``generator`` and ``history``.

    :raises ValueError: for an unknown name, listing the known ones.
    """
    if name not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}"
        )
    params = inspect.signature(SAMPLERS[name]).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind == p.KEYWORD_ONLY and p.name not in ("generator", "history")
    }


def check_options(name, options):
    """
    Fail early on options a sampler does not have.

    :param options: option name -> value; an option at its default is accepted
        for every sampler (so a shared flag such as ``--eta 0`` never gets in the way).
    :return: the options the sampler takes, with the others (at their defaults) left out.
    :raises ValueError: naming the option, the sampler and the options it has.
    """
    known = sampler_options(name)
    taken = {}
    for key, value in options.items():
        if key in known:
            taken[key] = value
        elif value:
            others = [n for n in SAMPLERS if key in sampler_options(n)]
            hint = f"; {key} is an option of {' and '.join(others)}" if others else ""
            raise ValueError(
                f"{key} {value}: the {name} sampler has no option {key} (its options: "
                f"{', '.join(known) or 'none'}){hint}"
            )
    return taken


def run(
    name, denoiser, x, timesteps=None, *, generator=None, history=None, callback=None,
    **options,
):
    """
    Run a registered sampler to the end.

    :param name: a key of :data:`SAMPLERS`.
    :param denoiser: a :class:`Denoiser` (or anything with its call and its
        ``alphas_cumprod``).
    :param x: the start x_T, (N, C, H, W).
    :param timesteps: the indices to visit; all of the schedule, descending, if None.
    :param generator: the noise source, see :func:`noise_like`.
    :param history: where a continued run starts from (see the module's docstring).
    :param callback: called as callback(i, out) after step i with the step's dict.
    :param options: the sampler's options (see :func:`sampler_options`).
    :return: the final sample, of x's shape.
    """
    options = check_options(name, options)
    steps = SAMPLERS[name](
        denoiser,
        x,
        descending(denoiser) if timesteps is None else timesteps,
        generator=generator,
        # a sampler that cannot continue a run takes no history
        **({} if history is None else {"history": history}),
        **options,
    )
    for i, out in enumerate(steps):
        if callback is not None:
            callback(i, out)
        x = out["sample"]
    return x


def descending(denoiser):
    """Every timestep of the denoiser's schedule, T - 1 down to 0."""
    return range(len(denoiser.alphas_cumprod) - 1, -1, -1)


class Denoiser:
    """
    The model as a sampler sees it: (x_t, t) -> its predictions, with the SAR
    condition, the clipping and the timestep respacing bound.

    :param diffusion: the (respaced) GaussianDiffusion; its ``alphas_cumprod``
        (float64) is the schedule the samplers read.
    :param model: the network, called through the diffusion on cat([x_t, condition]).
    :param condition: the clean SAR images, (N, C_sar, H, W), or None.
    :param clip_denoised: clip the x_0 prediction to [-1, 1].
    :param denoised_fn: applied to the x_0 prediction before clipping.
    :param model_kwargs: extra keyword arguments for the model.
    :param cond_fn: guidance, cond_fn(x, t, **model_kwargs) = grad log p(y | x_t);
        applied to the mean (``guidance="mean"``, guided-diffusion's DDPM) or to
        the score (``"score"``, its DDIM).
    """

    def __init__(
        self,
        diffusion,
        model,
        condition=None,
        *,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        cond_fn=None,
        guidance="mean",
    ):
        self.diffusion = diffusion
        self.model = model
        self.condition = condition
        self.clip_denoised = clip_denoised
        self.denoised_fn = denoised_fn
        self.model_kwargs = model_kwargs
        self.cond_fn = cond_fn
        self.guidance = guidance
        self.alphas_cumprod = diffusion.alphas_cumprod

    @th.no_grad()
    def __call__(self, x, t):
        """
        :param x: x_t, (N, C, H, W).
        :param t: a timestep index (int) or one per image, (N,).
        :return: a dict with "mean", "variance", "log_variance" (of p(x_{t-1} | x_t)),
            "pred_xstart" (x_0, clipped when asked) and "eps" (the noise that
            pred_xstart implies), each (N, C, H, W).
        """
        if not th.is_tensor(t):
            t = th.full((x.shape[0],), int(t), device=x.device, dtype=th.long)
        d = self.diffusion
        out = d.p_mean_variance(
            self.model,
            x,
            t,
            clip_denoised=self.clip_denoised,
            denoised_fn=self.denoised_fn,
            model_kwargs=self.model_kwargs,
            condition=self.condition,
        )
        if self.cond_fn is not None:
            if self.guidance == "mean":
                out["mean"] = d.condition_mean(
                    self.cond_fn, out, x, t, self.model_kwargs
                )
            else:
                out = d.condition_score(self.cond_fn, out, x, t, self.model_kwargs)
        out["eps"] = d._predict_eps_from_xstart(x, t, out["pred_xstart"])
        return out


# -- the samplers -------------------------------------------------------------------


@register("ddpm")
def ddpm(denoiser, x, timesteps, *, generator=None, history=None):
    """
    Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
    Algorithm 2), with the model's variance (fixed or learned). ``timesteps`` must
    be consecutive: each step is the model's transition t -> t - 1.
    """
    for t in timesteps:
        out = denoiser(x, t)
        # 1. z ~ N(0, I); drawn at t = 0 as well (and unused), so the random stream
        #    is the one other implementations of this sampler draw.
        z = noise_like(x, generator)
        # 2. x_{t-1} = mu_theta(x_t, t) + sigma_t z, no noise into the data.
        x = ancestral_step(out, z, float(t != 0))
        yield {"sample": x, "pred_xstart": out["pred_xstart"]}


def ancestral_step(out, z, nonzero):
    """mu + exp(log_variance / 2) z; ``nonzero`` (a number or (N, 1, ...)) masks z."""
    return out["mean"] + nonzero * th.exp(0.5 * out["log_variance"]) * z


@register("ddim")
def ddim(denoiser, x, timesteps, *, generator=None, history=None, eta=0.0):
    """
    DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12),
    deterministic at eta = 0, as noisy as DDPM at eta = 1.

    Noise is drawn only where it is used: a generator passed in is not advanced at
    eta = 0, nor at the last step (which ends in the data), so that per-image
    generators cost no host work here. The global generator (``generator=None``)
    draws at every step, as guided-diffusion's DDIM does, so that the draws after a
    seeded run (the next batch's x_T) are guided-diffusion's; that draw is made on
    x's device and waits for nothing.
    """
    abar = denoiser.alphas_cumprod
    timesteps = list(timesteps)
    for t, t_next in zip(timesteps, timesteps[1:] + [None]):
        out = denoiser(x, t)
        # 1. z ~ N(0, I) where sigma z is added (see above for the global generator).
        used = eta != 0 and t_next is not None
        z = noise_like(x, generator) if used or generator is None else None
        # 2. Eq. 12 towards the next timestep, or the clean data (abar = 1) after the last.
        #    abar as 0-d tensors on the host, which a device's kernels take as scalar
        #    arguments: made on the device (x.new_tensor), each would be a copy from
        #    the host that waits for the work queued there, at every step.
        abar_next = 1.0 if t_next is None else abar[t_next]
        x = ddim_step(
            out, z, th.tensor(abar[t], dtype=x.dtype), th.tensor(abar_next, dtype=x.dtype),
            eta, float(t_next is not None),
        )  # fmt: skip
        yield {"sample": x, "pred_xstart": out["pred_xstart"]}


def ddim_step(out, z, abar, abar_prev, eta, nonzero):
    """
    One DDIM step (eq. 12): x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev -
    sigma^2) eps + sigma z, with sigma from eq. 16.

    :param abar: abar_t and abar_prev (the step's end) as tensors that broadcast
        against x: 0-d, or (N, 1, ...) for a timestep per image.
    :param z: the noise, or None where none is added (eta = 0, or a step into
        the data).
    :param nonzero: masks the noise (0 where the step ends in the data).
    """
    sigma = eta * th.sqrt((1 - abar_prev) / (1 - abar)) * th.sqrt(1 - abar / abar_prev)
    mean = (
        out["pred_xstart"] * th.sqrt(abar_prev)
        + th.sqrt(1 - abar_prev - sigma**2) * out["eps"]
    )
    if z is None:
        return mean
    return mean + nonzero * sigma * z


def ddim_reverse(denoiser, x, timesteps, *, generator=None):
    """
    The deterministic DDIM ODE run forwards, x_t -> x_{t+1}, to encode an image into
    its latent (``timesteps`` ascending from 0). Draws no random numbers; not a
    sampler from noise, so not registered.
    """
    abar = denoiser.alphas_cumprod
    for t in timesteps:
        out = denoiser(x, t)
        abar_next = abar[t + 1] if t + 1 < len(abar) else 0.0
        # a 0-d tensor on the host, a scalar argument of the device's kernels (see ddim)
        x = ddim_reverse_step(out, th.tensor(abar_next, dtype=x.dtype))
        yield {"sample": x, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_step(out, abar_next):
    """x_{t+1} = sqrt(abar_{t+1}) x_0 + sqrt(1 - abar_{t+1}) eps (a tensor ``abar_next``)."""
    return out["pred_xstart"] * th.sqrt(abar_next) + th.sqrt(1 - abar_next) * out["eps"]


@register("dpm++2m")
def dpm_solver_pp(
    denoiser, x, timesteps, *, generator=None, history=None, solver_order=2,
    lower_order_final=2,
):
    """
    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models", Algorithm 2): a multistep solver of the
    probability-flow ODE in the data prediction, on the model's discrete schedule.
    The last update goes from the last timestep to the clean data.

    :param solver_order: 2 for DPM-Solver++(2M); 1 gives DPM-Solver++(1), which is DDIM
        with eta = 0.
    :param lower_order_final: how many of the last updates are first order. At
        least 1: the update into the data has an infinite step in log-SNR. The
        default 2 also keeps the one before it first order: on a grid even in t,
        the interval into timestep 0 is several times longer in log-SNR than the
        one before it, and the linear extrapolation overshoots there.
    """
    if solver_order not in (1, 2):
        raise ValueError(
            f"solver_order {solver_order}: DPM-Solver++(2M) has order 1 or 2"
        )
    if lower_order_final < 1:
        raise ValueError(
            f"lower_order_final {lower_order_final}: at least the last update (into the "
            "data, an infinite step in log-SNR) must be first order"
        )
    abar = denoiser.alphas_cumprod
    grid = list(timesteps)
    # alpha, sigma, lambda = log(alpha / sigma) at every grid point, then the data.
    alpha = [math.sqrt(abar[t]) for t in grid] + [1.0]
    sigma = [math.sqrt(1.0 - abar[t]) for t in grid] + [0.0]
    lam = [
        math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)
    ]
    x0_prev = h_prev = None
    if history is not None and solver_order == 2:
        # continuing a run: the step before grid[0] and its prediction
        t_prev = history["t"]
        lam_prev = math.log(math.sqrt(abar[t_prev])) - math.log(
            math.sqrt(1.0 - abar[t_prev])
        )
        x0_prev, h_prev = history["pred_xstart"], lam[0] - lam_prev
    for i, t in enumerate(grid):
        # 1. The data prediction x_theta(x_{t_{i-1}}, t_{i-1}).
        x0 = denoiser(x, t)["pred_xstart"]
        # 2. h_i = lambda_{t_i} - lambda_{t_{i-1}}.
        h = lam[i + 1] - lam[i]
        # 3. D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i) x_theta(t_{i-2}),
        #    r_i = h_{i-1} / h_i; first order (D_i = x_theta(t_{i-1})) without history
        #    and on the last lower_order_final updates.
        if solver_order == 1 or x0_prev is None or i >= len(grid) - lower_order_final:
            d = x0
        else:
            d = x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
        # 4. x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
        yield {"sample": x, "pred_xstart": x0}


# -- random numbers -------------------------------------------------------------------


@register("consistency", students=True)
def consistency(denoiser, x, timesteps, *, generator=None, history=None):
    """
    Multistep consistency sampling (Song et al. 2023, "Consistency Models",
    Algorithm 1), for a distilled student (base/consistency.py), whose x_0
    prediction is the consistency function: x_0 from x_t in one call, then, before
    every later timestep, x_0 noised again to it (x = sqrt(abar) x_0 + sqrt(1 - abar) z);
    the last x_0 is the sample. Noise is drawn only where it is added (not after
    the last step). A run continues from any step with no history.
    """
    abar = denoiser.alphas_cumprod
    timesteps = list(timesteps)
    for t, t_next in zip(timesteps, timesteps[1:] + [None]):
        x0 = denoiser(x, t)["pred_xstart"]
        if t_next is None:
            x = x0
        else:
            z = noise_like(x, generator)
            x = math.sqrt(abar[t_next]) * x0 + math.sqrt(1.0 - abar[t_next]) * z
        yield {"sample": x, "pred_xstart": x0}


def noise_like(x, generator=None):
    """
    Standard normal noise shaped like ``x``.

    :param generator: None draws from the global generator (``th.randn_like``, the
        order other implementations use); a ``th.Generator`` draws the whole batch
        from it; a sequence of generators, one per batch element, gives element i
        noise from generator i alone, so a sample does not depend on its batch mates.
    """
    if generator is None:
        return th.randn_like(x)
    return noise_of_shape(x.shape, generator, x.device, x.dtype)


def noise_of_shape(shape, generator, device, dtype=th.float32):
    """
    Standard normal noise of ``shape``; see :func:`noise_like` for ``generator``.

    Generators on the host (per-image generators are, so that a seed and a name give
    the same numbers on any device) draw into one host buffer, image by image, with
    the numbers of ``th.stack([th.randn(shape[1:], generator=g) for g in generator])``
    to the bit. For a CUDA ``device`` that buffer is pinned and the copy does not
    block: a blocking copy would make the host wait for all the device's queued work
    at every step. The caching host allocator keeps a pinned block from reuse until
    the copy that reads it has run.
    """
    device = th.device(device)
    if generator is None:
        return th.randn(*shape, device=device, dtype=dtype)
    one = isinstance(generator, th.Generator)
    generators = [generator] if one else list(generator)
    if not one and len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    if any(g.device.type != "cpu" for g in generators):
        # generators on a device draw there
        if one:
            return th.randn(
                *shape, generator=generator, device=generator.device, dtype=dtype
            ).to(device)
        parts = [
            th.randn(*shape[1:], generator=g, device=g.device, dtype=dtype)
            for g in generators
        ]
        return th.stack(parts).to(device)
    # Pinned memory only for CUDA: a CPU-only torch cannot pin, and other backends'
    # asynchronous copies from the host are not safe for a buffer the caller drops.
    # On `meta`, where no data moves, the copy is made as for CUDA, so that a CPU
    # can check that it does not block.
    to_cuda = device.type == "cuda"
    noise = th.empty(shape, dtype=dtype, pin_memory=to_cuda)
    for part, g in zip([noise] if one else noise, generators):
        th.randn(part.shape, generator=g, dtype=dtype, out=part)
    return noise.to(device, non_blocking=to_cuda or device.type == "meta")
