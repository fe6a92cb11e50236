"""
Sentinel-1 GRD products as they are delivered: the ``.SAFE`` folder, its ``.zip``
or the folder's ``manifest.safe`` (:func:`open_product`), read as calibrated sigma0
into a float32 GeoTIFF with the product's ground control points
(:func:`write_sigma0`), a band of rows at a time.

The layout is the Sentinel-1 Product Specification's (S1-RS-MDA-52-7441, and ESA's
"Sentinel-1 SAR Technical Guide: Level-1 Product Formatting"): in ``X.SAFE/``,
``measurement/s1a-iw-grd-vv-<start>-<stop>-<orbit>-<datatake>-001.tiff`` holds the
digital numbers of one polarisation, ``annotation/<same name>.xml`` its product
annotation (``imageAnnotation/imageInformation``: ``rangePixelSpacing``,
``azimuthPixelSpacing``; ``geolocationGrid/geolocationGridPointList``: points of
``line``, ``pixel``, ``latitude``, ``longitude``, ``height``) and
``annotation/calibration/calibration-<same name>.xml`` its calibration table
(``calibrationVectorList/calibrationVector``: ``line``, ``pixel`` [list],
``sigmaNought`` [list]). ESA's note on the radiometric calibration of Level-1
products (ESA-EOPG-CSCOP-TN-0002) gives sigma0 = DN^2 / A^2, A the sigmaNought table
interpolated bilinearly over its lines and pixels.

Our own reader (the XML with the standard library, the numbers with numpy, the
TIFFs through rasterio: a zip through GDAL's ``/vsizip/``) rather than
xarray-sentinel: a few hundred lines, no new dependency, and it reads a band of
rows at a time into the GeoTIFF the scene job reads anyway.
"""

import os
import warnings
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

from .geotiff import GeoTiffWriter
from .rasters import CO_POL, CROSS_POL, DataError

MANIFEST = "manifest.safe"
# DN 0 is no data: the swath's edges, outside the imaged area.
NODATA_DN = 0


def is_product(path):
    """
    Whether ``path`` names a Sentinel-1 product: a folder with a manifest.safe
    (X.SAFE), the manifest itself, or a zip that holds one.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MANIFEST))
    if os.path.basename(path) == MANIFEST:
        return os.path.isfile(path)
    if path.lower().endswith(".zip") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/" + MANIFEST) or n == MANIFEST for n in z.namelist())
    return False


class Band:
    """One polarisation of a product: its measurement TIFF (a path GDAL opens),
    annotation and calibration XML (members of the product)."""

    def __init__(self, polarisation, measurement, annotation, calibration):
        self.polarisation = polarisation
        self.measurement = measurement
        self.annotation = annotation
        self.calibration = calibration


class Product:
    """
    A Sentinel-1 GRD product (:func:`open_product`).

    :param path: the product as given.
    :param name: its name (X of X.SAFE).
    :param bands: polarisation ("VV", ...) -> :class:`Band`, in the product's order.
    """

    def __init__(self, path, name, bands, read):
        self.path, self.name, self.bands, self._read = path, name, bands, read

    @property
    def polarisations(self):
        return tuple(self.bands)

    def xml(self, member):
        """The root element of one of the product's XML files."""
        try:
            return ET.fromstring(self._read(member))
        except (OSError, KeyError, ET.ParseError) as exc:
            raise DataError(
                f"{self.path}: cannot read {member} ({type(exc).__name__}: {exc}); "
                "the product is incomplete or damaged: download it again"
            ) from None

    def pixel_spacing(self):
        """(range, azimuth) pixel spacing in metres, from the first band's annotation."""
        info = self.xml(next(iter(self.bands.values())).annotation)
        found = [
            info.findtext(f"imageAnnotation/imageInformation/{tag}")
            for tag in ("rangePixelSpacing", "azimuthPixelSpacing")
        ]
        if None in found:
            raise DataError(f"{self.path}: its annotation gives no pixel spacing")
        return tuple(float(v) for v in found)

    def gcps(self):
        """The annotation's geolocation grid as rasterio ground control points
        (longitude, latitude, height; EPSG:4326)."""
        from rasterio.control import GroundControlPoint

        root = self.xml(next(iter(self.bands.values())).annotation)
        points = root.findall("geolocationGrid/geolocationGridPointList/geolocationGridPoint")
        if not points:
            raise DataError(f"{self.path}: its annotation has no geolocation grid")
        return [
            GroundControlPoint(
                row=float(p.findtext("line")), col=float(p.findtext("pixel")),
                x=float(p.findtext("longitude")), y=float(p.findtext("latitude")),
                z=float(p.findtext("height") or 0.0), id=str(i + 1),
            )  # fmt: skip
            for i, p in enumerate(points)
        ]

    def calibration(self, polarisation):
        """The sigmaNought table of a polarisation (:func:`calibration_table`)."""
        return calibration_table(self.xml(self.bands[polarisation].calibration))


