"""
Several samples per input, their mean and spread, and whether the spread can be
trusted.

A diffusion model gives a distribution of optical images for one SAR image, not
one image. Drawing K samples of it gives their per-pixel mean and standard
deviation (the "spread"): where the samples disagree, the model is unsure. This
module holds the arithmetic, shared by every script that samples K times:

* the noise of sample k of an input: sample 0 is the single sample of a run with
  K = 1, to the bit (its generator is the one
  :func:`guided_diffusion.sampling.make_generators` gives); samples 1..K-1 have
  generators seeded from (seed, name, k), so no sample depends on the batch, the
  number of processes or K itself (:func:`seed_of_sample`,
  :func:`sample_generators`, :func:`translate_samples`);
* mean and spread from a stack of samples (:func:`mean_and_spread`) or sample by
  sample without keeping them (:class:`SpreadAccumulator`, the same numbers for
  scene-sized arrays), after :func:`grey_levels`;
* the spread as a picture a person can read: a colour scale (viridis, from
  anchor colours defined here) with a colour bar and its values
  (:func:`spread_picture`);
* its evaluation: how often the truth lies within mean +- 2 spread
  (:func:`coverage`, and what a calibrated model would score with K samples,
  :func:`expected_coverage`), binned calibration tables (uncertainty bin ->
  absolute error of the mean) for the spread and for a naive baseline, the
  smoothed edge magnitude of the SAR image (:func:`sar_edge_magnitude`), and a
  rank correlation per method (:func:`calibration_report`).

Units: the scripts turn the sampler's images ([-1, 1]) into grey levels of the
8-bit outputs with :func:`grey_levels` ((x + 1) * 127.5, clamped to [0, 255], not
rounded) before taking means and spreads, so that means, spreads and errors are
in the units of the error against an 8-bit ground truth. :func:`mean_and_spread`
and :class:`SpreadAccumulator` take any units.

For K samples of a batch of images (the web page, a script):

    acc = [SpreadAccumulator() for _ in names]
    for k, images in translate_samples(model, diffusion, sar, names, seed=seed,
                                       samples_per_input=K, sampler="ddim"):
        for a, image in zip(acc, grey_levels(images)):
            a.add(image)                    # images: sample k of every input
    mean, spread = acc[0].result()          # (H, W, 3) grey levels, input 0
    picture, legend = spread_picture(spread)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch as th
from PIL import Image, ImageDraw, ImageFont

from . import sampling
from .seeds import hashed_seed

# The top of the spread pictures' fixed colour scale, in grey levels: one scale for
# every image of a run, so that two pictures can be compared by eye. Larger spreads
# take the top colour (the legend says "64+"). The standard deviation of values in
# [0, 255] is at most 127.5; a model that knows the colour of a field within a
# quarter of the range is already unsure.
SPREAD_MAX = 64.0

# Viridis (van der Walt and Smith, matplotlib's default colour map) at 0, 1/8, ...,
# 1: a perceptually ordered scale, dark to light, that reads in grey and for the
# colour blind. Between anchors the colours are interpolated linearly in sRGB.
VIRIDIS_ANCHORS = (
    (0x44, 0x01, 0x54),
    (0x47, 0x2D, 0x7B),
    (0x3B, 0x52, 0x8B),
    (0x2C, 0x72, 0x8E),
    (0x21, 0x90, 0x8C),
    (0x27, 0xAD, 0x81),
    (0x5D, 0xC8, 0x63),
    (0xAA, 0xDC, 0x32),
    (0xFD, 0xE7, 0x25),
)

# The half-width of the coverage interval, in spreads: mean +- 2 spread.
COVERAGE_Z = 2.0

# Rank correlations are computed on at most this many pixels (a fixed random
# subset): their standard error is then about 0.001, and sorting stays cheap.
CORRELATION_PIXELS = 1_000_000


# ---------------------------------------------------------------------------
# K samples of an input


def seed_of_sample(seed, name, k):
    """
    The seed of sample k of one input.

    :param seed: the run's seed.
    :param name: the input's relative path ("/" separators).
    :param k: the sample's index, 0 <= k < K.
    :return: for k = 0 the seed of the run's single sample
        (:func:`guided_diffusion.sampling.sample_seed`); otherwise a 63-bit integer
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
    :param k: the sample's index; 0 gives :func:`~guided_diffusion.sampling.
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

    Each call of :func:`~guided_diffusion.sampling.translate` holds the batch as
    given, so sample 0 is exactly what a single translate call with
    ``make_generators(seed, names)`` returns, and memory does not grow with K.

    :param model: the U-Net.
    :param diffusion: the (respaced) diffusion.
    :param sar: (N, C_sar, H, W) in [-1, 1], on the model's device.
    :param names: the inputs' relative paths, N of them (they seed the noise).
    :param seed: the run's seed.
    :param samples_per_input: K, at least 1.
    :param kwargs: :func:`~guided_diffusion.sampling.translate`'s options (sampler,
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
        it is :func:`~guided_diffusion.sampling.to_uint8`'s image.
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


