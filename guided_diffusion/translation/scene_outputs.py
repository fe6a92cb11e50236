"""
What a scene job writes, and where: the result GeoTIFF, the quick-look PNG and the
full-size PNG (:func:`write_outputs`), written a band of rows at a time from any
source of rows (the job's arrays, or the result warped back onto the input's grid:
scene_inputs.py); with K samples, the samples' files (:func:`sample_path`) and their
mean, spread and spread picture (:func:`write_spread_outputs`, files named by
:func:`spread_paths`).
"""

import math
import os
import shutil
import warnings
from contextlib import ExitStack, nullcontext

import numpy as np
from PIL import Image

from .. import logger
from ..base.atomic import disk_of, write_atomic
from ..io import pictures
from ..io.geotiff import GeoTiffWriter, georeference
from ..io.pictures import SPREAD_MAX, spread_picture
from ..io.rasters import RasterRows, sar_bands_scaled
from .samples import mean_and_spread
from .sampling import sar_for_display, to_uint8
from .scene import BAND_ROWS, bands

# The work folder's subfolder of the samples a job does not keep beside its output.
SAMPLES_SUBDIR = "samples"
QUICKLOOK_WIDTH = 1024
# The pass over the K samples of a scene holds at most this many bytes of them at
# once (float64), in bands of BAND_ROWS rows or fewer.
SPREAD_PASS_BYTES = 64 * 2**20


def sample_path(job, k):
    """
    The GeoTIFF of sample k of a job with K samples: ``job.output`` itself for
    k = 0, ``OUTPUT_sample<k>.tif`` beside it (the output's extension) otherwise.
    What the job does not keep (``keep_samples``, ``geotiff``) is written to its
    work folder's ``samples/``, removed with it.
    """
    stem, ext = os.path.splitext(job.output)
    if (k == 0 and job.geotiff) or (k and job.keep_samples):
        return job.output if k == 0 else f"{stem}_sample{k}{ext}"
    return os.path.join(job.work_dir, SAMPLES_SUBDIR, f"sample{k}{ext}")


def spread_paths(output):
    """
    The files of the samples' statistics beside ``output``: a dict with "mean"
    (OUTPUT_mean.tif), "spread" (OUTPUT_spread.tif) and "picture" (OUTPUT_spread.png).
    """
    stem, ext = os.path.splitext(output)
    return {
        "mean": f"{stem}_mean{ext}",
        "spread": f"{stem}_spread{ext}",
        "picture": f"{stem}_spread.png",
    }


def _rows_of(rows, height):
    for top, bottom in bands(height):
        yield (top, bottom, *rows(top, bottom))


