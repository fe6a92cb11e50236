"""
Consistency distillation (guided_diffusion/distillation.py, scripts/image_distill.py).

The reference facts: the skip grid and the loss by hand; a student distilled from a
trained tiny teacher is closer in one step to the teacher's 50-step DDIM than the
teacher's own one step is; a resumed run equals an uninterrupted one bit for bit;
two ranks at batch B equal one process at batch 2B; each bad input is one line.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion.base import samplers
from guided_diffusion.base.consistency import ConsistencyModel
from guided_diffusion.distillation import (
    ConsistencyDistillation,
    resolve_huber_c,
    skip_grid,
)
from guided_diffusion.image_datasets import load_sar
from guided_diffusion.io.rasters import Scaling
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import train_defaults

REPO = Path(__file__).resolve().parents[1]
DISTILL = str(REPO / "scripts" / "image_distill.py")
TRAIN = str(REPO / "scripts" / "image_train.py")

# test_train.py's tiny U-Net, on 16 x 16 images: a step takes milliseconds.
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="8", diffusion_steps=50)  # fmt: skip
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()]


def run(script, args, env_extra, launcher=(), timeout=300):
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, sys.executable, script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load(path):
    return th.load(path, weights_only=True)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """
    32 pairs of 16 x 16 images: the SAR is a smooth random field, the optical image
    one of two colour maps of it, at random (red or blue where the SAR is bright).
    The SAR leaves the colour open, so the teacher's ODE picks a map by its x_T where
    its single step gives their blurred mean: what distillation must learn.
    """
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for sub in ("sar", "opt"):
        (root / sub).mkdir()
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    for i in range(32):
        a, b, c = rng.uniform(-1, 1, 3)
        sar = np.clip(0.5 + 0.5 * (a * xx + b * yy + c * xx * yy) / 2, 0, 1)
        opt = np.stack([sar, 0.5 * np.ones_like(sar), 1 - sar], -1)
        if rng.random() < 0.5:
            opt = opt[..., ::-1]
        Image.fromarray((sar * 255).astype(np.uint8)).save(root / "sar" / f"{i}.png")
        Image.fromarray((opt * 255).astype(np.uint8)).save(root / "opt" / f"{i}.png")
    return root


def data_flags(pairs_dir):
    return [f"--data_dir_sar={pairs_dir / 'sar'}", f"--data_dir_opt={pairs_dir / 'opt'}",
            "--num_workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A tiny teacher with small random weights, saved as a training run saves it."""
    run_dir = tmp_path_factory.mktemp("random_teacher")
    model, _ = create_model_and_diffusion(**TINY)
    gen = th.Generator().manual_seed(1)
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn(p.shape, generator=gen) * 0.02)
    th.save(model.state_dict(), run_dir / "model000010.pt")
    config = {**train_defaults(), **model_and_diffusion_defaults(), **TINY,
              "inputs": Scaling(sar_channels=3).record(), "world_size": 1}  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir / "model000010.pt"


# -- the method by hand -----------------------------------------------------------


def test_skip_grid_from_the_top_to_the_data():
    t, s = skip_grid(1000, 20)
    assert t[0] == 999 and t[-1] == 19 and s[-1] == 0  # one-step sampling's t; the data
    assert len(t) == 50 and np.all(t[:-1] - s[:-1] == 20) and np.all(t - s <= 20)
    t, s = skip_grid(50, 5)
    assert list(t) == [49, 44, 39, 34, 29, 24, 19, 14, 9, 4] and s[-1] == 0
    with pytest.raises(ValueError, match="--skip 50"):
        skip_grid(50, 50)
    assert math.isclose(resolve_huber_c(-1.0, (3, 64, 64)), 0.00054 * math.sqrt(3 * 64 * 64))
    assert resolve_huber_c(0.5, (3, 64, 64)) == 0.5


