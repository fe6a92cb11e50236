"""
Likelihood helpers for the variational bound: Gaussian KL divergence and the
discretised Gaussian log-likelihood of 8-bit images scaled to [-1, 1].
"""

import numpy as np
import torch as th


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Any argument may be a scalar as long as one of them is a tensor; shapes broadcast.
    """
    tensor = next(
        (obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, th.Tensor)),
        None,
    )
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # Scalars become tensors of the right dtype so th.exp works on them, filled on
    # the device: made on the host, they would be a copy that waits.
    logvar1, logvar2 = [
        x if isinstance(x, th.Tensor) else tensor.new_full((), x)
        for x in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (the tanh form used by GELU)."""
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood of a Gaussian discretised to the 256 bins of an 8-bit image.

    :param x: target images in [-1, 1] that were uint8 before rescaling.
    :param means: the Gaussian means, same shape as x.
    :param log_scales: the Gaussian log standard deviations, same shape as x.
    :return: log probabilities in nats, same shape as x.
    """
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    # One bin is 2/255 wide; the edge bins extend to -inf and +inf.
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, th.log(cdf_delta.clamp(min=1e-12))),
    )
    assert log_probs.shape == x.shape
    return log_probs
