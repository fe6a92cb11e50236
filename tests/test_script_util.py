"""Tests of guided_diffusion.script_util: defaults, factories and argparse helpers."""

import argparse
import re

import numpy as np
import pytest
import torch as th
from conftest import TINY_FLAGS, tiny_model_and_diffusion

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)

GUIDED_DIFFUSION_KEYS = {
    "image_size",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_heads_upsample",
    "num_head_channels",
    "attention_resolutions",
    "channel_mult",
    "dropout",
    "use_checkpoint",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
    "learn_sigma",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
}


def _level_widths(model):
    """Output channels of the first residual block of every input level, in order."""
    widths = {}
    for key, value in model.state_dict().items():
        match = re.fullmatch(r"input_blocks\.(\d+)\.0\.out_layers\.3\.weight", key)
        if match:
            widths[int(match.group(1))] = value.shape[0]
    return [widths[i] for i in sorted(widths)]


# ---------------------------------------------------------------- defaults


def test_defaults_have_guided_diffusion_keys_and_sar_channels():
    defaults = model_and_diffusion_defaults()
    assert GUIDED_DIFFUSION_KEYS | {"sar_channels"} <= set(defaults)
    expected = dict(
        num_heads=4,
        num_head_channels=-1,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        sar_channels=3,
    )
    assert {key: defaults[key] for key in expected} == expected


def test_defaults_build_the_default_diffusion():
    _, diffusion = tiny_model_and_diffusion()
    assert isinstance(diffusion, SpacedDiffusion)
    assert diffusion.model_mean_type == gd.ModelMeanType.EPSILON
    assert diffusion.model_var_type == gd.ModelVarType.FIXED_LARGE
    assert diffusion.loss_type == gd.LossType.MSE
    assert diffusion.rescale_timesteps is False
    assert diffusion.num_timesteps == TINY_FLAGS["diffusion_steps"]


# ---------------------------------------------------------------- factories


@pytest.mark.parametrize(
    "flags,mean_type,var_type,loss_type",
    [
        ({}, "EPSILON", "FIXED_LARGE", "MSE"),
        (dict(learn_sigma=True), "EPSILON", "LEARNED_RANGE", "MSE"),
        (dict(predict_xstart=True), "START_X", "FIXED_LARGE", "MSE"),
        (dict(predict="v"), "VELOCITY", "FIXED_LARGE", "MSE"),
        (dict(predict="x_start"), "START_X", "FIXED_LARGE", "MSE"),
        (dict(use_kl=True), "EPSILON", "FIXED_LARGE", "RESCALED_KL"),
        (
            dict(learn_sigma=True, rescale_learned_sigmas=True),
            "EPSILON",
            "LEARNED_RANGE",
            "RESCALED_MSE",
        ),
    ],
)
def test_flags_select_the_diffusion_types(flags, mean_type, var_type, loss_type):
    _, diffusion = tiny_model_and_diffusion(**flags)
    assert diffusion.model_mean_type == gd.ModelMeanType[mean_type]
    assert diffusion.model_var_type == gd.ModelVarType[var_type]
    assert diffusion.loss_type == gd.LossType[loss_type]


def test_sigma_small_selects_the_posterior_variance():
    diffusion = create_gaussian_diffusion(steps=50, sigma_small=True)
    assert diffusion.model_var_type == gd.ModelVarType.FIXED_SMALL
    diffusion = create_gaussian_diffusion(steps=50, rescale_timesteps=True)
    assert diffusion.rescale_timesteps is True


def test_paper_schedule_and_respacing():
    diffusion = create_gaussian_diffusion(steps=2000, noise_schedule="linear")
    expected = np.linspace(0.0001 * 0.5, 0.02 * 0.5, 2000, dtype=np.float64)
    np.testing.assert_allclose(diffusion.betas, expected, rtol=1e-9)
    assert diffusion.num_timesteps == 2000

    respaced = create_gaussian_diffusion(steps=2000, timestep_respacing="250")
    assert respaced.num_timesteps == 250
    assert respaced.original_num_steps == 2000
    assert [int(i) for i in respaced.timestep_map][:2] == [0, 8]


@pytest.mark.parametrize("learn_sigma,out", [(False, 3), (True, 6)])
@pytest.mark.parametrize("sar_channels", [1, 3])
def test_model_channels_follow_sar_channels_and_learn_sigma(
    learn_sigma, out, sar_channels
):
    model, _ = tiny_model_and_diffusion(
        learn_sigma=learn_sigma, sar_channels=sar_channels
    )
    state = model.state_dict()
    assert state["input_blocks.0.0.weight"].shape[1] == 3 + sar_channels
    assert state["out.2.weight"].shape[0] == out
    x = th.zeros(1, 3 + sar_channels, 32, 32)
    assert model(x, th.tensor([3])).shape == (1, out, 32, 32)