def open_product(path):
    """
    A Sentinel-1 GRD product: the X.SAFE folder, its zip, or its manifest.safe.

    :return: a :class:`Product`.
    :raises DataError: not a GRD product, or one without measurements, naming it.
    """
    path = os.fspath(path)
    if os.path.basename(path) == MANIFEST:
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        root = os.path.abspath(path)
        members = []
        for folder, _, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            members += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in files]

        def read(member):
            with open(os.path.join(root, member), "rb") as f:
                return f.read()

        def gdal_path(member):
            return os.path.join(root, member)

        name = os.path.basename(root)
    else:
        archive = os.path.abspath(path)
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
        manifest = next((n for n in names if n.rsplit("/", 1)[-1] == MANIFEST), None)
        if manifest is None:
            raise DataError(f"{path}: no {MANIFEST} inside; not a Sentinel-1 product")
        top = manifest[: -len(MANIFEST)]
        members = [n[len(top):] for n in names if n.startswith(top) and not n.endswith("/")]

        def read(member):
            with zipfile.ZipFile(archive) as z:
                return z.read(top + member)

        def gdal_path(member):
            return f"/vsizip/{archive}/{top}{member}"

        name = top.rstrip("/").rsplit("/", 1)[-1] or os.path.basename(archive)[:-4]
    name = name[:-5] if name.upper().endswith(".SAFE") else name
    bands = {}
    for member in sorted(members):
        folder, _, file = member.rpartition("/")
        if folder != "measurement" or not file.lower().endswith((".tiff", ".tif")):
            continue
        stem = file.rsplit(".", 1)[0]
        # mission-swath-type-polarisation-start-stop-orbit-datatake-index
        parts = stem.split("-")
        if len(parts) < 4:
            continue
        if parts[2].lower() != "grd":
            raise DataError(
                f"{path}: a {parts[2].upper()} product; only GRD products (ground range, "
                "detected) are read: download the GRD product of the scene"
            )
        pol = parts[3].upper()
        annotation = f"annotation/{stem}.xml"
        calibration = f"annotation/calibration/calibration-{stem}.xml"
        for needed in (annotation, calibration):
            if needed not in members:
                raise DataError(
                    f"{path}: {needed} is missing; the product is incomplete: "
                    "download it again"
                )
        bands[pol] = Band(pol, gdal_path(member), annotation, calibration)
    if not bands:
        raise DataError(
            f"{path}: no measurement/*.tiff; not a Sentinel-1 GRD product, or an "
            "incomplete one"
        )
    # co-polarised first, as the models' bands are ordered
    order = sorted(bands, key=lambda p: (p in CROSS_POL, p))
    return Product(path, name, {p: bands[p] for p in order}, read)


def calibration_table(root):
    """
    The sigmaNought table of a calibration XML.

    :return: (lines (L,), pixels (P,), values (L, P)), lines ascending; vectors
        whose pixels differ are interpolated onto the first vector's pixels.
    """
    vectors = root.findall("calibrationVectorList/calibrationVector")
    if not vectors:
        raise DataError("the calibration XML has no calibrationVector")
    lines, rows = [], []
    pixels = None
    for v in vectors:
        pix = np.array(v.findtext("pixel").split(), dtype=np.float64)
        sigma = np.array(v.findtext("sigmaNought").split(), dtype=np.float64)
        if pixels is None:
            pixels = pix
        if pix.shape != pixels.shape or not np.array_equal(pix, pixels):
            sigma = np.interp(pixels, pix, sigma)
        lines.append(float(v.findtext("line")))
        rows.append(sigma)
    order = np.argsort(lines, kind="stable")
    return np.asarray(lines)[order], pixels, np.stack(rows)[order]


def interpolate_table(lines, pixels, values, rows, cols):
    """
    A table given at (lines, pixels) interpolated bilinearly at every (row, col),
    held at its edge values outside it.

    :param rows, cols: (R,), (C,) the image's rows and columns.
    :return: (R, C) float64.
    """
    along = np.stack([np.interp(cols, pixels, v) for v in values])  # (L, C)
    if len(lines) == 1:
        return np.broadcast_to(along[0], (len(rows), len(cols))).copy()
    rows = np.asarray(rows, np.float64)
    below = np.clip(np.searchsorted(lines, rows, side="right") - 1, 0, len(lines) - 2)
    w = np.clip((rows - lines[below]) / (lines[below + 1] - lines[below]), 0.0, 1.0)
    return (1 - w)[:, None] * along[below] + w[:, None] * along[below + 1]


