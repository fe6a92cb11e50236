"""
Scores and a picture for the out-of-the-box demo (demo.sh).

The demo translates the test set of a generated dataset (see scenes.py)
and compares the model with two baselines that need no training at all:

* the training set's mean optical image, the same for every input: what a
  model that ignores the SAR image would converge to under an MSE loss;
* the SAR image copied into the three RGB channels: the structure is all
  there, the colours are not.

Besides SSIM and PSNR (guided_diffusion/evaluation/metrics.py) it measures class
accuracy: the generator knows the land-cover class of every pixel, so a
generated pixel counts as right when its colour is nearer to the mean colour
of its true class than to that of any other class. This tells "the field came out green" apart from
"the picture is blurry", which SSIM and PSNR mix up.
"""

import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..base.atomic import write_atomic, write_text
from ..evaluation import metrics
from ..image_datasets import load_opt
from ..io.pictures import columns_side_by_side, write_png

# Picture layout, in pixels of the written PNG.
SEPARATOR = 2
TITLE_HEIGHT = 16
COLUMN_TITLES = ("SAR", "generated", "ground truth")


def class_accuracy(images, cls_maps, class_colours):
    """
    Share of pixels whose colour is nearest to the colour of their true class.

    Distances are Euclidean in RGB. On a tie between two class colours the
    pixel goes to the class with the lower id (numpy's argmin), so a pixel
    exactly half way between two colours is right only for the lower class.
    A class whose colour is unknown (a row of NaN, e.g. a class absent from
    the training set) is never the nearest; its pixels count as wrong.

    :param images: uint8 array (N, H, W, 3) of RGB images to judge.
    :param cls_maps: integer array (N, H, W) of true class ids, indexing the
        rows of class_colours.
    :param class_colours: array (K, 3) of one RGB colour per class id.
    :return: the share as a float in [0, 1].
    """
    images = np.asarray(images)
    cls_maps = np.asarray(cls_maps)
    colours = np.asarray(class_colours, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if cls_maps.shape != images.shape[:3]:
        raise ValueError(
            f"class maps {cls_maps.shape} do not match the images {images.shape}"
        )
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"expected class colours of shape (K, 3), got {colours.shape}")
    if cls_maps.size == 0:
        raise ValueError("class_accuracy needs at least one pixel")
    if cls_maps.min() < 0 or cls_maps.max() >= len(colours):
        raise ValueError(
            f"class ids must lie in 0..{len(colours) - 1} (one colour per class), "
            f"got {cls_maps.min()}..{cls_maps.max()}"
        )
    # numpy's argmin picks NaN as the minimum; an infinite distance is never
    # picked while any colour is known
    known = np.all(np.isfinite(colours), axis=1)
    colours = np.where(known[:, None], colours, np.inf)
    right = 0
    for image, cls_map in zip(images, cls_maps):  # one image at a time bounds memory
        pixels = image.reshape(-1, 1, 3).astype(np.float64)
        nearest = np.argmin(np.sum((pixels - colours[None]) ** 2, axis=-1), axis=1)
        truth = cls_map.reshape(-1)
        right += int(np.sum((nearest == truth) & known[truth]))
    return right / cls_maps.size


def load_class_colours(dataset_json):
    """
    The per-class mean colours of a generated dataset's training set.

    :param dataset_json: the dataset.json that scenes.make_dataset writes.
    :return: float64 array (K, 3) indexed by class id; a row of NaN for a
        class that never occurred in the training set.
    """
    with open(dataset_json) as f:
        info = json.load(f)
    try:
        ids = [c["id"] for c in info["classes"]]
        means = info["class_mean_rgb"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{dataset_json} has no class table (missing {err}); write the dataset "
            "again with scripts/make_synthetic_dataset.py"
        ) from None
    colours = np.full((max(ids) + 1, 3), np.nan)
    for i, rgb in zip(ids, means, strict=True):
        if rgb is not None:
            colours[i] = rgb
    return colours


