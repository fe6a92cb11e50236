"""
What each job writes, recorded before the jobs' code was restructured (issue 22), so
that moving the folder loop, the scene runner, the page and validation into one
library function per job can be shown to change no output.

Every job runs as a user runs it, on small fixtures with the bundled model
(assets/scene_model/, 32 px, VV and VH in dB) and a few steps, on SAR GeoTIFFs with
nodata:

* ``folder_k1``, ``folder_k3``: scripts/image_sample_realtime.py on a folder of two
  patches (one with a nodata stripe in its VH band) with optical ground truth, once
  and with ``--samples_per_input 3``;
* ``scene_k2_resumed``: scripts/translate_scene.py on a small scene with a nodata
  strip, ``--samples_per_input 2``, stopped by SIGTERM in the second sample (after
  its save) and run again to the end; the files beside the output when it stopped,
  and the steps run before and after the stop, are recorded too;
* ``page_patch``, ``page_scene``: the page's two routes (guided_diffusion/page/app.py's
  Translator, without a browser), three and two samples;
* ``validation``: scripts/image_train.py resumed from the bundled weights with a
  learning rate of 0 for one step, validating on the folder (its grid, and its
  scores to a thousandth).

Each output file is compared by its name relative to the job's folder: images and
arrays decoded, at most one grey level apart (a convolution's last bits differ
between processors; none is expected on the same one); file names, dtypes, shapes,
georeference (CRS, transform, ground control points, nodata value, band names, the
dataset mask) and the JSON a run writes exactly. Left out, because they change from
run to run or are not outputs: the JSON fields of :data:`PER_RUN` (dates, times,
versions); absolute paths, which are compared with the run's folders replaced by
placeholders; the text of logs (times, speeds); checkpoints the training run writes
(its weights are the bundled ones: the learning rate is 0); the page's time and
the order of the flags in its command. To record anew, after a change meant to
change the outputs: ``SAR2OPT_RECORD=1 python -m pytest tests/test_recorded_jobs.py``.
"""

import json
import os
import shlex
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DATA_DIR
from PIL import Image
from rasterio.transform import Affine

ROOT = Path(__file__).resolve().parents[1]
RECORD_DIR = DATA_DIR / "recorded_jobs"
SAMPLE = ROOT / "scripts" / "image_sample_realtime.py"
SCENE = ROOT / "scripts" / "translate_scene.py"
TRAIN = ROOT / "scripts" / "image_train.py"
EXAMPLES = ROOT / "assets" / "examples"
BUNDLED = ROOT / "assets" / "scene_model"
PAGE_MODEL = "scene_model (bundled demo)"
RECORDING = bool(os.environ.get("SAR2OPT_RECORD"))
# JSON fields that differ between two runs of the same job: when and with what
# software it ran, not what it made
PER_RUN = {"torch", "date", "time", "started", "finished", "seconds", "python"}
pytestmark = pytest.mark.usefixtures("one_thread")


# -- the fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """sar/ and opt/: fields (nodata in VH: a stripe and a dash), river (none)."""
    data = tmp_path_factory.mktemp("folder")
    (data / "sar").mkdir()
    (data / "opt").mkdir()
    with rasterio.open(EXAMPLES / "fields_32.tif") as src:
        profile, bands = src.profile, src.read()
    bands[1][:, :6] = np.nan
    bands[1][20, 10:14] = np.nan
    with rasterio.open(data / "sar" / "fields.tif", "w", **profile) as dst:
        dst.write(bands)
        dst.descriptions = ("VV", "VH")
    shutil.copy(EXAMPLES / "river_32.tif", data / "sar" / "river.tif")
    for seed, name in enumerate(("fields", "river")):
        # Sentinel-2 L1C: 13 bands of digital numbers, some above the 0..3000 range
        dn = np.random.default_rng(seed).integers(0, 4000, (13, 32, 32))
        with rasterio.open(data / "opt" / f"{name}.tif", "w", driver="GTiff", width=32,
                           height=32, count=13, dtype="uint16", crs="EPSG:32632",
                           transform=Affine(10, 0, 500000, 0, -10, 5400000)) as dst:  # fmt: skip
            dst.write(dn.astype(np.uint16))
    return data