def sigma0(dn, a):
    """sigma0 = DN^2 / A^2 (linear power, float32); DN 0 is nodata (NaN)."""
    dn = dn.astype(np.float64)
    out = dn**2 / a**2
    out[dn == NODATA_DN] = np.nan
    return out.astype(np.float32)


def model_polarisations(scaling):
    """
    The product's polarisations a model reads, in its band order: the names given
    to --sar_bands, else the names it learned on, else co- (and cross-) polarised
    by its channel count (None: the product's own).

    :param scaling: the job's rasters.Scaling.
    :return: a tuple of names, or (None,) / (None, None) when the model names none.
    """
    named = [b for b in scaling.sar_bands if isinstance(b, str)]
    if named and len(named) == len(scaling.sar_bands):
        return tuple(b.upper() for b in named)
    if scaling.sar_band_names:
        return tuple(b.upper() for b in scaling.sar_band_names)
    return (None, None) if scaling.sar_channels == 2 else (None,)


def choose_polarisations(product, wanted):
    """
    The product's polarisations for a model's bands.

    :param wanted: :func:`model_polarisations`.
    :return: a tuple of the product's polarisation names, in the model's order.
    :raises DataError: the product lacks one, in one line naming the product,
        what it has and what the model needs.
    """
    have = product.polarisations
    if all(w is None for w in wanted):
        # an unnamed model: the co-polarised band, then the cross-polarised one
        co = [p for p in have if p in CO_POL]
        cross = [p for p in have if p in CROSS_POL]
        picked = (co[:1] + cross[:1])[: len(wanted)]
        if len(picked) == len(wanted):
            return tuple(picked)
    elif all(w in have for w in wanted):
        return tuple(wanted)
    needs = ", ".join(w or "?" for w in wanted)
    if all(w is None for w in wanted):
        needs = "co- and cross-polarised bands" if len(wanted) == 2 else "one band"
    hint = "download a product of the polarisations the model was trained on"
    if len(have) < len(wanted):
        hint = (
            f"a {len(wanted)}-polarisation model needs a dual-polarisation product "
            "(1SDV for VV+VH, 1SDH for HH+HV)"
        )
    elif set(have) <= {"HH", "HV"} and {"VV", "VH"} & set(wanted):
        hint = "translate a VV+VH (1SDV) product, or use a model trained on HH, HV"
    elif set(have) <= {"VV", "VH"} and {"HH", "HV"} & set(wanted):
        hint = "translate an HH+HV (1SDH) product, or use a model trained on VV, VH"
    raise DataError(
        f"Sentinel-1 product {product.path} has {', '.join(have)} but the model "
        f"needs {needs}: {hint}"
    )


def write_sigma0(product, path, polarisations, *, rows=512):
    """
    The chosen polarisations of a product as a float32 GeoTIFF of linear sigma0:
    band descriptions the polarisations' names, NaN nodata (DN 0), the product's
    ground control points (EPSG:4326), written atomically a band of ``rows`` rows
    at a time (a product is about 25000 x 17000 pixels: never whole).

    :param polarisations: :func:`choose_polarisations`.
    :return: ``path``.
    :raises DataError: a measurement that cannot be read, or bands of different
        sizes, naming the product.
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    sources = []
    try:
        try:
            # the product places its pixels by the annotation's grid (written below)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                sources = [rasterio.open(product.bands[p].measurement) for p in polarisations]
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(
                f"{product.path}: cannot read its measurement ({exc}); the product "
                "is incomplete or damaged: download it again"
            ) from None
        width, height = sources[0].width, sources[0].height
        if any((s.width, s.height) != (width, height) for s in sources):
            raise DataError(f"{product.path}: its polarisations differ in size")
        tables = [product.calibration(p) for p in polarisations]
        cols = np.arange(width, dtype=np.float64)
        georef = {"gcps": product.gcps(), "gcp_crs": CRS.from_epsg(4326)}
        with GeoTiffWriter(
            path, len(sources), height, width, np.float32, georef,
            nodata=float("nan"), names=list(polarisations),
        ) as out:  # fmt: skip
            for top in range(0, height, rows):
                h = min(rows, height - top)
                lines = np.arange(top, top + h, dtype=np.float64)
                band = np.empty((len(sources), h, width), np.float32)
                for i, (src, table) in enumerate(zip(sources, tables)):
                    dn = src.read(1, window=Window(0, top, width, h))
                    band[i] = sigma0(dn, interpolate_table(*table, lines, cols))
                out.write(top, band)
    finally:
        for src in sources:
            src.close()
    return path
