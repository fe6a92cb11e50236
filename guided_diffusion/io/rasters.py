"""
Reading SAR and optical images and scaling them to the model's [-1, 1].

Two readers: 8-bit PNG, JPEG, BMP and WebP files go through Pillow exactly as in
the original code; TIFF and GeoTIFF files (any band count, integer or float) and
16-bit PNGs go through rasterio. Both hand over a :class:`Raster`.

How a file's values become the model's input is a :class:`Scaling`, built from
the "inputs" settings (settings.py) and kept in a training run's record, so that
training, validation, sampling and the likelihood scale an image the same way:

* SAR, ``--sar_input``: ``uint8`` (the default, SEN1-2's 8-bit PNGs: v / 127.5 - 1,
  as the original), or ``db``, ``power`` or ``amplitude`` (turned into dB as
  10 log10 and 20 log10), then clipped to a dB range per band and mapped linearly
  to [-1, 1]. The default ranges are SEN12MS-CR's: -25..0 dB for the
  co-polarised band (VV, HH), -32.5..0 dB for the cross-polarised one (VH, HV).
* Nodata (the value the file declares, or ``--sar_nodata``; NaN, and in power or
  amplitude any value <= 0, always) is filled with the bottom of the range (-1),
  counted and kept as a mask, so no log of zero reaches the network. This holds
  for 8-bit SAR too (the network sees -1 there, as a 0 would give); a PNG declares
  no nodata, so SEN1-2's PNGs read as in the original. ``--sar_nodata none`` ignores
  a declared value (a file whose tag is wrong).
* Band names in the file (SNAP writes ``Sigma0_VH``, ``Sigma0_VV``, often VH
  first) decide the order over the file's order: co-polarised first.
* Optical: 8-bit RGB as the original; otherwise ``--opt_bands`` picks the red,
  green and blue bands (Sentinel-2: 4,3,2) and ``--opt_range`` maps its values
  linearly to [-1, 1] (L1C digital numbers: 0,3000).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from ..base.image_files import PILLOW_EXTENSIONS

SAR_INPUTS = ("uint8", "db", "power", "amplitude")

# SEN12MS-CR's clipping ranges (Ebel et al. 2021): VV -25..0 dB, VH -32.5..0 dB.
CO_POL_DB = (-25.0, 0.0)
CROSS_POL_DB = (-32.5, 0.0)
CO_POL, CROSS_POL = ("VV", "HH"), ("VH", "HV")

# Above this share of an image's valid pixels clipped at one end of its dB range,
# the input is probably not what --sar_input says (raw GRD numbers land near 40-60).
CLIP_WARN_SHARE = 0.05

# Nodata pixels are filled with the bottom of the range: "no return".
NODATA_FILL = -1.0

# Scaling.sar_nodata for --sar_nodata none: the file's declared nodata value is not
# used (NaN still is nodata).
NODATA_OFF = "none"

# Pillow modes with more than 8 bits per sample (16-bit integer, 32-bit int, float)
_WIDE_MODES = ("I", "F")

_POLARISATION = re.compile(r"(?:^|[^A-Za-z])(VV|VH|HH|HV)(?:$|[^A-Za-z])", re.I)


class DataError(ValueError):
    """A problem with the user's data; its one-line message names the file and fix."""


# ---------------------------------------------------------------------------
# Settings -> Scaling