def mean_image_baseline(train_opt, image_size, progress=False, *, scaling=None):
    """
    The mean of the training set's optical images, pixel by pixel.

    Images are loaded as the model sees them (image_datasets.load_opt: resized
    and centre-cropped to image_size, bands picked and scaled by ``scaling``).

    :param train_opt: folder of optical training images (searched
        recursively), or a sequence of their files.
    :param image_size: side of the square images.
    :param progress: show a progress bar.
    :param scaling: a :class:`~guided_diffusion.io.rasters.Scaling` that picks and
        scales the bands of multispectral or 16-bit files (the training run's),
        or None for 8-bit RGB images.
    :return: uint8 array (image_size, image_size, 3), the rounded mean. 8-bit
        images are averaged as their integer values; scaled ones as the
        floats the model sees, mapped from [-1, 1] to [0, 255], unrounded.
    """
    if isinstance(train_opt, (str, os.PathLike)):
        paths, where = list(metrics.list_images(train_opt).values()), train_opt
    else:
        paths = [os.fspath(p) for p in train_opt]
        where = "the list of optical training files"
    if not paths:
        raise ValueError(
            f"{where}: no images; the mean-image baseline needs the "
            "optical training images"
        )
    total = np.zeros((image_size, image_size, 3), dtype=np.float64)
    for path in tqdm(paths, desc="mean training image", disable=not progress):
        if scaling is None:
            # load_opt returns v / 127.5 - 1 in float32; rounding recovers v exactly
            image = np.round((load_opt(path, image_size) + 1.0) * 127.5)
        else:
            opt = load_opt(path, image_size, scaling=scaling)
            image = (opt.astype(np.float64) + 1.0) * 127.5
        total += image.transpose(1, 2, 0)
    return np.round(total / len(paths)).astype(np.uint8)


def sar_baseline(sar):
    """
    The SAR image copied into the three channels of an RGB image.

    :param sar: uint8 array (..., H, W) of single-band SAR images.
    :return: uint8 array (..., H, W, 3).
    """
    sar = np.asarray(sar)
    return np.repeat(sar[..., None], 3, axis=-1)


def score(images, gts, cls_maps, class_colours):
    """
    SSIM, PSNR and class accuracy of a set of images against their ground truth.

    :param images: uint8 array (N, H, W, 3) of images to judge.
    :param gts: uint8 array (N, H, W, 3) of ground-truth images, same order.
    :param cls_maps: integer array (N, H, W) of true class ids.
    :param class_colours: array (K, 3), one RGB colour per class id.
    :return: dict with ``ssim`` (mean RGB SSIM over images), ``psnr`` (mean
        over the images with a finite PSNR, in dB; inf when every image is
        identical to its ground truth), ``psnr_inf_count`` (the images left
        out of that mean) and ``class_acc`` (see :func:`class_accuracy`).
    """
    if len(images) != len(gts) or len(images) == 0:
        raise ValueError(
            f"need the same non-zero number of images and ground truths, got "
            f"{len(images)} and {len(gts)}"
        )
    ssim = [metrics.ssim_rgb(a, b) for a, b in zip(images, gts)]
    psnr = np.array([metrics.psnr(a, b) for a, b in zip(images, gts)])
    finite = psnr[np.isfinite(psnr)]
    return dict(
        ssim=float(np.mean(ssim)),
        psnr=float(finite.mean()) if len(finite) else float("inf"),
        psnr_inf_count=int(len(psnr) - len(finite)),
        class_acc=class_accuracy(images, cls_maps, class_colours),
    )


def comparison_table(rows):
    """
    A plain-text table of scores, one line per method.

    :param rows: sequence of (label, scores) with scores as :func:`score`
        returns them.
    :return: the table as one string (no trailing newline).
    """
    width = max([len("method")] + [len(label) for label, _ in rows])
    lines = [f"{'method':<{width}}  {'SSIM':>6}  {'PSNR (dB)':>9}  {'class acc':>9}"]
    for label, s in rows:
        lines.append(
            f"{label:<{width}}  {s['ssim']:>6.3f}  {s['psnr']:>9.2f}  "
            f"{s['class_acc']:>9.3f}"
        )
    return "\n".join(lines)


