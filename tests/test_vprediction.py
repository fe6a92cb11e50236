"""
v-prediction and Min-SNR-gamma loss weighting (issue 15).

The reference facts: v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans and Ho
2022), so x_0 = sqrt(abar) x_t - sqrt(1 - abar) v and eps = sqrt(1 - abar) x_t +
sqrt(abar) v, computed here by hand; for Gaussian data the exact v predictor has a
closed form, and every sampler run with it approaches the data's distribution as
its steps grow; Min-SNR-gamma (Hang et al. 2023) weights an x_0 error by
min(SNR, gamma) whatever the model outputs.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import FixedOutputModel, GaussianEpsModel, RecordingModel

from guided_diffusion import dist_util, logger, train_util
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.base import samplers
from guided_diffusion.io.checkpoints import read_run_config
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    prediction_target,
)
from guided_diffusion.translation.sampling import checkpoint_model_flags

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "image_train.py"
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {
    "eps": gd.ModelMeanType.EPSILON,
    "x_start": gd.ModelMeanType.START_X,
    "v": gd.ModelMeanType.VELOCITY,
}


def _diffusion(mean_type, betas, **kwargs):
    return gd.GaussianDiffusion(
        betas=np.asarray(betas, dtype=np.float64),
        model_mean_type=mean_type,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
        **kwargs,
    )


# ---------------------------------------------------------------- conversions

# betas 0.36 and 0.5: abar_0 = 0.64 (sqrt 0.8, sqrt(1 - abar) 0.6) and abar_1 = 0.32.
BETAS = [0.36, 0.5]


def test_v_conversions_match_hand_computed_values():
    diffusion = _diffusion(gd.ModelMeanType.VELOCITY, BETAS)
    x_t = th.tensor([1.0, -0.5]).view(2, 1, 1, 1)
    v = th.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    t = th.tensor([0, 1])
    a1, s1 = math.sqrt(0.32), math.sqrt(0.68)
    # t = 0: x_0 = 0.8 * 1 - 0.6 * 0.5 = 0.5, eps = 0.6 * 1 + 0.8 * 0.5 = 1.0
    x0 = [0.5, a1 * -0.5 - s1 * 2.0]
    eps = [1.0, s1 * -0.5 + a1 * 2.0]
    got_x0 = diffusion._predict_xstart_from_v(x_t, t, v).flatten().tolist()
    got_eps = diffusion._predict_eps_from_v(x_t, t, v).flatten().tolist()
    assert got_x0 == pytest.approx(x0, abs=1e-6)
    assert got_eps == pytest.approx(eps, abs=1e-6)
    # and back: v = sqrt(abar) eps - sqrt(1 - abar) x_0 = 0.8 * 1 - 0.6 * 0.5
    x0_t, eps_t = th.tensor(x0).view(2, 1, 1, 1), th.tensor(eps).view(2, 1, 1, 1)
    back = diffusion._v_from_xstart_and_eps(x0_t, t, eps_t).flatten().tolist()
    assert back == pytest.approx([0.5, 2.0], abs=1e-6)


def test_a_v_model_output_goes_through_p_mean_variance():
    """The prediction of x_0, the posterior mean and the implied noise of a v output."""
    diffusion = _diffusion(gd.ModelMeanType.VELOCITY, BETAS)
    x_t = th.full((1, 3, 2, 2), 1.0)
    out = diffusion.p_mean_variance(
        FixedOutputModel(th.full((1, 3, 2, 2), 0.5)), x_t, th.tensor([0]),
        clip_denoised=False,
    )  # fmt: skip
    assert th.allclose(out["pred_xstart"], th.full_like(x_t, 0.5))
    # The posterior mean at t = 0 (abar_prev = 1) is x_0 itself.
    assert th.allclose(out["mean"], th.full_like(x_t, 0.5))
    eps = samplers.Denoiser(diffusion, FixedOutputModel(th.full((1, 3, 2, 2), 0.5)))(
        x_t, 0
    )["eps"]
    assert th.allclose(eps, th.full_like(x_t, 1.0), atol=1e-6)


def test_the_v_target_is_trained_on_v():
    diffusion = _diffusion(gd.ModelMeanType.VELOCITY, BETAS)
    x_start = th.tensor([0.5, -0.25]).view(2, 1, 1, 1)
    noise = th.tensor([1.0, 0.75]).view(2, 1, 1, 1)
    losses = diffusion.training_losses(
        RecordingModel(1, fill=0.0), x_start, None, th.tensor([0, 1]), noise=noise
    )
    v = [0.8 * 1.0 - 0.6 * 0.5, math.sqrt(0.32) * 0.75 + math.sqrt(0.68) * 0.25]
    assert losses["mse"].tolist() == pytest.approx([x * x for x in v], abs=1e-6)
    assert th.equal(losses["loss"], losses["mse"])


# ---------------------------------------------------------------- the Gaussian toy

MU, S = 0.3, 0.5


class GaussianVModel(th.nn.Module):
    """
    The exact v predictor for data x_0 ~ N(mu, s^2) in every dimension:
    E[v | x_t] = sqrt(abar) E[eps | x_t] - sqrt(1 - abar) E[x_0 | x_t], with
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / d,
    E[x_0 | x_t] = mu + s^2 sqrt(abar) (x_t - sqrt(abar) mu) / d and
    d = abar s^2 + 1 - abar, at the ORIGINAL timestep indices it receives.
    """

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.alphas_cumprod = th.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        self.mu, self.s = mu, s

    def forward(self, x, t, **kwargs):
        abar = self.alphas_cumprod[t.long()].view(-1, *([1] * (x.dim() - 1)))
        x64, d = x.double(), abar * self.s**2 + 1 - abar
        centred = x64 - abar.sqrt() * self.mu
        eps = (1 - abar).sqrt() * centred / d
        x0 = self.mu + self.s**2 * abar.sqrt() * centred / d
        return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).to(x.dtype)


@pytest.fixture(scope="module")
def base_abar():
    return create_gaussian_diffusion(steps=1000).alphas_cumprod


def _sample(name, model, predict, steps, x_T, seed=1):
    diffusion = create_gaussian_diffusion(
        steps=1000, predict=predict, timestep_respacing=str(steps)
    )
    return diffusion.sample_loop(
        model, x_T.shape, name, noise=x_T, clip_denoised=False,
        generator=th.Generator().manual_seed(seed),
    )  # fmt: skip


# the samplers of diffusion models: a student's (consistency) is no ODE solver
@pytest.mark.parametrize("name", samplers.samplers_for(student=False))
def test_every_sampler_with_the_exact_v_predictor_converges(name, base_abar):
    """
    Sample mean and standard deviation approach mu and s as the steps grow. x_T is
    65536 values standardised to the exact marginal of x_T, so the exact ODE would
    give mean mu and std s to the bit and what remains is the steps' error (and
    DDPM's fresh noise, near 0.002). The exact eps predictor gives the same
    samples: the v output reaches every sampler as the same prediction.
    """
    z = th.randn(16, 1, 64, 64, generator=th.Generator().manual_seed(0)).double()
    abar_T = base_abar[-1]
    z = (z - z.mean()) / z.std()
    x_T = (math.sqrt(abar_T) * MU + math.sqrt(abar_T * S**2 + 1 - abar_T) * z).float()
    v_model = GaussianVModel(base_abar, MU, S)
    errors = []
    for steps in (3, 10, 100):
        x = _sample(name, v_model, "v", steps, x_T).double()
        errors.append(abs(x.mean().item() - MU) + abs(x.std().item() - S))
        if steps == 10:
            same = _sample(name, GaussianEpsModel(base_abar, MU, S), "eps", 10, x_T)
            assert (x - same.double()).abs().max() < 1e-4
    print(f"{name}: |mean - mu| + |std - s| at 3, 10, 100 steps: {errors}")
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < min(0.02, errors[0] / 20), errors


def test_the_likelihood_of_a_v_model_is_the_eps_models(base_abar):
    """calc_bpd_loop goes through the same conversion: the exact predictors agree."""
    x_start = MU + S * th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(3))
    x_start = x_start.clamp(-1, 1)
    results = []
    for predict, model in (
        ("v", GaussianVModel(base_abar, MU, S)),
        ("eps", GaussianEpsModel(base_abar, MU, S)),
    ):
        diffusion = create_gaussian_diffusion(
            steps=1000, predict=predict, timestep_respacing="10"
        )
        th.manual_seed(5)
        results.append(diffusion.calc_bpd_loop(model, x_start, clip_denoised=False))
    for key in ("total_bpd", "xstart_mse", "mse"):
        th.testing.assert_close(results[0][key], results[1][key], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- Min-SNR-gamma


def _losses_for_one_x0_error(target, snr_gamma, t):
    """
    The losses of a model whose x_0 prediction misses by the same error for
    every target: its output is that x_0 prediction written as the target,
    computed here in float64.
    """
    diffusion = create_gaussian_diffusion(
        steps=1000, predict=target, snr_gamma=snr_gamma
    )
    gen = th.Generator().manual_seed(7)
    x_start = th.rand(len(t), 3, 4, 4, generator=gen) * 2 - 1
    noise = th.randn(x_start.shape, generator=gen)
    error = 0.3 * th.randn(x_start.shape, generator=gen)
    abar = th.as_tensor(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0, eps = x_start.double(), noise.double()
    x_t = a * x0 + s * eps
    x0_hat = x0 + error.double()
    output = {
        "x_start": x0_hat,
        "eps": (x_t - a * x0_hat) / s,
        "v": (a * x_t - x0_hat) / s,
    }[target]
    losses = diffusion.training_losses(
        FixedOutputModel(output.float()), x_start, None, t, noise=noise
    )
    snr = (abar / (1 - abar)).flatten()
    x0_mse = (error.double() ** 2).mean(dim=(1, 2, 3))
    return losses, snr, x0_mse


# SNR from 1e4 (t = 0) to 4e-5 (t = 999): on both sides of every gamma here.
TIMESTEPS = th.tensor([0, 50, 200, 400, 600, 999])


@pytest.mark.parametrize("gamma", [1.0, 5.0, math.inf])
def test_min_snr_weights_one_x0_error_the_same_for_every_target(gamma):
    """The property that defines the weighting: min(SNR, gamma) |x_0 error|^2."""
    for target in TARGETS:
        losses, snr, x0_mse = _losses_for_one_x0_error(target, gamma, TIMESTEPS)
        expected = th.minimum(snr, th.tensor(gamma, dtype=th.float64)) * x0_mse
        th.testing.assert_close(losses["loss"].double(), expected, rtol=2e-3, atol=0)


def test_gamma_inf_gives_back_the_unweighted_loss():
    """
    For eps, its own unweighted loss. For x_start and v, the unweighted eps loss of
    the same x_0 error (mse times SNR, and times SNR / (SNR + 1) = abar): see
    gaussian_diffusion.mse_loss_weights for why not their own.
    """
    eps_off, snr, _ = _losses_for_one_x0_error("eps", 0, TIMESTEPS)
    eps_inf, _, _ = _losses_for_one_x0_error("eps", math.inf, TIMESTEPS)
    assert th.equal(eps_inf["loss"], eps_off["loss"])
    assert th.equal(eps_inf["loss"], eps_inf["mse"])
    for target, factor in (("x_start", snr), ("v", snr / (snr + 1))):
        off, _, _ = _losses_for_one_x0_error(target, 0, TIMESTEPS)
        inf, _, _ = _losses_for_one_x0_error(target, math.inf, TIMESTEPS)
        assert th.equal(off["loss"], off["mse"])  # off: the target's own loss
        th.testing.assert_close(inf["mse"], off["mse"])
        th.testing.assert_close(
            inf["loss"].double(), off["mse"].double() * factor, rtol=1e-5, atol=0
        )
        th.testing.assert_close(
            inf["loss"].double(), eps_off["loss"].double(), rtol=2e-3, atol=0
        )


@pytest.mark.parametrize("target", list(TARGETS))
def test_min_snr_weights_of_a_respaced_schedule_are_the_base_ones(target):
    kwargs = dict(
        betas=gd.get_named_beta_schedule("cosine", 100),
        model_mean_type=TARGETS[target],
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
        snr_gamma=5.0,
    )
    base = gd.GaussianDiffusion(**kwargs)
    spaced = SpacedDiffusion(space_timesteps(100, "10"), **kwargs)
    expected = base.mse_loss_weight[spaced.timestep_map]
    np.testing.assert_allclose(spaced.mse_loss_weight, expected, rtol=1e-9)


def test_a_learned_variance_keeps_its_bound_term_unweighted():
    diffusion = create_gaussian_diffusion(
        steps=50, predict="v", learn_sigma=True, snr_gamma=2.0
    )
    gen = th.Generator().manual_seed(2)
    x_start = th.rand(3, 3, 4, 4, generator=gen) * 2 - 1
    output = th.randn(3, 6, 4, 4, generator=gen) * 0.5
    t = th.tensor([0, 20, 49])
    losses = diffusion.training_losses(FixedOutputModel(output), x_start, None, t)
    weight = th.as_tensor(diffusion.mse_loss_weight)[t].float()
    th.testing.assert_close(losses["loss"], losses["mse"] * weight + losses["vb"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(snr_gamma=-1.0), "--snr_gamma -1.0: give a positive gamma"),
        (dict(snr_gamma=5.0, use_kl=True), "--snr_gamma 5.0 weights the MSE loss"),
    ],
)
def test_a_min_snr_gamma_that_cannot_apply_is_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        create_gaussian_diffusion(steps=50, **flags)


# ---------------------------------------------------------------- flags and records


@pytest.mark.parametrize(
    "predict, predict_xstart, target",
    [
        ("", False, "eps"),
        ("", True, "x_start"),
        ("eps", False, "eps"),
        ("x_start", False, "x_start"),
        ("x_start", True, "x_start"),
        ("v", False, "v"),
    ],
)
def test_the_target_of_the_two_flags(predict, predict_xstart, target):
    assert prediction_target(predict, predict_xstart) == target
    diffusion = create_gaussian_diffusion(
        steps=50, predict=predict, predict_xstart=predict_xstart
    )
    assert diffusion.model_mean_type == TARGETS[target]


@pytest.mark.parametrize("predict", ["eps", "v"])
def test_contradictory_flags_stop_with_one_line_naming_both(predict):
    message = f"--predict_xstart True contradicts --predict {predict}: give one"
    with pytest.raises(ValueError, match=message):
        create_gaussian_diffusion(steps=50, predict=predict, predict_xstart=True)


def test_the_training_script_stops_on_contradictory_flags(run_in_process, tmp_path):
    proc = run_in_process(
        TRAIN,
        ["--data_dir_sar", tmp_path / "sar", "--data_dir_opt", tmp_path / "opt",
         "--image_size", 16, "--num_channels", 32, "--num_res_blocks", 1,
         "--channel_mult", "1,2", "--attention_resolutions", "8",
         "--predict_xstart", True, "--predict", "v"],
        env={"OPENAI_LOGDIR": tmp_path / "run"},
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--predict_xstart True contradicts --predict v" in last


def test_the_training_record_holds_the_target_and_the_weighting():
    spec = importlib.util.spec_from_file_location("image_train_for_test", TRAIN)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.create_argparser().parse_args(
        ["--predict", "v", "--snr_gamma", "inf"]
    )
    record = vars(args)  # what config.json is written from
    assert record["predict"] == "v" and record["predict_xstart"] is False
    assert record["snr_gamma"] == math.inf


def _config(tmp_path, **record):
    (tmp_path / "config.json").write_text(json.dumps(record))
    return tmp_path / "ema_0.9999_000010.pt"


@pytest.mark.parametrize(
    "record, target",
    [
        (dict(predict_xstart=False), "EPSILON"),
        (dict(predict_xstart=True), "START_X"),
        (dict(predict_xstart=False, predict="v", snr_gamma=5.0), "VELOCITY"),
    ],
    ids=["old-eps", "old-x_start", "v"],
)
def test_a_run_record_gives_sampling_its_target(tmp_path, record, target):
    """A config.json written before --predict existed reads as it did then."""
    model_path = _config(tmp_path, diffusion_steps=50, **record)
    assert read_run_config(model_path)["predict"] == record.get("predict", "")
    flags, conflicts, note = checkpoint_model_flags(model_path, {})
    assert conflicts == {} and note is None
    diffusion = create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{k: flags[k] for k in ("predict", "predict_xstart", "snr_gamma")},
    )
    assert diffusion.model_mean_type == gd.ModelMeanType[target]


def test_sampling_a_v_record_with_predict_xstart_is_refused(tmp_path):
    model_path = _config(tmp_path, diffusion_steps=50, predict="v")
    flags, _, _ = checkpoint_model_flags(model_path, {"predict_xstart": True})
    with pytest.raises(ValueError, match="--predict_xstart True contradicts"):
        create_gaussian_diffusion(
            steps=50, predict=flags["predict"], predict_xstart=flags["predict_xstart"]
        )


# ---------------------------------------------------------------- training


def test_a_v_model_with_min_snr_trains(tmp_path):
    """Two steps of TrainLoop, with the importance sampler that reads the losses."""
    dist_util.setup_dist()
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="8", diffusion_steps=50, predict="v", snr_gamma=5.0,
    )  # fmt: skip
    assert diffusion.model_mean_type == gd.ModelMeanType.VELOCITY
    batch = th.rand(2, 6, 16, 16, generator=th.Generator().manual_seed(1)) * 2 - 1

    def data(start_batch):
        while True:
            yield batch, {}

    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=2, lr=1e-3,
        ema_rate="0.9", log_interval=1, save_interval=10**6, max_steps=2,
        schedule_sampler="loss-second-moment",
    )  # fmt: skip
    before = model.out[2].weight.detach().clone()
    loop.run_loop()
    assert loop.step == 2 and loop.skipped_steps == 0
    assert not th.equal(before, model.out[2].weight)
    logged = (tmp_path / "progress.csv").read_text().splitlines()
    header, last = logged[0].split(","), logged[-1].split(",")
    assert math.isfinite(float(last[header.index("loss")]))
