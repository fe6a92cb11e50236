"""
Sentinel-1 GRD products as delivered (io/sentinel1.py, issue 23 item 4): a minimal
product built here (manifest, annotation with pixel spacings and a 3 x 3
geolocation grid, a calibration table of three lines, uint16 digital numbers of VV
and VH) is read as sigma0 = DN^2 / A^2 with A interpolated by hand in the test, keeps
its ground control points, refuses polarisations the model lacks in one line, and
translates end to end (folder and zip) with --resample on the bundled model.
"""

import runpy
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from guided_diffusion.io import sentinel1
from guided_diffusion.io.rasters import DataError, Scaling

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "translate_scene.py")
MODEL = ROOT / "assets" / "scene_model" / "model.pt"
WIDTH, HEIGHT = 120, 90
STEM = "s1a-iw-grd-{pol}-20230101t052000-20230101t052025-046582-059545-{n:03d}"
NAME = "S1A_IW_GRDH_1SDV_20230101T052000_20230101T052025_046582_059545_ABCD"
# the calibration table: its lines and pixels, and sigmaNought per polarisation
CAL_LINES, CAL_PIXELS = (0, 60, 89), (0, 40, 80, 119)
SIGMA = {
    "vv": [[500.0, 510.0, 520.0, 530.0], [540.0, 560.0, 580.0, 600.0], [610.0, 620.0, 630.0, 640.0]],
    "vh": [[400.0, 405.0, 410.0, 415.0], [420.0, 430.0, 440.0, 450.0], [460.0, 470.0, 480.0, 490.0]],
}  # fmt: skip
GRID_LINES, GRID_PIXELS = (0, 45, 89), (0, 60, 119)


def lonlat(line, pixel):
    """The geolocation grid: about 10 m pixels near 9 E, 45 N, a little rotated."""
    return 9.0 + pixel * 1.27e-4 + line * 1.0e-5, 45.0 - line * 9.0e-5 + pixel * 1.0e-5


def digital_numbers(pol):
    rng = np.random.default_rng(1 if pol == "vv" else 2)
    dn = rng.integers(20, 400, (HEIGHT, WIDTH)).astype(np.uint16)
    dn[:, :6] = 0  # the swath's edge: no data
    return dn


def write_product(folder, pols=("vv", "vh"), mission_pol="1SDV"):
    """A minimal GRD product X.SAFE in ``folder``; returns its path."""
    safe = folder / (NAME.replace("1SDV", mission_pol) + ".SAFE")
    (safe / "measurement").mkdir(parents=True)
    (safe / "annotation" / "calibration").mkdir(parents=True)
    (safe / "manifest.safe").write_text(
        '<?xml version="1.0"?><xfdu:XFDU xmlns:xfdu="urn:ccsds:schema:xfdu:1">'
        "<dataObjectSection/></xfdu:XFDU>"
    )
    points = "".join(
        f"<geolocationGridPoint><line>{line}</line><pixel>{pixel}</pixel>"
        f"<latitude>{lonlat(line, pixel)[1]}</latitude>"
        f"<longitude>{lonlat(line, pixel)[0]}</longitude><height>0</height>"
        "</geolocationGridPoint>"
        for line in GRID_LINES
        for pixel in GRID_PIXELS
    )
    for n, pol in enumerate(pols, 1):
        stem = STEM.format(pol=pol, n=n)
        (safe / "annotation" / f"{stem}.xml").write_text(
            f"<product><adsHeader><polarisation>{pol.upper()}</polarisation></adsHeader>"
            "<imageAnnotation><imageInformation><rangePixelSpacing>1.000000e+01"
            "</rangePixelSpacing><azimuthPixelSpacing>1.000000e+01</azimuthPixelSpacing>"
            f"<numberOfSamples>{WIDTH}</numberOfSamples><numberOfLines>{HEIGHT}"
            "</numberOfLines></imageInformation></imageAnnotation>"
            f"<geolocationGrid><geolocationGridPointList count=\"9\">{points}"
            "</geolocationGridPointList></geolocationGrid></product>"
        )
        table = SIGMA.get(pol, SIGMA["vv"])
        vectors = "".join(
            f"<calibrationVector><azimuthTime>2023-01-01T05:20:0{i}</azimuthTime>"
            f"<line>{line}</line><pixel count=\"4\">{' '.join(map(str, CAL_PIXELS))}</pixel>"
            f"<sigmaNought count=\"4\">{' '.join(map(str, table[i]))}</sigmaNought>"
            f"<betaNought count=\"4\">{' '.join(['237.0'] * 4)}</betaNought>"
            "</calibrationVector>"
            for i, line in enumerate(CAL_LINES)
        )
        (safe / "annotation" / "calibration" / f"calibration-{stem}.xml").write_text(
            "<calibration><calibrationVectorList count=\"3\">"
            f"{vectors}</calibrationVectorList></calibration>"
        )
        with rasterio.open(
            safe / "measurement" / f"{stem}.tiff", "w", driver="GTiff", width=WIDTH,
            height=HEIGHT, count=1, dtype="uint16",
        ) as dst:  # fmt: skip
            dst.write(digital_numbers(pol), 1)
    return safe