def rasterio_open(path):
    """rasterio.open, quiet about a file without a map transform (an input placed
    by ground control points, or none: the job writes what it has)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def quicklook_path(output):
    """The quick-look PNG written beside ``output``."""
    return os.path.splitext(output)[0] + "_quicklook.png"


def png_path(path):
    """The full-size 8-bit PNG of a job with ``png`` set, beside ``path``."""
    return os.path.splitext(path)[0] + ".png"


def write_outputs(job, scaling, rows, height, width):
    """
    The result, a band of rows at a time: the GeoTIFF (unless ``job.geotiff`` is
    False and this is not a sample a later pass reads), the quick-look PNG
    (``job.quicklook``, sample 0 only) and the full-size PNG (``job.png``).

    :param rows: (top, bottom) -> the result (3, h, W) in [-1, 1], valid (h, W)
        and the scaled SAR (C, h, W) of those rows.
    """
    if job.output_units == "optical":
        lo, hi = scaling.opt_range
        dtype, nodata = np.float32, float("nan")
    else:
        # no nodata value: a generated 0 is a dark pixel; the mask says what is not
        dtype, nodata = np.uint8, None
    quicklook = job.quicklook and not job.sample
    # a sample's GeoTIFF is read by the pass over the samples, kept or not
    geotiff = job.geotiff or job.samples_per_input > 1
    png = job.png and not job.sample
    # the quick-look keeps every step-th row and column (then shrinks to its width)
    step = max(1, (2 * width + 4) // QUICKLOOK_WIDTH)
    looks = {"sar": [], "result": [], "valid": []}
    full = []
    # sample 0's GeoTIFF, when the job keeps none, is written to its work folder
    target = job.output if job.sample else sample_path(job, 0)
    writer = nullcontext()
    if geotiff:
        os.makedirs(os.path.dirname(target), exist_ok=True)  # the work folder's samples/
        # what the user keeps is a COG (job.cog); what only the pass over the
        # samples reads, in the work folder, need not be
        kept = job.keep_samples if job.sample else job.geotiff
        writer = GeoTiffWriter(
            target, 3, height, width, dtype, georeference(job.input), nodata=nodata,
            names=("red", "green", "blue"), mask=nodata is None, cog=job.cog and kept,
        )  # fmt: skip
        log_disk_needed(writer)
    with writer as out:
        for top, bottom, x, valid, sar in _rows_of(rows, height):
            if job.output_units == "optical":
                image = ((x.double().numpy() + 1) / 2 * (hi - lo) + lo).astype(np.float32)
                image[:, ~valid] = np.nan
            else:
                image = to_uint8(x[None])[0].transpose(2, 0, 1).copy()
                image[:, ~valid] = 0
            if out is not None:
                out.write(top, image, valid)
            if png:
                full.append(np.where(valid[..., None], to_uint8(x[None])[0], 0))
            if not quicklook:
                continue
            keep = [r - top for r in range(top, bottom) if r % step == 0]
            sar = sar[:, keep, ::step]
            looks["sar"].append(sar_for_display(to_uint8(sar[None]))[0])
            looks["result"].append(to_uint8(x[None, :, keep, ::step])[0])
            looks["valid"].append(valid[keep, ::step])
    if geotiff:
        logger.log(f"wrote {target} ({width}x{height}, {np.dtype(dtype).name})")
    if png:
        path = png_path(job.output)
        pictures.write_png(path, np.concatenate(full).astype(np.uint8))
        logger.log(f"wrote {path}")
    if not quicklook:
        return
    path = quicklook_path(job.output)
    write_quicklook(path, *(np.concatenate(looks[k]) for k in ("sar", "result", "valid")))
    logger.log(f"wrote {path}")


def write_quicklook(path, sar, result, valid, width=QUICKLOOK_WIDTH):
    """
    SAR | result side by side, downscaled so the pair is at most ``width`` wide, as
    RGBA: transparent where the SAR has no data, in both halves (black there could
    be a dark pixel), opaque elsewhere. Where the downscaling merges pixels with and
    without data, the pixel is opaque, of its pixels with data (Pillow resizes RGBA
    with premultiplied alpha).

    :param valid: (H, W) bool, the pixels where the SAR has data.
    """
    result = np.where(valid[..., None], result, 0).astype(np.uint8)
    both = pictures.side_by_side([[sar, result]], gap=4)
    shown = np.where(valid, 255, 0).astype(np.uint8)
    alpha = pictures.side_by_side([[shown, shown]], gap=4)[..., :1]
    both = Image.fromarray(np.concatenate([both, alpha], axis=2), "RGBA")
    if both.width > width:
        both = both.resize(
            (width, max(1, round(both.height * width / both.width))), Image.BOX
        )
        rgba = np.asarray(both).copy()
        rgba[..., 3] = np.where(rgba[..., 3] > 0, 255, 0)
        both = Image.fromarray(rgba, "RGBA")
    pictures.write_png(path, both)


def disk_needed(job, height, width):
    """
    At most the bytes a job's outputs take on the output's disk while they are
    written: the GeoTIFFs it keeps (the result, kept samples, the samples' mean and
    spread), each bounded as :class:`~guided_diffusion.io.geotiff.GeoTiffWriter`
    bounds it (its intermediate and overviews included), summed; for the line a
    job logs before it starts.
    """
    optical = job.output_units == "optical"
    dtype = np.float32 if optical else np.uint8

    def bound(dtype, mask):
        return GeoTiffWriter(
            job.output, 3, height, width, dtype, {}, mask=mask, cog=job.cog
        ).bytes_needed

    count = job.samples_per_input
    files = int(job.geotiff) + (count - 1 if count > 1 and job.keep_samples else 0)
    files += int(job.geotiff and count > 1)  # the mean
    need = files * bound(dtype, not optical)
    if count > 1:
        need += bound(np.float32, False)  # the spread
    return need


def log_disk_needed(writer):
    """Log the disk a GeoTIFF writer needs at most, where, and what is free there."""
    disk = disk_of(writer.path)
    try:
        free = f"{shutil.disk_usage(disk).free / 1e6:,.0f} MB free"
    except OSError:
        free = "free space unknown"
    kind = "Cloud-Optimized GeoTIFF" if writer.cog else "GeoTIFF"
    logger.log(
        f"writing {writer.path} ({kind}): needs at most "
        f"{writer.bytes_needed / 1e6:,.1f} MB on the disk at {disk} ({free})"
    )


def write_spread_outputs(job, scaling, count):
    """
    The mean and spread of the K sample GeoTIFFs of a run with --samples_per_input,
    read a band of rows at a time (the memory does not grow with the scene's
    height), into the files of :func:`spread_paths`, each written under a temporary
    name and renamed when complete:

    * the mean, in the output's units and type (8-bit values rounded to the
      nearest, or float32 optical values), nodata as the output's;
    * the spread, float32: per channel the standard deviation of the K samples
      (divisor K - 1, :func:`~guided_diffusion.translation.samples.mean_and_spread`), in
      the output's units (grey levels for 8-bit output), NaN where the input has
      no data;
    * its picture: the spread averaged over the channels and over blocks of pixels
      down to at most :data:`QUICKLOOK_WIDTH` columns, drawn by
      :func:`~guided_diffusion.io.pictures.spread_picture` (nodata black) with its
      colour bar; the top colour is 64 grey levels (for optical units, their
      equivalent through --opt_range, which the title says).

    Both GeoTIFFs have the input's georeference and the output's band names.

    :param count: K, the samples written by :func:`sample_path`.
    :return: the dict of :func:`spread_paths`.
    """

    paths = spread_paths(job.output)
    source = RasterRows(job.input)
    height, width = source.height, source.width
    optical = job.output_units == "optical"
    georef = georeference(job.input)
    names = ("red", "green", "blue")
    rows = max(1, min(BAND_ROWS, SPREAD_PASS_BYTES // (8 * 3 * count * width)))
    step = max(1, math.ceil(width / QUICKLOOK_WIDTH))
    shape = (math.ceil(height / step), math.ceil(width / step))
    sums, pixels = np.zeros(shape), np.zeros(shape)
    with ExitStack() as stack:
        samples = [
            stack.enter_context(rasterio_open(sample_path(job, k))) for k in range(count)
        ]
        for k, src in enumerate(samples):
            if (src.count, src.height, src.width) != (3, height, width):
                raise ValueError(
                    f"{src.name} holds {src.count} bands of {src.width}x{src.height}, "
                    f"not sample {k} of {job.input}: delete it and rerun"
                )
        mean_out = None
        writers = []
        if job.geotiff:
            writers.append(GeoTiffWriter(
                paths["mean"], 3, height, width, np.float32 if optical else np.uint8,
                georef, nodata=float("nan") if optical else None, names=names,
                mask=not optical, cog=job.cog,
            ))  # fmt: skip
        writers.append(GeoTiffWriter(
            paths["spread"], 3, height, width, np.float32, georef,
            nodata=float("nan"), names=names, cog=job.cog,
        ))  # fmt: skip
        for writer in writers:
            log_disk_needed(writer)
        mean_out = stack.enter_context(writers[0]) if job.geotiff else None
        spread_out = stack.enter_context(writers[-1])
        mean_rows = []  # the mean as an 8-bit picture, for job.png
        for top, bottom in bands(height, rows):
            window = ((top, bottom), (0, width))
            stacked = np.stack([src.read(window=window) for src in samples])
            _, valid, _ = sar_bands_scaled(source.read(top, bottom), scaling)
            mean, spread = mean_and_spread(stacked, axis=0)
            spread[:, ~valid] = np.nan
            if optical:
                mean = mean.astype(np.float32)
                mean[:, ~valid] = np.nan
            else:
                mean = np.rint(mean).astype(np.uint8)
                mean[:, ~valid] = 0
            if mean_out is not None:
                mean_out.write(top, mean, valid)
            if job.png:
                mean_rows.append(mean_picture_rows(mean, valid, optical, scaling))
            spread_out.write(top, spread.astype(np.float32))
            # the picture's blocks of step x step pixels: their sums and counts
            shown = spread.mean(axis=0)
            finite = np.isfinite(shown)
            extra = ((0, 0), (0, shape[1] * step - width))
            block = (bottom - top, shape[1], step)
            part_sum = np.pad(np.where(finite, shown, 0), extra).reshape(block).sum(2)
            part_count = np.pad(finite, extra).reshape(block).sum(2)
            np.add.at(sums, np.arange(top, bottom) // step, part_sum)
            np.add.at(pixels, np.arange(top, bottom) // step, part_count)
    for name in ("mean", "spread") if job.geotiff else ("spread",):
        logger.log(f"wrote {paths[name]}")
    if job.png:
        pictures.write_png(png_path(paths["mean"]), np.concatenate(mean_rows))
        logger.log(f"wrote {png_path(paths['mean'])}")
    title = f"spread of {count} samples (standard deviation), grey levels"
    vmax = SPREAD_MAX
    if optical:
        lo, hi = scaling.opt_range
        vmax = SPREAD_MAX * (hi - lo) / 255
        title = (
            f"spread of {count} samples (standard deviation), optical units; "
            f"top colour {vmax:.4g} = {SPREAD_MAX:g} grey levels"
        )
    picture, _ = spread_picture(
        sums / np.maximum(pixels, 1), vmax=vmax, valid=pixels > 0, title=title
    )
    write_atomic(paths["picture"], lambda f: picture.save(f, format="PNG"))
    logger.log(f"wrote {paths['picture']}")
    return paths


def mean_picture_rows(mean, valid, optical, scaling):
    """Rows of the samples' mean as 8-bit RGB, (h, W, 3), black where the SAR has
    no data: as written for 8-bit output, optical values mapped back through the
    training run's --opt_range."""
    if optical:
        lo, hi = scaling.opt_range
        x = (np.nan_to_num(mean.astype(np.float64), nan=lo) - lo) / (hi - lo) * 2 - 1
        mean = to_uint8(x[None])[0].transpose(2, 0, 1)
    image = np.where(valid[None], mean, 0).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(1, 2, 0))
