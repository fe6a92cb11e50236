"""
scripts/translate_scene.py on small georeferenced scenes with a tiny random model:
the GeoTIFF keeps the input's place (CRS and transform, or GCPs) and nodata, the
result does not depend on how tiles are batched, and odd sizes (and a scene
smaller than a tile) work.
"""

import json
import os
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
from conftest import randomize_, save_dual_pol_run
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.transform import Affine

from guided_diffusion.base import settings
from guided_diffusion.script_util import create_model
from guided_diffusion.translation.scene import SceneSampler

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "translate_scene.py")
TILE = 32
FLAGS = dict(image_size=TILE, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="16", sar_channels=2, learn_sigma=False,
             diffusion_steps=50)  # fmt: skip
TRANSFORM = Affine(10, 0, 600000, 0, -10, 5100000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with the config.json of a run trained on VV, VH in dB."""
    run = tmp_path_factory.mktemp("run")
    model_flags = {k: v for k, v in {**settings.defaults("model"), **FLAGS}.items()
                   if k in settings.names("model")}  # fmt: skip
    th.manual_seed(0)
    model = create_model(**{k: v for k, v in model_flags.items()}, learn_sigma=False)
    randomize_(model)
    return save_dual_pol_run(run, model, FLAGS, "ema_0.9999_000001.pt")


def write_scene(path, height, width, *, gcps=False, strip=0, seed=0, transform=TRANSFORM):
    rng = np.random.default_rng(seed)
    vv = rng.uniform(-22, -4, (height, width)).astype(np.float32)
    vh = vv - 7
    if strip:
        vv[:, :strip] = np.nan
        vh[:, :strip] = np.nan
    geo = {"crs": "EPSG:32632", "transform": transform} if not gcps else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=2,
                           dtype="float32", nodata=float("nan"), **geo) as dst:  # fmt: skip
            dst.write(np.stack([vh, vv]))  # SNAP's order: VH first
            dst.set_band_description(1, "Sigma0_VH_db")
            dst.set_band_description(2, "Sigma0_VV_db")
            if gcps:
                points = [GroundControlPoint(0, 0, 600000, 5100000),
                          GroundControlPoint(0, width, 600000 + 10 * width, 5100000),
                          GroundControlPoint(height, 0, 600000, 5100000 - 10 * height)]  # fmt: skip
                dst.gcps = (points, rasterio.crs.CRS.from_epsg(32632))
    return str(path)


def translate(monkeypatch, scene, output, checkpoint, *extra):
    args = ["--input", scene, "--output", str(output), "--model_path", str(checkpoint),
            "--sampler", "ddim", "--timestep_respacing", "ddim3", *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    runpy.run_path(SCRIPT, run_name="__main__")
    with rasterio.open(output) as src:
        return src.read(), src.profile, src.descriptions, src.gcps, src.overviews(1)


def read_band_stack(*paths):
    """The pixels of GeoTIFFs, stacked: (len(paths), bands, H, W) float64."""
    out = []
    for path in paths:
        with rasterio.open(path) as src:
            out.append(src.read().astype(np.float64))
    return np.stack(out)


def test_geotiff_keeps_place_and_nodata_and_ignores_the_tile_batch(
    tmp_path, monkeypatch, checkpoint
):
    scene = write_scene(tmp_path / "scene.tif", 72, 100, strip=9)
    a, profile, names, _, _ = translate(
        monkeypatch, scene, tmp_path / "a.tif", checkpoint, "--batch_size", "1"
    )
    b, *_ = translate(
        monkeypatch, scene, tmp_path / "b.tif", checkpoint, "--batch_size", "7"
    )
    assert a.shape == (3, 72, 100) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b).max() <= 1  # float sums in another order
    assert profile["crs"].to_epsg() == 32632 and profile["transform"] == TRANSFORM
    # 8-bit: no nodata value (a generated 0 is a pixel), the dataset mask says
    # where the input has none (issue 23)
    assert (
        profile["nodata"] is None and profile["tiled"] and profile["compress"] == "deflate"
    )
    assert names == ("red", "green", "blue")
    assert (a[:, :, :9] == 0).all()  # the input's nodata strip
    with rasterio.open(tmp_path / "a.tif") as src:
        assert (src.dataset_mask()[:, :9] == 0).all() and (src.dataset_mask()[:, 9:] == 255).all()
    assert a[:, :, 9:].std() > 0
    quicklook = np.asarray(Image.open(tmp_path / "a_quicklook.png"))
    assert quicklook.shape == (72, 2 * 100 + 4, 4)  # RGBA: the strip transparent
    assert not (tmp_path / "a.tif.work").exists()


@pytest.mark.parametrize("height, width", [(200, 300), (257, 1000), (20, 24)])
def test_odd_sizes_and_a_scene_smaller_than_a_tile(
    tmp_path, monkeypatch, checkpoint, height, width
):
    scene = write_scene(tmp_path / "scene.tif", height, width, seed=1)
    out, profile, _, _, overviews = translate(
        monkeypatch, scene, tmp_path / "out.tif", checkpoint, "--batch_size", "16",
        "--overlap", "8",
    )  # fmt: skip
    assert out.shape == (3, height, width)
    assert profile["transform"] == TRANSFORM
    # a COG's overviews (GDAL's COG driver): halvings while the larger side exceeds
    # the 256-pixel block: 300 -> 150, 1000 -> 500 -> 250, none for 24
    assert overviews == {300: [2], 1000: [2, 4], 24: []}[width]
    assert out[:, :, :].std() > 0 and not (tmp_path / "out.tif.work").exists()


def test_ground_control_points_and_optical_units(tmp_path, monkeypatch, checkpoint):
    scene = write_scene(tmp_path / "scene.tif", 40, 48, gcps=True, strip=3)
    out, profile, _, (gcps, crs), _ = translate(
        monkeypatch,
        scene,
        tmp_path / "out.tif",
        checkpoint,
        "--output_units",
        "optical",
    )
    with rasterio.open(scene) as src:
        expected, expected_crs = src.gcps
    assert crs == expected_crs and [(p.row, p.col, p.x, p.y) for p in gcps] == [
        (p.row, p.col, p.x, p.y) for p in expected
    ]
    assert out.dtype == np.float32 and np.isnan(profile["nodata"])
    assert np.isnan(out[:, :, :3]).all() and np.isfinite(out[:, :, 3:]).all()
    assert 0 <= np.nanmin(out) and np.nanmax(out) <= 3000  # --opt_range 0,3000


@pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)
def test_two_ranks_share_the_tiles_and_give_the_same_scene(
    tmp_path, monkeypatch, checkpoint
):
    """... and with --samples_per_input 2, each sample, and one process writes the
    mean and spread."""
    scene = write_scene(tmp_path / "scene.tif", 48, 80, strip=5, seed=3)
    twice = ("--samples_per_input", "2")
    translate(monkeypatch, scene, tmp_path / "one.tif", checkpoint, *twice)
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, SCRIPT, "--input", scene, "--output",
         str(tmp_path / "two.tif"), "--model_path", str(checkpoint), "--sampler", "ddim",
         "--timestep_respacing", "ddim3", *twice],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("wrote " + str(tmp_path / "two_mean.tif")) == 1
    for suffix in ("", "_sample1", "_mean"):
        one, two = read_band_stack(tmp_path / f"one{suffix}.tif", tmp_path / f"two{suffix}.tif")
        assert np.abs(one - two).max() <= 1, suffix
    assert not (tmp_path / "two.tif.work").exists()


def test_memory_mapped_arrays_give_the_memory_result(tmp_path, monkeypatch, checkpoint):
    scene = write_scene(tmp_path / "scene.tif", 150, 90, strip=4, seed=4)
    flags = ("--sampler", "ddpm", "--timestep_respacing", "4", "--batch_size", "5")
    ram, *_ = translate(monkeypatch, scene, tmp_path / "ram.tif", checkpoint, *flags,
                        "--memory", "ram")  # fmt: skip
    disk, *_ = translate(monkeypatch, scene, tmp_path / "disk.tif", checkpoint, *flags,
                         "--memory", "mmap")  # fmt: skip
    assert np.array_equal(disk, ram)
    assert not (tmp_path / "disk.tif.work").exists()  # the mapped files are gone


RESUME = ("--sampler", "dpm++2m", "--timestep_respacing", "7", "--save_every", "2",
          "--batch_size", "3")  # fmt: skip


@pytest.mark.parametrize("memory", ["ram", "mmap"])
def test_a_crashed_job_continues_from_its_last_save_to_the_same_scene(
    tmp_path, monkeypatch, checkpoint, memory
):
    scene = write_scene(tmp_path / "scene.tif", 64, 80, strip=6, seed=5)
    expected, *_ = translate(monkeypatch, scene, tmp_path / "straight.tif", checkpoint,
                             *RESUME)  # fmt: skip
    out = tmp_path / "out.tif"
    real_step = SceneSampler.step_once
    done = []

    def crashes_in_step_4(job):
        if job.step == 3:
            raise MemoryError("the machine ran out")
        real_step(job)
        done.append(job.step)

    monkeypatch.setattr(SceneSampler, "step_once", crashes_in_step_4)
    with pytest.raises(MemoryError):
        translate(monkeypatch, scene, out, checkpoint, *RESUME, "--memory", memory)
    assert done == [1, 2, 3] and not out.exists()
    job = json.loads((tmp_path / "out.tif.work" / "job.json").read_text())
    assert job["step"] == 2  # saved every 2 steps: step 3 is lost, no more
    monkeypatch.setattr(SceneSampler, "step_once", real_step)
    done.clear()
    again, *_ = translate(monkeypatch, scene, out, checkpoint, *RESUME, "--memory", memory)
    assert np.array_equal(again, expected)
    assert not (tmp_path / "out.tif.work").exists()


def test_a_stopped_job_saves_where_it_is_and_says_how_to_go_on(
    tmp_path, monkeypatch, checkpoint, capsys
):
    scene = write_scene(tmp_path / "scene.tif", 40, 72, seed=6)
    expected, *_ = translate(monkeypatch, scene, tmp_path / "straight.tif", checkpoint,
                             *RESUME)  # fmt: skip
    real_step = SceneSampler.step_once

    def terminated_in_step_3(job):
        if job.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's scheduler does
        real_step(job)

    monkeypatch.setattr(SceneSampler, "step_once", terminated_in_step_3)
    out = tmp_path / "out.tif"
    with pytest.raises(SystemExit) as stopped:
        translate(monkeypatch, scene, out, checkpoint, *RESUME)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 3 of 7" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.tif.work" / "job.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers given back
    monkeypatch.setattr(SceneSampler, "step_once", real_step)
    again, *_ = translate(monkeypatch, scene, out, checkpoint, *RESUME)
    assert np.array_equal(again, expected)
    # the same folder with another seed: refused, naming the setting
    translate_again = [SCRIPT, "--input", scene, "--output", str(out), "--model_path",
                       str(checkpoint), *RESUME, "--seed", "3"]  # fmt: skip
    monkeypatch.setattr(SceneSampler, "step_once", terminated_in_step_3)
    with pytest.raises(SystemExit):
        translate(monkeypatch, scene, out, checkpoint, *RESUME)
    monkeypatch.setattr(SceneSampler, "step_once", real_step)
    proc = subprocess.run([sys.executable, *translate_again], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "with other settings (seed 0, not 3)" in proc.stderr and "delete the folder" in proc.stderr


def test_a_scene_of_other_pixels_is_warned_of_and_resampled_on_request(
    tmp_path, monkeypatch, checkpoint, capsys
):
    coarse = Affine(20, 0, 600000, 0, -20, 5100000)  # the model saw 10 m pixels
    scene = write_scene(tmp_path / "scene.tif", 30, 44, strip=4, seed=7, transform=coarse)
    plain, *_ = translate(monkeypatch, scene, tmp_path / "plain.tif", checkpoint)
    assert "add --resample" in capsys.readouterr().out
    out, profile, *_ = translate(
        monkeypatch, scene, tmp_path / "out.tif", checkpoint, "--resample"
    )
    log = capsys.readouterr()
    assert "to 88x60 of 10 x 10" in log.out and "add --resample" not in log.out
    # back on the input's grid, its nodata strip kept
    assert out.shape == (3, 30, 44) and profile["transform"] == coarse
    assert (out[:, :, :4] == 0).all() and (out[:, :, 5:] > 0).any()
    assert not np.array_equal(out, plain)
    assert not (tmp_path / "out.tif.work").exists()
    # a scene placed by ground control points only is warped onto a map grid and
    # back: the output has its size, its GCPs and its nodata strip
    gcps = write_scene(tmp_path / "gcps.tif", 30, 44, gcps=True, strip=4)
    out, profile, _, (points, crs), _ = translate(
        monkeypatch, gcps, tmp_path / "g.tif", checkpoint, "--resample"
    )
    with rasterio.open(gcps) as src:
        expected, expected_crs = src.gcps
    assert out.shape == (3, 30, 44) and crs == expected_crs
    assert [(p.row, p.col, p.x, p.y) for p in points] == [
        (p.row, p.col, p.x, p.y) for p in expected
    ]
    with rasterio.open(tmp_path / "g.tif") as src:
        valid = src.dataset_mask() > 0
    assert not valid[:, :4].any() and valid[:, 5:-1].all()


def test_a_full_disk_ends_in_one_line_naming_what_survived(
    tmp_path, monkeypatch, checkpoint, capsys
):
    import errno

    scene = write_scene(tmp_path / "scene.tif", 40, 40, seed=8)
    real_save = SceneSampler.save

    def disk_fills_at_step_4(job, folder):
        if job.step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        real_save(job, folder)

    monkeypatch.setattr(SceneSampler, "save", disk_fills_at_step_4)
    with pytest.raises(SystemExit) as failed:
        translate(monkeypatch, scene, tmp_path / "out.tif", checkpoint, *RESUME)
    assert failed.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and line.startswith("error: No space left on device")
    assert "the job saved at step 2 of 7" in line and "rerun the same command" in line


# -- several translations of a scene (--samples_per_input) ------------------------------

SAMPLES = ("--sampler", "ddim", "--timestep_respacing", "ddim3", "--save_every", "1")


@pytest.fixture(scope="module")
def three_samples(tmp_path_factory, checkpoint):
    """A scene with a nodata strip translated once without the flag, once with
    --samples_per_input 1 and once with 3: (scene, folder)."""
    folder = tmp_path_factory.mktemp("samples")
    scene = write_scene(folder / "scene.tif", 40, 72, strip=5, seed=9)
    with pytest.MonkeyPatch.context() as patch:
        translate(patch, scene, folder / "plain.tif", checkpoint, *SAMPLES)
        translate(patch, scene, folder / "one.tif", checkpoint, *SAMPLES,
                  "--samples_per_input", "1")  # fmt: skip
        translate(patch, scene, folder / "out.tif", checkpoint, *SAMPLES,
                  "--samples_per_input", "3")  # fmt: skip
    return scene, folder


def test_one_sample_per_input_writes_what_a_run_without_the_flag_writes(three_samples):
    _, folder = three_samples
    for name in ("plain", "one"):
        assert sorted(p.name for p in folder.glob(f"{name}*")) == [
            f"{name}.tif", f"{name}_quicklook.png"
        ]  # fmt: skip
    for suffix in (".tif", "_quicklook.png"):
        assert (folder / f"one{suffix}").read_bytes() == (
            folder / f"plain{suffix}"
        ).read_bytes()


def test_three_samples_their_mean_and_spread(three_samples):
    scene, folder = three_samples
    assert sorted(p.name for p in folder.glob("out*")) == [
        "out.tif", "out_mean.tif", "out_quicklook.png", "out_sample1.tif",
        "out_sample2.tif", "out_spread.png", "out_spread.tif",
    ]  # fmt: skip
    assert not (folder / "out.tif.work").exists()
    # sample 0 is the run of one sample, to the bit, quick-look included
    for suffix in (".tif", "_quicklook.png"):
        assert (folder / f"out{suffix}").read_bytes() == (
            folder / f"plain{suffix}"
        ).read_bytes()
    samples = read_band_stack(*(folder / n for n in ("out.tif", "out_sample1.tif",
                                                     "out_sample2.tif")))  # fmt: skip
    assert not np.array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[0], samples[2])
    assert not np.array_equal(samples[1], samples[2])
    with rasterio.open(scene) as src:
        valid = np.isfinite(src.read()).all(axis=0)
        crs, transform = src.crs, src.transform
    assert not valid[:, :5].any() and valid[:, 5:].all()
    expected_mean = np.rint(samples.mean(axis=0))
    expected_spread = samples.std(axis=0, ddof=1)
    with rasterio.open(folder / "out_mean.tif") as src:
        mean, mean_profile, mean_names = src.read(), src.profile, src.descriptions
    with rasterio.open(folder / "out_spread.tif") as src:
        spread, spread_profile, spread_names = src.read(), src.profile, src.descriptions
    assert mean.dtype == np.uint8 and mean_profile["nodata"] is None  # a mask instead
    assert np.array_equal(mean[:, valid], expected_mean[:, valid])
    assert (mean[:, ~valid] == 0).all()
    assert spread.dtype == np.float32 and np.isnan(spread_profile["nodata"])
    assert np.allclose(spread[:, valid], expected_spread[:, valid], rtol=1e-6, atol=1e-5)
    assert np.isnan(spread[:, ~valid]).all() and spread[:, valid].max() > 0
    for profile in (mean_profile, spread_profile):
        assert profile["crs"] == crs and profile["transform"] == transform
    assert mean_names == spread_names == ("red", "green", "blue")
    picture = Image.open(folder / "out_spread.png")
    assert picture.mode == "RGB" and picture.width > 256  # the map enlarged, its legend


def test_a_stopped_run_of_three_samples_continues_to_the_same_files(
    three_samples, tmp_path, monkeypatch, checkpoint, capsys
):
    scene, reference = three_samples
    real_step = SceneSampler.step_once
    steps = []

    def terminated_in_sample_2(job):
        if job.key.get("sample") == 2 and job.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        real_step(job)
        steps.append((job.key.get("sample", 0), job.step))

    monkeypatch.setattr(SceneSampler, "step_once", terminated_in_sample_2)
    out = tmp_path / "out.tif"
    with pytest.raises(SystemExit) as stopped:
        translate(monkeypatch, scene, out, checkpoint, *SAMPLES, "--samples_per_input", "3")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    assert (tmp_path / "out_sample1.tif").exists()
    assert not (tmp_path / "out_sample2.tif").exists()
    assert not (tmp_path / "out_mean.tif").exists()
    work = tmp_path / "out.tif.work"
    assert json.loads((work / "samples.json").read_text())["done"] == [0, 1]
    assert json.loads((work / "sample2" / "job.json").read_text())["step"] == 2
    # another seed may not continue it
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        translate(monkeypatch, scene, out, checkpoint, *SAMPLES, "--samples_per_input",
                  "3", "--seed", "4")  # fmt: skip
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "2 finished sample(s) of a run with other settings (seed 0, not 4)" in err
    # the same command: sample 2 continues from its save, the others are kept
    steps.clear()
    translate(monkeypatch, scene, out, checkpoint, *SAMPLES, "--samples_per_input", "3")
    assert steps == [(2, 3)]
    assert "2 of 3 samples already translated" in capsys.readouterr().out
    for name in ("out.tif", "out_sample1.tif", "out_sample2.tif", "out_mean.tif",
                 "out_spread.tif", "out_spread.png", "out_quicklook.png"):  # fmt: skip
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name
    assert not work.exists()


def test_samples_in_optical_units_by_ground_control_points(
    tmp_path, monkeypatch, checkpoint
):
    scene = write_scene(tmp_path / "scene.tif", 24, 40, gcps=True, strip=3, seed=10)
    translate(monkeypatch, scene, tmp_path / "out.tif", checkpoint, *SAMPLES,
              "--output_units", "optical", "--samples_per_input", "2")  # fmt: skip
    samples = read_band_stack(tmp_path / "out.tif", tmp_path / "out_sample1.tif")
    with rasterio.open(tmp_path / "out_mean.tif") as src:
        mean, (gcps, _) = src.read(), src.gcps
        assert mean.dtype == np.float32 and np.isnan(src.nodata)
    with rasterio.open(tmp_path / "out_spread.tif") as src:
        spread = src.read()
    with rasterio.open(scene) as src:
        expected_gcps = src.gcps[0]
    assert [(p.row, p.col, p.x, p.y) for p in gcps] == [
        (p.row, p.col, p.x, p.y) for p in expected_gcps
    ]
    assert np.isnan(mean[:, :, :3]).all() and np.isnan(spread[:, :, :3]).all()
    assert np.allclose(mean[:, :, 3:], samples.mean(axis=0)[:, :, 3:], rtol=1e-6)
    assert np.allclose(spread[:, :, 3:], samples.std(axis=0, ddof=1)[:, :, 3:],
                       rtol=1e-5, atol=1e-3)  # fmt: skip
    assert spread[:, :, 3:].max() > 1  # optical units (0..3000), not grey levels
    assert Image.open(tmp_path / "out_spread.png").width > 256


def test_resampled_samples_come_back_on_the_inputs_grid(tmp_path, monkeypatch, checkpoint):
    coarse = Affine(20, 0, 600000, 0, -20, 5100000)
    scene = write_scene(tmp_path / "scene.tif", 20, 28, strip=4, seed=11, transform=coarse)
    translate(monkeypatch, scene, tmp_path / "out.tif", checkpoint, *SAMPLES,
              "--resample", "--samples_per_input", "2")  # fmt: skip
    for name in ("out_sample1.tif", "out_mean.tif", "out_spread.tif"):
        with rasterio.open(tmp_path / name) as src:
            assert (src.height, src.width) == (20, 28) and src.transform == coarse
    assert not (tmp_path / "out.tif.work").exists()


def test_no_samples_is_refused_naming_the_flag(tmp_path, monkeypatch, checkpoint, capsys):
    scene = write_scene(tmp_path / "scene.tif", 20, 20)
    with pytest.raises(SystemExit) as refused:
        translate(monkeypatch, scene, tmp_path / "out.tif", checkpoint,
                  "--samples_per_input", "0")  # fmt: skip
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --samples_per_input 0")
    assert not (tmp_path / "out.tif").exists()


# -- on several GPUs, shown on a CPU ----------------------------------------------------


def test_compile_sees_one_tile_batch_shape_as_the_tiles_move(tmp_path, monkeypatch, checkpoint):
    from guided_diffusion import dist_util
    from guided_diffusion.translation.scene import step_shift
    from guided_diffusion.translation.tiling import max_shift, tile_grid

    scene = write_scene(tmp_path / "scene.tif", 72, 100, seed=2)
    flags = ("--sampler", "ddim", "--timestep_respacing", "ddim3", "--batch_size", "7")
    plain, *_ = translate(monkeypatch, scene, tmp_path / "plain.tif", checkpoint, *flags)
    limit = max_shift(TILE, TILE // 2)
    counts = [  # the tiles of each of the 3 steps (seed 0)
        len(tile_grid(72, 100, TILE, TILE // 2, step_shift(0, step, limit)))
        for step in range(3)
    ]
    shapes = []

    class Compiled(th.nn.Module):  # torch.compile's module, recording its inputs
        def __init__(self, model, **options):
            super().__init__()
            self.model = model

        def forward(self, x, t, **kwargs):
            shapes.append(tuple(x.shape))
            return self.model(x, t, **kwargs)

    numerics = []
    monkeypatch.setattr(th, "compile", Compiled)
    monkeypatch.setattr(dist_util, "configure_numerics", lambda **how: numerics.append(how))
    compiled, *_ = translate(monkeypatch, scene, tmp_path / "compiled.tif", checkpoint,
                             *flags, "--compile", "True")  # fmt: skip
    # 24, 20, 20 tiles: last batches of 3 and 6 tiles, each padded to 7
    assert len({n % 7 for n in counts}) > 1 and all(n % 7 for n in counts)
    assert {s[0] for s in shapes} == {7} and len({s[2:] for s in shapes}) == 1
    assert numerics == [{"use_tf32": False, "cudnn_benchmark": True}]
    assert np.abs(compiled.astype(int) - plain).max() <= 1


def crash_in_step_3(monkeypatch, scene, out, checkpoint, *flags):
    """Run a job that saves at step 2 and dies in step 3; the work folder stays."""
    real_step = SceneSampler.step_once

    def crashes(job):
        if job.step == 2:
            raise MemoryError("the machine ran out")
        real_step(job)

    with monkeypatch.context() as patch:
        patch.setattr(SceneSampler, "step_once", crashes)
        with pytest.raises(MemoryError):
            translate(monkeypatch, scene, out, checkpoint, *flags)


def test_a_saved_job_continues_only_where_every_rank_reads_it_in_its_precisions(
    tmp_path, monkeypatch, checkpoint, capsys
):
    from guided_diffusion import dist_util

    scene = write_scene(tmp_path / "scene.tif", 40, 72, seed=6)
    out = tmp_path / "out.tif"
    crash_in_step_3(monkeypatch, scene, out, checkpoint, *RESUME)

    def refused():
        with pytest.raises(SystemExit) as stopped:
            translate(monkeypatch, scene, out, checkpoint, *RESUME)
        assert stopped.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]  # after progress bars
        assert line.startswith("error: ") and str(out) + ".work" in line
        return line

    # rank 1, on a machine of its own, finds no job in its OUTPUT.work
    with monkeypatch.context() as patch:
        patch.setattr(
            dist_util, "all_gather_object",
            lambda mine: [mine, None if isinstance(mine, (tuple, type(None))) else mine],
        )  # fmt: skip
        line = refused()
    assert "rank 0: step 2" in line and "rank 1: none" in line and "--work_dir" in line
    # the job as a GPU run of a float16 model with TF32 saves it: not on a CPU
    saved = tmp_path / "out.tif.work" / "job.json"
    job = json.loads(saved.read_text())
    key = {**job["key"], "use_fp16": True, "use_tf32": True}
    saved.write_text(json.dumps({**job, "key": key}))
    line = refused()
    assert "use_fp16 True" in line and "use_tf32 True" in line


def test_memory_auto_divides_the_memory_among_the_ranks_of_a_machine(
    tmp_path, monkeypatch, checkpoint, capsys
):
    from guided_diffusion import dist_util
    from guided_diffusion.translation import scene_translation
    from guided_diffusion.translation.scene import scene_bytes

    scene = write_scene(tmp_path / "scene.tif", 40, 72, seed=6)
    need = scene_bytes(40, 72, 2, False)
    # the arrays take 0.3 of the memory available: one rank holds them in memory
    monkeypatch.setattr(scene_translation, "available_memory", lambda: need / 0.3)
    flags = ("--timestep_respacing", "ddim2", "--memory", "auto")
    translate(monkeypatch, scene, tmp_path / "one.tif", checkpoint, *flags)
    logged = capsys.readouterr().out
    assert "GiB in memory" in logged and "memory-mapped" not in logged
    # two ranks on this machine (the same host name) would take 0.6 of it
    monkeypatch.setattr(dist_util, "all_gather_object", lambda mine: [mine, mine])
    translate(monkeypatch, scene, tmp_path / "two.tif", checkpoint, *flags)
    assert "in memory-mapped files" in capsys.readouterr().out
