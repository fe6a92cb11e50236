"""
The scene a job reads, prepared: a Sentinel-1 product turned into a sigma0 GeoTIFF
in the work folder (:func:`product_input`), its pixel size checked against the
training data's (:func:`check_pixel_size`), or, with --resample, warped onto the
training pixel size in the work folder (:func:`resample_input`) and the result
brought back onto the input's grid (:func:`resampled_rows`); the rows of the result
for scene_outputs.write_outputs (:func:`array_rows`, :func:`resampled_rows`).
"""

import os
import shutil
from dataclasses import replace

import numpy as np
import torch as th

from .. import dist_util, logger
from ..io import sentinel1
from ..io.checkpoints import read_run_config
from ..io.geotiff import GeoTiffWriter, georeference
from ..io.rasters import DataError, RasterRows, sar_bands_scaled
from ..io.warp import grid_at_pixel_size, warp_to_gcps, warp_to_grid
from .scene_outputs import _rows_of, rasterio_open

# Pixel sizes that differ by more than this share from the training data's are warned of.
PIXEL_SIZE_TOLERANCE = 0.2
# The work folder's subfolder that holds a Sentinel-1 product's sigma0 GeoTIFF.
PRODUCT_SUBDIR = "input"


def check_pixel_size(raster, trained, path):
    """Warn when the scene's pixels differ from the training data's by > 20%."""
    warning = pixel_size_warning(raster.pixel_size, trained, path)
    if warning:
        logger.warn(warning)


def pixel_size_warning(pixel_size, trained, path):
    """
    The warning line for pixels (x, y) that differ from the training data's by
    more than :data:`PIXEL_SIZE_TOLERANCE`, or None.
    """
    if not trained or not pixel_size:
        return None
    ratio = max(a / b for a, b in zip(pixel_size, trained))
    ratio = max(ratio, max(b / a for a, b in zip(pixel_size, trained)))
    if ratio <= 1 + PIXEL_SIZE_TOLERANCE:
        return None
    return (
        f"warning: {path} has {pixel_size[0]:g} x {pixel_size[1]:g} "
        f"pixels, the training data {trained[0]:g} x {trained[1]:g}: the model sees "
        "objects at another scale; add --resample to translate it at the training "
        "pixel size (and bring the result back to this grid)"
    )


def trained_pixel_size(model_path):
    """The training data's (x, y) pixel size from the run's config.json, or None."""
    return ((read_run_config(model_path) or {}).get("inputs") or {}).get("pixel_size")


def product_input(job, scaling):
    """
    A Sentinel-1 GRD product as --input (io/sentinel1.py): the polarisations the
    model reads, as calibrated linear sigma0, written once into a GeoTIFF in the
    work folder's :data:`PRODUCT_SUBDIR` (atomically, so one that is there is
    complete and a rerun reuses it; its path, size and time keep the job's key),
    with the product's ground control points.

    :param job: a placed SceneJob whose input is a product.
    :param scaling: the job's rasters.Scaling.
    :return: (the job reading that GeoTIFF, the scaling that reads it: linear
        power, its bands by name).
    :raises DataError: the product lacks the model's polarisations, or
        --sar_input names other units, in one line.
    """
    given = job.inputs.get("sar_input")
    if given not in (None, "power"):
        raise DataError(
            f"--sar_input {given}: a Sentinel-1 product is read as calibrated sigma0 "
            f"(linear power) from its own tables; leave --sar_input out for {job.input}"
        )
    product = sentinel1.open_product(job.input)
    polarisations = sentinel1.choose_polarisations(
        product, sentinel1.model_polarisations(scaling)
    )
    path = os.path.join(
        job.work_dir, PRODUCT_SUBDIR, f"{product.name}_sigma0_{'_'.join(polarisations)}.tif"
    )

    def calibrate():
        if os.path.exists(path):
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        logger.log(
            f"{job.input}: {', '.join(polarisations)} calibrated to sigma0 with the "
            f"product's tables into {path}, read as linear power (10 log10 to dB, "
            "then the model's dB ranges)"
        )
        sentinel1.write_sigma0(product, path, polarisations)

    dist_util.on_main_process(calibrate)
    if not job.resample and not job.warned:
        spacing = product.pixel_spacing()
        warning = pixel_size_warning(spacing, trained_pixel_size(job.model_path), job.input)
        logger.warn(
            warning
            or f"warning: {job.input} is in radar geometry (a GRD product is not a map): "
            "add --resample to warp it with its ground control points onto a map grid "
            "of the training pixel size"
        )
    return replace(job, input=path), replace(
        scaling, sar_input="power", sar_bands=polarisations
    )


def remove_product_input(job):
    """Remove a finished job's sigma0 GeoTIFF of a product, and its work folder when
    nothing else is left there."""
    shutil.rmtree(os.path.join(job.work_dir, PRODUCT_SUBDIR), ignore_errors=True)
    try:
        os.rmdir(job.work_dir)
    except OSError:
        pass  # gone already, or holding something else: keep it


def resample_input(job, source, trained):
    """--resample: the scene warped to the training pixel size, in the work folder."""
    if not trained:
        raise ValueError(
            "--resample: the training run recorded no pixel size (its data were not "
            "georeferenced), so there is nothing to resample to; leave --resample out"
        )
    crs, transform, width, height = grid_at_pixel_size(job.input, trained)
    path = os.path.join(job.work_dir, "input_resampled.tif")

    def warp():
        os.makedirs(job.work_dir, exist_ok=True)
        warp_to_grid(job.input, path, transform, width, height, crs=crs)

    dist_util.on_main_process(warp)
    px = source.pixel_size
    pixels = f" of {px[0]:g} x {px[1]:g}" if px else " (ground control points)"
    logger.log(
        f"--resample: {source.width}x{source.height} pixels{pixels} to {width}x{height} "
        f"of {trained[0]:g} x {trained[1]:g} in {crs} (the training data's size)"
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
    # back onto the input's grid: its map grid, or every pixel of a GCP input
    input_georef = georeference(job.input)
    if "gcps" in input_georef:
        warp_to_gcps(on_grid, back, input_georef, source.width, source.height)
    else:
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
