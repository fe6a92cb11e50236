"""
Warping rasters onto another grid: the grid of a raster at another pixel size
(:func:`grid_at_pixel_size`: for a raster georeferenced by ground control points
only, a UTM grid), a raster resampled onto a grid (:func:`warp_to_grid`) and a
raster on a map grid sampled back at every pixel of a GCP-georeferenced one
(:func:`warp_to_gcps`), a band of rows at a time.
"""

import math

import numpy as np

from .geotiff import GeoTiffWriter, georeference
from .rasters import DataError


def grid_at_pixel_size(path, pixel_size):
    """
    The grid of a georeferenced raster at another pixel size: the same CRS, the
    same upper-left corner, the same extent (rounded to whole pixels). A raster
    georeferenced by ground control points only (a Sentinel-1 GRD product, in
    radar geometry) gets a north-up grid in the UTM zone of its centre covering
    its footprint (:func:`utm_grid`).

    :param pixel_size: (x, y) in CRS units (metres for the UTM grid).
    :return: (crs, transform, width, height).
    :raises DataError: the file is not georeferenced, naming it.
    """
    import rasterio
    from rasterio.transform import Affine

    georef = georeference(path)
    if "gcps" in georef:
        with rasterio.open(path) as src:
            return utm_grid(georef["gcps"], georef["gcp_crs"], src.width, src.height, pixel_size)
    if "transform" not in georef:
        raise DataError(
            f"--resample: {path} is not georeferenced (no map transform, no ground "
            "control points), so it has no pixel size to resample from; leave "
            "--resample out"
        )
    with rasterio.open(path) as src:
        t, width, height = src.transform, src.width, src.height
    px, py = pixel_size
    new_width = max(1, round(width * abs(t.a) / px))
    new_height = max(1, round(height * abs(t.e) / py))
    transform = Affine(
        math.copysign(px, t.a), 0.0, t.c, 0.0, math.copysign(py, t.e), t.f
    )
    return georef["crs"], transform, new_width, new_height


def _pixel_lonlat(gcps, gcp_crs, rows, cols, crs):
    """The centres of pixels (rows, cols) in ``crs``, through GDAL's GCP transformer."""
    from rasterio.transform import GCPTransformer
    from rasterio.warp import transform as transform_points

    with GCPTransformer(gcps) as t:
        xs, ys = t.xy(rows, cols)
    xs, ys = transform_points(gcp_crs, crs, np.ravel(xs), np.ravel(ys))
    return np.asarray(xs), np.asarray(ys)


