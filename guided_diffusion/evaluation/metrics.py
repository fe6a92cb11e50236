"""
Image quality figures for SAR-to-optical results: SSIM, PSNR, colour error, FID.

The per-image figures follow docs/design.md, section 3: scikit-image on uint8 RGB
images (``structural_similarity(a, b, channel_axis=-1, data_range=255)`` with
its defaults, the same on the grey image, and ``peak_signal_noise_ratio``
with ``data_range=255``), averaged over images. A generated image and its
ground truth are paired by file name, never by position.

FID uses the 2048-d pool features of NVlabs' TorchScript Inception-v3
(``inception-2015-12-05.pt``) and the Frechet distance in float64.

scikit-image and scipy are imported inside the functions that need them, so
the module imports without them.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings

import numpy as np
import torch as th
from PIL import Image

from ..base import image_files
from ..base.atomic import write_json, write_text
from ..io import results

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "SAR2OPT_INCEPTION"
INCEPTION_HELP = (
    f"FID needs NVlabs' {INCEPTION_FILE}, the TorchScript Inception-v3 of the "
    "StyleGAN/EDM metrics (published with stylegan2-ada-pytorch at "
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    f"{INCEPTION_FILE}); give its path with --inception PATH or set "
    f"{INCEPTION_ENV}=PATH"
)
FEATURE_DIM = 2048

# Below this many images per set the 2048 x 2048 feature covariance is
# rank-deficient, which biases FID upwards.
FID_MIN_IMAGES = 2048

RECORD_FIELDS = (
    "name",
    "ssim_rgb",
    "ssim_grey",
    "psnr",
    "colour_err_r",
    "colour_err_g",
    "colour_err_b",
    "abs_err_r",
    "abs_err_g",
    "abs_err_b",
)


# ---------------------------------------------------------------------------
# Per-image figures


def _check_pair(a, b):
    for image in (a, b):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected uint8 images of shape (H, W, 3), got {image.dtype} "
                f"{image.shape}"
            )
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} and {b.shape}")


def to_grey(image):
    """
    Grey version of an RGB image: ITU-R 601-2 luma as PIL's ``convert("L")``
    computes it, uint8(round(0.299 R + 0.587 G + 0.114 B)) in 16-bit fixed point.

    :param image: uint8 array of shape (H, W, 3).
    :return: uint8 array of shape (H, W).
    """
    return np.asarray(Image.fromarray(image).convert("L"))


def ssim_rgb(a, b):
    """
    SSIM of two RGB images, scikit-image defaults (7x7 uniform window).

    :param a: generated image, uint8 array of shape (H, W, 3).
    :param b: ground truth, uint8 array of the same shape.
    :return: the SSIM as a float (1.0 for identical images).
    """
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def ssim_grey(a, b):
    """
    SSIM of the grey versions (:func:`to_grey`) of two RGB images.

    :param a: generated image, uint8 array of shape (H, W, 3).
    :param b: ground truth, uint8 array of the same shape.
    :return: the SSIM as a float.
    """
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    return float(structural_similarity(to_grey(a), to_grey(b), data_range=255))


def psnr(a, b):
    """
    Peak signal-to-noise ratio in dB with a peak of 255 (symmetric in a, b).

    :param a: generated image, uint8 array of shape (H, W, 3).
    :param b: ground truth, uint8 array of the same shape.
    :return: the PSNR as a float; ``float("inf")`` for identical images.
    """
    from skimage.metrics import peak_signal_noise_ratio

    _check_pair(a, b)
    # identical images divide by a zero error: inf is the right answer
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(b, a, data_range=255))


def colour_error(a, b):
    """
    Per-channel colour error in grey levels, generated minus ground truth.

    The signed mean shows a tint (positive: too bright in that channel); the
    absolute mean shows how far the colours are off regardless of sign.

    :param a: generated image, uint8 array of shape (H, W, 3).
    :param b: ground truth, uint8 array of the same shape.
    :return: (signed, absolute), two float64 arrays of shape (3,) in R, G, B order.
    """
    _check_pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return diff.mean(axis=(0, 1)), np.abs(diff).mean(axis=(0, 1))


# ---------------------------------------------------------------------------
# Folders


def list_images(folder):
    """
    Find the images under a folder (image_files.list_images), keyed by relative
    path without extension.

    :param folder: the folder to search, recursively.
    :return: dict from key (posix relative path without extension, e.g.
        ``"sub/12"``) to file path, in the natural order of the files.
    :raises ValueError: when two files differ only by extension.
    """
    found = {}
    for name in image_files.list_images(folder):
        key = os.path.splitext(name)[0]
        path = os.path.join(folder, *name.split("/"))
        if key in found:
            raise ValueError(
                f"{found[key]} and {path} have the same name: the pairing by "
                "name is ambiguous, keep one of them"
            )
        found[key] = path
    return found


def _name_list(names, limit=5):
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def pair_folders(gen_dir, gt_dir):
    """
    Pair generated images with their ground truth by relative path without
    extension (``gen/sub/x.png`` <-> ``gt/sub/x.jpg``).

    :param gen_dir: folder of generated images.
    :param gt_dir: folder of ground-truth images.
    :return: list of (name, gen_path, gt_path), name being the generated
        image's path relative to gen_dir.
    :raises ValueError: naming the files without a partner on either side.
    """
    gen, gt = list_images(gen_dir), list_images(gt_dir)
    problems = []
    no_gt = [
        os.path.relpath(path, gen_dir) for key, path in gen.items() if key not in gt
    ]
    if no_gt:
        problems.append(
            f"{len(no_gt)} generated image(s) have no ground truth in {gt_dir}: "
            + _name_list(no_gt)
        )
    no_gen = [
        os.path.relpath(path, gt_dir) for key, path in gt.items() if key not in gen
    ]
    if no_gen:
        problems.append(
            f"{len(no_gen)} ground-truth image(s) have no generated image in "
            f"{gen_dir}: " + _name_list(no_gen)
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + " (images are paired by relative path without "
            "extension; evaluate matching sets)"
        )
    return [
        (os.path.relpath(path, gen_dir), path, gt[key]) for key, path in gen.items()
    ]


def load_image(path):
    """
    Read an 8-bit image file as RGB.

    :param path: image file.
    :return: uint8 array of shape (H, W, 3).
    :raises ValueError: for unreadable files and for 16-bit, 32-bit or float
        images, which the conversion would clip.
    """
    try:
        with Image.open(path) as img:
            if img.mode.startswith(("I", "F")):
                raise ValueError(
                    f"{path}: image mode {img.mode} is not 8-bit; evaluation "
                    "compares 8-bit RGB images, convert the file first"
                )
            return np.asarray(img.convert("RGB"))
    except OSError as e:  # unreadable, truncated or not an image at all
        raise ValueError(f"{path}: cannot read the image ({e})") from e


def compare_folders(gen_dir, gt_dir):
    """
    Score every generated image against its ground truth (see :func:`pair_folders`).

    :param gen_dir: folder of generated images.
    :param gt_dir: folder of ground-truth images.
    :return: list of dicts with the keys of ``RECORD_FIELDS``, one per image.
    :raises ValueError: for unpaired files or a pair of different sizes.
    """
    records = []
    for name, gen_path, gt_path in pair_folders(gen_dir, gt_dir):
        a, b = load_image(gen_path), load_image(gt_path)
        if a.shape != b.shape:
            raise ValueError(
                f"{gen_path} is {a.shape[1]}x{a.shape[0]} but its ground truth "
                f"{gt_path} is {b.shape[1]}x{b.shape[0]}; compare images of one size"
            )
        if min(a.shape[:2]) < 7:
            raise ValueError(f"{gen_path}: SSIM needs images of at least 7x7 pixels")
        err, abs_err = colour_error(a, b)
        record = dict(
            name=name.replace(os.sep, "/"),
            ssim_rgb=ssim_rgb(a, b),
            ssim_grey=ssim_grey(a, b),
            psnr=psnr(a, b),
        )
        for c, signed, absolute in zip("rgb", err, abs_err, strict=True):
            record[f"colour_err_{c}"] = float(signed)
            record[f"abs_err_{c}"] = float(absolute)
        records.append(record)
    return records


def summarize(records):
    """
    Means over images of the per-image figures.

    :param records: the list :func:`compare_folders` returns (not empty).
    :return: dict with ``num_images``, the mean of every figure, and
        ``psnr_inf_count``: identical pairs have an infinite PSNR, which is
        left out of the PSNR mean (the mean is inf when every pair is identical).
    """
    if not records:
        raise ValueError("no images to summarize")
    summary = dict(num_images=len(records))
    for field in RECORD_FIELDS[1:]:
        values = np.array([record[field] for record in records], dtype=np.float64)
        if field == "psnr":
            finite = values[np.isfinite(values)]
            summary["psnr"] = float(finite.mean()) if len(finite) else math.inf
            summary["psnr_inf_count"] = int(len(values) - len(finite))
        else:
            summary[field] = float(values.mean())
    return summary


def write_report(out_dir, summary, records, **extra):
    """
    Write ``metrics.json`` (the summary and any extra entries) and
    ``per_image.csv`` (one row per image).

    JSON has no infinity, so a mean PSNR of inf (every pair identical) is
    written as null next to ``psnr_inf_count``; the CSV writes ``inf``.

    :param out_dir: folder to write into (created if needed).
    :param summary: the dict :func:`summarize` returns.
    :param records: the list :func:`compare_folders` returns.
    :param extra: further JSON entries, e.g. the folders and the FID.
    :return: (json_path, csv_path).
    """
    os.makedirs(out_dir, exist_ok=True)
    report = {**extra, **summary}
    if not math.isfinite(report["psnr"]):
        report["psnr"] = None
    json_path = write_json(os.path.join(out_dir, "metrics.json"), report, indent=2)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=RECORD_FIELDS)
    writer.writeheader()
    writer.writerows(records)
    csv_path = write_text(os.path.join(out_dir, "per_image.csv"), table.getvalue())
    return json_path, csv_path


def format_summary(summary, fid=None):
    """
    A readable table of the summary (infinite PSNR shown as inf).

    :param summary: the dict :func:`summarize` returns.
    :param fid: the FID, or None when it was skipped.
    :return: the table as one string.
    """
    s = summary
    inf_count = s["psnr_inf_count"]
    rows = [
        ("images", f"{s['num_images']}"),
        ("SSIM (RGB)", f"{s['ssim_rgb']:.4f}"),
        ("SSIM (grey)", f"{s['ssim_grey']:.4f}"),
        (
            "PSNR (dB)",
            f"{s['psnr']:.2f}"
            + (f" ({inf_count} identical, PSNR inf, left out)" if inf_count else ""),
        ),
        (
            "colour error R G B",
            " ".join(f"{s['colour_err_' + c]:+.2f}" for c in "rgb")
            + " (generated - truth, grey levels)",
        ),
        ("abs error R G B", " ".join(f"{s['abs_err_' + c]:.2f}" for c in "rgb")),
        ("FID", "skipped" if fid is None else f"{fid:.3f}"),
    ]
    return "\n".join(f"{label:<20} {value}" for label, value in rows)


# ---------------------------------------------------------------------------
# The spread of several samples per input (guided_diffusion/translation/samples.py)


def find_spread_npz(choice, gen_dir):
    """
    The npz of a sampling run with several samples per input to evaluate.

    :param choice: ``"auto"`` (the ``samples_*.npz`` beside ``gen_dir`` when it
        holds a spread), ``"off"``, or the path of an npz or of the folder holding
        one.
    :param gen_dir: the folder of generated images being evaluated.
    :return: the npz path, or None (``off``, or ``auto`` found no spread).
    :raises ValueError: a path given that holds no npz with a spread.
    """
    if choice == "off":
        return None
    folder = (
        os.path.abspath(results.results_dir(gen_dir)) if choice == "auto" else choice
    )
    found = [folder] if os.path.isfile(folder) else results.npz_files(folder)
    with_spread = [path for path in found if results.has_spread(path)]
    if len(with_spread) == 1:
        return with_spread[0]
    if choice == "auto" and not with_spread:
        return None
    raise ValueError(
        f"--spread {choice}: "
        + ("no samples_*.npz with a spread (sample with --samples_per_input 2 or more)"
           if not with_spread else f"{len(with_spread)} npz files with a spread")
        + " in it; give the npz file of the run to evaluate"
    )  # fmt: skip


def load_spread_inputs(npz_path, gt_dir):
    """
    What the spread's evaluation needs, paired by name: the mean and spread of a
    run's npz, the ground truth of ``gt_dir`` and the SAR display images of the
    run's ``cond_sar/`` (beside the npz).

    :return: (mean, spread, truth, sar or None, K or None, valid or None, note or
        None); ``valid`` (N, H, W) bool is False where the SAR had no data (None in
        npz files written before it was kept); ``note`` says why the SAR baseline
        is missing.
    :raises ValueError: an input without ground truth, or of another size.
    """
    run = results.read_spread_npz(npz_path)
    names, mean, spread = run["names"], run["mean"], run["spread"]
    count, valid = run["samples_per_input"], run["valid"]
    truths = list_images(gt_dir)
    keys = [os.path.splitext(n)[0] for n in names]
    missing = [n for n, k in zip(names, keys) if k not in truths]
    if missing:
        raise ValueError(
            f"{len(missing)} input(s) of {npz_path} have no ground truth in {gt_dir}: "
            + _name_list(missing)
            + " (give the run's gt_opt/ as --gt_dir, or --spread off)"
        )
    truth = np.stack([load_image(truths[k]) for k in keys])
    if truth.shape != mean.shape:
        raise ValueError(
            f"the ground truth in {gt_dir} is {truth.shape[1:3]} per image but the "
            f"means in {npz_path} are {mean.shape[1:3]}; evaluate the run's gt_opt/"
        )
    out_dir = os.path.dirname(os.path.abspath(npz_path))
    sar_paths = [results.sar_picture(out_dir, k) for k in keys]
    absent = [p for p in sar_paths if not os.path.isfile(p)]
    if absent:
        note = f"no SAR image {absent[0]}: the SAR-edge baseline is skipped"
        return mean, spread, truth, None, count, valid, note
    return (
        mean,
        spread,
        truth,
        np.stack([load_image(p) for p in sar_paths]),
        count,
        valid,
        None,
    )


# ---------------------------------------------------------------------------
# FID


def find_inception(path=None):
    """
    Locate the Inception network file: ``path``, else ``$SAR2OPT_INCEPTION``.

    :param path: the file given by the user, or None.
    :return: the path of an existing file.
    :raises FileNotFoundError: with a message saying which file is needed and
        where to give it, when neither is set or the file does not exist.
    """
    source = "--inception" if path else INCEPTION_ENV
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise FileNotFoundError(INCEPTION_HELP)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source} {path}: no such file. {INCEPTION_HELP}")
    return path


def load_inception(path, device="cpu"):
    """
    Load the TorchScript Inception-v3 used for FID.

    :param path: the network file (NVlabs' ``inception-2015-12-05.pt``).
    :param device: where to put it.
    :return: the network, called as ``net(uint8 NCHW, return_features=True)``.
    :raises ValueError: when the file is not a TorchScript network.
    """
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript, but it is the format NVlabs
            # ships the network in: the notice is nothing a user can act on
            warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
            return th.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a TorchScript network ({e.__class__.__name__}). "
            + INCEPTION_HELP
        ) from e


def _batch_features(net, batch, device):
    x = th.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(device)
    with th.inference_mode():
        features = net(x, return_features=True)
    if tuple(features.shape) != (len(batch), FEATURE_DIM):
        raise ValueError(
            f"the FID network returned features of shape {tuple(features.shape)} "
            f"for {len(batch)} images, expected ({len(batch)}, {FEATURE_DIM}). "
            + INCEPTION_HELP
        )
    return features.double().cpu().numpy()


def compute_features(net, images, batch_size=64, device="cpu"):
    """
    Inception pool features of a stream of images.

    Images of one size are batched together; a change of size starts a new
    batch (the network resizes to 299x299 itself).

    :param net: the network from :func:`load_inception`.
    :param images: iterable of uint8 arrays of shape (H, W, 3).
    :param batch_size: images per forward pass.
    :param device: device of the network.
    :return: float64 array of shape (N, 2048).
    """
    features, batch = [], []
    for image in images:
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            features.append(_batch_features(net, batch, device))
            batch = []
        batch.append(image)
    if batch:
        features.append(_batch_features(net, batch, device))
    if not features:
        raise ValueError("no images to compute FID features of")
    return np.concatenate(features)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    :param mu1: mean, shape (D,).
    :param sigma1: covariance, shape (D, D).
    :param mu2: mean, shape (D,).
    :param sigma2: covariance, shape (D, D).
    :param eps: added to the diagonals when the product is too singular for
        the matrix square root (its effect on the distance is of order sqrt(eps)).
    :return: the distance as a float.
    :raises ValueError: when the square root has a large imaginary part, which
        means a covariance is not positive semi-definite.
    """
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a singular product is normal for rank-deficient covariances; the
        # result is checked below instead
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, np.abs(covmean.real).max())
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(
                "the square root of sigma1 sigma2 has a large imaginary part "
                f"({np.abs(covmean.imag).max():.3g}): the covariances are not "
                "positive semi-definite"
            )
        covmean = covmean.real
    return float(
        diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    )


