"""
Scene outputs as GIS tools read them (issue 23, items 1 and 3):

* masks that hold: a model whose output is black in one band (x0 = -1, uint8 0)
  translates a SAR scene with a nodata strip; in the result, the mean of two samples,
  the kept sample, the page's GeoTIFF and the quick-look, the valid pixels (GDAL's
  dataset mask, read by rasterio; the quick-look's alpha) are exactly the SAR's, and
  the black band is 0 at valid pixels (a nodata value of 0 would mask them all);
* Cloud-Optimized GeoTIFFs: every GeoTIFF a scene job keeps passes rio-cogeo's
  validator, and Debian's ``gdalinfo`` (a second reader, skipped when absent) reads
  the CRS, geotransform, size, mask and overviews that rasterio reads; an input's
  ground control points survive; ``--cog false`` gives a plain GeoTIFF, not a COG,
  with the mask;
* a full disk while GDAL's COG driver copies the file ends in DiskFull, leaving
  neither the intermediate file nor the COG's temporary behind.
"""

import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch as th
from conftest import save_dual_pol_run
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.transform import Affine

from guided_diffusion.base import atomic, settings
from guided_diffusion.base.atomic import DiskFull
from guided_diffusion.io.geotiff import GeoTiffWriter
from guided_diffusion.page import app
from guided_diffusion.script_util import create_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "translate_scene.py")
TILE = 32
FLAGS = dict(image_size=TILE, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="16", sar_channels=2, learn_sigma=False,
             diffusion_steps=50, predict_xstart=True)  # fmt: skip
TRANSFORM = Affine(10, 0, 600000, 0, -10, 5100000)
# the model's constant x0 per band: red (0.6 + 1) * 127.5 = 204, green 128, blue
# clipped to -1, i.e. 0
BIAS = (0.6, 0.0, -5.0)
# a scene larger than the 256-pixel block, so its COG has an overview (300 > 256)
HEIGHT, WIDTH, STRIP = 200, 300, 37


@pytest.fixture(scope="module")
def black_model(tmp_path_factory):
    """An x_start model whose last convolution is zero with the biases BIAS: its
    output is BIAS whatever the input, the blue band black."""
    run = tmp_path_factory.mktemp("run")
    model_flags = {k: v for k, v in {**settings.defaults("model"), **FLAGS}.items()
                   if k in settings.names("model")}  # fmt: skip
    model = create_model(**model_flags)
    last = model.out[-1]
    with th.no_grad():
        last.weight.zero_()
        last.bias.copy_(th.tensor(BIAS))
    return save_dual_pol_run(run, model, FLAGS, "model000001.pt")


def write_scene(path, height, width, *, strip, gcps=False):
    """VV, VH in dB with NaN (nodata) in the first ``strip`` columns and one pixel."""
    rng = np.random.default_rng(0)
    vv = rng.uniform(-22, -4, (height, width)).astype(np.float32)
    vv[:, :strip] = np.nan
    vv[height // 2, width // 2] = np.nan  # a hole inside, not only an edge
    geo = {"crs": "EPSG:32632", "transform": TRANSFORM} if not gcps else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=2,
                           dtype="float32", nodata=float("nan"), **geo) as dst:  # fmt: skip
            dst.write(np.stack([vv, vv - 7]))
            dst.descriptions = ("VV", "VH")
            if gcps:
                points = [GroundControlPoint(0, 0, 600000, 5100000),
                          GroundControlPoint(0, width, 600000 + 10 * width, 5100000),
                          GroundControlPoint(height, 0, 600000, 5100000 - 10 * height)]  # fmt: skip
                dst.gcps = (points, rasterio.crs.CRS.from_epsg(32632))
    return str(path), np.isfinite(vv)