def write_scene(path, height=40, width=56):
    """The example scene's top-left corner, moved, with a nodata strip and hole."""
    with rasterio.open(EXAMPLES / "scene_64x96.tif") as src:
        profile, bands = src.profile, src.read()[:, :height, :width]
    bands[:, :, :5] = np.nan
    bands[:, 30:33, 20:26] = np.nan
    place = Affine(10, 0, 431270, 0, -10, 5012390)
    profile.update(height=height, width=width, transform=place)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
        dst.descriptions = ("VV", "VH")
    return path


# -- what a job wrote, as the record holds it ----------------------------------------


def placeholders(value, places):
    """``value`` with each folder of ``places`` (name -> path) written as <name>."""
    if isinstance(value, dict):
        return {
            k: placeholders(v, places) for k, v in value.items() if k not in PER_RUN
        }
    if isinstance(value, list):
        return [placeholders(v, places) for v in value]
    if isinstance(value, str):
        for name, path in places.items():
            value = value.replace(str(path), f"<{name}>")
    return value


def georeference(src):
    """What places a GeoTIFF and says where it has data."""
    gcps, gcp_crs = src.gcps
    nodata = src.nodata
    return {
        "crs": src.crs.to_wkt() if src.crs else None,
        "transform": list(src.transform)[:6],
        "gcps": [[p.row, p.col, p.x, p.y] for p in gcps],
        "gcp_crs": gcp_crs.to_wkt() if gcp_crs else None,
        "nodata": "nan" if nodata is not None and np.isnan(nodata) else nodata,
        "descriptions": list(src.descriptions),
        "dtype": src.dtypes[0],
        "shape": [src.count, src.height, src.width],
    }


