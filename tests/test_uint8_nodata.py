"""
A nodata value that an 8-bit SAR file declares is nodata (issue 23, item 2): the
pixels are masked, and the network sees -1 there (what a 0 gives, and the fill of
float nodata); ``--sar_nodata none`` reads them as data; a number overrides; a PNG
declares none and reads as in the original; a scene job saved before this rule is
refused on resume in one line.

The independent answers: the original scaling v / 127.5 - 1 computed here, the
strip written here, and the output's mask read back with rasterio.
"""

import json
import os
import runpy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from guided_diffusion.io.rasters import (
    NODATA_OFF,
    DataError,
    Scaling,
    load_sar_patch,
    parse_nodata,
    read_raster,
    sar_bands_scaled,
)
from guided_diffusion.translation.scene import KEY_VERSION, JobMismatch, SceneSampler
from guided_diffusion.translation.scene_translation import (
    BUNDLED_MODEL,
    SAMPLES_FILE,
    samples_done,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "translate_scene.py")
STRIP = 5  # nodata columns at the left edge
pytestmark = pytest.mark.usefixtures("one_thread")


def eight_bit(bands, height, width, seed=0):
    """(bands, H, W) uint8 in 60..199: none of the values 0, 50 and 200 the tests mark."""
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, (bands, height, width)).astype(np.uint8)


def write_tif(path, bands, nodata=None, names=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(
            path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
            count=len(bands), dtype="uint8", nodata=nodata, crs="EPSG:32632",
            transform=Affine(10, 0, 600000, 0, -10, 5100000),
        ) as dst:  # fmt: skip
            dst.write(bands)
            for i, name in enumerate(names or ()):
                dst.set_band_description(i + 1, name)
    return str(path)


def strip_mask(height, width):
    mask = np.zeros((height, width), bool)
    mask[:, :STRIP] = True
    return mask


@pytest.mark.parametrize("tag", [0, 200])
def test_a_declared_nodata_strip_is_masked_and_filled_with_minus_one(tmp_path, tag):
    values = eight_bit(1, 16, 16)
    strip = strip_mask(16, 16)
    values[:, strip] = tag
    path = write_tif(tmp_path / "s1.tif", values, nodata=tag)
    expected = values[0] / 127.5 - 1
    expected[strip] = -1.0  # the fill, also for 200 (which would read 0.57)

    data, valid, stats = sar_bands_scaled(read_raster(path), Scaling(sar_channels=1))
    np.testing.assert_array_equal(valid, ~strip)
    np.testing.assert_allclose(data[0], expected)
    assert stats.nodata == strip.sum() and stats.pixels == 256

    # the original code's path (Pillow), 3 channels replicated, no resize at 16
    arr, window_valid, stats = load_sar_patch(path, 16, Scaling())
    np.testing.assert_array_equal(window_valid, ~strip)
    np.testing.assert_allclose(arr, np.repeat(expected[None], 3, axis=0), atol=1e-6)
    assert stats.nodata == strip.sum() and stats.valid_in_window == (~strip).sum()
    # resized to 8: the strip's mask goes through the same geometry (5 of 16 -> 2.5)
    _, window_valid, _ = load_sar_patch(path, 8, Scaling())
    assert not window_valid[:, :2].any() and window_valid[:, 3:].all()


def test_sar_nodata_none_reads_the_strip_as_data_and_a_number_overrides(tmp_path):
    values = eight_bit(2, 12, 10, seed=1)
    strip = strip_mask(12, 10)
    values[:, strip] = 200
    values[1, 3, 8] = 50
    path = write_tif(tmp_path / "s1.tif", values, nodata=200, names=["VV", "VH"])
    raster = read_raster(path)

    off = Scaling.from_settings({"sar_nodata": "none"}, sar_channels=2)
    assert off.sar_nodata == NODATA_OFF
    data, valid, stats = sar_bands_scaled(raster, off)
    assert valid.all() and stats.nodata == 0
    np.testing.assert_allclose(data, values / 127.5 - 1)  # 200 -> 0.5686...

    given = Scaling.from_settings({"sar_nodata": "50"}, sar_channels=2)
    data, valid, _ = sar_bands_scaled(raster, given)
    expected_valid = np.ones((12, 10), bool)
    expected_valid[3, 8] = False  # 50 in one band is nodata; the tagged 200 is data
    np.testing.assert_array_equal(valid, expected_valid)
    assert data[:, 3, 8].tolist() == [-1.0, -1.0]
    np.testing.assert_allclose(data[:, strip], 200 / 127.5 - 1)


def test_a_palette_files_nodata_is_an_index_not_a_colour(tmp_path):
    index = np.full((1, 6, 8), 5, np.uint8)
    index[0, :, :2] = 3  # the declared nodata index
    path = tmp_path / "p.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=6, count=1,
                       dtype="uint8", nodata=3, photometric="palette", crs="EPSG:32632",
                       transform=Affine(10, 0, 600000, 0, -10, 5100000)) as dst:  # fmt: skip
        dst.write(index)
        # index 5 is coloured (3, 3, 3): a colour equal to the nodata index
        dst.write_colormap(1, {3: (10, 20, 30, 255), 5: (3, 3, 3, 255)})
    data, valid, _ = sar_bands_scaled(read_raster(str(path)), Scaling())
    np.testing.assert_array_equal(valid, index[0] != 3)
    np.testing.assert_allclose(data[:, :, 2:], 3 / 127.5 - 1)
    assert (data[:, :, :2] == -1).all()