# ---------------------------------------------------------------------------
# The spread as a picture


def colour_map(values):
    """
    The viridis colour of values in [0, 1] (clipped), from a 256-entry table.

    :param values: an array of any shape.
    :return: uint8 array of shape ``values.shape + (3,)``.
    """
    index = np.rint(np.clip(np.asarray(values, dtype=np.float64), 0, 1) * 255)
    return _colour_table()[index.astype(np.intp)]


def _colour_table():
    anchors = np.asarray(VIRIDIS_ANCHORS, dtype=np.float64)
    position = np.linspace(0, len(anchors) - 1, 256)
    below = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    weight = (position - below)[:, None]
    table = anchors[below] * (1 - weight) + anchors[below + 1] * weight
    return np.rint(table).astype(np.uint8)


@dataclass(frozen=True)
class Legend:
    """
    Where a spread picture's colour bar is and what its ticks say.

    :param bar: (left, top, right, bottom) of the colour bar, pixel rows and
        columns, bottom and right exclusive; the top row is ``vmax``, the bottom 0.
    :param ticks: (value, row, label) per tick, from 0 up.
    :param vmax: the value of the top colour.
    """

    bar: tuple
    ticks: tuple
    vmax: float


def tick_values(vmax, count=5):
    """:return: ``count`` evenly spaced values from 0 to ``vmax``."""
    return tuple(float(v) for v in np.linspace(0, vmax, count))


def _label(value, vmax):
    text = f"{value:g}" if value == int(value) else f"{value:.1f}"
    return text + "+" if value == vmax else text