def zip_product(safe):
    path = safe.with_suffix(".zip")
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(safe.rglob("*")):
            z.write(f, f.relative_to(safe.parent).as_posix())
    return path


@pytest.fixture
def product(tmp_path):
    return write_product(tmp_path)


def read_sigma0(product, tmp_path, pols=("VV", "VH")):
    out = tmp_path / "sigma0.tif"
    sentinel1.write_sigma0(sentinel1.open_product(product), out, pols, rows=32)
    with rasterio.open(out) as src:
        return src.read(), src.descriptions, src.gcps


@pytest.mark.parametrize("packed", ["folder", "zip", "manifest"])
def test_sigma0_is_dn_squared_over_the_interpolated_table(product, tmp_path, packed):
    given = {"folder": product, "zip": zip_product(product),
             "manifest": product / "manifest.safe"}[packed]  # fmt: skip
    assert sentinel1.is_product(given)
    data, names, (gcps, crs) = read_sigma0(given, tmp_path)
    assert names == ("VV", "VH") and data.dtype == np.float32
    dn = {p: digital_numbers(p).astype(np.float64) for p in ("vv", "vh")}
    # at the table's nodes: A is the table's value
    for b, pol in enumerate(("vv", "vh")):
        for i, line in enumerate(CAL_LINES):
            for j, pixel in enumerate(CAL_PIXELS):
                a = SIGMA[pol][i][j]
                expected = dn[pol][line, pixel] ** 2 / a**2 if pixel >= 6 else np.nan
                assert data[b, line, pixel] == pytest.approx(expected, rel=1e-6, nan_ok=True)
    # between the nodes: line 15 is a quarter of the way from line 0 to 60, pixel 50
    # a quarter of the way from 40 to 80
    s = SIGMA["vv"]
    a = (0.75 * 0.75 * s[0][1] + 0.75 * 0.25 * s[0][2]
         + 0.25 * 0.75 * s[1][1] + 0.25 * 0.25 * s[1][2])  # fmt: skip
    assert a == pytest.approx(525.625)  # 286.875 + 97.5 + 105 + 36.25
    assert data[0, 15, 50] == pytest.approx(dn["vv"][15, 50] ** 2 / a**2, rel=1e-6)
    # DN 0 is nodata, everything else is not
    assert np.isnan(data[:, :, :6]).all() and np.isfinite(data[:, :, 6:]).all()
    # the annotation's geolocation grid, as ground control points in EPSG:4326
    assert crs.to_epsg() == 4326 and len(gcps) == 9
    for g, (line, pixel) in zip(gcps, [(a, b) for a in GRID_LINES for b in GRID_PIXELS]):
        assert (g.row, g.col) == (line, pixel)
        assert (g.x, g.y) == pytest.approx(lonlat(line, pixel))


def test_pixel_spacing_and_polarisations(product):
    opened = sentinel1.open_product(product)
    assert opened.polarisations == ("VV", "VH") and opened.pixel_spacing() == (10.0, 10.0)
    model = Scaling(sar_channels=2, sar_input="db", sar_band_names=("VV", "VH"))
    assert sentinel1.choose_polarisations(opened, sentinel1.model_polarisations(model)) == ("VV", "VH")
    # a model whose bands are named the other way round gets them in its order
    flipped = Scaling(sar_channels=2, sar_input="db", sar_bands=("VH", "VV"))
    assert sentinel1.model_polarisations(flipped) == ("VH", "VV")


