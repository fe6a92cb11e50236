"""
The demo on the SEN12MS-like GeoTIFF tree: scripts/demo_report.py scoring a
tiny trained and sampled run (ground truth and SAR from the sampling run's
pictures, the mean image from the s2 rasters read as the model read them), and
demo.sh's DATA_FORMAT=sen12ms wiring.

demo.sh is checked dry, with a stand-in `python` first on PATH that records
every call: a real tiny run of demo.sh takes about 40 s on two busy cores, and
the scripts it calls are run for real by the first test with the same flags
(SCALING_FLAGS below is what demo.sh must pass to training).
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from guided_diffusion.demo import report
from guided_diffusion.demo.sen12ms import make_sen12ms_dataset
from guided_diffusion.io.rasters import Scaling

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "scripts" / "demo_report.py"

# what demo.sh passes to training for DATA_FORMAT=sen12ms, after the data folders
SCALING_FLAGS = [
    "--sar_input", "db", "--sar_channels", "2", "--opt_bands", "4,3,2", "--opt_range", "0,3000",
]  # fmt: skip
MODEL_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
    "--attention_resolutions 16 --learn_sigma False"
)
DIFFUSION_FLAGS = "--diffusion_steps 50 --noise_schedule linear --predict_xstart True"
TRAIN_FLAGS = "--lr 1e-3 --batch_size 4 --ema_rate 0.995 --num_workers 0"
LABELS = ["model", "training mean image", "SAR copied to RGB"]


def scripts_env(**extra):
    """The environment of a script run: this interpreter's PATH, one thread."""
    return {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """A 16+4 scene tree, a model trained 2 steps on it, its test set sampled in 2."""
    root = tmp_path_factory.mktemp("sen12ms_demo")
    data, run = root / "data", root / "run"
    make_sen12ms_dataset(
        data, num_train=16, num_test=4, image_size=32, seed=0, progress=False
    )
    env = scripts_env(OPENAI_LOGDIR=str(run))
    train = str(data / "train")
    commands = [
        ["scripts/image_train.py", "--data_dir_sar", train, "--data_dir_opt", train]
        + SCALING_FLAGS
        + f"{MODEL_FLAGS} {DIFFUSION_FLAGS} {TRAIN_FLAGS} --max_steps 2".split(),
        # no scaling flags: sampling reads them from the run's config.json
        ["scripts/image_sample_realtime.py", "--data_dir", str(data / "test")]
        + ["--model_path", str(run / "ema_0.995_000002.pt"), "--sampler", "ddim"]
        + "--timestep_respacing ddim2 --batch_size 4 --seed 0".split(),
    ]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, run, run / "sample_results" / "ddim2"


def run_report(monkeypatch, capsys, *args):
    """scripts/demo_report.py ARGS in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [str(REPORT), *map(str, args)])
        patch.setattr(sys, "path", list(sys.path))  # the script prepends the repo
        try:
            runpy.run_path(str(REPORT), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def pictures(folder):
    """The PNGs of a folder in name order, as uint8 RGB arrays."""
    paths = sorted(Path(folder).glob("*.png"))
    return [p.stem for p in paths], np.stack(
        [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    )


def as_written(scores):
    """Scores as demo_metrics.json holds them (an infinite PSNR is null)."""
    return {k: None if v == float("inf") else v for k, v in scores.items()}


def s2_rgb_mean(train_dir):
    """The mean of bands 4, 3, 2 of the s2 rasters, 0..3000 mapped to 0..255."""
    paths = sorted(Path(train_dir).glob("ROIs*/s2_*/*.tif"))
    total = 0.0
    for path in paths:
        with rasterio.open(path) as src:
            rgb = src.read([4, 3, 2]).astype(np.float64).transpose(1, 2, 0)
        total = total + np.clip(rgb * 255 / 3000, 0, 255)
    return len(paths), total / len(paths)


def test_report_scores_a_sen12ms_run(sampled, tmp_path, monkeypatch, capsys):
    data, run, results = sampled
    out = tmp_path / "report"
    code, stdout, stderr = run_report(
        monkeypatch, capsys, "--data_dir", data, "--gen_dir", results / "gen_opt",
        "--out", out,
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    figures = json.loads((out / "demo_metrics.json").read_text())
    assert figures["num_images"] == 4 and list(figures["rows"]) == LABELS
    for label in LABELS:
        assert label in stdout  # the table was printed
    # the mean image's bands and range were read from the training run
    assert f"bands 4,3,2, 0..3000 mapped to 0..255 (as {run / 'config.json'} says)" in (
        stdout
    )

    names, gen = pictures(results / "gen_opt")
    assert pictures(results / "gt_opt")[0] == names
    gt = pictures(results / "gt_opt")[1]
    cond = pictures(results / "cond_sar")[1]
    cls_maps = np.stack(
        [np.asarray(Image.open(data / "test" / "cls" / f"{n}.png")) for n in names]
    )
    colours = report.load_class_colours(data / "dataset.json")
    rows = figures["rows"]

    # the model against gt_opt, the ground truth scaled as the model saw it
    assert rows["model"] == as_written(report.score(gen, gt, cls_maps, colours))

    # the SAR baseline: cond_sar's VV channel (R = B = VV, G = VH) in all three
    assert np.array_equal(cond[..., 0], cond[..., 2])
    assert not np.array_equal(cond[..., 0], cond[..., 1])
    vv_rgb = np.repeat(cond[..., :1], 3, axis=-1)
    assert rows["SAR copied to RGB"] == as_written(
        report.score(vv_rgb, gt, cls_maps, colours)
    )

    # the mean image: bands 4,3,2 of the 16 s2 rasters, DN * 255 / 3000, averaged
    count, expected = s2_rgb_mean(data / "train")
    assert count == 16
    s2_files = sorted((data / "train").glob("ROIs*/s2_*/*.tif"))
    mean_image = report.mean_image_baseline(
        s2_files, 32, scaling=Scaling(opt_bands=(4, 3, 2), opt_range=(0.0, 3000.0))
    )
    # rounded to the nearest grey level; a mean exactly half way may go either way
    assert np.abs(mean_image - expected).max() <= 0.5 + 1e-4
    assert np.mean(mean_image == np.round(expected)) > 0.99
    expected_scores = report.score(
        np.broadcast_to(np.round(expected).astype(np.uint8), gt.shape),
        gt,
        cls_maps,
        colours,
    )
    for key, value in as_written(expected_scores).items():
        assert rows["training mean image"][key] == pytest.approx(value, abs=1e-3), key

    # the picture: 4 rows of SAR | generated | ground truth, the SAR as cond_sar shows it
    sep, title = report.SEPARATOR, report.TITLE_HEIGHT
    with Image.open(out / "demo.png") as img:
        assert img.size == (3 * 128 + 4 * sep, title + 4 * 128 + 5 * sep)
        picture = np.asarray(img.convert("RGB"))
    top = title + sep
    np.testing.assert_array_equal(
        picture[top : top + 128, sep : sep + 128], np.kron(cond[0], np.ones((4, 4, 1)))
    )

    # a results folder moved away from its training run: run.json's own record
    moved = tmp_path / "moved" / "ddim2"
    shutil.copytree(results, moved)
    record = json.loads((moved / "run.json").read_text())
    record["model_path"] = str(tmp_path / "gone" / "ema_0.995_000002.pt")
    (moved / "run.json").write_text(json.dumps(record))
    code, stdout, stderr = run_report(
        monkeypatch, capsys, "--data_dir", data, "--gen_dir", moved / "gen_opt",
        "--out", tmp_path / "moved_report",
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert f"(as {moved / 'run.json'} says)" in stdout
    moved_figures = json.loads((tmp_path / "moved_report" / "demo_metrics.json").read_text())
    assert moved_figures["rows"] == rows


def test_report_needs_the_sampling_runs_ground_truth(
    sampled, tmp_path, monkeypatch, capsys
):
    data, _, results = sampled
    gen_dir = tmp_path / "ddim2" / "gen_opt"
    shutil.copytree(results / "gen_opt", gen_dir)  # no gt_opt/ or cond_sar/ beside it
    code, stdout, stderr = run_report(
        monkeypatch, capsys, "--data_dir", data, "--gen_dir", gen_dir, "--out", tmp_path
    )
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{tmp_path / 'ddim2' / 'gt_opt'} is missing" in stderr


# -- demo.sh, dry ---------------------------------------------------------------------

# records its arguments, one call a line, fields separated by \x1f
FAKE_PYTHON = '#!/usr/bin/env bash\nprintf "%s\\037" "$@" >> "$DEMO_CALLS"\necho >> "$DEMO_CALLS"\n'
TINY = dict(
    NUM_TRAIN="16",
    NUM_TEST="4",
    STEPS="2",
    MODEL_FLAGS=MODEL_FLAGS,
    DIFFUSION_FLAGS=DIFFUSION_FLAGS,
    TRAIN_FLAGS=TRAIN_FLAGS,
    SAMPLER="ddim",
    SAMPLE_STEPS="2",
)
DEMO_SETTINGS = ("DATA_FORMAT", "DATA_DIR", "RUN_DIR", "SAMPLE_FLAGS")


def dry_demo(tmp_path, *args, **settings):
    """demo.sh with a `python` that only records its calls: (process, calls)."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DEMO_SETTINGS}
    env.update(TINY, **settings)
    env["PATH"] = str(fake.parent) + os.pathsep + os.environ["PATH"]
    env["DEMO_CALLS"] = str(calls)
    proc = subprocess.run(
        ["bash", str(REPO / "demo.sh"), *args], env=env, capture_output=True, text=True,
        timeout=60,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, [line.split("\x1f")[:-1] for line in lines]


def finished_run(tmp_path):
    """The files demo.sh checks for after training and sampling, at STEPS=2."""
    run = tmp_path / "run"
    (run / "sample_results" / "ddim2" / "gen_opt").mkdir(parents=True)
    (run / "ema_0.995_000002.pt").touch()
    return run


@pytest.mark.parametrize("data_format", ["sen12ms", None])
def test_demo_sh_passes_the_format_to_every_step(tmp_path, data_format):
    data, run = tmp_path / "data", finished_run(tmp_path)
    settings = dict(DATA_DIR=str(data), RUN_DIR=str(run))
    if data_format:
        settings["DATA_FORMAT"] = data_format
    proc, calls = dry_demo(tmp_path, **settings)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [c[0] for c in calls] == [
        "scripts/make_synthetic_dataset.py",
        "scripts/image_train.py",
        "scripts/image_sample_realtime.py",
        "scripts/demo_report.py",
    ]
    make, train, sample, report_call = calls
    dataset = ["--out", str(data), "--overwrite"]
    dataset += ["--num_train", "16", "--num_test", "4", "--image_size", "32"]
    if data_format == "sen12ms":
        assert make[1:] == dataset + ["--format", "sen12ms"]
        assert train[1:5] + train[5 : 5 + len(SCALING_FLAGS)] == [
            "--data_dir_sar", str(data / "train"), "--data_dir_opt", str(data / "train"),
            *SCALING_FLAGS,
        ]  # fmt: skip
        assert "as SEN12MS-like GeoTIFFs in" in proc.stdout
    else:  # the PNG demo, as it always was
        assert make[1:] == dataset
        assert train[1:5] == [
            "--data_dir_sar", str(data / "train" / "sar"),
            "--data_dir_opt", str(data / "train" / "opt"),
        ]  # fmt: skip
        assert "GeoTIFF" not in proc.stdout
    # sampling reads the scaling from the run's config.json, for either format
    assert sample[1:3] == ["--data_dir", str(data / "test")]
    assert not [a for a in sample if a.startswith(("--sar_", "--opt_"))]
    assert report_call[1:] == [
        "--data_dir", str(data), "--gen_dir", str(run / "sample_results" / "ddim2" / "gen_opt"),
        "--out", str(run),
    ]  # fmt: skip


def test_demo_sh_format_defaults_and_refusals(tmp_path):
    # the defaults of the variant (the run stops at the missing checkpoint)
    proc, _ = dry_demo(tmp_path, DATA_FORMAT="sen12ms")
    assert "GeoTIFFs in data/sen12ms32\n" in proc.stdout
    assert "training to step 2 in logs/demo_sen12ms " in proc.stdout

    proc, calls = dry_demo(tmp_path, DATA_FORMAT="tif")
    assert proc.returncode == 2 and not calls
    assert proc.stderr == (
        "demo.sh: unknown DATA_FORMAT tif; choose png (the default) or sen12ms\n"
    )

    # a PNG dataset (its dataset.json has no "format") is not used as a sen12ms one
    data = tmp_path / "png_data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"seed": 0, "image_size": 32}, indent=2))
    proc, calls = dry_demo(tmp_path, DATA_FORMAT="sen12ms", DATA_DIR=str(data))
    assert proc.returncode == 2 and not calls
    assert proc.stderr == (
        f"demo.sh: {data} holds a png dataset, not DATA_FORMAT=sen12ms; use another "
        f"DATA_DIR or delete {data}\n"
    )


@pytest.mark.parametrize("data_format", ["sen12ms", "png"])
def test_update_assets_bundles_the_sen12ms_model_and_keeps_the_png_picture(
    tmp_path, data_format
):
    data, run = tmp_path / "data", finished_run(tmp_path)
    proc, calls = dry_demo(tmp_path, "--update_assets", DATA_DIR=str(data),
                           RUN_DIR=str(run), DATA_FORMAT=data_format)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = [c for c in calls if c[0] == "scripts/demo_report.py"]
    bundle = [c for c in calls if c[0] == "-c"]
    if data_format == "sen12ms":  # the model, not the README's picture
        assert "--update_assets" not in report[0]
        assert "bundle_model" in bundle[0][1] and "assets/scene_model" in bundle[0][1]
        assert bundle[0][2] == str(run / "ema_0.995_000002.pt")
    else:
        assert report[0][-1] == "--update_assets" and not bundle


def test_a_bundled_model_names_no_path_of_this_machine(tmp_path, monkeypatch):
    from guided_diffusion.demo.report import bundle_model

    run = tmp_path / "repo" / "logs" / "run"
    run.mkdir(parents=True)
    (run / "ema_0.995_000010.pt").write_bytes(b"weights")
    config = {"data_dir_sar": str(tmp_path / "repo" / "data" / "train"),
              "data_dir_opt": "/elsewhere/opt", "image_size": 32, "lr": 1e-3}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path / "repo")
    path = bundle_model(run / "ema_0.995_000010.pt", "assets/scene_model")
    assert open(path, "rb").read() == b"weights"
    copied = json.loads((tmp_path / "repo" / "assets" / "scene_model" / "config.json").read_text())
    assert copied == {**config, "data_dir_sar": os.path.join("data", "train"),
                      "data_dir_opt": "opt"}  # fmt: skip


def test_the_dataset_script_writes_one_scene_to_translate(tmp_path):
    import rasterio

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic_dataset.py"), "--format",
         "scene", "--width", "90", "--height", "70", "--seed", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "scene_s1.tif") as src:
        assert (src.width, src.height, src.count) == (90, 70, 2)
        assert src.crs.to_epsg() == 32632 and src.transform.a == 10
    assert Image.open(tmp_path / "scene_rgb.png").size == (90, 70)
    assert f"translate_scene.py --input {tmp_path / 'scene_s1.tif'}" in proc.stdout
