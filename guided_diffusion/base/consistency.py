"""
Consistency models in a diffusion model's own discrete schedule: the student a
distilled model (scripts/image_distill.py) is, and how it is sampled.

A consistency function maps any point x_t of a probability-flow trajectory to the
trajectory's start x_0 in one call. As latent consistency models do (Luo et al. 2023,
"Latent Consistency Models", after Song et al. 2023, "Consistency Models"), the
student is the teacher's network read through boundary scalings in the teacher's
discrete timesteps t = 0 .. T - 1:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_net(x_t, t),
    c_skip(t) = s^2 / ((k t)^2 + s^2),   c_out(t) = k t / sqrt((k t)^2 + s^2),

with s = :data:`SIGMA_DATA` and k = :data:`TIMESTEP_SCALING`, where x0_net is the
x_0 the network's output means in the teacher's parametrisation (noise, x_0 or v).
At the smallest timestep c_skip = 1 and c_out = 0: the student returns its input
there, whatever its weights (the boundary condition). :class:`ConsistencyModel`
wraps the network so that its output, read by the diffusion as the teacher's would
be, gives f as the x_0 prediction: every part of the package that samples a model
(the folder and scene jobs, the page) samples a student unchanged, with the
"consistency" sampler (base/samplers.py), on :func:`trailing_timesteps`.

Imports nothing from the rest of the package.
"""

import torch as th
from torch import nn

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
# What the network predicts, by the name config.json records (--predict_xstart, --predict_v).
MEAN_TYPES = ("eps", "x_start", "v")


def boundary_scalings(t):
    """
    c_skip(t) and c_out(t) at the teacher's timestep indices ``t`` (a tensor).

    :return: (c_skip, c_out), float64 tensors of t's shape.
    """
    scaled = TIMESTEP_SCALING * t.double()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def trailing_timesteps(num_timesteps, count):
    """
    The ``count`` timesteps a consistency model is sampled at: T - 1 and then
    every T / count steps down, so that the last is T / count - 1, not 0 (where the
    student returns its input): 999, 749, 499, 249 for 4 of 1000 steps.

    :return: a set of indices of the teacher's schedule.
    :raises ValueError: a count outside 1 .. T.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(
            f"--timestep_respacing {count}: a consistency model takes 1 to "
            f"{num_timesteps} steps"
        )
    return {num_timesteps - 1 - (k * num_timesteps) // count for k in range(count)}


class ConsistencyModel(nn.Module):
    """
    A network read as a consistency function (see the module's docstring): called
    as the network is, on (cat([x_t, condition]), t), it returns what the teacher's
    network would return if its x_0 were f(x_t, t) (a learned variance, when the
    network has one, passes through).

    :param net: the network (the teacher's architecture).
    :param alphas_cumprod: the teacher's schedule, one value per timestep (float64).
    :param mean_type: what the network predicts, one of :data:`MEAN_TYPES`.
    :param channels: the image's channels C (x_t is the input's first C).
    :param rescale_timesteps: the network is given t scaled to 0 .. 1000 (the
        diffusion's ``rescale_timesteps``).
    """

    def __init__(self, net, alphas_cumprod, mean_type, channels, rescale_timesteps=False):
        super().__init__()
        if mean_type not in MEAN_TYPES:
            raise ValueError(f"mean_type {mean_type!r}: one of {', '.join(MEAN_TYPES)}")
        self.net = net
        self.mean_type = mean_type
        self.channels = channels
        self.rescale_timesteps = rescale_timesteps
        self.register_buffer(
            "alphas_cumprod", th.as_tensor(alphas_cumprod, dtype=th.float64), persistent=False
        )

    # A student's weights are its network's own (its checkpoints hold the network's
    # state dict, which the teacher's architecture loads): the wrapper is transparent.
    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        return self.net.load_state_dict(state_dict, strict, **kwargs)

    def index(self, t):
        """The teacher's timestep index of the network's ``t``."""
        steps = len(self.alphas_cumprod)
        if self.rescale_timesteps:
            return th.round(t.double() * steps / 1000.0).long().clamp(0, steps - 1)
        return t.long()

    def _coefficients(self, t, like):
        i = self.index(t)
        if self.alphas_cumprod.device != like.device:
            # a wrapper made around a network already on its device: moved once
            self.alphas_cumprod = self.alphas_cumprod.to(like.device)
        abar = self.alphas_cumprod[i]
        c_skip, c_out = boundary_scalings(i.to(like.device))

        def shaped(v):
            return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

        return shaped(abar.sqrt()), shaped((1 - abar).sqrt()), shaped(c_skip), shaped(c_out)

    def consistency(self, x, t, **kwargs):
        """
        f(x_t, t) and the network's raw output.

        :return: (f (N, C, H, W), the network's output (N, C or 2C, H, W)).
        """
        out = self.net(x, t, **kwargs)
        x_t = x[:, : self.channels]
        a, s, c_skip, c_out = self._coefficients(t, x_t)
        pred = out[:, : self.channels]
        if self.mean_type == "x_start":
            x0 = pred
        elif self.mean_type == "eps":
            x0 = (x_t - s * pred) / a
        else:  # v = a eps - s x_0, x_t = a x_0 + s eps
            x0 = a * x_t - s * pred
        return c_skip * x_t + c_out * x0, out

    def forward(self, x, t, **kwargs):
        f, out = self.consistency(x, t, **kwargs)
        x_t = x[:, : self.channels]
        a, s, _, _ = self._coefficients(t, x_t)
        if self.mean_type == "x_start":
            pred = f
        elif self.mean_type == "eps":
            pred = (x_t - a * f) / s
        else:
            pred = (a * x_t - f) / s
        return th.cat([pred, out[:, self.channels :]], dim=1)