class Constant(th.nn.Module):
    """A network whose output is ``value`` everywhere (plus a parameter for the grad)."""

    def __init__(self, value):
        super().__init__()
        self.value = th.nn.Parameter(th.tensor(float(value)))

    def forward(self, x, t):
        return self.value * th.ones_like(x[:, :3])


@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_loss_by_hand(distance):
    """x_0-predicting networks that answer constants: DDIM's step and the distance in closed form."""
    diffusion = create_model_and_diffusion(**{**TINY, "predict": "x_start"})[1]
    abar = th.from_numpy(diffusion.alphas_cumprod)
    loss_fn = ConsistencyDistillation(
        diffusion, Constant(1.7), Constant(0.2), mean_type="x_start", skip=5,
        distance=distance, huber_c=0.3,
    )  # fmt: skip
    th.manual_seed(0)
    x0, sar, noise = th.randn(2, 3, 4, 4), th.randn(2, 1, 4, 4), th.randn(2, 3, 4, 4)
    t = th.tensor([49, 4])
    student = Constant(-0.4)
    loss = loss_fn.training_losses(student, x0, sar, t, noise=noise)["loss"]
    # by hand, in float64
    s = th.tensor([44, 0])  # t - 5, and 0 for the grid's last pair
    a_t, a_s = abar[t].view(-1, 1, 1, 1), abar[s].view(-1, 1, 1, 1)
    x_t = a_t.sqrt() * x0.double() + (1 - a_t).sqrt() * noise.double()
    teacher_x0 = 1.0  # 1.7 clipped to [-1, 1]
    eps = (x_t - a_t.sqrt() * teacher_x0) / (1 - a_t).sqrt()
    x_s = a_s.sqrt() * teacher_x0 + (1 - a_s).sqrt() * eps

    def f(x, steps, out):
        u = 10.0 * steps.double().view(-1, 1, 1, 1)
        return 0.25 / (u**2 + 0.25) * x + u / (u**2 + 0.25).sqrt() * out

    target = f(x_s, s, 0.2)
    assert th.allclose(target[1], x_s[1])  # s = 0: the boundary returns x_s itself
    d = (f(x_t, t, -0.4) - target).flatten(1)
    want = d.pow(2).mean(1) if distance == "l2" else (d.pow(2).sum(1) + 0.09).sqrt() - 0.3
    assert th.allclose(loss.double(), want, rtol=1e-5)
    loss.sum().backward()
    assert student.value.grad is not None and student.value.grad != 0


# -- distillation learns ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_teacher(pairs_dir, tmp_path_factory):
    """A tiny teacher trained on the colour-map pairs: a smooth probability-flow ODE
    worth distilling (a random network's ODE is not a translation at all)."""
    run_dir = tmp_path_factory.mktemp("trained_teacher")
    run(TRAIN, [*data_flags(pairs_dir), *TINY_FLAGS, "--predict=x_start", "--batch_size=8", "--lr=2e-3",
                "--max_steps=300", "--save_interval=300", "--ema_rate=0.99",
                "--progress=False"], {"OPENAI_LOGDIR": str(run_dir)})  # fmt: skip
    return run_dir / "ema_0.99_000300.pt"


def sample(name, net, diffusion, x_T, sar, timesteps):
    denoiser = samplers.Denoiser(diffusion, net, sar)
    return samplers.run(name, denoiser, x_T, timesteps, generator=th.Generator())