def utm_zone(lon, lat):
    """The EPSG code of the WGS 84 UTM zone of a point (326xx north, 327xx south)."""
    zone = min(60, max(1, int((lon + 180.0) // 6.0) + 1))
    return (32600 if lat >= 0 else 32700) + zone


def utm_grid(gcps, gcp_crs, width, height, pixel_size, *, edge_points=64):
    """
    A north-up grid for a raster georeferenced by ground control points: the UTM
    zone of its centre, ``pixel_size`` metres, covering the raster's footprint
    (its edges followed through the GCPs at ``edge_points`` points each).

    :return: (crs, transform, width, height).
    """
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    lon, lat = _pixel_lonlat(gcps, gcp_crs, [height / 2 - 0.5], [width / 2 - 0.5], "EPSG:4326")
    crs = CRS.from_epsg(utm_zone(lon[0], lat[0]))
    along_x = np.linspace(0, width - 1, edge_points)
    along_y = np.linspace(0, height - 1, edge_points)
    rows = np.concatenate([np.zeros_like(along_x), np.full_like(along_x, height - 1), along_y, along_y])
    cols = np.concatenate([along_x, along_x, np.zeros_like(along_y), np.full_like(along_y, width - 1)])
    xs, ys = _pixel_lonlat(gcps, gcp_crs, rows, cols, crs)
    px, py = pixel_size
    # the edge pixels' centres, and half a pixel of the new grid around them
    left, top = xs.min() - px / 2, ys.max() + py / 2
    new_width = max(1, math.ceil((xs.max() + px / 2 - left) / px))
    new_height = max(1, math.ceil((top - (ys.min() - py / 2)) / py))
    return crs, Affine(px, 0.0, left, 0.0, -py, top), new_width, new_height


def gcp_pixel_size(gcps, gcp_crs, crs):
    """
    The mean pixel size of a GCP-georeferenced raster in ``crs`` units: the
    square root of the area of one pixel of the affine fit of the GCPs.
    """
    from rasterio.warp import transform as transform_points

    xs, ys = transform_points(gcp_crs, crs, [g.x for g in gcps], [g.y for g in gcps])
    design = np.column_stack([[g.col for g in gcps], [g.row for g in gcps], np.ones(len(gcps))])
    (ax, bx, _), *_ = np.linalg.lstsq(design, np.asarray(xs), rcond=None)
    (ay, by, _), *_ = np.linalg.lstsq(design, np.asarray(ys), rcond=None)
    return math.sqrt(abs(ax * by - bx * ay))


def warp_to_grid(src_path, dst_path, transform, width, height, *, crs=None, rows=256):
    """
    Resample a raster onto a grid (of its CRS, or of ``crs``; a source
    georeferenced by ground control points is warped through them), a band of
    rows at a time, into a float32 GeoTIFF with the same band names and nodata
    (NaN for none). Coarser pixels average the finer ones; finer ones
    interpolate bilinearly.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import reproject
    from rasterio.windows import Window

    with rasterio.open(src_path) as src:
        crs = crs or src.crs
        gcps, gcp_crs = src.gcps
        by_gcps = src.crs is None and bool(gcps)
        source_size = gcp_pixel_size(gcps, gcp_crs, crs) if by_gcps else abs(src.transform.a)
        resampling = Resampling.average if abs(transform.a) > source_size else Resampling.bilinear
        nodata = src.nodata if src.nodata is not None else float("nan")
        georef = {"crs": crs, "transform": transform}
        names = [d or "" for d in src.descriptions]
        bands = list(range(1, src.count + 1))
        with GeoTiffWriter(
            dst_path, src.count, height, width, np.float32, georef, nodata=nodata,
            names=names,
        ) as out:  # fmt: skip
            if by_gcps:
                # rasterio's WarpedVRT reads no GCPs (all nodata): GDAL's warper
                # through reproject, from the open file, does
                for top in range(0, height, rows):
                    h = min(rows, height - top)
                    band = np.full((src.count, h, width), nodata, np.float32)
                    reproject(
                        rasterio.band(src, bands), band, gcps=gcps, src_crs=gcp_crs,
                        src_nodata=nodata, dst_transform=transform @ Affine.translation(0, top),
                        dst_crs=crs, dst_nodata=nodata, resampling=resampling,
                    )  # fmt: skip
                    out.write(top, band)
                return dst_path
            with WarpedVRT(
                src, crs=crs, transform=transform, width=width, height=height,
                resampling=resampling, src_nodata=nodata, nodata=nodata, dtype="float32",
            ) as vrt:  # fmt: skip
                for top in range(0, height, rows):
                    h = min(rows, height - top)
                    out.write(top, vrt.read(window=Window(0, top, width, h)))
    return dst_path


def warp_to_gcps(src_path, dst_path, georef, width, height, *, rows=256, cols=1024):
    """
    Sample a raster on a map grid back at every pixel of a raster georeferenced
    by ground control points (the way back from :func:`utm_grid`): each pixel's
    place through GDAL's GCP transformer (as the warper placed it), bilinearly
    interpolated from the four nearest pixel centres (NaN where one is nodata or
    the place is outside the raster; within its outer half pixels, the edge's), ``rows`` x ``cols`` pixels at a time, into a float32 GeoTIFF of
    width x height with those GCPs, the same band names and NaN nodata.

    :param georef: {"gcps": ..., "gcp_crs": ...} of the destination.
    """
    import rasterio
    from rasterio.windows import Window

    gcps, gcp_crs = georef["gcps"], georef["gcp_crs"]
    with rasterio.open(src_path) as src, GeoTiffWriter(
        dst_path, src.count, height, width, np.float32, georef, nodata=float("nan"),
        names=[d or "" for d in src.descriptions],
    ) as out:  # fmt: skip
        nodata = src.nodata
        inverse = ~src.transform
        for top in range(0, height, rows):
            h = min(rows, height - top)
            band = np.full((src.count, h, width), np.nan, np.float32)
            for left in range(0, width, cols):
                w = min(cols, width - left)
                r, c = np.mgrid[top : top + h, left : left + w]
                xs, ys = _pixel_lonlat(gcps, gcp_crs, r.ravel(), c.ravel(), src.crs)
                # fractional indices of the source's pixel centres
                fx, fy = inverse @ (xs, ys)
                fx, fy = np.asarray(fx) - 0.5, np.asarray(fy) - 0.5
                # a place within the source's outer pixels (up to half a pixel past
                # their centres) takes the edge pixel's value, so the result's
                # border rows and columns are not lost
                inside = (fx >= -0.5) & (fx <= src.width - 0.5)
                inside &= (fy >= -0.5) & (fy <= src.height - 0.5)
                fx = np.clip(fx, 0, src.width - 1)
                fy = np.clip(fy, 0, src.height - 1)
                x0 = np.minimum(np.floor(fx), max(src.width - 2, 0)).astype(int)
                y0 = np.minimum(np.floor(fy), max(src.height - 2, 0)).astype(int)
                if not inside.any():
                    continue
                wx0, wy0 = x0[inside].min(), y0[inside].min()
                win = Window(wx0, wy0, x0[inside].max() + 2 - wx0, y0[inside].max() + 2 - wy0)
                data = src.read(window=win).astype(np.float64)
                if nodata is not None and not np.isnan(nodata):
                    data[data == nodata] = np.nan
                i, j = y0[inside] - wy0, x0[inside] - wx0
                ax, ay = fx[inside] - x0[inside], fy[inside] - y0[inside]
                value = (
                    data[:, i, j] * (1 - ax) * (1 - ay) + data[:, i, j + 1] * ax * (1 - ay)
                    + data[:, i + 1, j] * (1 - ax) * ay + data[:, i + 1, j + 1] * ax * ay
                )  # fmt: skip
                block = np.full((src.count, h * w), np.nan, np.float32)
                block[:, inside] = value
                band[:, :, left : left + w] = block.reshape(src.count, h, w)
            out.write(top, band)
    return dst_path
