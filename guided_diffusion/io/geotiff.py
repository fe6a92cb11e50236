"""
Georeferenced rasters out: where a raster lies (:func:`georeference`), GeoTIFFs a GIS
opens well, written whole (:func:`write_geotiff`) or a band of rows at a time for
scenes larger than memory (:class:`GeoTiffWriter`, atomically: a reader never sees
half a file). Reading and scaling rasters is rasters.py's, warping them warp.py's.
"""

import math
import os
import shutil
import warnings

import numpy as np

from ..base.atomic import DiskFull, disk_of, temporary_path
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


def write_geotiff(path, image, georef, *, nodata=None, names=None, block=256,
                  valid=None, cog=False):  # fmt: skip
    """
    Write (B, H, W) as a GeoTIFF a GIS opens well (see :class:`GeoTiffWriter`).

    :param georef: :func:`georeference` of the input.
    :param valid: (H, W) bool, the pixels with data, written as the dataset's mask;
        None for no mask.
    :param cog: a Cloud-Optimized GeoTIFF rather than a plain tiled one.
    """
    count, height, width = image.shape
    with GeoTiffWriter(
        path, count, height, width, image.dtype, georef, nodata=nodata, names=names,
        block=block, mask=valid is not None, cog=cog,
    ) as out:  # fmt: skip
        out.write(0, image, valid)
    return path