def write_metrics(path, rows, **extra):
    """
    Write the scores as JSON, atomically: ``{**extra, "rows": {label: scores}}``.

    JSON has no infinity, so an infinite PSNR (every image identical to its
    ground truth) is written as null.

    :param path: the JSON file to write.
    :param rows: sequence of (label, scores) as for :func:`comparison_table`.
    :param extra: further entries (folders, number of images, ...).
    :return: the path.
    """
    finite = {
        label: {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in scores.items()
        }
        for label, scores in rows
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_text(path, json.dumps({**extra, "rows": finite}, indent=2) + "\n")


def _rgb(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return sar_baseline(images) if images.ndim == 3 else images


def make_picture(sar, gen, gt, path, n=8, scale=4):
    """
    Write a PNG with one scene per row: SAR | generated | ground truth.

    Every tile is enlarged by ``scale`` with nearest-neighbour sampling, so a
    32-pixel scene shows its pixels instead of a blur. Tiles sit on a white
    background, SEPARATOR pixels apart and from the border, under a band of
    TITLE_HEIGHT pixels with the column titles. The file is written to a
    temporary name and renamed, so a reader never sees half a picture.

    :param sar: uint8 array (N, H, W) or (N, H, W, 3) of SAR images.
    :param gen: uint8 array (N, H, W, 3) of generated images.
    :param gt: uint8 array (N, H, W, 3) of ground-truth images.
    :param path: the PNG file to write.
    :param n: number of rows (the first n scenes; fewer when N < n).
    :param scale: integer enlargement factor.
    :return: the written picture's size (width, height).
    """
    columns = [_rgb(sar), _rgb(gen), _rgb(gt)]
    shapes = {c.shape[1:] for c in columns}
    if len(shapes) != 1 or len({len(c) for c in columns}) != 1:
        raise ValueError(
            "SAR, generated and ground-truth images must have the same number and "
            f"size, got {[c.shape for c in columns]}"
        )
    rows = min(n, len(columns[0]))
    if rows < 1 or scale < 1:
        raise ValueError(f"need at least one image and scale >= 1, got {rows}, {scale}")
    w = columns[0].shape[2] * scale
    grid = columns_side_by_side(
        [c[:rows] for c in columns], gap=SEPARATOR, margin=SEPARATOR, scale=scale
    )
    # the titles' band above the grid's top margin
    picture = Image.fromarray(
        np.pad(grid, ((TITLE_HEIGHT, 0), (0, 0), (0, 0)), constant_values=255)
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for c, title in enumerate(COLUMN_TITLES):
        x0, y0, x1, y1 = draw.textbbox((0, 0), title, font=font)
        left = SEPARATOR + c * (w + SEPARATOR) + (w - (x1 - x0)) // 2 - x0
        draw.text(
            (left, (TITLE_HEIGHT - (y1 - y0)) // 2 - y0), title, fill=0, font=font
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(path, picture)
    return picture.size


def copy_to_assets(picture, target):
    """
    Copy the demo picture to the README's assets (atomically, folder created).

    :param picture: the PNG written by :func:`make_picture`.
    :param target: destination file, e.g. ``assets/demo.png``.
    :return: the target path.
    """
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    with open(picture, "rb") as source:
        return write_atomic(target, lambda f: shutil.copyfileobj(source, f))


def bundle_model(checkpoint, folder):
    """
    Copy a trained model into the repository's assets as the bundled scene model:
    ``folder/model.pt`` and its run's ``config.json``, with the run's absolute
    paths (its data folders) made relative to the current folder where they lie
    inside it, else cut to their last part, so nothing in the copy names this
    machine.

    :param checkpoint: a model or EMA file with ``config.json`` beside it.
    :return: the path of the copied model.
    """
    config_path = os.path.join(
        os.path.dirname(os.path.abspath(checkpoint)), "config.json"
    )
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    here = os.path.abspath(os.curdir)
    for key, value in config.items():
        if isinstance(value, str) and os.path.isabs(value):
            inside = os.path.commonpath([here, value]) == here
            config[key] = (
                os.path.relpath(value, here) if inside else os.path.basename(value)
            )
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "model.pt")
    copy_to_assets(checkpoint, target)
    write_text(
        os.path.join(folder, "config.json"),
        json.dumps(config, indent=2, sort_keys=True) + "\n",
    )
    return target