# not marked slow (about 45 s on 2 cores): it is what fails when distillation learns
# nothing, so it runs with every suite
def test_distilled_student_is_closer_to_the_teachers_ode_in_one_step(
    pairs_dir, trained_teacher, tmp_path
):
    out = tmp_path / "student"
    steps = 200
    run(DISTILL, [f"--teacher_path={trained_teacher}", *data_flags(pairs_dir),
                  "--batch_size=8", "--lr=1e-3", "--skip=5", f"--max_steps={steps}",
                  f"--save_interval={steps}", "--log_interval=10", "--progress=False"],
        {"OPENAI_LOGDIR": str(out)})  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["distillation"]["teacher"] == str(trained_teacher)
    teacher, diffusion = create_model_and_diffusion(**TINY, predict="x_start")
    teacher.load_state_dict(load(trained_teacher))
    student, _ = create_model_and_diffusion(**TINY, predict="x_start")
    student.load_state_dict(load(out / f"ema_0.95_{steps:06d}.pt"))
    student = ConsistencyModel(student, diffusion.alphas_cumprod, "x_start", 3)
    th.manual_seed(0)
    x_T = th.randn(16, 3, 16, 16)
    sar = th.stack([th.from_numpy(load_sar(pairs_dir / "sar" / f"{i}.png", 16)) for i in range(16)])
    with th.no_grad():
        reference = sample("ddim", teacher.eval(), diffusion, x_T, sar, range(49, -1, -1))
        teacher_1 = sample("ddim", teacher, diffusion, x_T, sar, [49])
        student_1 = sample("consistency", student.eval(), diffusion, x_T, sar, [49])
        # the boundary condition: the student returns its input at t = 0
        f0, _ = student.consistency(th.cat([x_T, sar], 1), th.zeros(16, dtype=th.long))
    assert th.equal(f0, x_T)
    err_teacher = (teacher_1 - reference).pow(2).mean().item()
    err_student = (student_1 - reference).pow(2).mean().item()
    assert err_student < 0.7 * err_teacher, (err_student, err_teacher)
    losses = [float(row.split(",")[header.index("loss")]) for header in
              [(out / "progress.csv").read_text().splitlines()[0].split(",")]
              for row in (out / "progress.csv").read_text().splitlines()[1:]]  # fmt: skip
    # the first 10 steps' mean against the last 30's: the target moves with the
    # student, so the loss does not fall at every step
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


# -- everything training has: resume, ranks -------------------------------------------


def distill_args(pairs_dir, teacher, *extra):
    return [f"--teacher_path={teacher}", *data_flags(pairs_dir), "--skip=5", "--lr=1e-3",
            "--random_flip=True", "--progress=False", "--ema_rate=0.9", *extra]  # fmt: skip


