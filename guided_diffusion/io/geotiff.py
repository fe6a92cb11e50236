"""
Georeferenced rasters out: where a raster lies (:func:`georeference`), GeoTIFFs a GIS
opens well, written whole (:func:`write_geotiff`) or a band of rows at a time for
scenes larger than memory (:class:`GeoTiffWriter`, atomically: a reader never sees
half a file). Reading and scaling rasters is rasters.py's, warping them warp.py's.
"""

import warnings

import numpy as np

from ..base.atomic import temporary_path
from .rasters import _unreadable


def georeference(path):
    """
    Where a raster lies: its CRS and transform, or its ground control points.

    :return: a dict of rasterio profile entries ("crs" and "transform", or "gcps"
        and "gcp_crs"); empty for a file that is not georeferenced.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                gcps, gcp_crs = src.gcps
                if src.crs is not None and not src.transform.is_identity:
                    return {"crs": src.crs, "transform": src.transform}
                if gcps:
                    return {"gcps": gcps, "gcp_crs": gcp_crs}
                return {}
    except Exception as exc:  # rasterio.errors.RasterioIOError and GDAL's errors
        raise _unreadable(path, exc) from None


def write_geotiff(path, image, georef, *, nodata=None, names=None, block=256):
    """
    Write (B, H, W) as a GeoTIFF a GIS opens well (see :class:`GeoTiffWriter`).

    :param georef: :func:`georeference` of the input.
    """
    count, height, width = image.shape
    with GeoTiffWriter(
        path, count, height, width, image.dtype, georef, nodata=nodata, names=names,
        block=block,
    ) as out:  # fmt: skip
        out.write(0, image)
    return path


class GeoTiffWriter:
    """
    A GeoTIFF written a band of rows at a time: internally tiled, deflate
    compressed, BigTIFF when it needs it, with overviews (halvings down to about
    ``block`` pixels, built on closing), band names and the nodata value. It is
    written to a temporary file and renamed when the ``with`` block ends without an
    error (:func:`atomic.temporary_path`), so a killed job never leaves half a file
    under ``path``, and a full disk ends in :class:`atomic.DiskFull`.

    :param georef: :func:`georeference` of the input.
    """

    def __init__(self, path, count, height, width, dtype, georef, *, nodata=None,
                 names=None, block=256):  # fmt: skip
        self.path, self.georef, self.names = path, georef, names
        self.height, self.width, self.block = height, width, block
        self.profile = {
            "driver": "GTiff", "width": width, "height": height, "count": count,
            "dtype": np.dtype(dtype).name, "nodata": nodata, "tiled": True,
            "blockxsize": block, "blockysize": block, "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }  # fmt: skip
        if not georef.get("gcps"):
            self.profile.update(
                {k: v for k, v in georef.items() if k in ("crs", "transform")}
            )
        self._dst = self._tmp = None

    def __enter__(self):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self._tmp = temporary_path(self.path, ".tif")
        tmp = self._tmp.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dst = rasterio.open(tmp, "w", **self.profile)
        except BaseException as err:
            if not self._tmp.__exit__(type(err), err, err.__traceback__):
                raise
        return self

    def write(self, top, rows):
        """Write (B, h, W) as the rows [top, top + h)."""
        from rasterio.windows import Window

        self._dst.write(rows, window=Window(0, top, self.width, rows.shape[1]))

    def __exit__(self, exc_type, exc, tb):
        try:
            try:
                if exc_type is None:
                    self._finish()
            finally:
                self._dst.close()
        except BaseException as err:
            # Finishing or closing failed (a full disk shows here): the temporary
            # file goes, and this is the error to report.
            if not self._tmp.__exit__(type(err), err, err.__traceback__):
                raise
        else:
            # Renames the file, or removes it after an error in the ``with`` block
            # (raising DiskFull instead when the disk is full).
            self._tmp.__exit__(exc_type, exc, tb)
        return False

    def _finish(self):
        """The georeference, band names and overviews, written before closing."""
        from rasterio.enums import Resampling

        dst = self._dst
        if self.georef.get("gcps"):
            dst.gcps = (self.georef["gcps"], self.georef["gcp_crs"])
        for i, name in enumerate(self.names or ()):
            dst.set_band_description(i + 1, name)
        factors = []
        while min(self.height, self.width) // (2 ** (len(factors) + 1)) >= (
            self.block // 2
        ):
            factors.append(2 ** (len(factors) + 1))
        if factors:
            dst.build_overviews(factors, Resampling.average)
            dst.update_tags(ns="rio_overview", resampling="average")