def spread_picture(spread, *, vmax=SPREAD_MAX, valid=None, title=None, min_side=256):
    """
    The spread of one image as a colour-scale picture with its legend.

    The map (the spread averaged over the channels when it has three) is enlarged by
    a whole factor until its shorter side reaches ``min_side`` pixels (nearest
    neighbour, so every model pixel stays one block), and a colour bar with tick
    values stands to its right, under a title line.

    :param spread: (H, W) or (H, W, C) spread in grey levels.
    :param vmax: the value of the top colour; larger spreads take it too.
    :param valid: (H, W) bool, False where the input has no data (drawn black), or
        None.
    :param title: the line above the map (default: what the colours measure).
    :param min_side: the shorter side of the map as drawn, at least.
    :return: (PIL RGB image, :class:`Legend`).
    """
    spread = np.asarray(spread, dtype=np.float64)
    if spread.ndim == 3:
        spread = spread.mean(axis=2)
    if spread.ndim != 2:
        raise ValueError(
            f"expected a spread of shape (H, W) or (H, W, C), got {spread.shape}"
        )
    height, width = spread.shape
    scale = max(1, math.ceil(min_side / min(height, width)))
    colours = colour_map(spread / vmax)
    if valid is not None:
        colours[~np.asarray(valid, dtype=bool)] = 0
    big = np.repeat(np.repeat(colours, scale, axis=0), scale, axis=1)

    font = ImageFont.load_default()
    title = title or "spread: standard deviation of the samples, grey levels"
    ticks = tick_values(vmax)
    labels = [_label(v, vmax) for v in ticks]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(_text_size(draw_probe, t, font)[1] for t in [title, *labels])
    label_w = max(_text_size(draw_probe, t, font)[0] for t in labels)
    pad, gap, bar_w, tick_w = 8, 12, 16, 5
    top = pad + text_h + 6
    map_h, map_w = big.shape[:2]
    bar_left = pad + map_w + gap
    canvas_w = max(
        bar_left + bar_w + tick_w + 3 + label_w + pad,
        pad + _text_size(draw_probe, title, font)[0] + pad,
    )
    canvas_h = top + map_h + pad + text_h // 2
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (pad, top))

    # The bar: row top holds vmax, row top + map_h - 1 holds 0, linearly between.
    rows = np.linspace(1, 0, map_h)
    bar = np.repeat(colour_map(rows)[:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray(bar), (bar_left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    placed = []
    for value, label in zip(ticks, labels):
        row = top + int(round((1 - value / vmax) * (map_h - 1)))
        x0 = bar_left + bar_w
        draw.line([(x0, row), (x0 + tick_w - 1, row)], fill=(0, 0, 0))
        w, h = _text_size(draw, label, font)
        draw.text((x0 + tick_w + 3, row - h // 2 - 1), label, fill=(0, 0, 0), font=font)
        placed.append((value, row, label))
    legend = Legend((bar_left, top, bar_left + bar_w, top + map_h), tuple(placed), vmax)
    return canvas, legend


def _text_size(draw, text, font):
    left, top_, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top_


# ---------------------------------------------------------------------------
# Is the spread worth trusting?


def coverage(mean, spread, truth, z=COVERAGE_Z):
    """
    How often the truth lies within mean +- z spread, over every pixel and channel.

    :param mean: the mean of the samples, any shape.
    :param spread: their spread, the same shape.
    :param truth: the ground truth, the same shape, in the same units.
    :return: the fraction, a float in [0, 1].
    """
    mean, spread, truth = (
        np.asarray(a, dtype=np.float64) for a in (mean, spread, truth)
    )
    return float(np.mean(np.abs(truth - mean) <= z * spread))


def expected_coverage(samples_per_input, z=COVERAGE_Z):
    """
    The coverage of mean +- z spread that a calibrated model scores with K samples.

    If the truth and the K samples are independent draws of one normal
    distribution, (truth - mean) / (spread sqrt(1 + 1/K)) follows Student's t with
    K - 1 degrees of freedom, so the coverage is P(|t| <= z / sqrt(1 + 1/K)): 95.4%
    for K -> inf, less for few samples (83% at K = 4, 90% at K = 8), since the
    mean and the spread are estimates themselves.

    :param samples_per_input: K.
    :return: the fraction, or None for K < 2 (no spread).
    """
    from scipy.stats import t as student_t

    k = int(samples_per_input)
    if k < 2:
        return None
    return float(2 * student_t.cdf(z / math.sqrt(1 + 1 / k), k - 1) - 1)


def box_blur(image, radius):
    """
    The mean over a (2 radius + 1)^2 square, the image's edge values repeated
    beyond it.

    :param image: (H, W) float array.
    :param radius: in pixels, 0 for none.
    :return: (H, W) float64.
    """
    x = np.asarray(image, dtype=np.float64)
    if radius <= 0:
        return x
    size = 2 * radius + 1
    for axis in (0, 1):
        padded = np.pad(x, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="edge")  # fmt: skip
        sums = np.cumsum(padded, axis=axis)
        sums = np.concatenate(
            [np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis
        )
        n = x.shape[axis]
        x = (np.take(sums, range(size, size + n), axis=axis)
             - np.take(sums, range(n), axis=axis)) / size  # fmt: skip
    return x


def sobel_magnitude(grey):
    """
    The Sobel gradient magnitude, sqrt(gx^2 + gy^2), with the kernels
    [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] and its transpose (a step of height h
    between two columns gives 4 h on both), the image's edge values repeated
    beyond it.

    :param grey: (H, W) float array.
    :return: (H, W) float64.
    """
    g = np.pad(np.asarray(grey, dtype=np.float64), 1, mode="edge")
    gx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (
        g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2]
    )
    gy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (
        g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:]
    )
    return np.hypot(gx, gy)


def sar_edge_magnitude(sar, radius=2):
    """
    The naive baseline "uncertainty": how much edge the SAR image has around a
    pixel. The Sobel magnitude of the SAR display image (its channels averaged),
    smoothed twice with a box of side 2 radius + 1 (close to a Gaussian of
    standard deviation sqrt(2 radius (radius + 1) / 3), 2 pixels at radius 2), so
    that speckle counts less than the borders of fields.

    :param sar: (H, W) or (H, W, C) SAR display image (8-bit values).
    :param radius: the smoothing box's radius (0: the raw Sobel magnitude).
    :return: (H, W) float64.
    """
    sar = np.asarray(sar, dtype=np.float64)
    grey = sar.mean(axis=2) if sar.ndim == 3 else sar
    return box_blur(box_blur(sobel_magnitude(grey), radius), radius)


def calibration_table(uncertainty, error, bins=10):
    """
    The mean error per bin of an uncertainty, bins of (nearly) equal pixel counts.

    Bin edges are the uncertainty's quantiles, so tables of uncertainties in
    different units (a spread in grey levels, an edge magnitude) compare row by
    row: the first row holds the least uncertain tenth of the pixels in both.
    Equal values are never split: a value shared by many pixels fills a larger
    bin, and the table has fewer rows.

    :param uncertainty: per-pixel uncertainty, any shape.
    :param error: per-pixel absolute error, the same shape.
    :param bins: the number of quantile bins.
    :return: list of dicts, one per non-empty bin from least to most uncertain:
        ``lo`` and ``hi`` (the bin's smallest and largest uncertainty),
        ``mean_uncertainty``, ``mean_abs_error``, ``pixels``.
    """
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    e = np.asarray(error, dtype=np.float64).ravel()
    if u.shape != e.shape or not u.size:
        raise ValueError(
            f"uncertainty and error must be non-empty and alike, got {u.shape} and {e.shape}"
        )
    # bin b holds the values up to the (b + 1) / bins quantile (an order statistic,
    # so a run of equal values ends in one bin), above the previous bin's
    positions = [math.ceil(u.size * (b + 1) / bins) - 1 for b in range(bins - 1)]
    tops = np.unique(np.partition(u, positions)[positions]) if positions else []
    index = np.searchsorted(tops, u, side="left")
    counts = np.bincount(index, minlength=len(tops) + 1)
    sum_u = np.bincount(index, weights=u, minlength=len(counts))
    sum_e = np.bincount(index, weights=e, minlength=len(counts))
    rows = []
    for b in np.flatnonzero(counts):
        members = u[index == b]
        rows.append(dict(
            lo=float(members.min()),
            hi=float(members.max()),
            mean_uncertainty=float(sum_u[b] / counts[b]),
            mean_abs_error=float(sum_e[b] / counts[b]),
            pixels=int(counts[b]),
        ))  # fmt: skip
    return rows


def rank_correlation(uncertainty, error, limit=CORRELATION_PIXELS):
    """
    Spearman's rank correlation of uncertainty and error (ties ranked by their
    mean rank), on a fixed random subset of ``limit`` pixels when there are more.

    :return: the correlation in [-1, 1], or None when either is constant.
    """
    from scipy.stats import spearmanr

    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    e = np.asarray(error, dtype=np.float64).ravel()
    if u.size > limit:
        keep = np.random.default_rng(0).choice(u.size, limit, replace=False)
        u, e = u[keep], e[keep]
    if u.size < 2 or np.all(u == u[0]) or np.all(e == e[0]):
        return None
    return float(spearmanr(u, e).statistic)


def method_summary(uncertainty, error, bins=10):
    """
    One uncertainty's calibration table and its two summary figures: Spearman's
    rank correlation with the error, and the mean error of the most uncertain bin
    over that of the least uncertain (None when the latter is 0, or with one bin).
    """
    table = calibration_table(uncertainty, error, bins)
    low, high = table[0]["mean_abs_error"], table[-1]["mean_abs_error"]
    ratio = high / low if len(table) > 1 and low > 0 else None
    return dict(
        spearman=rank_correlation(uncertainty, error),
        top_bottom_error_ratio=ratio,
        table=table,
    )


def calibration_report(
    mean, spread, truth, sar=None, *, samples_per_input=None, bins=10, valid=None
):
    """
    Whether the spread says where the mean is wrong, and more than the SAR's edges do.

    Per pixel and channel: the coverage of mean +- 2 spread. Per pixel (the
    channels averaged, as the spread pictures show it): the error of the mean,
    |truth - mean|, binned by the spread and, as the baseline, by the SAR's edge
    magnitude (:func:`sar_edge_magnitude`), with quantile bins for both.

    :param mean: (N, H, W, 3) mean of the samples, grey levels.
    :param spread: (N, H, W, 3) their spread, grey levels.
    :param truth: (N, H, W, 3) the ground truth (8-bit values).
    :param sar: (N, H, W, C) the SAR display images, or None (no baseline).
    :param samples_per_input: K, for the coverage a calibrated model would score.
    :param bins: the number of quantile bins.
    :param valid: (N, H, W) bool, False where the SAR has no data (sampling writes
        black there, so the error is the truth's), or None: every pixel counts.
    :return: a JSON-ready dict: ``num_images``, ``num_pixels`` (the pixels that
        count), ``nodata_pixels`` (those left out), ``samples_per_input``,
        ``coverage_2sd``, ``coverage_2sd_calibrated``,
        ``mean_spread``, ``mean_abs_error``, ``spread`` and ``sar_edges``
        (:func:`method_summary`; ``sar_edges`` is None without SAR).
    """
    mean, spread = np.asarray(mean, np.float64), np.asarray(spread, np.float64)
    truth = np.asarray(truth, np.float64)
    if not (mean.shape == spread.shape == truth.shape) or mean.ndim != 4:
        raise ValueError(
            f"mean, spread and truth must be alike (N, H, W, C) arrays, got "
            f"{mean.shape}, {spread.shape} and {truth.shape}"
        )
    if valid is None:
        valid = np.ones(mean.shape[:3], bool)
    valid = np.asarray(valid, bool)
    if valid.shape != mean.shape[:3]:
        raise ValueError(f"a nodata mask of shape {valid.shape} for means of {mean.shape}")
    if not valid.any():
        raise ValueError("every pixel is nodata: nothing to evaluate the spread on")
    # (pixels, channels) of the pixels with data
    mean, spread, truth = mean[valid], spread[valid], truth[valid]
    error = np.abs(truth - mean).mean(axis=1)
    report = dict(
        num_images=int(valid.shape[0]),
        num_pixels=int(error.size),
        nodata_pixels=int(valid.size - error.size),
        samples_per_input=None if samples_per_input is None else int(samples_per_input),
        coverage_2sd=coverage(mean, spread, truth),
        coverage_2sd_calibrated=(
            None if samples_per_input is None else expected_coverage(samples_per_input)
        ),
        mean_spread=float(spread.mean()),
        mean_abs_error=float(error.mean()),
        spread=method_summary(spread.mean(axis=1), error, bins),
        sar_edges=None,
    )
    if sar is not None:
        sar = np.asarray(sar)
        if sar.shape[:3] != valid.shape:
            raise ValueError(
                f"SAR images of shape {sar.shape[1:3]} for means of {valid.shape[1:3]}"
            )
        edges = np.stack([sar_edge_magnitude(image) for image in sar])
        report["sar_edges"] = method_summary(edges[valid], error, bins)
    return report


def format_calibration(report):
    """
    The report of :func:`calibration_report` as text: the coverage, the two tables
    one after the other and their summary figures.

    :param report: the dict of :func:`calibration_report`; a ``sar_edges_note``
        entry says why a missing baseline is missing.
    :return: one string.
    """
    r = report
    calibrated = r["coverage_2sd_calibrated"]
    lines = [
        f"spread of {r['samples_per_input'] or '?'} samples per input, "
        f"{r['num_images']} images, {r['num_pixels']} pixels"
        + (f" ({r['nodata_pixels']} nodata pixels left out)" if r.get("nodata_pixels") else ""),
        f"truth within mean +- 2 spread   {100 * r['coverage_2sd']:.1f}% of pixels and "
        "channels"
        + (f" (a calibrated model: {100 * calibrated:.1f}% with this many samples)"
           if calibrated is not None else ""),
        f"mean spread {r['mean_spread']:.2f}, mean abs error of the mean "
        f"{r['mean_abs_error']:.2f} (grey levels)",
        "",
    ]  # fmt: skip
    methods = [("spread", r["spread"])]
    if r["sar_edges"] is not None:
        methods.append(("SAR edges", r["sar_edges"]))
    for title, summary in methods:
        lines.append(
            f"{title}: binned by quantiles, error = |truth - mean| (grey levels)"
        )
        lines.append(
            f"{'bin':>4} {'uncertainty from':>17} {'to':>9} {'abs error':>10} {'pixels':>9}"
        )
        for i, row in enumerate(summary["table"], 1):
            lines.append(
                f"{i:>4} {row['lo']:>17.2f} {row['hi']:>9.2f} "
                f"{row['mean_abs_error']:>10.2f} {row['pixels']:>9}"
            )
        ratio = summary["top_bottom_error_ratio"]
        rho = summary["spearman"]
        lines.append(
            "Spearman rank correlation with the error: "
            + ("undefined (constant)" if rho is None else f"{rho:.3f}")
            + "; error of the top bin / bottom bin: "
            + ("undefined" if ratio is None else f"{ratio:.2f}")
        )
        lines.append("")
    if r["sar_edges"] is None:
        lines.append(
            f"SAR edges: {r.get('sar_edges_note') or 'no SAR images'}, skipped"
        )
    return "\n".join(lines).rstrip() + "\n"
