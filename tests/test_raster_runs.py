"""
1-, 2- and 3-channel models trained on GeoTIFF and PNG data, then sampled with the
scaling their config.json recorded (no scaling flag repeated at sampling time).

The scripts run in this process (runpy), except one two-rank training under mpiexec.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from guided_diffusion.image_datasets import load_sar
from guided_diffusion.io.rasters import Scaling, load_sar_patch
from guided_diffusion.translation.sampling import sar_for_display, to_uint8

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "image_train.py")
SAMPLE = str(ROOT / "scripts" / "image_sample_realtime.py")
NLL = str(ROOT / "scripts" / "image_nll.py")
SIZE = 16
TINY = [f"--image_size={SIZE}", "--num_channels=32", "--num_res_blocks=1",
        "--channel_mult=1,2", "--attention_resolutions=8", "--diffusion_steps=50",
        "--learn_sigma=False"]  # fmt: skip
TRAIN_FLAGS = ["--batch_size=2", "--max_steps=2", "--save_interval=2",
               "--log_interval=1", "--num_workers=0"]  # fmt: skip
SAMPLE_FLAGS = ["--sampler=ddim", "--timestep_respacing=ddim3", "--batch_size=2"]


def write_tif(path, bands, names=None, nodata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = np.asarray(bands)
    with rasterio.open(
        path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
        count=len(bands), dtype=bands.dtype, nodata=nodata, crs="EPSG:32632",
        transform=Affine(10, 0, 500000, 0, -10, 5000000),
    ) as dst:  # fmt: skip
        dst.write(bands)
        for i, name in enumerate(names or ()):
            dst.set_band_description(i + 1, name)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_data(root, kind, rng):
    """
    A train/ and test/ folder of one kind of data. The optical image is a function
    of the SAR, so a pair's two sides carry the same pattern.

    :return: (train flags, test folder)
    """
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            grey = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
            rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
            sar, opt = root / split / "sar", root / split / "opt"
            db = -25 + grey.astype(np.float32) / 255 * 25
            if kind == "tif2":
                # SNAP's export: linear power, VH first, nodata 0 on a strip
                power = np.stack([10 ** ((db - 7) / 10), 10 ** (db / 10)])
                if i % 2:  # 4 of the 6 training pairs make 2 steps: 1 or more of these
                    power[:, :, :4] = 0.0
                write_tif(sar / f"{i}.tif", power.astype(np.float32),
                          names=["Sigma0_VH", "Sigma0_VV"])  # fmt: skip
                s2 = np.zeros((13, SIZE, SIZE), np.uint16)
                s2[[3, 2, 1]] = np.round(rgb.transpose(2, 0, 1) * (3000 / 255))
                write_tif(opt / f"{i}.tif", s2)
            elif kind == "tif1":
                write_tif(sar / f"{i}.tif", db[None])
                write_tif(opt / f"{i}.tif", rgb.transpose(2, 0, 1))
            elif kind == "tif3":
                write_tif(sar / f"{i}.tif", np.stack([grey, grey // 2, 255 - grey]))
                write_png(opt / f"{i}.png", rgb)
            else:
                write_png(sar / f"{i}.png", grey)
                write_png(opt / f"{i}.png", rgb)
    flags = {
        "tif2": ["--sar_channels=2", "--sar_input=power", "--sar_nodata=0",
                 "--opt_bands=4,3,2", "--opt_range=0,3000"],
        "tif1": ["--sar_channels=1", "--sar_input=db"],
        "tif3": ["--sar_channels=3"],
        "png1": ["--sar_channels=1"],
        "png3": ["--sar_channels=3"],
    }[kind]  # fmt: skip
    data = [
        f"--data_dir_sar={root / 'train' / 'sar'}",
        f"--data_dir_opt={root / 'train' / 'opt'}",
    ]
    return data + flags, root / "test"


def run_script(script, args, logdir, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(logdir))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        runpy.run_path(script, run_name="__main__")


def read(path):
    return np.asarray(Image.open(path))


EXPECTED_INPUTS = {
    "tif2": dict(sar_channels=2, sar_input="power", sar_band_names=["VV", "VH"],
                 sar_db_range=[[-25.0, 0.0], [-32.5, 0.0]], sar_nodata=0.0,
                 opt_bands=[4, 3, 2], opt_range=[0.0, 3000.0], pixel_size=[10.0, 10.0]),
    "tif1": dict(sar_channels=1, sar_input="db", sar_db_range=[[-25.0, 0.0]],
                 crs="EPSG:32632"),
    "tif3": dict(sar_channels=3, sar_input="uint8", sar_db_range=[]),
    "png1": dict(sar_channels=1, sar_input="uint8", pixel_size=None),
    "png3": dict(sar_channels=3, sar_input="uint8", opt_range=[]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(EXPECTED_INPUTS))
def test_train_then_sample_with_the_recorded_scaling(tmp_path, monkeypatch, kind):
    train_flags, test_dir = make_data(tmp_path / "data", kind, np.random.default_rng(0))
    run = tmp_path / "run"
    validation = [f"--val_data_dir={test_dir}", "--val_interval=2", "--val_num=2",
                  "--val_timestep_respacing=3"]  # fmt: skip
    run_script(TRAIN, [*train_flags, *TINY, *TRAIN_FLAGS, *validation], run, monkeypatch)
    assert (run / "val_000002.png").is_file()
    inputs = json.loads((run / "config.json").read_text())["inputs"]
    for key, value in EXPECTED_INPUTS[kind].items():
        assert inputs[key] == value, key

    # sampling is given no scaling flag: config.json's "inputs" decides
    run_script(SAMPLE, [f"--data_dir={test_dir}", f"--model_path={run / 'ema_0.9999_000002.pt'}",
                        *SAMPLE_FLAGS], run, monkeypatch)  # fmt: skip
    out = run / "sample_results" / "ddim3"
    assert json.loads((out / "run.json").read_text())["inputs"] == {
        k: v for k, v in inputs.items() if k not in ("crs", "pixel_size")
    }
    scaling = Scaling.from_record(inputs)
    for sar_path in sorted((test_dir / "sar").iterdir()):
        name = sar_path.stem + ".png"
        fed = sar_for_display(
            to_uint8(load_sar(str(sar_path), SIZE, scaling=scaling)[None])
        )[0]
        assert (
            read(out / "cond_sar" / name) == np.broadcast_to(fed, (SIZE, SIZE, 3))
        ).all()
        generated = read(out / "gen_opt" / name)
        assert generated.shape == (SIZE, SIZE, 3)
        _, valid, _ = load_sar_patch(str(sar_path), SIZE, scaling)
        assert (generated[~valid] == 0).all()  # nodata in, nodata out
        assert read(out / "gt_opt" / name).shape == (SIZE, SIZE, 3)
    # the likelihood reads the test pairs with the same record
    run_script(NLL, [f"--data_dir={test_dir}", f"--model_path={run / 'ema_0.9999_000002.pt'}"],
               tmp_path / "nll", monkeypatch)  # fmt: skip
    nll = json.loads((tmp_path / "nll" / "nll.json").read_text())
    assert nll["num_images"] == 2 and np.isfinite(nll["bpd"])
    if kind == "tif2":
        assert (read(out / "gen_opt" / "1.png")[:, :4] == 0).all()
        assert read(out / "gen_opt" / "1.png")[:, 4:].any()
        log = (run / "log.txt").read_text()
        assert "SAR pixels are nodata; nodata pixels are filled" in log


@pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)
def test_two_ranks_train_a_dual_polarisation_model_from_geotiff(tmp_path):
    train_flags, test_dir = make_data(
        tmp_path / "data", "tif2", np.random.default_rng(1)
    )
    run = tmp_path / "run"
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, TRAIN, *train_flags, *TINY,
         "--batch_size=1", "--max_steps=2", "--save_interval=2", "--num_workers=0"],
        env={**os.environ, "OPENAI_LOGDIR": str(run), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["inputs"]["sar_band_names"] == ["VV", "VH"]
    assert (run / "ema_0.9999_000002.pt").is_file()
    import torch as th

    weights = th.load(run / "ema_0.9999_000002.pt", map_location="cpu")
    assert weights["input_blocks.0.0.weight"].shape[1] == 3 + 2  # noisy RGB + VV, VH


def test_bad_rasters_and_ranges_stop_training_with_one_line(tmp_path, monkeypatch):
    train_flags, _ = make_data(tmp_path / "data", "tif2", np.random.default_rng(2))
    run = tmp_path / "run"
    cases = {
        "--sar_channels=1": "2 bands (Sigma0_VH, Sigma0_VV) but the model takes --sar_channels 1",
        "--sar_db_range=0,-25": "--sar_db_range 0,-25: the range 0,-25 needs min < max",
        "--sar_bands=HH,HV": "--sar_bands HH: ",
        "--sar_input=uint8": "holds float32 values, not 8-bit; --sar_input uint8",
    }
    for flag, expected in cases.items():
        name = flag.split("=")[0]
        args = [f for f in train_flags if not f.startswith(name + "=")] + [flag]
        with pytest.raises(SystemExit) as stop:
            run_script(TRAIN, [*args, *TINY, *TRAIN_FLAGS], run, monkeypatch)
        message = str(stop.value.code)
        assert message.startswith("error: ") and expected in message, message
        assert "\n" not in message
        assert not run.exists()  # stopped before a run folder was made
