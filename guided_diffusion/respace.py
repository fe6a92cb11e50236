"""
Sampling with fewer steps than the model was trained with ("timestep respacing").

A SpacedDiffusion keeps a subset of the base process's timesteps and recomputes
betas so that its alphas_cumprod equal the base ones at the kept steps; the model
is wrapped so that it always sees the ORIGINAL timestep indices it was trained on.
"""

import numpy as np
import torch as th

from .base.consistency import trailing_timesteps
from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """
    Choose the timesteps to keep from a base process.

    The base process is cut into equal sections and each section keeps the given
    number of evenly strided steps: "10,15,20" over 300 steps keeps 10 of the first
    100, 15 of the next 100 and 20 of the last 100. "ddimN" keeps N steps with the
    fixed integer stride of the DDIM paper. "trailingN" keeps T - 1 and every T / N
    steps down (base/consistency.trailing_timesteps: where a consistency model is
    sampled).

    :param num_timesteps: the number of steps of the base process.
    :param section_counts: a list of ints, or a string "N", "N1,N2,...", "ddimN" or
        "trailingN".
    :return: the set of kept step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("trailing"):
            count = _parse_count(section_counts[len("trailing") :], section_counts)
            return trailing_timesteps(num_timesteps, count)
        if section_counts.startswith("ddim"):
            desired_count = _parse_count(section_counts[len("ddim") :], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"--timestep_respacing {section_counts}: {num_timesteps} steps cannot be cut "
                f"into exactly {desired_count} steps with an even integer stride; pick another "
                f"count or use --timestep_respacing {desired_count} (near-even spacing)"
            )
        section_counts = [
            _parse_count(x, section_counts) for x in section_counts.split(",")
        ]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"--timestep_respacing: a section of {size} steps cannot keep {section_count} steps "
                f"(the model has {num_timesteps} diffusion steps)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulated (not multiplied) so rounding picks the same steps as guided-diffusion.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def _parse_count(text, whole):
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"--timestep_respacing {whole!r}: expected a positive step count like '250', "
            f"'10,20,30' or 'ddim50'"
        )
    return count


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process that skips steps of a base diffusion process.

    :param use_timesteps: the timesteps of the base process to keep.
    :param kwargs: the keyword arguments of the base GaussianDiffusion.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])

        base_diffusion = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        self.timestep_map = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._wrapped = {}

    def _model_output(self, model, x_t, t, condition=None, model_kwargs=None):
        return super()._model_output(
            self._wrap_model(model), x_t, t, condition, model_kwargs
        )

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model,
            self.timestep_map,
            self.rescale_timesteps,
            self.original_num_steps,
            self._wrapped,
        )

    def _scale_timesteps(self, t):
        # Scaling is done by the wrapped model, on the original indices.
        return t


class _WrappedModel:
    """Maps respaced timestep indices to the base process's before calling the model."""

    def __init__(
        self, model, timestep_map, rescale_timesteps, original_num_steps, map_cache
    ):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        # Shared by the wrappers of one diffusion: the map is copied to a device once.
        self._map_cache = map_cache

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        map_tensor = self._map_cache.get(key)
        if map_tensor is None:
            map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            self._map_cache[key] = map_tensor
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