@pytest.mark.parametrize("pols, code, needs", [
    (("vv",), "1SSV", "a 2-polarisation model needs a dual-polarisation product"),
    (("hh", "hv"), "1SDH", "translate a VV+VH (1SDV) product"),
])  # fmt: skip
def test_polarisations_the_model_lacks_are_one_line(tmp_path, pols, code, needs):
    product = sentinel1.open_product(write_product(tmp_path, pols, code))
    model = Scaling(sar_channels=2, sar_input="db", sar_band_names=("VV", "VH"))
    with pytest.raises(DataError) as err:
        sentinel1.choose_polarisations(product, sentinel1.model_polarisations(model))
    message = str(err.value)
    assert "\n" not in message and needs in message
    assert str(product.path) in message and "needs VV, VH" in message
    assert f"has {', '.join(p.upper() for p in pols)}" in message


def test_an_slc_or_a_folder_without_measurements_is_refused(tmp_path):
    empty = tmp_path / "X.SAFE"
    empty.mkdir()
    (empty / "manifest.safe").write_text("<xfdu/>")
    with pytest.raises(DataError, match="no measurement"):
        sentinel1.open_product(empty)
    assert not sentinel1.is_product(tmp_path)


def translate(monkeypatch, product, output, *extra):
    args = ["--input", str(product), "--output", str(output), "--model_path", str(MODEL),
            "--sampler", "ddim", "--timestep_respacing", "ddim2", *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    runpy.run_path(SCRIPT, run_name="__main__")
    with rasterio.open(output) as src:
        return src.read(), src.width, src.height, src.gcps


# the zip's reading is checked above: its whole run (over 20 s on 2 cores) is slow
@pytest.mark.parametrize("packed", ["folder", pytest.param("zip", marks=pytest.mark.slow)])
def test_a_product_translates_end_to_end_with_its_gcps(product, tmp_path, monkeypatch,
                                                       capsys, packed):  # fmt: skip
    given = product if packed == "folder" else zip_product(product)
    out = tmp_path / "out.tif"
    image, width, height, (gcps, crs) = translate(monkeypatch, given, out, "--resample")
    log = capsys.readouterr().out
    assert "calibrated to sigma0" in log and "EPSG:32632" in log
    # back on the product's grid: its size and its geolocation grid
    assert (width, height) == (WIDTH, HEIGHT) and image.shape[0] == 3
    assert crs.to_epsg() == 4326
    assert [(g.row, g.col, round(g.x, 9), round(g.y, 9)) for g in gcps] == [
        (line, pixel, *(round(v, 9) for v in lonlat(line, pixel)))
        for line in GRID_LINES
        for pixel in GRID_PIXELS
    ]
    # some pixels translated away from the nodata edge; the work folder is gone
    assert image[:, 10:-10, 10:-10].any()
    assert not (tmp_path / "out.tif.work").exists()


def test_a_gcp_raster_warps_to_utm_and_back(tmp_path):
    """--resample of a GCP-only raster: onto a UTM grid of its pixel size and back
    onto its own pixels gives the same values (the grid is the raster's own)."""
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS

    from guided_diffusion.io.geotiff import georeference
    from guided_diffusion.io.warp import grid_at_pixel_size, warp_to_gcps, warp_to_grid

    h, w = 30, 44
    points = [GroundControlPoint(0, 0, 600000, 5100000),
              GroundControlPoint(0, w, 600000 + 10 * w, 5100000),
              GroundControlPoint(h, 0, 600000, 5100000 - 10 * h)]  # fmt: skip
    values = np.random.default_rng(0).uniform(-20, -5, (2, h, w)).astype(np.float32)
    src = tmp_path / "g.tif"
    with rasterio.open(src, "w", driver="GTiff", width=w, height=h, count=2,
                       dtype="float32", nodata=float("nan")) as dst:  # fmt: skip
        dst.write(values)
        dst.gcps = (points, CRS.from_epsg(32632))
    crs, transform, width, height = grid_at_pixel_size(src, (10, 10))
    assert crs.to_epsg() == 32632 and (width, height) == (w, h)
    assert (transform.c, transform.f) == (600000, 5100000)
    warp_to_grid(src, tmp_path / "utm.tif", transform, width, height, crs=crs)
    warp_to_gcps(tmp_path / "utm.tif", tmp_path / "back.tif", georeference(src), w, h)
    with rasterio.open(tmp_path / "back.tif") as back:
        got, (gcps, _) = back.read(), back.gcps
    assert len(gcps) == 3
    # every pixel but the last row and column (bilinear needs a neighbour there)
    assert np.allclose(got[:, :-1, :-1], values[:, :-1, :-1], atol=1e-4)
