"""
Small layers and helpers shared by the U-Net, the diffusion process and training.

The layer factories keep guided-diffusion's names so that state-dict keys (and
therefore checkpoints of the original code) line up one to one.
"""

import math

import torch as th
import torch.utils.checkpoint
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """
    GroupNorm that always normalises in float32, also inside an fp16/bf16 model.

    A bfloat16 input on the CPU goes straight to PyTorch's mixed-precision kernel,
    which accumulates the statistics and normalises in float32 and rounds once to
    bfloat16: the same numbers as upcasting first (within one bfloat16 rounding),
    without the two float32 copies of the activation, and several times faster
    (benchmarks/README.md, "Figures behind design choices").
    """

    def forward(self, x):
        if (
            x.dtype == th.bfloat16
            and x.device.type == "cpu"
            and self.weight is not None
            and self.weight.dtype == th.float32
        ):
            return nn.functional.group_norm(
                x, self.num_groups, self.weight, self.bias, self.eps
            )
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution module."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs):
    """A linear module (named for symmetry with conv_nd)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling module."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def normalization(channels):
    """
    The normalisation layer of every block: GroupNorm with 32 groups.

    :param channels: number of input channels (a multiple of 32).
    """
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero the parameters of a module and return it (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Sinusoidal timestep embeddings, cosine half first, then sine half.

    :param timesteps: a 1-D tensor of N (possibly fractional) timesteps.
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an (N, dim) float32 tensor.
    """
    half = dim // 2
    # made on the timesteps' device: a table made on the host would be copied to
    # the device in every model call, a copy the host waits for
    freqs = th.exp(
        -math.log(max_period)
        * th.arange(start=0, end=half, dtype=th.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def update_ema(target_params, source_params, rate=0.99, use_foreach=True):
    """
    Move target parameters towards source parameters: targ = rate * targ + (1 - rate) * src.

    :param target_params: the EMA parameters (updated in place).
    :param source_params: the live parameters.
    :param rate: the EMA rate (closer to 1 means slower).
    :param use_foreach: one fused multi-tensor op instead of a Python loop; both
        compute the same values, the loop is kept for comparison in benchmarks.
    """
    targets = [p.detach() for p in target_params]
    sources = [p.detach() for p in source_params]
    if use_foreach:
        th._foreach_mul_(targets, rate)
        th._foreach_add_(targets, sources, alpha=1 - rate)
    else:
        for targ, src in zip(targets, sources):
            targ.mul_(rate).add_(src, alpha=1 - rate)


def checkpoint(func, inputs, params, flag):
    """
    Evaluate ``func(*inputs)``, without keeping intermediate activations when ``flag``
    is set and gradients are needed (they are recomputed in the backward pass).

    :param params: unused, kept for guided-diffusion's call signature.
    """
    del params
    if flag and th.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