def test_a_png_declares_no_nodata_and_reads_as_the_original(tmp_path):
    values = eight_bit(1, 20, 24, seed=2)[0]
    values[:, :STRIP] = 0  # zeros are data in a PNG
    path = tmp_path / "s1.png"
    Image.fromarray(values).save(path)
    arr, valid, stats = load_sar_patch(str(path), 20, Scaling())
    # the original: short side resized to 20 (no change), centre crop, v / 127.5 - 1
    expected = values[:, 2:22] / 127.5 - 1
    np.testing.assert_allclose(arr, np.repeat(expected[None], 3, axis=0), atol=1e-6)
    assert valid.all() and stats.nodata == 0
    data, valid, _ = sar_bands_scaled(read_raster(path), Scaling(sar_channels=1))
    assert valid.all()
    np.testing.assert_allclose(data[0], values / 127.5 - 1)


def test_the_setting_is_recorded_and_an_old_record_still_loads(tmp_path):
    assert parse_nodata("") is None and parse_nodata("None") == NODATA_OFF
    assert parse_nodata("0") == 0.0 and np.isnan(parse_nodata("nan"))
    with pytest.raises(DataError, match="--sar_nodata x: give a number .* none"):
        parse_nodata("x")
    for nodata, recorded in ((NODATA_OFF, "none"), (0.0, 0.0), (None, None)):
        record = json.loads(json.dumps(Scaling(sar_nodata=nodata).record()))
        assert record["sar_nodata"] == recorded
        assert Scaling.from_record(record).sar_nodata == nodata
    # a record written before (issue 22's, of an 8-bit run): sar_nodata null
    old = {"sar_channels": 3, "sar_input": "uint8", "sar_db_range": [],
           "sar_nodata": None, "sar_bands": [], "sar_band_names": [],
           "opt_bands": [], "opt_range": []}  # fmt: skip
    scaling = Scaling.from_record(old)
    assert scaling == Scaling()
    assert "declared nodata filled with -1" in scaling.describe()
    assert "NaN (a declared nodata value ignored)" in Scaling(
        sar_nodata=NODATA_OFF
    ).describe()


# -- the scene script on the bundled model (VV, VH; read here as 8-bit) ------------------


def translate(monkeypatch, scene, output, *extra):
    args = ["--input", scene, "--output", str(output), "--model_path", BUNDLED_MODEL,
            "--sar_input", "uint8", "--sampler", "ddim", "--timestep_respacing", "ddim2",
            *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    runpy.run_path(SCRIPT, run_name="__main__")
    with rasterio.open(output) as src:
        # nodata: the dataset mask (or, for a per-band nodata value, every band's)
        return (src.read_masks() == 0).all(axis=0)


@pytest.fixture
def scene(tmp_path):
    values = eight_bit(2, 24, 40, seed=3)
    values[:, strip_mask(24, 40)] = 0
    return write_tif(tmp_path / "scene.tif", values, nodata=0, names=["VV", "VH"])


def test_a_declared_nodata_strip_of_an_8_bit_scene_is_nodata_in_the_output(
    tmp_path, monkeypatch, scene
):
    strip = strip_mask(24, 40)
    masked = translate(monkeypatch, scene, tmp_path / "out.tif")
    np.testing.assert_array_equal(masked, strip)
    masked = translate(monkeypatch, scene, tmp_path / "data.tif", "--sar_nodata", "none")
    assert not masked.any()


def test_finished_samples_saved_before_the_rule_are_refused_too(tmp_path):
    job = SimpleNamespace(work_dir=str(tmp_path / "out.tif.work"),
                          output=str(tmp_path / "out.tif"))  # fmt: skip
    os.makedirs(job.work_dir)
    key = {"seed": 0, "version": KEY_VERSION}
    old = {"key": {"seed": 0}, "done": [0]}  # as written before the rule
    (tmp_path / "out.tif.work" / SAMPLES_FILE).write_text(json.dumps(old))
    with pytest.raises(JobMismatch, match="earlier version.*8-bit SAR file declares"):
        samples_done(job, key)


def test_a_scene_job_saved_before_the_rule_is_refused_in_one_line(
    tmp_path, monkeypatch, scene, capsys
):
    out = tmp_path / "out.tif"
    flags = ("--save_every", "1")

    def crashes(job):
        raise MemoryError("the machine ran out")

    real_step = SceneSampler.step_once
    calls = []

    def crash_after_a_save(job):
        calls.append(job.step)
        if len(calls) == 2:
            crashes(job)
        real_step(job)

    with monkeypatch.context() as patch:
        patch.setattr(SceneSampler, "step_once", crash_after_a_save)
        with pytest.raises(MemoryError):
            translate(monkeypatch, scene, out, *flags)
    saved = tmp_path / "out.tif.work" / "job.json"
    job = json.loads(saved.read_text())
    assert job["key"]["version"] == KEY_VERSION == 2
    # the key as the version before this rule wrote it
    old_key = {k: v for k, v in job["key"].items() if k != "version"}
    saved.write_text(json.dumps({**job, "key": old_key}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        translate(monkeypatch, scene, out, *flags)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("error: ") and str(out) + ".work" in line
    assert "earlier version" in line and "8-bit SAR file declares is nodata" in line
    assert "delete the folder" in line and not out.exists()
    assert "other settings" not in line and sum("earlier version" in e for e in err) == 1