def fid_from_features(features1, features2):
    """
    FID between two sets of Inception features.

    Warns when a set has fewer than 2048 images: the covariance is then
    rank-deficient, FID is biased upwards and not comparable with papers.

    :param features1: array of shape (N1, D), for example the generated images.
    :param features2: array of shape (N2, D), for example the ground truth.
    :return: the FID as a float.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if min(len(f1), len(f2)) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {len(f1)} and {len(f2)}"
        )
    if min(len(f1), len(f2)) < FID_MIN_IMAGES:
        warnings.warn(
            f"FID from {len(f1)} and {len(f2)} images: with fewer than "
            f"{FID_MIN_IMAGES} images per set the feature covariance is "
            "rank-deficient and FID is biased upwards; do not compare it with "
            "papers' numbers",
            stacklevel=2,
        )
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    if len(f1) + len(f2) + 1 < f1.shape[1]:
        # Both covariances and the mean difference lie in the span of the
        # centred features. An orthonormal basis of that span turns the D x D
        # square root into a small one with the same traces: exact, and it
        # spares the slow 2048 x 2048 sqrtm when few images are scored
        # (benchmarks/README.md).
        spread = np.concatenate([f1 - mu1, f2 - mu2, (mu1 - mu2)[None]])
        basis = np.linalg.qr(spread.T)[0]
        f1, f2 = f1 @ basis, f2 @ basis
    return frechet_distance(
        f1.mean(axis=0),
        np.cov(f1, rowvar=False),
        f2.mean(axis=0),
        np.cov(f2, rowvar=False),
    )