@pytest.mark.parametrize("adv_weight", [0.0, 0.5])
def test_resume_equals_uninterrupted_run_and_validation_leaves_it_alone(
    pairs_dir, random_teacher, tmp_path, adv_weight
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = distill_args(pairs_dir, random_teacher, "--batch_size=2", f"--adv_weight={adv_weight}")
    # validation in the straight run only: it must leave the trajectory alone
    run(DISTILL, [*common, "--max_steps=4", f"--val_data_dir={pairs_dir}", "--val_num=2",
                  "--val_interval=4"], {"OPENAI_LOGDIR": str(straight)})  # fmt: skip
    for n in (1, 2, 4):  # a grid and scores at each of the student's step counts
        assert (straight / f"val_000004_{n}step.png").exists()
        assert f"val_ssim_{n}step" in (straight / "progress.csv").read_text()
    run(DISTILL, [*common, "--max_steps=2"], {"OPENAI_LOGDIR": str(resumed)})
    proc = run(DISTILL, [*common, "--max_steps=4", "--resume_checkpoint=auto"],
               {"OPENAI_LOGDIR": str(resumed)})  # fmt: skip
    assert "from step 2" in proc.stdout
    for name in ("model000004.pt", "ema_0.95_000004.pt", "ema_0.9_000004.pt"):
        a, b = load(straight / name), load(resumed / name)
        assert all(th.equal(a[k], b[k]) for k in a), name
    teacher = load(random_teacher)
    assert not th.equal(load(straight / "model000004.pt")["out.2.weight"], teacher["out.2.weight"])
    opt_a, opt_b = load(straight / "opt000004.pt"), load(resumed / "opt000004.pt")
    for i, state in opt_a["state"].items():
        for key, value in state.items():
            assert th.equal(value, opt_b["state"][i][key]), (i, key)
    # the discriminator's head and optimizer, saved in the state file, resume too
    state_a, state_b = load(straight / "state000004.pt"), load(resumed / "state000004.pt")
    assert ("discriminator_head" in state_a) == bool(adv_weight)
    if adv_weight:
        head_a, head_b = state_a["discriminator_head"], state_b["discriminator_head"]
        assert all(th.equal(head_a[k], head_b[k]) for k in head_a)
        assert "disc_loss" in (straight / "progress.csv").read_text()


@pytest.mark.parametrize("adv_weight", [0.0, 0.5])
def test_two_ranks_equal_one_process_at_twice_the_batch(
    pairs_dir, random_teacher, tmp_path, adv_weight
):
    single, mpi = tmp_path / "single", tmp_path / "mpi"
    common = distill_args(pairs_dir, random_teacher, "--max_steps=2", f"--adv_weight={adv_weight}")
    run(DISTILL, [*common, "--batch_size=4"], {"OPENAI_LOGDIR": str(single)})
    run(DISTILL, [*common, "--batch_size=2"], {"OPENAI_LOGDIR": str(mpi)},
        launcher=["mpiexec", "-n", "2"])  # fmt: skip
    teacher = load(random_teacher)
    for name in ("model000002.pt", "ema_0.95_000002.pt"):
        a, b = load(mpi / name), load(single / name)
        diff = th.cat([(a[k] - b[k]).abs().flatten() for k in b])
        moved = th.cat([(b[k] - teacher[k]).abs().flatten() for k in b])
        # Equal to round-off, but for the few weights whose gradient is zero but for
        # round-off (a bias before a GroupNorm of one channel a group), which Adam
        # turns into steps of up to lr: at most 2 lr over 2 steps, on few weights.
        assert (diff > 1e-5).float().mean() < 1e-3 and (moved > 1e-5).float().mean() > 0.5, name
        assert diff.max() <= 2 * 2e-3, name
    assert load(mpi / "state000002.pt")["global_batch"] == 4
    if adv_weight:  # the discriminator's head: its gradient averaged over the ranks
        a, b = (load(run / "state000002.pt")["discriminator_head"] for run in (mpi, single))
        diff = th.cat([(a[k] - b[k]).abs().flatten() for k in b])
        assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() <= 2 * 2e-3


# -- bad input: one line each ----------------------------------------------------------


def bad_inputs(pairs_dir, teacher, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model000001.pt").write_bytes(teacher.read_bytes())
    not_checkpoint = tmp_path / "not_checkpoint"
    not_checkpoint.mkdir()
    (not_checkpoint / "model000001.pt").write_text("not a checkpoint")
    (not_checkpoint / "config.json").write_text((teacher.parent / "config.json").read_text())
    data = data_flags(pairs_dir)
    return {
        "could not be read": [f"--teacher_path={not_checkpoint / 'model000001.pt'}", *data],
        "no config.json": [f"--teacher_path={no_config / 'model000001.pt'}", *data],
        "--image_size 32": [f"--teacher_path={teacher}", *data, "--image_size=32"],
        "--sar_channels 2": [f"--teacher_path={teacher}", *data, "--sar_channels=2"],
        "--num_channels 64": [f"--teacher_path={teacher}", *data, "--num_channels=64"],
        "--opt_range": [f"--teacher_path={teacher}", *data, "--opt_range=0,3000"],
        "--skip 50": [f"--teacher_path={teacher}", *data, "--skip=50"],
    }


def test_each_bad_input_is_one_line(pairs_dir, random_teacher, tmp_path, run_in_process):
    for expected, args in bad_inputs(pairs_dir, random_teacher, tmp_path).items():
        proc = run_in_process(DISTILL, args, env={"OPENAI_LOGDIR": tmp_path / "run"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (expected, proc.stderr)
        assert expected in lines[0] and "Traceback" not in proc.stderr