def read_outputs(root, places, skip=()):
    """
    The files under ``root``: facts compared exactly, and arrays within a grey level.

    :param places: folders whose paths the JSON files may name (see placeholders).
    :param skip: suffixes of files whose contents are not outputs (names only).
    :return: (facts: relative name -> dict, arrays: "name" or "name:key" -> array).
    """
    facts, arrays = {}, {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        fact = {}
        if path.suffix in skip:
            pass
        elif path.suffix == ".png":
            with Image.open(path) as image:
                fact["mode"] = image.mode
                arrays[name] = np.asarray(image)
        elif path.suffix == ".tif":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    fact.update(georeference(src))
                    arrays[name] = src.read()
                    arrays[name + ":mask"] = src.dataset_mask()
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                for key in npz.files:
                    arrays[f"{name}:{key}"] = npz[key]
                fact["keys"] = sorted(npz.files)
        elif path.suffix == ".json":
            fact["json"] = placeholders(json.loads(path.read_text()), places)
        facts[name] = fact
    for key, array in arrays.items():
        name, _, part = key.partition(":")
        shape = "x".join(map(str, array.shape))
        facts[name].setdefault("arrays", {})[part or "pixels"] = (
            f"{array.dtype} {shape}"
        )
    return facts, arrays


def check(job, facts, arrays, near=()):
    """
    Compare with the record of ``job``, or write it when recording.

    :param near: names of facts that are numbers computed from the pixels (scores):
        compared to a thousandth, as a grey level's change moves them.
    """
    facts = json.loads(json.dumps(facts))  # as the file holds it: lists, not tuples
    if RECORDING:
        RECORD_DIR.mkdir(exist_ok=True)
        np.savez_compressed(RECORD_DIR / f"{job}.npz", **arrays)
        (RECORD_DIR / f"{job}.json").write_text(json.dumps(facts, indent=1) + "\n")
    recorded = json.loads((RECORD_DIR / f"{job}.json").read_text())
    with np.load(RECORD_DIR / f"{job}.npz") as npz:
        recorded_arrays = {key: npz[key] for key in npz.files}
    assert sorted(facts) == sorted(recorded), f"{job}: other files or facts"
    for name in recorded:
        expected = recorded[name]
        if name in near:
            expected = {k: pytest.approx(v, rel=1e-3) for k, v in expected.items()}
        assert facts[name] == expected, f"{job}: {name}"
    assert sorted(arrays) == sorted(recorded_arrays)
    for key, ref in recorded_arrays.items():
        out = arrays[key]
        assert out.dtype == ref.dtype and out.shape == ref.shape, f"{job}: {key}"
        if out.dtype.kind in "fiu" and not key.endswith(":mask"):
            out, ref = out.astype(np.float64), ref.astype(np.float64)
            assert np.array_equal(np.isnan(out), np.isnan(ref)), f"{job}: {key} nodata"
            diff = np.abs(np.nan_to_num(out) - np.nan_to_num(ref))
            assert diff.max(initial=0) <= 1, (
                f"{job}: {key}: {np.count_nonzero(diff > 1)} values differ from the "
                f"record by more than a grey level, by up to {diff.max()}"
            )
        else:
            assert np.array_equal(out, ref), f"{job}: {key}"


# -- the jobs ------------------------------------------------------------------------


def sample_folder(run_in_process, folder, logdir, *flags):
    args = ["--data_dir", folder, "--model_path", BUNDLED / "model.pt", "--sampler", "ddpm",
            "--timestep_respacing", 4, "--batch_size", 2, "--seed", 5, *flags]  # fmt: skip
    proc = run_in_process(SAMPLE, args, env={"OPENAI_LOGDIR": logdir,
                                             "OPENAI_LOG_FORMAT": None})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_outputs(
        logdir, {"data": folder, "model": BUNDLED}, skip=(".txt", ".csv")
    )


@pytest.mark.parametrize("k", [1, 3])
def test_a_folder_run_writes_the_recorded_files(k, folder, tmp_path, run_in_process):
    flags = ["--samples_per_input", k] if k > 1 else []
    check(
        f"folder_k{k}", *sample_folder(run_in_process, folder, tmp_path / "log", *flags)
    )


def test_a_scene_run_stopped_and_run_again_writes_the_recorded_files(
    tmp_path, run_in_process, monkeypatch
):
    from guided_diffusion.unet import UNetModel

    scene = write_scene(tmp_path / "scene.tif")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--input", scene, "--output", out / "optical.tif", "--model_path",
            BUNDLED / "model.pt", "--sampler", "ddpm", "--timestep_respacing", 4,
            "--samples_per_input", 2, "--batch_size", 4, "--seed", 2]  # fmt: skip
    # SIGTERM, as a cluster's scheduler sends it, in the second step of the second
    # sample (the 6th step: a step is a run of network calls at one timestep)
    real_forward, steps, stop_at = UNetModel.forward, [], [6]

    def forward(model, x, t, **kwargs):
        if not steps or not np.array_equal(steps[-1], t[:1].numpy()):
            steps.append(t[:1].numpy())
            if len(steps) in stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(model, x, t, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", forward)
    stopped = run_in_process(SCENE, args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    # beside the output: sample 0's files, and the work folder (its contents are
    # the job's to choose)
    beside = sorted(p.name for p in out.iterdir())
    before, steps[:], stop_at[:] = len(steps), [], []
    finished = run_in_process(SCENE, args)
    assert finished.returncode == 0, finished.stderr[-2000:]
    facts, arrays = read_outputs(out, {})
    # the steps run before the stop and after it: the second run continues from
    # the save, it does not start sample 1 again
    facts["stopped"] = {"files": beside, "steps": [before, len(steps)]}
    check("scene_k2_resumed", facts, arrays)


def shown_command(command):
    """The page's command as (script, flag -> value), in no order."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "python"
    flags = {}
    for flag, value in zip(argv[2:], [*argv[3:], ""]):
        if flag.startswith("--"):
            flags[flag] = "" if value.startswith("--") else value
    return {"script": argv[1], "flags": dict(sorted(flags.items()))}


@pytest.mark.parametrize("route", ["patch", "scene"])
def test_a_page_route_gives_the_recorded_result_and_files(
    route, folder, tmp_path, monkeypatch
):
    from guided_diffusion.page import app

    monkeypatch.chdir(ROOT)  # the page shows paths relative to where it runs
    if route == "patch":  # the folder's patch with nodata, at the model's size
        upload = folder / "sar" / "fields.tif"
        choices = dict(sampler="ddim", steps=3, seed=7, samples=3)
    else:
        upload = write_scene(tmp_path / "my scene.tif")
        choices = dict(sampler="dpm++2m", steps=4, seed=5, samples=2)
    work = tmp_path / "page"
    translator = app.Translator(app.find_models(), work_dir=str(work))
    result = translator.translate(str(upload), PAGE_MODEL, **choices)
    facts, arrays = read_outputs(work, {})
    (request,) = {Path(name).parts[0] for name in facts}
    facts = {Path(name).relative_to(request).as_posix(): f for name, f in facts.items()}
    arrays = {str(Path(key).relative_to(request)): a for key, a in arrays.items()}
    shown = {
        "route": result.route,
        "samples": result.samples,
        "notes": result.notes,
        "command": shown_command(result.command),
        "downloads": [os.path.relpath(p, work / request) for p in result.downloads()],
        "png": os.path.relpath(result.png, work / request),
        "geotiff": result.geotiff and os.path.relpath(result.geotiff, work / request),
        "mean": result.mean and os.path.relpath(result.mean, work / request),
        "spread": result.spread and os.path.relpath(result.spread, work / request),
    }
    facts["result"] = shown
    arrays.update({"result:image": result.image, "result:sar": result.sar})
    check(f"page_{route}", facts, arrays)


def test_validation_during_training_gives_the_recorded_grid_and_scores(
    folder, tmp_path, run_in_process
):
    config = json.loads((BUNDLED / "config.json").read_text())
    architecture = ("image_size", "num_channels", "num_res_blocks", "channel_mult",
                    "attention_resolutions", "num_heads", "use_scale_shift_norm",
                    "learn_sigma", "predict_xstart", "diffusion_steps", "noise_schedule",
                    "sar_channels", "sar_input", "opt_bands", "opt_range")  # fmt: skip
    start = tmp_path / "start"
    start.mkdir()
    shutil.copy(BUNDLED / "model.pt", start / "model000010.pt")
    run = tmp_path / "run"
    # a learning rate of 0: the bundled weights are validated, whatever the step does
    args = [f"--{k}={config[k]}" for k in architecture] + [
        f"--data_dir_sar={folder / 'sar'}", f"--data_dir_opt={folder / 'opt'}",
        f"--resume_checkpoint={start / 'model000010.pt'}", "--lr=0", "--max_steps=11",
        "--batch_size=2", "--num_workers=0", "--save_interval=100", "--log_interval=1",
        "--progress=False", f"--val_data_dir={folder}", "--val_interval=1", "--val_num=2",
        "--val_sampler=ddim", "--val_timestep_respacing=ddim4", "--seed=3",
    ]  # fmt: skip
    proc = run_in_process(
        TRAIN, args, env={"OPENAI_LOGDIR": run, "OPENAI_LOG_FORMAT": None}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts, arrays = read_outputs(run, {"data": folder, "start": start, "run": run},
                                 skip=(".pt", ".txt", ".csv"))  # fmt: skip
    rows = (run / "progress.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    facts["scores"] = {k: float(last[k]) for k in ("val_ssim", "val_psnr")}
    check("validation", facts, arrays, near=("scores",))


JOBS = ["folder_k1", "folder_k3", "scene_k2_resumed", "page_patch", "page_scene",
        "validation"]  # fmt: skip


def test_every_job_is_recorded():
    recorded = sorted(p.name for p in RECORD_DIR.iterdir())
    assert recorded == sorted(f"{job}.{ext}" for job in JOBS for ext in ("json", "npz"))


@pytest.mark.parametrize("job", JOBS)
def test_the_records_are_images_worth_comparing(job):
    # a record that is all one value, or mostly clipped, would hide a change
    with np.load(RECORD_DIR / f"{job}.npz") as npz:
        images = {k: npz[k] for k in npz.files if npz[k].dtype == np.uint8
                  and not k.endswith(":mask") and npz[k].size >= 32 * 32 * 3}  # fmt: skip
    assert images
    for key, pixels in images.items():
        clipped = np.mean((pixels == 0) | (pixels == 255))
        assert clipped < 0.5 and len(np.unique(pixels)) > 32, f"{job}: {key}"
