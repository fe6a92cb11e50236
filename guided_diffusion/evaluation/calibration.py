"""
Whether the spread of several samples can be trusted (scripts/image_evaluate.py).

How often the truth lies within mean +- 2 spread (:func:`coverage`, and what a
calibrated model would score with K samples, :func:`expected_coverage`), binned
calibration tables (uncertainty bin -> absolute error of the mean) for the spread
and for a naive baseline, the smoothed edge magnitude of the SAR image
(:func:`sar_edge_magnitude`), and a rank correlation per method
(:func:`calibration_report`). Means, spreads and errors are in grey levels
(samples.grey_levels).
"""

import math

import numpy as np

# The half-width of the coverage interval, in spreads: mean +- 2 spread.
COVERAGE_Z = 2.0

# Rank correlations are computed on at most this many pixels (a fixed random
# subset): their standard error is then about 0.001, and sorting stays cheap.
CORRELATION_PIXELS = 1_000_000


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
