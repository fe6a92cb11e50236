"""
Warping rasters onto another grid: the grid of a raster at another pixel size
(:func:`grid_at_pixel_size`) and a raster resampled onto a grid
(:func:`warp_to_grid`), a band of rows at a time.
"""

import math

import numpy as np

from .geotiff import GeoTiffWriter, georeference
from .rasters import DataError


def grid_at_pixel_size(path, pixel_size):
    """
    The grid of a georeferenced raster at another pixel size: the same CRS, the
    same upper-left corner, the same extent (rounded to whole pixels).

    :param pixel_size: (x, y) in CRS units.
    :return: (transform, width, height).
    :raises DataError: the file has no CRS and transform (ground control points
        only, or nothing), naming it.
    """
    import rasterio
    from rasterio.transform import Affine

    georef = georeference(path)
    if "transform" not in georef:
        raise DataError(
            f"--resample: {path} has no map transform (only ground control points, "
            "or none): warp it onto a map grid first (e.g. gdalwarp -tr), then resample"
        )
    with rasterio.open(path) as src:
        t, width, height = src.transform, src.width, src.height
    px, py = pixel_size
    new_width = max(1, round(width * abs(t.a) / px))
    new_height = max(1, round(height * abs(t.e) / py))
    transform = Affine(
        math.copysign(px, t.a), 0.0, t.c, 0.0, math.copysign(py, t.e), t.f
    )
    return transform, new_width, new_height


def warp_to_grid(src_path, dst_path, transform, width, height, *, rows=256):
    """
    Resample a raster onto another grid of its CRS (a band of rows at a time),
    into a float32 GeoTIFF with the same band names and nodata (NaN for none).
    Coarser pixels average the finer ones; finer ones interpolate bilinearly.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    with rasterio.open(src_path) as src:
        coarser = abs(transform.a) > abs(src.transform.a)
        nodata = src.nodata if src.nodata is not None else float("nan")
        georef = {"crs": src.crs, "transform": transform}
        names = [d or "" for d in src.descriptions]
        with WarpedVRT(
            src, crs=src.crs, transform=transform, width=width, height=height,
            resampling=Resampling.average if coarser else Resampling.bilinear,
            src_nodata=nodata, nodata=nodata, dtype="float32",
        ) as vrt, GeoTiffWriter(
            dst_path, src.count, height, width, np.float32, georef, nodata=nodata,
            names=names,
        ) as out:  # fmt: skip
            for top in range(0, height, rows):
                h = min(rows, height - top)
                out.write(top, vrt.read(window=Window(0, top, width, h)))
    return dst_path
