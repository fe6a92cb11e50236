"""scripts/image_nll.py: bits/dim of a checkpoint on a paired folder, with the SAR condition."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import REAL_PAIRS, randomize_

from guided_diffusion.image_datasets import load_opt, load_sar, natural_key
from guided_diffusion.script_util import create_model_and_diffusion

REPO = Path(__file__).resolve().parents[1]
FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    diffusion_steps=30,
)


def test_nll_script_matches_the_bound_computed_directly(tmp_path):
    data = tmp_path / "data"
    # In the script's order: natural sort, p268 before p1008.
    names = sorted(sorted(os.listdir(REAL_PAIRS / "sar"))[:3], key=natural_key)
    for sub in ("sar", "opt"):
        (data / sub).mkdir(parents=True)
        for name in names:
            (data / sub / name).write_bytes((REAL_PAIRS / sub / name).read_bytes())
    model, diffusion = create_model_and_diffusion(**FLAGS)
    randomize_(model, seed=1)
    run = tmp_path / "train"
    run.mkdir()
    th.save(model.state_dict(), run / "model000001.pt")
    (run / "config.json").write_text(json.dumps(FLAGS))

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image_nll.py"), f"--data_dir={data}",
         f"--model_path={run / 'model000001.pt'}", "--seed=5"],
        env={**os.environ, "OPENAI_LOGDIR": str(out)}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "nll.json").read_text())
    assert sorted(report["per_image"]) == sorted(names)

    sar = th.from_numpy(np.stack([load_sar(str(data / "sar" / n), 32) for n in names]))
    opt = th.from_numpy(np.stack([load_opt(str(data / "opt" / n), 32) for n in names]))
    th.manual_seed(5)
    with th.no_grad():
        direct = diffusion.calc_bpd_loop(model.eval(), opt, condition=sar)["total_bpd"]
    got = th.tensor([report["per_image"][n]["bpd"] for n in names])
    th.testing.assert_close(got, direct, rtol=1e-4, atol=1e-4)
    assert report["bpd"] == pytest.approx(float(direct.mean()), rel=1e-4)
    # A random model is far from the data: several bits per dimension.
    assert bool(th.isfinite(got).all()) and float(got.min()) > 1.0


def test_nll_of_a_checkpoint_without_config_needs_the_flags_its_weights_do_not_tell(
    tmp_path, run_in_process
):
    data = tmp_path / "data"
    name = sorted(os.listdir(REAL_PAIRS / "sar"))[0]
    for sub in ("sar", "opt"):
        (data / sub).mkdir(parents=True)
        (data / sub / name).write_bytes((REAL_PAIRS / sub / name).read_bytes())
    model, diffusion = create_model_and_diffusion(**FLAGS)
    randomize_(model, seed=2)
    th.save(model.state_dict(), tmp_path / "ema_0.9999_000001.pt")  # no config.json

    def run(*flags):
        # In this process: the test above is the script's real launch.
        return run_in_process(
            REPO / "scripts" / "image_nll.py",
            [f"--data_dir={data}", f"--model_path={tmp_path / 'ema_0.9999_000001.pt'}",
             "--seed=5", *flags],
            env={"OPENAI_LOGDIR": tmp_path / "out"},
        )  # fmt: skip

    proc = run()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--diffusion_steps" in proc.stderr and "--noise_schedule" in proc.stderr
    assert not (tmp_path / "out" / "nll.json").exists()

    proc = run(
        "--image_size=32", "--diffusion_steps=30", "--noise_schedule=linear",
        "--num_heads=4", "--num_head_channels=-1", "--num_heads_upsample=-1",
        "--use_new_attention_order=False", "--predict_xstart=False",
        "--rescale_timesteps=False", "--sigma_small=False",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "read off its weights" in proc.stdout
    sar = th.from_numpy(load_sar(str(data / "sar" / name), 32)[None])
    opt = th.from_numpy(load_opt(str(data / "opt" / name), 32)[None])
    th.manual_seed(5)
    with th.no_grad():
        direct = diffusion.calc_bpd_loop(model.eval(), opt, condition=sar)["total_bpd"]
    report = json.loads((tmp_path / "out" / "nll.json").read_text())
    assert report["per_image"][name]["bpd"] == pytest.approx(float(direct), rel=1e-4)
