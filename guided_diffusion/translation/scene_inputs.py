"""
The scene a job reads, prepared: its pixel size checked against the training data's
(:func:`check_pixel_size`), or, with --resample, warped onto the training pixel size
in the work folder (:func:`resample_input`) and the result brought back onto the
input's grid (:func:`resampled_rows`); the rows of the result for
scene_outputs.write_outputs (:func:`array_rows`, :func:`resampled_rows`).
"""

import os

import numpy as np
import torch as th

from .. import dist_util, logger
from ..io.geotiff import GeoTiffWriter, georeference
from ..io.rasters import RasterRows, sar_bands_scaled
from ..io.warp import grid_at_pixel_size, warp_to_grid
from .scene_outputs import _rows_of, rasterio_open

# Pixel sizes that differ by more than this share from the training data's are warned of.
PIXEL_SIZE_TOLERANCE = 0.2


def check_pixel_size(raster, trained, path):
    """Warn when the scene's pixels differ from the training data's by > 20%."""
    if not trained or not raster.pixel_size:
        return
    ratio = max(a / b for a, b in zip(raster.pixel_size, trained))
    ratio = max(ratio, max(b / a for a, b in zip(raster.pixel_size, trained)))
    if ratio > 1 + PIXEL_SIZE_TOLERANCE:
        logger.warn(
            f"warning: {path} has {raster.pixel_size[0]:g} x {raster.pixel_size[1]:g} "
            f"pixels, the training data {trained[0]:g} x {trained[1]:g}: the model sees "
            "objects at another scale; add --resample to translate it at the training "
            "pixel size (and bring the result back to this grid)"
        )


def resample_input(job, source, trained):
    """--resample: the scene warped to the training pixel size, in the work folder."""
    if not trained:
        raise ValueError(
            "--resample: the training run recorded no pixel size (its data were not "
            "georeferenced), so there is nothing to resample to; leave --resample out"
        )
    transform, width, height = grid_at_pixel_size(job.input, trained)
    path = os.path.join(job.work_dir, "input_resampled.tif")
    if dist_util.is_main_process():
        os.makedirs(job.work_dir, exist_ok=True)
        warp_to_grid(job.input, path, transform, width, height)
    dist_util.barrier()
    px = source.pixel_size
    logger.log(
        f"--resample: {source.width}x{source.height} pixels of {px[0]:g} x {px[1]:g} "
        f"to {width}x{height} of {trained[0]:g} x {trained[1]:g} (the training data's)"
    )
    return RasterRows(path)


def array_rows(arrays, width):
    """The result's rows from the job's arrays: (x, valid, SAR) of rows [top, bottom)."""

    def rows(top, bottom):
        x = arrays.read("x", (top, bottom))[:, :, :width].clamp(-1, 1)
        valid = arrays.read("valid", (top, bottom))[0, :, :width].numpy() > 0.5
        return x, valid, arrays.read("sar", (top, bottom))[:, :, :width]

    return rows


def resampled_rows(job, scaling, arrays, reader, source):
    """
    --resample: the result written on the training grid, warped back onto the
    input's grid; validity and the SAR from the input itself.
    """
    on_grid = os.path.join(job.work_dir, "result_resampled.tif")
    back = os.path.join(job.work_dir, "result_back.tif")
    georef = georeference(reader.path)
    with GeoTiffWriter(
        on_grid, 3, reader.height, reader.width, np.float32, georef, nodata=float("nan")
    ) as out:  # fmt: skip
        for top, _, x, valid, _ in _rows_of(array_rows(arrays, reader.width), reader.height):
            image = x.numpy().copy()
            image[:, ~valid] = np.nan
            out.write(top, image)
    with rasterio_open(job.input) as src:
        transform = src.transform
    warp_to_grid(on_grid, back, transform, source.width, source.height)

    def rows(top, bottom):
        sar, valid, _ = sar_bands_scaled(source.read(top, bottom), scaling)
        with rasterio_open(back) as src:
            x = src.read(window=((top, bottom), (0, source.width)))
        valid &= np.isfinite(x).all(axis=0)
        x = th.from_numpy(np.nan_to_num(x, nan=-1.0)).clamp(-1, 1)
        return x, valid, th.from_numpy(sar.astype(np.float32))

    return rows
