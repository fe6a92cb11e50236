"""
Sampling: per-image noise, the sampling script, its results folder and sample.sh.

The reference facts: every input of a real SEN1-2 test folder gets exactly one
output under its own name; an image's noise depends only on (seed, name), so one
process at batch 4 and two ranks at batch 1 give the same images; a rerun only
fills in what is missing; a different seed never writes into a finished folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import (
    REAL_PAIRS,
    TINY_FLAGS,
    RecordingModel,
    randomize_,
    tiny_model_and_diffusion,
)
from PIL import Image

from guided_diffusion.base.samplers import SAMPLERS, noise_of_shape
from guided_diffusion.translation.sampling import (
    load_model,
    make_generators,
    read_run_config,
    sample_seed,
    to_uint8,
    translate,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = str(REPO / "scripts" / "image_sample_realtime.py")
SAMPLE_FLAGS = ["--timestep_respacing", "10", "--batch_size", "4"]


@pytest.fixture(scope="module")
def data_dir():
    return REAL_PAIRS


@pytest.fixture(scope="module")
def input_names(data_dir):
    """The SAR names in natural order: by the patch number after "_p"."""
    names = os.listdir(data_dir / "sar")
    return sorted(names, key=lambda n: int(n.rsplit("_p", 1)[1].split(".")[0]))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """A tiny model with every weight random, saved as a training run saves it."""
    return tiny_checkpoint


def run_sample(args, logdir, *, launcher=(), expect_rc=0, timeout=120):
    env = {
        **os.environ,
        "OPENAI_LOGDIR": str(logdir),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [*launcher, sys.executable, SCRIPT, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def in_process_sampler(run_in_process):
    """
    run_sample's twin that runs the script in this process (conftest.run_in_process):
    for refusals and reruns whose real launch other tests here cover.
    """

    def sample(args, logdir, *, expect_rc=0):
        proc = run_in_process(SCRIPT, args, env={"OPENAI_LOGDIR": logdir})
        assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    return sample


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, checkpoint, data_dir):
    """One process, batch 4, no model flags: they must come from config.json."""
    logdir = tmp_path_factory.mktemp("samples")
    args = ["--model_path", checkpoint, "--data_dir", data_dir, *SAMPLE_FLAGS]
    run_sample(args, logdir)
    return logdir / "sample_results" / "ddpm10"


def png_names(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def read_png(path):
    return np.asarray(Image.open(path))


def snapshot(folder):
    """Every file under ``folder``: relative path -> (mtime_ns, bytes)."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    }


