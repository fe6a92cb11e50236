"""
Several samples per input: their noise, and their mean and spread.

A diffusion model gives a distribution of optical images for one SAR image, not
one image. Drawing K samples of it gives their per-pixel mean and standard
deviation (the "spread"): where the samples disagree, the model is unsure. This
module holds the arithmetic, shared by every job that samples K times (folder.py,
scene_translation.py):

* the noise of sample k of an input: sample 0 is the single sample of a run with
  K = 1, to the bit (its generator is the one
  :func:`guided_diffusion.translation.sampling.make_generators` gives); samples 1..K-1 have
  generators seeded from (seed, name, k), so no sample depends on the batch, the
  number of processes or K itself (:func:`seed_of_sample`,
  :func:`sample_generators`, :func:`translate_samples`);
* mean and spread from a stack of samples (:func:`mean_and_spread`) or sample by
  sample without keeping them (:class:`SpreadAccumulator`, the same numbers for
  scene-sized arrays), after :func:`grey_levels`.

Units: the jobs turn the sampler's images ([-1, 1]) into grey levels of the 8-bit
outputs with :func:`grey_levels` ((x + 1) * 127.5, clamped to [0, 255], not
rounded) before taking means and spreads, so that means, spreads and errors are in
the units of the error against an 8-bit ground truth. :func:`mean_and_spread` and
:class:`SpreadAccumulator` take any units. The spread as a picture is
pictures.spread_picture; whether it can be trusted, calibration.py.
"""

import numpy as np
import torch as th

from ..base.seeds import hashed_seed
from . import sampling


def seed_of_sample(seed, name, k):
    """
    The seed of sample k of one input.

    :param seed: the run's seed.
    :param name: the input's relative path ("/" separators).
    :param k: the sample's index, 0 <= k < K.
    :return: for k = 0 the seed of the run's single sample
        (:func:`guided_diffusion.translation.sampling.sample_seed`); otherwise a 63-bit integer
        from SHA-256 of (seed, name, k), the same in every process.
    """
    if k == 0:
        return sampling.sample_seed(seed, name)
    return hashed_seed(int(seed), name, int(k))


def sample_generators(seed, names, k, device="cpu"):
    """
    One seeded generator per input for its sample k.

    :param seed: the run's seed.
    :param names: the inputs' relative paths, in batch order.
    :param k: the sample's index; 0 gives :func:`~guided_diffusion.translation.sampling.
        make_generators`' generators, those of a run with one sample per input.
    :param device: where the generators live (CPU: the same numbers on any device).
    :return: a list of th.Generator, one per name.
    """
    return [
        th.Generator(device=device).manual_seed(seed_of_sample(seed, name, k))
        for name in names
    ]


def check_samples_per_input(value, flag="--samples_per_input"):
    """
    :param value: the number of samples per input asked for.
    :return: ``value`` as an int.
    :raises ValueError: one line naming the flag, when it is below 1.
    """
    if int(value) != value or value < 1:
        raise ValueError(
            f"{flag} {value}: give the number of samples per input, 1 or more "
            "(1: one sample, as without the flag)"
        )
    return int(value)


def translate_samples(
    model, diffusion, sar, names, *, seed, samples_per_input, **kwargs
):
    """
    Sample every input of a batch K times, one sample of the whole batch at a time.

    Each call of :func:`~guided_diffusion.translation.sampling.translate` holds the batch as
    given, so sample 0 is exactly what a single translate call with
    ``make_generators(seed, names)`` returns, and memory does not grow with K.

    :param model: the U-Net.
    :param diffusion: the (respaced) diffusion.
    :param sar: (N, C_sar, H, W) in [-1, 1], on the model's device.
    :param names: the inputs' relative paths, N of them (they seed the noise).
    :param seed: the run's seed.
    :param samples_per_input: K, at least 1.
    :param kwargs: :func:`~guided_diffusion.translation.sampling.translate`'s options (sampler,
        clip_denoised, eta, progress, use_bf16, the sampler's own).
    :return: an iterator of (k, images), images (N, 3, H, W) in [-1, 1], k = 0..K-1.
    """
    count = check_samples_per_input(samples_per_input)
    if len(names) != sar.shape[0]:
        raise ValueError(f"{len(names)} names for a batch of {sar.shape[0]} SAR images")
    for k in range(count):
        generators = sample_generators(seed, names, k)
        yield (
            k,
            sampling.translate(model, diffusion, sar, generators=generators, **kwargs),
        )


def grey_levels(images):
    """
    Images in the units of the 8-bit outputs, before rounding.

    :param images: (N, C, H, W) in [-1, 1], a tensor or an array.
    :return: (N, H, W, C) float64, ``(x + 1) * 127.5`` clamped to [0, 255]; rounded,
        it is :func:`~guided_diffusion.translation.sampling.to_uint8`'s image.
    """
    x = th.as_tensor(images).detach().to("cpu", th.float64)
    return ((x + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy()


def mean_and_spread(samples, axis=0):
    """
    The mean and the standard deviation of samples along one axis.

    The spread is the sample standard deviation, sqrt(sum (x - mean)^2 / (K - 1)):
    its square is an unbiased estimate of the model's variance, whatever K (the
    divisor K would shrink it by a factor (K - 1) / K, a quarter at K = 4). One
    sample has no spread: 0.

    :param samples: an array of K samples stacked along ``axis``.
    :param axis: the samples' axis.
    :return: (mean, spread), float64 arrays without that axis.
    """
    x = np.asarray(samples, dtype=np.float64)
    count = x.shape[axis]
    mean = x.mean(axis=axis)
    if count < 2:
        return mean, np.zeros_like(mean)
    return mean, x.std(axis=axis, ddof=1)


class SpreadAccumulator:
    """
    The mean and spread of samples added one at a time, without keeping them
    (Welford's update in float64): :func:`mean_and_spread` of their stack, for
    arrays too large to hold K times (a whole scene).
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._m2 = None

    def add(self, sample):
        """:param sample: one sample, an array of the same shape every time."""
        x = np.asarray(sample, dtype=np.float64)
        if self._mean is None:
            self._mean, self._m2 = np.zeros_like(x), np.zeros_like(x)
        elif x.shape != self._mean.shape:
            raise ValueError(
                f"a sample of shape {x.shape} after samples of shape {self._mean.shape}"
            )
        self.count += 1
        delta = x - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (x - self._mean)

    def result(self):
        """
        :return: (mean, spread) as :func:`mean_and_spread` gives them.
        :raises ValueError: no sample was added.
        """
        if not self.count:
            raise ValueError("no samples added")
        if self.count < 2:
            return self._mean.copy(), np.zeros_like(self._mean)
        return self._mean.copy(), np.sqrt(np.maximum(self._m2, 0) / (self.count - 1))