def translate(monkeypatch, scene, output, checkpoint, *extra):
    args = ["--input", scene, "--output", str(output), "--model_path", str(checkpoint),
            "--sampler", "ddim", "--timestep_respacing", "ddim2", "--overlap", "0",
            "--batch_size", "64", *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    runpy.run_path(SCRIPT, run_name="__main__")


@pytest.fixture(scope="module")
def two_samples(tmp_path_factory, black_model):
    """The black model on the scene with a strip, two samples (kept: the default)."""
    folder = tmp_path_factory.mktemp("two")
    scene, valid = write_scene(folder / "scene.tif", HEIGHT, WIDTH, strip=STRIP)
    with pytest.MonkeyPatch.context() as patch:
        translate(patch, scene, folder / "out.tif", black_model,
                  "--samples_per_input", "2")
    return folder, valid


def assert_mask_is(path, valid):
    """The GeoTIFF's valid pixels (its dataset mask) are exactly ``valid``; no
    nodata value; the black band is 0 where valid."""
    with rasterio.open(path) as src:
        assert src.nodata is None and src.dtypes == ("uint8",) * 3
        assert src.mask_flag_enums == ([rasterio.enums.MaskFlags.per_dataset],) * 3
        assert np.array_equal(src.dataset_mask(), np.where(valid, 255, 0))
        for band in range(1, 4):
            assert np.array_equal(src.read_masks(band), np.where(valid, 255, 0))
        data = src.read()
        assert (data[2][valid] == 0).all()  # black, and still valid
        assert (data[0][valid] == 204).all() and (data[1][valid] == 128).all()
        assert src.colorinterp == (rasterio.enums.ColorInterp.red,
                                   rasterio.enums.ColorInterp.green,
                                   rasterio.enums.ColorInterp.blue)  # fmt: skip
        assert src.descriptions == ("red", "green", "blue")


def test_valid_pixels_are_the_sars_in_every_8bit_output(two_samples):
    folder, valid = two_samples
    assert not valid[:, :STRIP].any() and valid.sum() == HEIGHT * (WIDTH - STRIP) - 1
    for name in ("out.tif", "out_sample1.tif", "out_mean.tif"):
        assert_mask_is(folder / name, valid)
    quicklook = np.asarray(Image.open(folder / "out_quicklook.png"))
    # SAR | 4 px gap | result, at full size (2 * 300 + 4 < 1024)
    assert quicklook.shape == (HEIGHT, 2 * WIDTH + 4, 4)
    alpha = quicklook[..., 3]
    assert np.array_equal(alpha[:, :WIDTH], np.where(valid, 255, 0))
    assert np.array_equal(alpha[:, WIDTH + 4:], np.where(valid, 255, 0))
    assert (alpha[:, WIDTH:WIDTH + 4] == 255).all()
    assert (quicklook[:, WIDTH + 4:, 2][valid] == 0).all()  # the black band, shown


def test_the_page_geotiff_has_the_sars_valid_pixels(tmp_path, black_model):
    """The page's patch route (an upload of the model's size) with a nodata strip."""
    scene, valid = write_scene(tmp_path / "patch.tif", TILE, TILE, strip=5)
    translator = app.Translator({"black": str(black_model)}, work_dir=str(tmp_path / "page"))
    result = translator.translate(scene, "black", "ddim", 2, 0)
    assert result.route == "patch"
    assert_mask_is(result.geotiff, valid)
    from rio_cogeo.cogeo import cog_validate

    assert cog_validate(result.geotiff, quiet=True)[0]


def gdalinfo(path):
    return json.loads(
        subprocess.run(["gdalinfo", "-json", str(path)], capture_output=True, text=True,
                       check=True).stdout  # fmt: skip
    )


def overview_sizes(src):
    """(width, height) of each overview, as GDAL rounds them (up)."""
    return [(-(-src.width // f), -(-src.height // f)) for f in src.overviews(1)]


def test_every_scene_geotiff_is_a_cog_that_gdalinfo_reads_alike(two_samples):
    from rio_cogeo.cogeo import cog_validate

    folder, _ = two_samples
    names = ["out.tif", "out_sample1.tif", "out_mean.tif", "out_spread.tif"]
    assert sorted(p.name for p in folder.glob("*.tif")) == sorted([*names, "scene.tif"])
    for name in names:
        valid_cog, errors, _ = cog_validate(str(folder / name), quiet=True)
        assert valid_cog, (name, errors)
        with rasterio.open(folder / name) as src:
            assert src.overviews(1) == [2]  # 300 > 256: one halving
            assert src.crs.to_epsg() == 32632 and src.transform == TRANSFORM
            expected = {
                "size": [src.width, src.height],
                "geoTransform": list(src.transform.to_gdal()),
                "overviews": [list(s) for s in overview_sizes(src)],
                "mask": [m.name.upper() for m in src.mask_flag_enums[0]],
            }
        if shutil.which("gdalinfo") is None:
            continue
        info = gdalinfo(folder / name)
        band = info["bands"][0]
        assert info["size"] == expected["size"]
        assert np.allclose(info["geoTransform"], expected["geoTransform"])
        assert 'ID["EPSG",32632]' in info["coordinateSystem"]["wkt"]
        assert [o["size"] for o in band["overviews"]] == expected["overviews"]
        if expected["mask"] == ["PER_DATASET"]:  # the mask and its overviews
            assert band["mask"]["flags"] == expected["mask"]
            assert [o["size"] for o in band["mask"]["overviews"]] == expected["overviews"]
        else:  # float: NaN is nodata, no mask
            assert expected["mask"] == ["NODATA"] and band["noDataValue"] == "NaN"
            assert "mask" not in band
        assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo (Debian's gdal-bin) is not installed: rasterio alone read them")


def test_gcps_survive_and_cog_false_gives_a_plain_geotiff_with_the_mask(
    tmp_path, monkeypatch, black_model
):
    from rio_cogeo.cogeo import cog_validate

    # the smallest side 256: the plain GeoTIFF's overviews go down to half a block
    scene, valid = write_scene(tmp_path / "g.tif", 256, 288, strip=11, gcps=True)
    translate(monkeypatch, scene, tmp_path / "cog.tif", black_model)
    translate(monkeypatch, scene, tmp_path / "plain.tif", black_model, "--cog", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(scene) as src:
            gcps, gcp_crs = src.gcps
        for name in ("cog.tif", "plain.tif"):
            assert_mask_is(tmp_path / name, valid)
            with rasterio.open(tmp_path / name) as src:
                assert src.gcps[1] == gcp_crs
                assert [(p.row, p.col, p.x, p.y) for p in src.gcps[0]] == [
                    (p.row, p.col, p.x, p.y) for p in gcps
                ]
                assert src.overviews(1) == [2]
    assert cog_validate(str(tmp_path / "cog.tif"), quiet=True)[0]
    assert not cog_validate(str(tmp_path / "plain.tif"), quiet=True)[0]


def test_full_disk_in_the_cog_copy_is_disk_full_and_leaves_nothing(tmp_path, monkeypatch):
    """
    GDAL's COG driver meets a write it cannot make: the file size limit
    (RLIMIT_FSIZE, EFBIG) stands for a full disk, set only around the copy, with
    the disk seen as full (atomic's rule for GDAL's errors, which name no errno).
    """
    path = tmp_path / "scene.tif"
    path.write_bytes(b"old")
    real_copy = GeoTiffWriter._copy_cog

    def copy_on_a_full_disk(self, src, dst):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(src) // 2, limit[1]))
        real = atomic.shutil.disk_usage
        monkeypatch.setattr(
            atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=0)
        )
        try:
            real_copy(self, src, dst)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(GeoTiffWriter, "_copy_cog", copy_on_a_full_disk)
    noise = np.random.default_rng(0).integers(0, 256, (3, 300, 400), dtype=np.uint8)
    geo = {"crs": rasterio.crs.CRS.from_epsg(32632), "transform": TRANSFORM}
    with pytest.raises(DiskFull) as caught:
        with GeoTiffWriter(str(path), 3, 300, 400, np.uint8, geo, mask=True,
                           cog=True) as out:  # fmt: skip
            out.write(0, noise, np.ones((300, 400), bool))
    assert str(path) in str(caught.value)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["scene.tif"]


def test_a_downscaled_quicklook_is_transparent_only_where_no_pixel_had_data(tmp_path):
    """Halved (44 -> 22 columns): a pixel of two without data is transparent, one
    of a pixel with and one without is opaque, of the colour of the one with."""
    from guided_diffusion.translation.scene_outputs import write_quicklook

    valid = np.ones((10, 20), bool)
    valid[:, :3] = False  # columns 0, 1: none; columns 2, 3: half
    sar = np.full((10, 20), 90, np.uint8)
    result = np.zeros((10, 20, 3), np.uint8)
    result[..., 0] = 200
    write_quicklook(str(tmp_path / "q.png"), sar, result, valid, width=22)
    picture = np.asarray(Image.open(tmp_path / "q.png"))
    assert picture.shape == (5, 22, 4)
    # SAR columns 0-19 -> 0-9, the gap 20-23 -> 10-11, the result 24-43 -> 12-21
    for left in (0, 12):
        assert (picture[:, left, 3] == 0).all()
        assert (picture[:, left + 1:left + 10, 3] == 255).all()
    assert (picture[:, 10:12, 3] == 255).all()
    assert (np.abs(picture[:, 1, :3].astype(int) - 90) <= 1).all()
    assert (np.abs(picture[:, 13, :3].astype(int) - (200, 0, 0)) <= 1).all()


def test_a_disk_without_room_for_the_cog_is_refused_before_the_copy(tmp_path, monkeypatch):
    """Less free space than the intermediate file: DiskFull before GDAL copies
    anything, saying what is needed and that --cog false writes a plain GeoTIFF."""
    path = tmp_path / "scene.tif"
    copies = []
    monkeypatch.setattr(GeoTiffWriter, "_copy_cog", lambda self, *a: copies.append(a))
    real = atomic.shutil.disk_usage
    geo = {"crs": rasterio.crs.CRS.from_epsg(32632), "transform": TRANSFORM}
    noise = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    with pytest.raises(DiskFull) as caught:
        with GeoTiffWriter(str(path), 3, 64, 64, np.uint8, geo, mask=True, cog=True) as out:
            out.write(0, noise, np.ones((64, 64), bool))
            work = out._work  # one byte less free than the finished intermediate
            monkeypatch.setattr(
                atomic.shutil, "disk_usage",
                lambda p: real(p)._replace(free=os.path.getsize(work) - 1),
            )  # fmt: skip
    message = str(caught.value)
    assert str(path) in message and "--cog false" in message and "needs more than" in message
    assert copies == [] and os.listdir(tmp_path) == []