def one_line_error(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- per-image noise ------------------------------------------------------------


def test_sample_seed_is_stable_across_processes():
    name = "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.png"
    code = (
        "from guided_diffusion.translation.sampling import sample_seed; "
        f"print(sample_seed(7, {name!r}), hash({name!r}))"
    )
    # One other process (each imports torch), with a string hash that differs from
    # this process's: hash seed 1, or 2 if this process runs with seed 1.
    for hash_seed in (1, 2):
        seed, string_hash = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        if int(string_hash) != hash(name):
            break
    assert int(string_hash) != hash(name)
    assert seed == str(sample_seed(7, name))
    assert 0 <= sample_seed(7, name) < 2**63
    assert sample_seed(7, name) != sample_seed(7, name.replace("p30", "p31"))
    assert sample_seed(7, name) != sample_seed(8, name)


def test_noise_of_an_image_does_not_depend_on_its_batch():
    names = [f"{i}.png" for i in range(4)]
    together = noise_of_shape((4, 3, 8, 8), make_generators(0, names), "cpu")
    alone = [
        noise_of_shape((1, 3, 8, 8), make_generators(0, [n]), "cpu") for n in names
    ]
    assert th.equal(together, th.cat(alone))
    assert not th.equal(together[0], together[1])

    # The same through translate: the model's first input holds x_T.
    _, diffusion = tiny_model_and_diffusion(timestep_respacing="3")
    sar = th.rand(4, 3, 8, 8) * 2 - 1
    recorder = RecordingModel(out_channels=3)
    translate(recorder, diffusion, sar, generators=make_generators(0, names))
    x_t_batch = recorder.calls[0]["x"][:, :3]
    for i, name in enumerate(names):
        single = RecordingModel(out_channels=3)
        translate(
            single, diffusion, sar[i : i + 1], generators=make_generators(0, [name])
        )
        assert th.equal(single.calls[0]["x"][:, :3], x_t_batch[i : i + 1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_size_changes_images_by_at_most_one_grey_level(sampler):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="3")
    randomize_(model, seed=2)
    sar = th.rand(4, 3, 32, 32, generator=th.Generator().manual_seed(0)) * 2 - 1
    names = [f"{i}.png" for i in range(4)]
    batch = to_uint8(
        translate(
            model, diffusion, sar, sampler=sampler, generators=make_generators(3, names)
        )
    )
    singles = np.concatenate(
        [
            to_uint8(
                translate(
                    model,
                    diffusion,
                    sar[i : i + 1],
                    sampler=sampler,
                    generators=make_generators(3, [n]),
                )
            )
            for i, n in enumerate(names)
        ]
    )
    assert np.abs(batch.astype(int) - singles).max() <= 1
    assert np.abs(batch[0].astype(int) - batch[1]).max() > 10  # not a constant output


def test_to_uint8_maps_minus_one_to_one_onto_0_to_255():
    x = th.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (2, 1, 5, 3) and out.dtype == np.uint8
    # (x + 1) * 127.5, rounded half to even, clamped: 0 -> 127.5 -> 128
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_load_model_names_what_does_not_fit(checkpoint):
    assert read_run_config(checkpoint)["num_channels"] == TINY_FLAGS["num_channels"]
    model = load_model(checkpoint, TINY_FLAGS, "cpu")
    assert not model.training
    with pytest.raises(ValueError, match=r"model000010\.pt does not fit") as err:
        load_model(checkpoint, {**TINY_FLAGS, "num_res_blocks": 2}, "cpu")
    assert "trained with `--num_res_blocks 1`; the flags say 2" in str(err.value)
    assert "config.json" in str(err.value)


def test_an_fp16_run_is_loaded_in_float32_on_a_cpu(checkpoint, capsys):
    flags = {**TINY_FLAGS, "use_fp16": True}
    model = load_model(checkpoint, flags, "cpu")
    assert {p.dtype for p in model.parameters()} == {th.float32}
    assert "float32" in capsys.readouterr().out
    _, diffusion = tiny_model_and_diffusion(timestep_respacing="3")
    sar = th.rand(2, 3, 32, 32, generator=th.Generator().manual_seed(0)) * 2 - 1
    out = translate(model, diffusion, sar, generators=make_generators(0, ["a", "b"]))
    assert out.dtype == th.float32 and bool(th.isfinite(out).all())
    # The same weights sampled in float32 from the start give the same images.
    reference = load_model(checkpoint, TINY_FLAGS, "cpu")
    expected = translate(
        reference, diffusion, sar, generators=make_generators(0, ["a", "b"])
    )
    assert th.equal(out, expected)

    load_model(checkpoint, flags, "cpu", use_bf16=True)
    line = [x for x in capsys.readouterr().out.splitlines() if "use_fp16" in x]
    assert len(line) == 1 and "bfloat16" in line[0]


# -- the script -----------------------------------------------------------------


def test_every_input_gets_one_output_under_its_name(first_run, input_names, checkpoint):
    expected = sorted(n[: -len(".png")] + ".png" for n in input_names)
    for kind in ("gen_opt", "cond_sar", "gt_opt"):
        assert png_names(first_run / kind) == expected
    sar = read_png(first_run / "cond_sar" / input_names[0])
    assert sar.shape == (32, 32, 3)
    assert (sar[..., 0] == sar[..., 1]).all()  # single-band SAR fed as 3 equal channels

    npz = np.load(first_run / "samples_15x32x32x3.npz")
    assert npz["names"].tolist() == input_names
    for name, image in zip(input_names, npz["arr_0"]):
        assert np.array_equal(image, read_png(first_run / "gen_opt" / name))

    run = json.loads((first_run / "run.json").read_text())
    # No model flag was given: a 128-channel default model could not have loaded.
    assert run["num_channels"] == TINY_FLAGS["num_channels"]
    assert run["model_path"] == str(checkpoint) and run["seed"] == 0


@pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)
def test_two_ranks_at_batch_1_match_one_process_at_batch_4(
    tmp_path, first_run, checkpoint, data_dir, input_names
):
    args = [
        "--model_path",
        checkpoint,
        "--data_dir",
        data_dir,
        "--timestep_respacing",
        "10",
        "--batch_size",
        "1",
    ]
    proc = run_sample(args, tmp_path, launcher=["mpiexec", "-n", "2"], timeout=180)
    assert "translated 8 + 7 images (per process)" in proc.stdout  # disjoint shares
    results = tmp_path / "sample_results" / "ddpm10"
    assert png_names(results / "gen_opt") == png_names(first_run / "gen_opt")
    npz = np.load(results / "samples_15x32x32x3.npz")
    assert npz["names"].tolist() == input_names
    reference = np.load(first_run / "samples_15x32x32x3.npz")["arr_0"]
    assert np.abs(npz["arr_0"].astype(int) - reference).max() <= 1


def test_rerun_fills_in_only_missing_images_and_another_seed_refuses(
    tmp_path, first_run, checkpoint, data_dir, run_in_process
):
    logdir = tmp_path / "logs"
    shutil.copytree(first_run.parents[1], logdir)  # keeps the modification times
    results = logdir / "sample_results" / "ddpm10"
    removed = sorted(png_names(results / "gen_opt"))[:3]
    for name in removed:
        (results / "gen_opt" / name).unlink()
    before = snapshot(results)

    args = ["--model_path", checkpoint, "--data_dir", data_dir, *SAMPLE_FLAGS]
    proc = run_sample(args, logdir)
    assert "12 of 15 images already in" in proc.stdout
    after = snapshot(results)
    changed = sorted(k for k in after if before.get(k, (None,))[0] != after[k][0])
    npz = [k for k in after if k.endswith(".npz")]
    # The 3 images, their condition and ground truth, and the npz are rewritten.
    assert changed == sorted(
        [f"{kind}/{n}" for kind in ("gen_opt", "cond_sar", "gt_opt") for n in removed]
        + npz
    )
    for name in removed:
        again = read_png(results / "gen_opt" / name).astype(int)
        assert np.abs(again - read_png(first_run / "gen_opt" / name)).max() <= 1

    sample = in_process_sampler(run_in_process)
    line = one_line_error(sample([*args, "--seed", "1"], logdir, expect_rc=2))
    assert str(results) in line and "seed" in line and "OPENAI_LOGDIR" in line
    assert snapshot(results) == after


def test_use_ddim_and_a_flag_that_differs_from_config(tmp_path, checkpoint, data_dir):
    args = ["--model_path", checkpoint, "--data_dir", data_dir, "--use_ddim", "True"]
    args += [
        "--timestep_respacing",
        "ddim5",
        "--num_samples",
        "2",
        "--predict_xstart",
        "True",
    ]
    proc = run_sample(args, tmp_path)
    warning = [
        line for line in proc.stdout.splitlines() if "--predict_xstart True" in line
    ]
    assert len(warning) == 1 and "config.json" in warning[0]
    results = tmp_path / "sample_results" / "ddim5"
    assert len(png_names(results / "gen_opt")) == 2
    run = json.loads((results / "run.json").read_text())
    assert run["sampler"] == "ddim" and run["predict_xstart"] is True


def test_user_errors_are_one_line_with_status_2(
    tmp_path, checkpoint, data_dir, run_in_process
):
    base = ["--model_path", checkpoint, "--data_dir", data_dir]
    # A real process for the first: the status and stderr the user sees.
    misfit = one_line_error(
        run_sample([*base, "--num_channels", "64"], tmp_path, expect_rc=2)
    )
    assert str(checkpoint) in misfit and "does not fit" in misfit
    assert "trained with `--num_channels 32`; the flags say 64" in misfit
    # The others through the same top-level handler, in this process.
    sample = in_process_sampler(run_in_process)
    missing = one_line_error(
        sample(
            ["--model_path", checkpoint, "--data_dir", tmp_path / "nope"],
            tmp_path,
            expect_rc=2,
        )
    )
    assert "--data_dir" in missing and "nope" in missing
    no_model = one_line_error(sample(["--data_dir", data_dir], tmp_path, expect_rc=2))
    assert "--model_path" in no_model
    eta = one_line_error(sample([*base, "--eta", "0.5"], tmp_path, expect_rc=2))
    assert "eta 0.5" in eta and "ddim" in eta
    assert not (tmp_path / "sample_results").exists()  # a failed start claims nothing


def test_sample_sh_with_environment_overrides(tmp_path, checkpoint, data_dir):
    env = {
        **os.environ,
        "MODEL_PATH": str(checkpoint),
        "DATA_DIR": str(data_dir),
        "NUM_GPUS": "1",
        "OPENAI_LOGDIR": str(tmp_path),
        "MODEL_FLAGS": "",
        "DIFFUSION_FLAGS": "",
        "SAMPLE_FLAGS": "--batch_size 4 --num_samples 3 --timestep_respacing 5",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "sample.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(png_names(tmp_path / "sample_results" / "ddpm5" / "gen_opt")) == 3

    env["MODEL_PATH"] = str(tmp_path / "missing.pt")
    proc = subprocess.run(
        ["bash", str(REPO / "sample.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "missing.pt" in proc.stderr


# -- checkpoints of other runs and other versions ---------------------------------


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory, checkpoint):
    """The tiny checkpoint as the original code leaves it: no config.json beside it."""
    run = tmp_path_factory.mktemp("original_run")
    shutil.copy(checkpoint, run / "ema_0.9999_000010.pt")
    return run / "ema_0.9999_000010.pt"


# The flags the original's sample.sh gives, with the tiny checkpoint's values.
SAMPLE_SH = {
    "--image_size": 32,
    "--num_channels": 32,
    "--num_res_blocks": 1,
    "--learn_sigma": False,
    "--diffusion_steps": 50,
    "--noise_schedule": "linear",
}


def test_a_checkpoint_without_config_samples_with_the_flags_of_sample_sh(
    tmp_path, original_checkpoint, first_run, data_dir, input_names, run_in_process
):
    base = ["--model_path", original_checkpoint, "--data_dir", data_dir]
    # first_run's first batch: the same batch gives the same numbers.
    base += [*SAMPLE_FLAGS, "--num_samples", "4"]
    sample = in_process_sampler(run_in_process)
    # Without the number of steps and the schedule it stops, asking for those alone.
    without = [
        str(part)
        for k, v in SAMPLE_SH.items()
        if k not in ("--diffusion_steps", "--noise_schedule")
        for part in (k, v)
    ]
    line = one_line_error(sample([*base, *without], tmp_path, expect_rc=2))
    assert str(original_checkpoint) in line and "config.json" in line
    assert "--diffusion_steps" in line and "--noise_schedule" in line
    for flag in ("--num_heads", "--sigma_small", "--predict_xstart", "--num_channels"):
        assert flag not in line
    assert not (tmp_path / "sample_results").exists()

    given = [str(part) for item in SAMPLE_SH.items() for part in item]
    proc = run_sample([*base, *given], tmp_path)
    read = [x for x in proc.stdout.splitlines() if "read off its weights" in x]
    assert len(read) == 1
    for flag in ("--channel_mult 1,2", "--attention_resolutions 16"):
        assert flag in read[0]
    # guided-diffusion's defaults, named in the same line
    for flag in (
        "--num_heads 4",
        "--num_heads_upsample -1",
        "--num_head_channels -1",
        "--use_new_attention_order False",
        "--sigma_small False",
        "--predict_xstart False",
        "--rescale_timesteps False",
    ):
        assert flag in read[0]
    # The same model with the same flags: the images of the run that had config.json.
    results = tmp_path / "sample_results" / "ddpm10" / "gen_opt"
    assert png_names(results) == sorted(input_names[:4])
    for name in input_names[:4]:
        assert np.array_equal(
            read_png(results / name), read_png(first_run / "gen_opt" / name)
        )


def test_an_fp16_run_samples_in_float32_on_a_cpu(
    tmp_path, checkpoint, first_run, data_dir, input_names
):
    run = tmp_path / "fp16_run"
    run.mkdir()
    shutil.copy(checkpoint, run / "model000010.pt")
    config = json.loads((checkpoint.parent / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "use_fp16": True}))
    args = ["--model_path", run / "model000010.pt", "--data_dir", data_dir]
    # first_run's first batch: float32 weights in the same batch, the same images.
    proc = run_sample([*args, *SAMPLE_FLAGS, "--num_samples", "4"], tmp_path)
    line = [x for x in proc.stdout.splitlines() if "use_fp16" in x]
    assert len(line) == 1 and "float32" in line[0] and "CPU" in line[0]
    results = tmp_path / "sample_results" / "ddpm10"
    for name in input_names[:4]:
        assert np.array_equal(
            read_png(results / "gen_opt" / name),
            read_png(first_run / "gen_opt" / name),
        )
    # The folder records the precision the model ran in.
    assert json.loads((results / "run.json").read_text())["use_fp16"] is False


def test_an_older_run_json_continues_and_other_settings_refuse(
    tmp_path, first_run, checkpoint, data_dir, run_in_process
):
    logdir = tmp_path / "logs"
    shutil.copytree(first_run.parents[1], logdir)
    results = logdir / "sample_results" / "ddpm10"
    record = json.loads((results / "run.json").read_text())
    # Written before these flags existed: absent means their default...
    del record["use_new_attention_order"]
    record.pop("use_bf16", None)  # recorded only when on before this version
    # ... and written by a newer version, with a flag this one does not know.
    record["a_flag_of_a_newer_version"] = False
    (results / "run.json").write_text(json.dumps(record))
    before = snapshot(results)

    args = ["--model_path", checkpoint, "--data_dir", data_dir, *SAMPLE_FLAGS]
    # Speed levers compute the same function: the folder continues.
    speed = ["--channels_last", "True", "--use_sdpa", "True"]
    proc = run_sample([*args, *speed], logdir)
    assert "15 of 15 images already in" in proc.stdout

    # The refusals in this process; the continued run above was a real one.
    sample = in_process_sampler(run_in_process)
    for changed, name in (
        (["--timestep_respacing", "ddim10"], "timestep_respacing"),  # also 10 steps
        (["--seed", "3"], "seed"),
        (["--use_bf16", "True"], "use_bf16"),
    ):
        line = one_line_error(sample([*args, *changed], logdir, expect_rc=2))
        assert str(results) in line and name in line and "OPENAI_LOGDIR" in line
    after = snapshot(results)
    assert {k: v for k, v in after.items() if not k.endswith(".npz")} == {
        k: v for k, v in before.items() if not k.endswith(".npz")
    }


class ShapeRecorder(th.nn.Module):
    """Stands in for torch.compile's module: records the shape of every input."""

    shapes = []

    def __init__(self, model, **options):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        ShapeRecorder.shapes.append(tuple(x.shape))
        return self.model(x, t, **kwargs)


def test_compile_sees_one_batch_shape_and_the_folder_records_tf32(
    tmp_path, checkpoint, first_run, data_dir, input_names, monkeypatch, run_in_process
):
    ShapeRecorder.shapes = []
    monkeypatch.setattr(th, "compile", ShapeRecorder)
    numerics = []
    monkeypatch.setattr(
        "guided_diffusion.dist_util.configure_numerics",
        lambda **how: numerics.append(how),
    )
    sample = in_process_sampler(run_in_process)
    args = ["--model_path", checkpoint, "--data_dir", data_dir, *SAMPLE_FLAGS]
    # 15 images at batch 4: the last batch holds 3, padded to 4 under --compile
    sample([*args, "--compile", "True", "--use_tf32", "True"], tmp_path)
    assert {s[0] for s in ShapeRecorder.shapes} == {4} and len(ShapeRecorder.shapes) == 40
    assert numerics == [{"use_tf32": True, "cudnn_benchmark": True}]
    results = tmp_path / "sample_results" / "ddpm10"
    for name in input_names:  # the padding's outputs are dropped, the rest kept
        a, b = read_png(results / "gen_opt" / name), read_png(first_run / "gen_opt" / name)
        assert np.abs(a.astype(int) - b).max() <= 1
    record = json.loads((results / "run.json").read_text())
    assert record["use_tf32"] is False  # a CPU has no TF32: float32 as IEEE
    # a folder made with TF32 (on a GPU) is not continued in IEEE float32
    (results / "run.json").write_text(json.dumps({**record, "use_tf32": True}))
    line = one_line_error(sample(args, tmp_path, expect_rc=2))
    assert "use_tf32" in line and str(results) in line