class GeoTiffWriter:
    """
    A GeoTIFF written a band of rows at a time: internally tiled, deflate
    compressed, BigTIFF when it needs it, with overviews (halvings down to about
    ``block`` pixels, built on closing), band names, the colour interpretation
    (red, green, blue for bands so named) and the nodata value. It is written to a
    temporary file and renamed when the ``with`` block ends without an error
    (:func:`atomic.temporary_path`), so a killed job never leaves half a file under
    ``path``, and a full disk ends in :class:`atomic.DiskFull`.

    With ``mask``, the file carries GDAL's internal per-dataset mask (255 where a
    pixel has data, 0 where not; overviews have theirs): unlike a nodata value it
    cannot collide with a pixel's value, such as a generated 0 in 8-bit output.

    With ``cog``, the rows go to an intermediate tiled GeoTIFF (so a scene larger
    than memory is never held whole) that GDAL's COG driver then copies into a
    Cloud-Optimized GeoTIFF, building the overviews, the mask's included; the copy
    keeps the georeference (GCPs included), band names, colour interpretation and
    mask, and the intermediate is removed whatever happens. :attr:`bytes_needed`
    bounds the disk this takes; a disk with less free space than the intermediate
    (which the COG outgrows) is refused before the copy, with DiskFull.

    :param georef: :func:`georeference` of the input.
    :param mask: write the dataset mask: each :meth:`write` gives its rows' valid
        pixels.
    :param cog: a Cloud-Optimized GeoTIFF rather than a plain tiled one.
    """

    def __init__(self, path, count, height, width, dtype, georef, *, nodata=None,
                 names=None, block=256, mask=False, cog=False):  # fmt: skip
        self.path, self.georef, self.names = path, georef, names
        self.height, self.width, self.block = height, width, block
        self.mask, self.cog = mask, cog
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
        # an upper bound: the pixels uncompressed, with their mask, and a third
        # more for the overviews (halvings: 1/4 + 1/16 + ... < 1/3); a COG needs
        # the intermediate file, its own and the COG driver's temporary overviews
        pixels = height * width * (count * np.dtype(dtype).itemsize + (1 if mask else 0))
        self.bytes_needed = pixels * (1 + 4 / 3 + 1 / 3) if cog else pixels * 4 / 3
        self.bytes_needed = int(math.ceil(self.bytes_needed))
        self._dst = self._tmp = self._work = self._final = None

    def __enter__(self):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self._tmp = temporary_path(self.path, ".tif")
        tmp = self._tmp.__enter__()
        # the COG is copied to tmp from this intermediate, beside it
        self._final = tmp
        self._work = tmp[: -len(".tif")] + "-rows.tif" if self.cog else tmp
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dst = rasterio.open(self._work, "w", **self.profile)
        except BaseException as err:
            self._remove_work()
            if not self._tmp.__exit__(type(err), err, err.__traceback__):
                raise
        return self

    def write(self, top, rows, valid=None):
        """
        Write (B, h, W) as the rows [top, top + h).

        :param valid: (h, W) bool, the rows' pixels with data, for a writer with
            ``mask``; None: all of them.
        """
        from rasterio.windows import Window

        window = Window(0, top, self.width, rows.shape[1])
        self._dst.write(rows, window=window)
        if self.mask:
            if valid is None:
                valid = np.ones(rows.shape[1:], bool)
            self._dst.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)

    def __exit__(self, exc_type, exc, tb):
        try:
            try:
                try:
                    if exc_type is None:
                        self._finish()
                finally:
                    self._dst.close()
                if exc_type is None and self.cog:
                    self._check_room(self._work)
                    self._copy_cog(self._work, self._final)
            except BaseException as err:
                # Finishing, closing or the copy failed (a full disk shows here):
                # the temporary file goes, and this is the error to report.
                try:
                    handled = self._tmp.__exit__(type(err), err, err.__traceback__)
                except DiskFull as full:
                    if isinstance(err, DiskFull) and full.__cause__ is err:
                        raise err from None  # the room check's line says more
                    raise
                if not handled:
                    raise
            else:
                # Renames the file, or removes it after an error in the ``with``
                # block (raising DiskFull instead when the disk is full).
                self._tmp.__exit__(exc_type, exc, tb)
        finally:
            # only now: the free space at the error decides whether it was a full
            # disk (atomic.temporary_path), and removing this frees space
            self._remove_work()
        return False

    def _check_room(self, work):
        """
        Refuse the COG copy at once when the disk clearly lacks the room: the COG
        holds the intermediate's pixels, as compressed, and overviews besides.

        :raises DiskFull: naming the output, the disk and the bytes needed.
        """
        needed = os.path.getsize(work)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(work))).free
        if free < needed:
            raise DiskFull(
                self.path,
                f"disk full: {self.path} needs more than {needed:,} bytes for its "
                f"Cloud-Optimized copy, and the disk at {disk_of(work)} has {free:,} "
                "free: free space there, or write a plain GeoTIFF (--cog false)",
            )

    def _remove_work(self):
        if self.cog and self._work and os.path.exists(self._work):
            os.remove(self._work)

    def _copy_cog(self, src, dst):
        """The Cloud-Optimized GeoTIFF ``dst`` copied from the tiled GeoTIFF ``src``."""
        import rasterio.shutil
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                rasterio.shutil.copy(
                    src, dst, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=self.block,
                    OVERVIEW_RESAMPLING="AVERAGE", BIGTIFF="IF_SAFER",
                )  # fmt: skip
        except OSError:
            raise
        except Exception as err:
            # GDAL's errors here (rasterio's CPLE_* classes) are not OSErrors, and a
            # full disk shows as one of them ("TIFFRewriteDirectory: Error fetching
            # directory count"): an I/O error, for atomic.temporary_path to judge
            raise RasterioIOError(f"{dst}: {err}") from err

    def _finish(self):
        """The georeference, band names, colours and overviews, written before
        closing (a COG's overviews are the COG driver's)."""
        from rasterio.enums import ColorInterp, Resampling

        dst = self._dst
        if self.georef.get("gcps"):
            dst.gcps = (self.georef["gcps"], self.georef["gcp_crs"])
        for i, name in enumerate(self.names or ()):
            dst.set_band_description(i + 1, name)
        if tuple(self.names or ()) == ("red", "green", "blue"):
            # GDAL calls 3 bands of bytes RGB already, but not 3 of floats
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        if self.cog:
            return
        factors = []
        while min(self.height, self.width) // (2 ** (len(factors) + 1)) >= (
            self.block // 2
        ):
            factors.append(2 ** (len(factors) + 1))
        if factors:
            dst.build_overviews(factors, Resampling.average)
            dst.update_tags(ns="rio_overview", resampling="average")
