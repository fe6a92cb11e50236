"""
Nodata through the scripts: scripts/image_sample_realtime.py keeps the SAR's nodata
mask in its arrays (black outputs, the mask in the npz and the spread arrays), and
scripts/image_evaluate.py passes it to the calibration, so that nodata pixels are
left out of the coverage and the tables.

The independent answers: the mask is the file's NaNs, read here with rasterio; the
coverage is counted here from the npz's mean and spread and the ground-truth PNGs
over the pixels with data; the ground truth is the SEN12MS optical scaling (bands
4, 3, 2 over 0..3000) applied here to the file's digital numbers. The bundled
model (VV, VH in dB, Sentinel-2 optical) runs two steps.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from guided_diffusion.evaluation import metrics
from guided_diffusion.translation.scene_translation import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "scripts" / "image_sample_realtime.py"
EVALUATE = ROOT / "scripts" / "image_evaluate.py"
EXAMPLES = ROOT / "assets" / "examples"
pytestmark = pytest.mark.usefixtures("one_thread")


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def write_optical(path, seed):
    """A 13-band Sentinel-2 L1C patch, digital numbers 0..4000 (some above the range)."""
    dn = np.random.default_rng(seed).integers(0, 4000, (13, 32, 32)).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=13,
                       dtype="uint16", crs="EPSG:32632",
                       transform=Affine(10, 0, 500000, 0, -10, 5400000)) as dst:  # fmt: skip
        dst.write(dn)
    return dn


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A data folder: fields (nodata in its VH band only) and river (none)."""
    data = tmp_path_factory.mktemp("nodata_data")
    (data / "sar").mkdir()
    (data / "opt").mkdir()
    with rasterio.open(EXAMPLES / "fields_32.tif") as src:
        profile, bands = src.profile, src.read()
    holes = np.zeros((32, 32), bool)
    holes[:, :6] = True  # a stripe at the swath's edge
    holes[20, 10:14] = True
    bands[1][holes] = np.nan  # VH only
    with rasterio.open(data / "sar" / "fields.tif", "w", **profile) as dst:
        dst.write(bands)
        dst.descriptions = ("VV", "VH")
    shutil.copy(EXAMPLES / "river_32.tif", data / "sar" / "river.tif")
    dn = {name: write_optical(data / "opt" / f"{name}.tif", seed)
          for seed, name in enumerate(("fields", "river"))}  # fmt: skip
    return data, holes, dn


def test_the_sampling_script_and_the_evaluation_leave_nodata_out(
    run_dirs, tmp_path, run_in_process
):
    data, holes, dn = run_dirs
    log = tmp_path / "log"
    proc = run_in_process(SAMPLE, ["--data_dir", data, "--model_path", BUNDLED_MODEL,
                                   "--sampler", "ddim", "--timestep_respacing", 2,
                                   "--samples_per_input", 3, "--batch_size", 2],
                          env={"OPENAI_LOGDIR": log})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = log / "sample_results" / "ddim2"

    # the ground truth: bands 4, 3, 2 over 0..3000, to 8 bits, by hand
    for name, numbers in dn.items():
        rgb = numbers[[3, 2, 1]].astype(np.float64).transpose(1, 2, 0)
        expected = np.rint(np.clip(rgb / 3000, 0, 1) * 255)
        assert (
            np.abs(png(out / "gt_opt" / f"{name}.png").astype(float) - expected).max()
            <= 1
        )

    # the outputs: black where the SAR has no data, in every sample
    for sub in ("gen_opt", "gen_samples/1", "gen_samples/2"):
        image = png(out / sub / "fields.png")
        assert (image[holes] == 0).all(), sub
        assert image[~holes].mean() > 5  # a translation elsewhere
    npz = np.load(next(out.glob("samples_*.npz")))
    names = [str(n) for n in npz["names"]]
    assert sorted(names) == ["fields.tif", "river.tif"]
    fields, river = names.index("fields.tif"), names.index("river.tif")
    np.testing.assert_array_equal(npz["valid"][fields], ~holes)
    assert npz["valid"][river].all()
    assert (npz["spread"][fields][holes] == 0).all()
    with np.load(out / "spread_arrays" / "fields.npz") as arrays:
        np.testing.assert_array_equal(arrays["valid"], ~holes)

    # the evaluation: the calibration counts the pixels with data only
    proc = run_in_process(EVALUATE, ["--gen_dir", out / "gen_opt", "--gt_dir", out / "gt_opt",
                                     "--spread_bins", 3],
                          env={metrics.INCEPTION_ENV: None})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "metrics.json").read_text())["spread"]
    assert report["nodata_pixels"] == holes.sum()
    assert report["num_pixels"] == 2 * 32 * 32 - holes.sum()
    truth = np.stack(
        [png(out / "gt_opt" / (Path(n).stem + ".png")) for n in names]
    ).astype(np.float64)
    keep = npz["valid"]
    mean, spread = npz["mean"].astype(np.float64), npz["spread"].astype(np.float64)
    inside = np.abs(truth - mean)[keep] <= 2 * spread[keep]  # (pixels, 3)
    assert report["coverage_2sd"] == pytest.approx(inside.mean(), abs=1e-9)
    error = np.abs(truth - mean)[keep].mean(axis=1)
    assert report["mean_abs_error"] == pytest.approx(error.mean(), rel=1e-6)
    assert sum(row["pixels"] for row in report["spread"]["table"]) == keep.sum()