def _numbers(text, flag):
    try:
        return [float(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise DataError(
            f"{flag} {text}: expected numbers separated by commas"
        ) from None


def parse_db_range(text, flag="--sar_db_range"):
    """
    :param text: "" (the convention by polarisation), "LO,HI" (every band) or
        "LO1,HI1,LO2,HI2,..." (one range per band, in the model's channel order).
    :return: a tuple of (lo, hi) pairs, () for the convention.
    """
    values = _numbers(text, flag)
    if len(values) % 2:
        raise DataError(
            f"{flag} {text}: give pairs of numbers, LO,HI for every band or "
            "LO1,HI1,LO2,HI2 per band (e.g. -25,0,-32.5,0)"
        )
    pairs = tuple(zip(values[::2], values[1::2]))
    for lo, hi in pairs:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DataError(
                f"{flag} {text}: the range {lo:g},{hi:g} needs min < max (in dB)"
            )
    return pairs


def parse_nodata(text, flag="--sar_nodata"):
    """
    :return: None ("": the value the file declares), :data:`NODATA_OFF` ("none":
        not the file's), NaN or a number.
    """
    text = str(text).strip()
    if text == "":
        return None
    if text.lower() == NODATA_OFF:
        return NODATA_OFF
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"{flag} {text}: give a number (e.g. 0 or -9999), nan, or none to "
            "ignore the nodata value the file declares"
        ) from None


def parse_bands(text, flag="--sar_bands"):
    """:return: a tuple of 1-based indices (int) and names (str), in the order given."""
    out = []
    for token in str(text).replace(" ", "").split(","):
        if token == "":
            continue
        if token.isdigit():
            if int(token) < 1:
                raise DataError(f"{flag} {text}: band indices start at 1")
            out.append(int(token))
        else:
            out.append(token)
    return tuple(out)


def parse_opt_bands(text, flag="--opt_bands"):
    bands = parse_bands(text, flag)
    if bands and (len(bands) != 3 or not all(isinstance(b, int) for b in bands)):
        raise DataError(
            f"{flag} {text}: give the 1-based indices of the red, green and blue "
            "bands (Sentinel-2: 4,3,2)"
        )
    return bands


def parse_opt_range(text, flag="--opt_range"):
    pairs = parse_db_range(text, flag)
    if len(pairs) > 1:
        raise DataError(f"{flag} {text}: give one range, MIN,MAX (e.g. 0,3000)")
    return pairs[0] if pairs else ()


@dataclass(frozen=True)
class Scaling:
    """
    How SAR and optical files become model inputs.

    :param sar_channels: the model's SAR channels: 1, 2 (co- and cross-polarised)
        or 3 (a grey image replicated, or an RGB SAR image as it is).
    :param sar_input: one of :data:`SAR_INPUTS`.
    :param sar_db_range: (lo, hi) per band, one pair for every band, or () for
        the convention (:data:`CO_POL_DB`, :data:`CROSS_POL_DB`).
    :param sar_nodata: the nodata value, whatever the file's data type (8-bit
        too); None for the one the file declares, :data:`NODATA_OFF` for none but
        NaN (NaN is always nodata).
    :param sar_bands: bands to take, by 1-based index or name, in model order;
        () for the file's bands, named ones ordered co-polarised first.
    :param sar_band_names: the band names the model learned on (from the
        training run's record); files naming their bands are read by them.
    :param opt_bands: the 1-based red, green and blue bands; () for RGB files.
    :param opt_range: (lo, hi) of the optical values; () for 8-bit.
    """

    sar_channels: int = 3
    sar_input: str = "uint8"
    sar_db_range: tuple = ()
    sar_nodata: float | str | None = None
    sar_bands: tuple = ()
    sar_band_names: tuple = ()
    opt_bands: tuple = ()
    opt_range: tuple = ()

    def __post_init__(self):
        if self.sar_channels not in (1, 2, 3):
            raise DataError(
                f"--sar_channels {self.sar_channels}: give 1 (one polarisation), "
                "2 (co- and cross-polarised) or 3 (grey replicated, or RGB SAR)"
            )
        if self.sar_input not in SAR_INPUTS:
            raise DataError(
                f"--sar_input {self.sar_input}: choose one of {', '.join(SAR_INPUTS)}"
            )

    @classmethod
    def from_settings(cls, values, sar_channels=None):
        """
        :param values: setting name -> value (argparse namespace or dict): the
            "inputs" settings, strings as on the command line; None or a missing
            name for the default.
        :param sar_channels: the model's, when ``values`` lacks it.
        """
        v = values if isinstance(values, dict) else vars(values)
        channels = v.get("sar_channels") or sar_channels or 3
        return cls(sar_channels=int(channels)).updated(v)[0]

    def updated(self, values):
        """
        This scaling with the "inputs" settings in ``values`` that are not None.

        :return: (the new Scaling, the names whose value changed).
        """
        changes = {}
        for name, parse in _SETTING_PARSERS.items():
            if values.get(name) is None:
                continue
            value = parse(values[name])
            if value != getattr(self, name) and not (
                _both_nan(value, getattr(self, name))
            ):
                changes[name] = value
        return replace(self, **changes), sorted(changes)

    def record(self):
        """
        A JSON-ready dict (NaN written as "nan", :data:`NODATA_OFF` as "none");
        :meth:`from_record` reads it.
        """
        nodata = self.sar_nodata
        if isinstance(nodata, float) and math.isnan(nodata):
            nodata = "nan"
        return {
            "sar_channels": self.sar_channels,
            "sar_input": self.sar_input,
            "sar_db_range": [list(r) for r in self.sar_db_range],
            "sar_nodata": nodata,
            "sar_bands": list(self.sar_bands),
            "sar_band_names": list(self.sar_band_names),
            "opt_bands": list(self.opt_bands),
            "opt_range": list(self.opt_range),
        }

    @classmethod
    def from_record(cls, record):
        """
        The Scaling of a :meth:`record`. A record made before 8-bit nodata was read
        (issue 23) holds sar_nodata null, which means the same: the value the file
        declares, now for 8-bit files too. Its PNGs declare none and read as they
        did; an 8-bit GeoTIFF tagged with a nodata value now has those pixels
        filled with -1 and masked (``--sar_nodata none`` reads them as data again).
        """
        nodata = record.get("sar_nodata")
        if nodata is not None and str(nodata).strip().lower() == NODATA_OFF:
            nodata = NODATA_OFF
        elif nodata is not None:
            nodata = float(nodata)
        return cls(
            sar_channels=int(record.get("sar_channels", 3)),
            sar_input=record.get("sar_input", "uint8"),
            sar_db_range=tuple(
                tuple(map(float, r)) for r in record.get("sar_db_range", ())
            ),
            sar_nodata=nodata,
            sar_bands=tuple(record.get("sar_bands", ())),
            sar_band_names=tuple(record.get("sar_band_names", ())),
            opt_bands=tuple(record.get("opt_bands", ())),
            opt_range=tuple(map(float, record.get("opt_range", ()))),
        )

    def describe(self):
        """One line for the log: what the SAR and optical values are mapped from."""
        if self.sar_input == "uint8":
            sar = "8-bit SAR"
        else:
            names = self.sar_band_names or [
                f"band {i + 1}" for i in range(len(self.sar_db_range))
            ]
            ranges = (
                ", ".join(
                    f"{n} {lo:g}..{hi:g} dB"
                    for n, (lo, hi) in zip(names, self.sar_db_range)
                )
                or "the convention's dB ranges"
            )
            sar = f"SAR {self.sar_input} -> dB, {ranges}"
        if self.sar_nodata is None:
            nodata = "the file's declared nodata"
        elif self.sar_nodata == NODATA_OFF:
            nodata = "NaN (a declared nodata value ignored)"
        else:
            nodata = f"nodata {self.sar_nodata:g}"
        sar += f", {nodata} filled with -1 and masked"
        if self.opt_range:
            bands = ",".join(map(str, self.opt_bands)) if self.opt_bands else "1,2,3"
            opt = f"optical bands {bands}, {self.opt_range[0]:g}..{self.opt_range[1]:g}"
        else:
            opt = "8-bit optical RGB"
        return f"{sar} ({self.sar_channels} channel(s)); {opt}; all mapped to [-1, 1]"


_SETTING_PARSERS = {
    "sar_input": str,
    "sar_db_range": parse_db_range,
    "sar_nodata": parse_nodata,
    "sar_bands": parse_bands,
    "opt_bands": parse_opt_bands,
    "opt_range": parse_opt_range,
}

# What describes one input file rather than the model: given at sampling time, it
# replaces the training run's record without a warning.
FILE_SETTINGS = ("sar_input", "sar_nodata", "sar_bands")


def _both_nan(a, b):
    return (
        isinstance(a, float)
        and isinstance(b, float)
        and math.isnan(a)
        and math.isnan(b)
    )


# ---------------------------------------------------------------------------
# Reading


@dataclass
class Raster:
    """
    One decoded file.

    :param path: the file.
    :param image: the Pillow image of an 8-bit file read by Pillow, else None.
    :param bands: (B, H, W) in the file's data type (rasterio's read), else None.
    :param names: per band, its description in the file or None.
    :param nodata: the file's nodata value, or None.
    :param crs: the coordinate reference system as text, or None.
    :param pixel_size: (x, y) pixel size in CRS units, or None.
    :param nodata_pixels: (H, W) bool where the file declares nodata, for a file
        whose values are not its pixels' (a palette's indices: ``nodata`` is an
        index, the bands are colours); None to compare the bands with ``nodata``.
    """

    path: str
    image: Image.Image | None = None
    bands: np.ndarray | None = None
    names: tuple = ()
    nodata: float | None = None
    crs: str | None = None
    pixel_size: tuple | None = None
    nodata_pixels: np.ndarray | None = None

    @property
    def size(self):
        """(width, height) in pixels."""
        if self.image is not None:
            return self.image.size
        return self.bands.shape[2], self.bands.shape[1]

    @property
    def count(self):
        if self.image is not None:
            return Image.getmodebands(_pillow_bands_mode(self.image))
        return len(self.bands)

    def describe_bands(self):
        """'2 bands (VH, VV)' or '13 bands'."""
        n = self.count
        named = [d for d in self.names if d]
        shown = f" ({', '.join(self.names)})" if named and len(named) == n else ""
        return f"{n} band{'s' if n != 1 else ''}{shown}"


def _reason(exc):
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _unreadable(path, exc):
    return DataError(
        f"cannot read image {path} ({_reason(exc)}); replace or remove the file"
    )


def _png_bit_depth(path):
    with open(path, "rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return 8


def _open_pillow(path):
    """Decode an image fully, so a broken file fails here with its name."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except Exception as exc:
        # Pillow reports corrupt files with many exception types (OSError,
        # SyntaxError, ValueError, DecompressionBombError, struct.error ...)
        raise _unreadable(path, exc) from None


def _open_rasterio(path, rows=None):
    """The file, or only its rows [top, bottom) when ``rows`` is given."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                window = None
                if rows is not None:
                    window = Window(0, rows[0], src.width, rows[1] - rows[0])
                bands = src.read(window=window)
                names = tuple(d or None for d in src.descriptions)
                nodata = src.nodata
                crs = src.crs.to_string() if src.crs else None
                georeferenced = crs is not None and not src.transform.is_identity
                pixel_size = (abs(src.transform.a), abs(src.transform.e))
                palette = None
                if src.count == 1 and src.colorinterp[0] == ColorInterp.palette:
                    palette = src.colormap(1)
    except Exception as exc:  # rasterio.errors.RasterioIOError and GDAL's CPLE_* errors
        raise _unreadable(path, exc) from None
    nodata_pixels = None
    if palette is not None:
        lut = np.zeros((256, 3), np.uint8)
        for index, rgba in palette.items():
            if 0 <= index < 256:
                lut[index] = rgba[:3]
        if nodata is not None:
            nodata_pixels = bands[0] == nodata  # an index, not a colour
        bands = lut[bands[0]].transpose(2, 0, 1)
        names = (None, None, None)
    return Raster(
        path,
        bands=bands,
        names=names,
        nodata=nodata,
        crs=crs if georeferenced else None,
        pixel_size=pixel_size if georeferenced else None,
        nodata_pixels=nodata_pixels,
    )


def read_raster(path) -> Raster:
    """
    Decode a file: 8-bit PNG, JPEG, BMP and WebP with Pillow (as the original
    code), everything else (TIFF, GeoTIFF, 16-bit PNG) with rasterio.

    :param path: a str or path-like.
    :raises DataError: the file cannot be read, naming it.
    """
    path = os.fspath(path)
    if _reads_with_pillow(path):
        return Raster(path, image=_open_pillow(path))
    return _open_rasterio(path)


class RasterRows:
    """
    A raster read a band of rows at a time, so that a scene larger than memory can
    be scaled piece by piece: rasterio reads just those rows of a GeoTIFF; a file
    Pillow decodes (8-bit PNG, JPEG) is read whole once and sliced.

    :param path: a str or path-like.
    :raises DataError: the file cannot be read, naming it.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        first = read_raster(self.path) if _reads_with_pillow(self.path) else None
        if first is not None:
            self._whole = Raster(
                self.path, bands=_band_stack(first), names=(None,) * first.count
            )
        else:
            self._whole = None
            first = _open_rasterio(self.path, rows=(0, 1))
        self.width = first.size[0]
        self.height = (
            first.size[1] if self._whole is not None else _raster_height(self.path)
        )
        self.crs, self.pixel_size = first.crs, first.pixel_size

    def read(self, top, bottom) -> Raster:
        """The rows [top, bottom) as a :class:`Raster`."""
        if self._whole is not None:
            w = self._whole
            return Raster(w.path, bands=w.bands[:, top:bottom], names=w.names)
        return _open_rasterio(self.path, rows=(top, bottom))


def _reads_with_pillow(path):
    ext = path.lower().rsplit(".", 1)[-1]
    if f".{ext}" not in PILLOW_EXTENSIONS:
        return False
    try:
        return not (ext == "png" and _png_bit_depth(path) == 16)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _raster_height(path):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.height
    except Exception as exc:  # rasterio.errors.RasterioIOError and GDAL's errors
        raise _unreadable(path, exc) from None


def is_eight_bit(raster: Raster) -> bool:
    if raster.image is not None:
        mode = raster.image.mode
        return not (mode in _WIDE_MODES or mode.startswith("I;"))
    return raster.bands.dtype == np.uint8


def _pillow_bands_mode(img):
    """The mode whose bands a Pillow image's data are: L for grey (alpha dropped),
    the mode itself for wide grey, RGB for the rest (a palette expanded)."""
    if img.mode in _WIDE_MODES or img.mode.startswith("I;"):
        return img.mode
    return "L" if img.mode in ("1", "L", "LA", "La") else "RGB"


def _band_stack(raster: Raster) -> np.ndarray:
    """
    (B, H, W) of any raster; a Pillow image as grey or RGB (a palette expanded,
    alpha dropped, as the original code's conversions do).
    """
    if raster.bands is not None:
        return raster.bands
    img = raster.image
    mode = _pillow_bands_mode(img)
    if img.mode != mode:
        img = img.convert(mode)
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def polarisation(name):
    """'VV', 'VH', 'HH' or 'HV' named in a band description ('Sigma0_VH_db'), else None."""
    if not name:
        return None
    m = _POLARISATION.search(name)
    return m.group(1).upper() if m else None


def _band_label(raster, i):
    return polarisation(raster.names[i]) if raster.names and raster.names[i] else None


def select_sar_bands(raster: Raster, scaling: Scaling):
    """
    The SAR bands to feed, in model order.

    ``--sar_bands`` picks by index or name; else the names the model learned on
    (when the file names its bands); else the file's bands, ordered co-polarised
    first when every band names its polarisation.

    :return: (0-based indices, their polarisation names or None each).
    :raises DataError: a band asked for is not in the file.
    """
    n = raster.count
    labels = (
        [_band_label(raster, i) for i in range(n)]
        if raster.bands is not None
        else [None] * n
    )
    names = list(raster.names) if raster.bands is not None else [None] * n

    def listing():
        shown = ", ".join(
            f"{i + 1} {names[i] or labels[i] or '(unnamed)'}" for i in range(n)
        )
        return f"its bands: {shown}"

    def find(token, flag):
        if isinstance(token, int):
            if token > n:
                raise DataError(
                    f"{flag} {token}: {raster.path} has {n} band(s) ({listing()}); "
                    "give a 1-based index or a band name"
                )
            return token - 1
        for i in range(n):
            if labels[i] == token.upper() or (names[i] or "").lower() == token.lower():
                return i
        raise DataError(
            f"{flag} {token}: {raster.path} has no band {token} ({listing()}); "
            "give a band name or a 1-based index"
        )

    if scaling.sar_bands:
        chosen = [find(t, "--sar_bands") for t in scaling.sar_bands]
    elif scaling.sar_band_names and all(labels):
        try:
            chosen = [find(t, "--sar_bands") for t in scaling.sar_band_names]
        except DataError:
            raise DataError(
                f"the model learned on {', '.join(scaling.sar_band_names)} but "
                f"{raster.path} has {', '.join(labels)}; pick its bands with "
                f"--sar_bands (e.g. --sar_bands {','.join(labels[: len(scaling.sar_band_names)])})"
            ) from None
    elif all(labels) and len(set(labels)) == n:
        chosen = sorted(range(n), key=lambda i: (labels[i] in CROSS_POL, i))
    else:
        chosen = list(range(n))
    return chosen, [labels[i] for i in chosen]


def _check_band_count(raster, count, sar_channels, given_bands):
    if count == sar_channels or (count == 1 and sar_channels == 3):
        return
    hints = []
    if not given_bands and count > sar_channels:
        hints.append(
            f"pick {sar_channels} band(s) with --sar_bands (e.g. --sar_bands "
            f"{','.join(str(i + 1) for i in range(sar_channels))})"
        )
    if count in (1, 2, 3):
        # --sar_channels is the model's: a trained model keeps the one it has
        hints.append(
            f"train with --sar_channels {count} (a trained model keeps its own)"
        )
    hint = " or ".join(hints) or f"give {sar_channels} band(s) to --sar_bands"
    raise DataError(
        f"SAR image {raster.path} has {raster.describe_bands() if not given_bands else f'{count} band(s) selected'}"
        f" but the model takes --sar_channels {sar_channels}; {hint}"
    )


def db_ranges(scaling: Scaling, labels, positions=None):
    """
    The (lo, hi) dB range of each band fed.

    :param labels: the bands' polarisation names (None when unnamed), model order.
    :param positions: the bands' 0-based places in the file, model order; an
        unnamed band takes the convention of its place (SEN12MS: 1 VV, 2 VH).
    """
    n = len(labels)
    if scaling.sar_db_range:
        if len(scaling.sar_db_range) == 1:
            return [scaling.sar_db_range[0]] * n
        if len(scaling.sar_db_range) != n:
            raise DataError(
                f"--sar_db_range gives {len(scaling.sar_db_range)} ranges for {n} "
                "band(s); give one range for all bands or one per band"
            )
        return list(scaling.sar_db_range)
    positions = range(n) if positions is None else positions
    ranges = []
    for label, place in zip(labels, positions):
        cross = label in CROSS_POL if label else place % 2 == 1  # unnamed: VV, VH
        ranges.append(CROSS_POL_DB if cross else CO_POL_DB)
    return ranges


# ---------------------------------------------------------------------------
# Geometry: the same resize, crop and flip for 8-bit images and float bands


def _resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    # halving with BOX first avoids the aliasing of a single large bicubic step
    while min(img.size) >= 2 * short_side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short_side / min(img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def _window(img, image_size, crop, flip):
    """Resize the short side, crop a square, mirror: an (H, W[, C]) array."""
    short_side, fy, fx = (image_size, None, None) if crop is None else crop
    arr = np.asarray(_resize_short_side(img, short_side))
    h, w = arr.shape[:2]
    top = (h - image_size) // 2 if fy is None else int(fy * (h - image_size + 1))
    left = (w - image_size) // 2 if fx is None else int(fx * (w - image_size + 1))
    arr = arr[top : top + image_size, left : left + image_size]
    return arr[:, ::-1] if flip else arr


def eight_bit_array(img, image_size, channels, crop=None, flip=False) -> np.ndarray:
    """Resize, crop, flip and scale an 8-bit image to float32 (C, H, W) in [-1, 1]."""
    arr = _window(img, image_size, crop, flip)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        arr = np.repeat(arr, channels, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1


def float_array(bands, image_size, crop=None, flip=False) -> np.ndarray:
    """
    The geometry of :func:`eight_bit_array` on float bands already in [-1, 1].

    :param bands: (B, H, W) float.
    :return: float32 (B, image_size, image_size), clipped to [-1, 1] (bicubic
        resampling overshoots at edges).
    """
    out = [
        _window(
            Image.fromarray(np.asarray(b, np.float32), mode="F"), image_size, crop, flip
        )
        for b in bands
    ]
    return np.clip(np.stack(out), -1.0, 1.0).astype(np.float32)


def mask_array(valid, image_size, crop=None, flip=False) -> np.ndarray:
    """A validity mask through the same geometry: True where mostly valid."""
    img = Image.fromarray(np.where(valid, 255, 0).astype(np.uint8), mode="L")
    return _window(img, image_size, crop, flip) >= 128


# ---------------------------------------------------------------------------
# SAR


@dataclass
class SarStats:
    """
    What scaling one SAR image met.

    :param path: the file.
    :param nodata: nodata pixels of the file (before resizing), filled.
    :param pixels: all pixels of the file.
    :param valid_in_window: valid pixels of the resized, cropped window.
    :param clipped: per band fed, (share below, share above) its range among
        the valid pixels.
    :param observed: per band fed, (min, max) dB of the valid pixels.
    :param ranges: per band fed, its (lo, hi) dB range.
    :param labels: per band fed, its polarisation name or None.
    """

    path: str
    nodata: int = 0
    pixels: int = 0
    valid_in_window: int = -1
    clipped: list = field(default_factory=list)
    observed: list = field(default_factory=list)
    ranges: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    @property
    def all_nodata(self):
        return self.valid_in_window == 0

    @classmethod
    def combined(cls, parts):
        """The stats of a file from those of its pieces (bands of rows)."""
        parts = list(parts)
        whole = cls(parts[0].path, ranges=parts[0].ranges, labels=parts[0].labels)
        whole.nodata = sum(p.nodata for p in parts)
        whole.pixels = sum(p.pixels for p in parts)
        valid = [p.pixels - p.nodata for p in parts]
        total = max(sum(valid), 1)
        for band in range(len(parts[0].clipped)):
            whole.clipped.append(
                tuple(
                    sum(p.clipped[band][end] * n for p, n in zip(parts, valid)) / total
                    for end in (0, 1)
                )
            )
            lows = [p.observed[band][0] for p, n in zip(parts, valid) if n]
            highs = [p.observed[band][1] for p, n in zip(parts, valid) if n]
            whole.observed.append(
                (min(lows), max(highs)) if lows else (math.nan, math.nan)
            )
        return whole

    def clipping_warning(self, flag_hint=""):
        """A line when over :data:`CLIP_WARN_SHARE` of a band clips at one end, else None."""
        for i, ((below, above), (lo, hi)) in enumerate(zip(self.clipped, self.ranges)):
            if max(below, above) > CLIP_WARN_SHARE:
                low, high = self.observed[i]
                name = self.labels[i] or f"band {i + 1}"
                if below >= above:
                    end, hint = (
                        "below",
                        (
                            "calm water and radar shadow do this; otherwise check "
                            "--sar_input and --sar_db_range"
                        ),
                    )
                else:
                    end, hint = (
                        "above",
                        (
                            "uncalibrated numbers (raw GRD lands near 40-60) or linear "
                            "values read as dB do this: check --sar_input and "
                            "--sar_db_range"
                        ),
                    )
                return (
                    f"warning: {100 * max(below, above):.0f}% of the valid {name} pixels of "
                    f"{self.path} lie {end} the range {lo:g}..{hi:g} dB (observed "
                    f"{low:.1f}..{high:.1f} dB): {hint}"
                )
        return None


def _sar_selection(raster: Raster, scaling: Scaling):
    """The SAR bands fed, in the file's data type, and their polarisation names."""
    if scaling.sar_input == "uint8" and not is_eight_bit(raster):
        dtype = raster.bands.dtype if raster.bands is not None else raster.image.mode
        raise DataError(
            f"SAR image {raster.path} holds {dtype} values, not 8-bit; --sar_input "
            "uint8 (the default) reads 8-bit images only: give --sar_input db, power "
            "or amplitude (calibrated sigma0 in dB, linear power or amplitude)"
        )
    chosen, labels = select_sar_bands(raster, scaling)
    _check_band_count(
        raster, len(chosen), scaling.sar_channels, bool(scaling.sar_bands)
    )
    return _band_stack(raster)[chosen], labels, chosen


def sar_nodata_value(raster: Raster, scaling: Scaling):
    """
    The value that marks nodata in this SAR file: ``--sar_nodata`` when given,
    else the one the file declares (rasterio's ``nodata``; a PNG declares none),
    whatever its data type; None for none (NaN is nodata anyway).
    """
    if scaling.sar_nodata == NODATA_OFF:
        return None
    value = scaling.sar_nodata if scaling.sar_nodata is not None else raster.nodata
    return None if value is None or math.isnan(value) else value


def _nodata_pixels(raster, bands, scaling):
    """
    (H, W) bool: nodata by :func:`sar_nodata_value`, where any band holds it (as
    for float SAR), or where a palette file's index is its declared nodata.
    """
    value = sar_nodata_value(raster, scaling)
    if value is None:
        return np.zeros(bands.shape[1:], bool)
    if scaling.sar_nodata is None and raster.nodata_pixels is not None:
        return raster.nodata_pixels
    return (bands == value).any(axis=0)


def sar_bands_scaled(raster: Raster, scaling: Scaling):
    """
    The SAR bands of a file in [-1, 1] at full resolution.

    :return: (float64 (B, H, W), valid (H, W) bool, SarStats); B is the number of
        bands fed (1 for a grey image the model replicates to 3).
    :raises DataError: 8-bit input expected and the file is not, a band is
        missing, or the band count does not fit the model.
    """
    raw, labels, places = _sar_selection(raster, scaling)
    data = raw.astype(np.float64)
    stats = SarStats(raster.path, pixels=data.shape[1] * data.shape[2], labels=labels)
    if scaling.sar_input == "uint8":
        valid = ~_nodata_pixels(raster, raw, scaling)
        out = data / 127.5 - 1
        out[:, ~valid] = NODATA_FILL  # what a 0 gives: the float bands' fill
        stats.nodata = int(valid.size - valid.sum())
        return out, valid, stats

    valid = np.isfinite(data).all(axis=0)
    valid &= ~_nodata_pixels(raster, data, scaling)
    if scaling.sar_input in ("power", "amplitude"):
        valid &= (data > 0).all(axis=0)  # no log of zero
        factor = 10.0 if scaling.sar_input == "power" else 20.0
        with np.errstate(divide="ignore", invalid="ignore"):
            data = factor * np.log10(np.where(valid, data, 1.0))
    ranges = db_ranges(scaling, labels, places)
    stats.ranges = ranges
    stats.nodata = int(valid.size - valid.sum())
    out = np.empty_like(data)
    n_valid = max(int(valid.sum()), 1)
    for i, (lo, hi) in enumerate(ranges):
        band = data[i]
        good = band[valid]
        stats.clipped.append(
            (float((good < lo).sum() / n_valid), float((good > hi).sum() / n_valid))
        )
        stats.observed.append(
            (float(good.min()), float(good.max()))
            if good.size
            else (math.nan, math.nan)
        )
        out[i] = (np.clip(band, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    out[:, ~valid] = NODATA_FILL
    return out, valid, stats


def _eight_bit_image(raster: Raster, scaling: Scaling):
    """
    The Pillow image of an 8-bit grey or RGB SAR file read as ``uint8`` into 1 or
    3 channels without band selection, for the original code's path (a TIFF's
    bands too, so that a TIFF gives the tensor its PNG gives); else None.
    """
    if scaling.sar_input != "uint8" or scaling.sar_channels == 2 or scaling.sar_bands:
        return None
    if not is_eight_bit(raster):
        _sar_selection(raster, scaling)  # raises the 8-bit message
    if raster.image is not None:
        return raster.image
    if len(raster.bands) == 1:
        return Image.fromarray(raster.bands[0])
    if len(raster.bands) == 3:
        return Image.fromarray(np.ascontiguousarray(raster.bands.transpose(1, 2, 0)))
    return None


def load_sar_patch(
    path, image_size, scaling: Scaling, crop=None, flip=False, raster=None
):
    """
    Load one SAR image for the model, with its validity mask.

    :param path: the file.
    :param image_size: side of the square output.
    :param scaling: a :class:`Scaling`.
    :param crop: None for a center crop after resizing the short side to
        ``image_size``; or (short_side, y, x): resize the short side to
        ``short_side`` and place the crop window at the relative offsets y, x in
        [0, 1) of the remaining room.
    :param flip: mirror left-right after cropping.
    :param raster: the file already read (:func:`read_raster`), if it was.
    :return: (float32 (sar_channels, S, S) in [-1, 1], valid (S, S) bool, SarStats).
    """
    raster = raster if raster is not None else read_raster(path)
    channels = scaling.sar_channels
    img = _eight_bit_image(raster, scaling)
    if img is not None:
        # the original code's path: Pillow converts, resizes and replicates
        grey = channels == 1 or img.mode in ("1", "L", "LA", "La")
        nodata = None
        if sar_nodata_value(raster, scaling) is not None:
            nodata = _nodata_pixels(raster, _band_stack(raster), scaling)
        img = img.convert("L" if grey else "RGB")
        stats = SarStats(path, pixels=img.size[0] * img.size[1])
        if nodata is None or not nodata.any():  # a PNG: exactly the original's
            arr = eight_bit_array(img, image_size, channels, crop, flip)
            stats.valid_in_window = image_size * image_size
            return arr, np.ones((image_size, image_size), bool), stats
        # 0 becomes -1, the fill of float nodata; resized as float SAR's fill is
        pixels = np.array(img)
        pixels[nodata] = 0
        img = Image.fromarray(pixels)  # L or RGB, as converted above
        arr = eight_bit_array(img, image_size, channels, crop, flip)
        window_valid = mask_array(~nodata, image_size, crop, flip)
        stats.nodata = int(nodata.sum())
        stats.valid_in_window = int(window_valid.sum())
        return arr, window_valid, stats
    data, valid, stats = sar_bands_scaled(raster, scaling)
    arr = float_array(data, image_size, crop, flip)
    window_valid = mask_array(valid, image_size, crop, flip)
    stats.valid_in_window = int(window_valid.sum())
    if len(arr) == 1 and channels == 3:
        arr = np.repeat(arr, 3, axis=0)
    return arr, window_valid, stats


# ---------------------------------------------------------------------------
# Optical


def opt_bands_scaled(raster: Raster, scaling: Scaling | None):
    """
    The optical bands of a file: an 8-bit RGB Pillow image when it can go the
    original code's way, else float64 (3, H, W) in [-1, 1].

    :raises DataError: naming the file and the flag to give.
    """
    bands = scaling.opt_bands if scaling else ()
    value_range = scaling.opt_range if scaling else ()
    if raster.image is not None and not bands and not value_range:
        img = raster.image
        if not is_eight_bit(raster):
            raise DataError(
                f"optical image {raster.path} has mode {img.mode} (16-bit or float); "
                "give the range of its values with --opt_range (e.g. 0,3000 for "
                "Sentinel-2 L1C digital numbers), or convert it to 8-bit RGB"
            )
        return img.convert("RGB")
    data = _band_stack(raster)
    n = len(data)
    if bands:
        for b in bands:
            if b > n:
                raise DataError(
                    f"--opt_bands {','.join(map(str, bands))}: optical image "
                    f"{raster.path} has {raster.describe_bands()}; give three 1-based "
                    "band indices it has"
                )
        data = data[[b - 1 for b in bands]]
    elif n in (1, 3, 4):
        data = data[[0, 0, 0]] if n == 1 else data[:3]  # grey replicated, alpha dropped
    else:
        raise DataError(
            f"optical image {raster.path} has {raster.describe_bands()}; pick its red, "
            "green and blue bands with --opt_bands (Sentinel-2: 4,3,2)"
        )
    if value_range:
        lo, hi = value_range
        data = np.nan_to_num(data.astype(np.float64), nan=lo)
        return np.clip((data - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    if data.dtype != np.uint8:
        raise DataError(
            f"optical image {raster.path} holds {data.dtype} values; give their range "
            "with --opt_range (e.g. 0,3000 for Sentinel-2 L1C digital numbers)"
        )
    return Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0)), mode="RGB")


def load_opt_patch(path, image_size, scaling=None, crop=None, flip=False, raster=None):
    """
    Load one optical image as RGB in [-1, 1].

    :return: float32 (3, image_size, image_size).
    """
    raster = raster if raster is not None else read_raster(path)
    scaled = opt_bands_scaled(raster, scaling)
    if isinstance(scaled, Image.Image):
        return eight_bit_array(scaled, image_size, 3, crop, flip)
    return float_array(scaled, image_size, crop, flip)


# ---------------------------------------------------------------------------
# The training data's description, for the run's record


def resolve(scaling: Scaling, sar_path, opt_path=None):
    """
    Fix what the first training pair tells: the SAR band names and each band's dB
    range, so that every later file (and sampling) reads the same bands the same way.

    :return: (the resolved Scaling, facts for the record: the pixel size and CRS of
        the georeferenced SAR file, or None each).
    :raises DataError: as loading the pair would.
    """
    sar = read_raster(sar_path)
    if _eight_bit_image(sar, scaling) is not None:
        # the original code's path: nothing to fix beyond what it does
        resolved = scaling
    else:
        _, _, stats = sar_bands_scaled(sar, scaling)
        resolved = replace(
            scaling,
            sar_band_names=tuple(stats.labels) if all(stats.labels) else (),
            sar_db_range=tuple(map(tuple, stats.ranges)) or scaling.sar_db_range,
        )
    if opt_path is not None:
        opt_bands_scaled(read_raster(opt_path), scaling)
    facts = {
        "crs": sar.crs,
        "pixel_size": list(sar.pixel_size) if sar.pixel_size else None,
    }
    return resolved, facts