@pytest.mark.parametrize(
    "image_size,channels,mult",
    [
        (32, 32, (1, 2, 2)),
        (64, 32, (1, 2, 3, 4)),
        (128, 32, (1, 1, 2, 3, 4)),
        (256, 32, (1, 1, 2, 2, 4, 4)),
        (512, 64, (0.5, 1, 1, 2, 2, 4, 4)),
    ],
)
def test_channel_mult_defaults_by_image_size(image_size, channels, mult):
    model, _ = create_model_and_diffusion(
        image_size=image_size,
        num_channels=channels,
        num_res_blocks=1,
        diffusion_steps=50,
    )
    assert _level_widths(model) == [int(m * channels) for m in mult]


def test_explicit_channel_mult_and_unsupported_size():
    model, _ = tiny_model_and_diffusion(channel_mult="1,2")
    assert _level_widths(model) == [32, 64]
    model, _ = create_model_and_diffusion(
        image_size=48,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="24",
        diffusion_steps=50,
    )
    assert _level_widths(model) == [32, 64]
    with pytest.raises(ValueError, match="channel_mult"):
        create_model_and_diffusion(
            image_size=48, num_channels=32, num_res_blocks=1, diffusion_steps=50
        )


def test_unknown_flag_is_rejected():
    with pytest.raises(TypeError, match="num_chanels"):
        create_model_and_diffusion(**TINY_FLAGS, num_chanels=64)


# ---------------------------------------------------------------- argparse helpers


def test_argparser_round_trip_builds_the_model():
    defaults = model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(
        [
            "--image_size",
            "32",
            "--num_channels",
            "32",
            "--num_res_blocks",
            "1",
            "--channel_mult",
            "1,2",
            "--attention_resolutions",
            "16",
            "--diffusion_steps",
            "50",
            "--learn_sigma",
            "True",
            "--use_scale_shift_norm",
            "False",
            "--dropout",
            "0.1",
            "--timestep_respacing",
            "ddim25",
        ]
    )
    values = args_to_dict(args, defaults.keys())
    assert set(values) == set(defaults)
    assert values["image_size"] == 32 and isinstance(values["image_size"], int)
    assert values["dropout"] == 0.1 and isinstance(values["dropout"], float)
    assert values["learn_sigma"] is True and values["use_scale_shift_norm"] is False
    assert values["use_fp16"] is False  # untouched booleans keep their defaults
    assert values["timestep_respacing"] == "ddim25"

    model, diffusion = create_model_and_diffusion(**values)
    assert diffusion.num_timesteps == 25
    assert model.state_dict()["out.2.weight"].shape[0] == 6
    # Without scale-shift the embedding only shifts: out_channels, not 2 * out_channels.
    assert model.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 32


@pytest.mark.parametrize("text", ["True", "true", "T", "yes", "Y", "1"])
def test_str2bool_true(text):
    assert str2bool(text) is True


@pytest.mark.parametrize("text", ["False", "false", "F", "no", "N", "0"])
def test_str2bool_false(text):
    assert str2bool(text) is False


def test_str2bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, dict(use_fp16=False))
    with pytest.raises(SystemExit):
        parser.parse_args(["--use_fp16", "maybe"])


def test_too_few_linear_steps_are_rejected():
    # s = 1000 / 20 puts the last beta at exactly 1: alphas_cumprod would reach 0.
    with pytest.raises(ValueError, match="--diffusion_steps 20 is too few"):
        gd.get_named_beta_schedule("linear", 20)
    assert gd.get_named_beta_schedule("linear", 21)[-1] < 1


def test_a_single_step_process_has_a_finite_variance():
    # one step (a distilled student sampled in one call): the clipped log-variance at
    # t = 0, where the posterior's is 0, is that step's beta (1 - abar of step 0)
    one = create_gaussian_diffusion(steps=50, timestep_respacing="1")
    assert one.num_timesteps == 1
    assert one.posterior_log_variance_clipped[0] == np.log(one.betas[0])
    assert np.isfinite(one.posterior_log_variance_clipped).all()
    assert (
        create_gaussian_diffusion(steps=50, timestep_respacing="2").num_timesteps == 2
    )
