"""
What a checkpoint's weights tell about the flags it was trained with.

The reference facts: the state-dict listings of the original code for the paper
configuration and for the small one (tests/data/fixtures), whose flags are known,
and models built here from known flags. A checkpoint that does not fit the flags
names the flags that differ with both values, not 200 tensor names.
"""

import re

import pytest
import torch as th
from conftest import FIXTURES_DIR, TINY_FLAGS

from guided_diffusion.script_util import (
    check_state_dict_fits,
    create_model,
    read_unet_flags,
)
from guided_diffusion.translation.sampling import checkpoint_model_flags


def zeros_from_fixture(name):
    """A state dict of zeros with every name and shape of a fixture listing."""
    state_dict = {}
    for line in (FIXTURES_DIR / name).read_text().splitlines():
        key, shape = line.split(" ", 1)
        dims = [int(d) for d in re.findall(r"\d+", shape)]
        state_dict[key] = th.zeros(dims)
    return state_dict


def built(**flags):
    """The state dict of a U-Net built from TINY_FLAGS with ``flags`` replaced."""
    flags = {**TINY_FLAGS, **flags}
    flags.pop("diffusion_steps")
    return create_model(**flags).state_dict()


# What the original code was run with for the two fixture listings (see
# tests/data/README.md): the paper's flags, and 64 px / 64 channels / 2 blocks,
# everything else at guided-diffusion's defaults ("16,8" attention, scale-shift norm).
PAPER = dict(
    num_channels=128,
    num_res_blocks=3,
    channel_mult="1,1,2,2,4,4",
    attention_ds=(16, 32),  # 256 px // (16, 8)
    sar_channels=3,
    learn_sigma=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
)
SMALL = {
    **PAPER,
    "num_channels": 64,
    "num_res_blocks": 2,
    "channel_mult": "1,2,3,4",
    "attention_ds": (4, 8),  # 64 px // (16, 8)
}


@pytest.mark.parametrize(
    "fixture,expected",
    [("unet_keys_paper.txt", PAPER), ("unet_keys_small.txt", SMALL)],
)
def test_reads_the_flags_of_the_original_codes_checkpoints(fixture, expected):
    assert read_unet_flags(zeros_from_fixture(fixture)) == expected


TINY_READ = dict(
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_ds=(2,),  # 32 px // 16
    sar_channels=3,
    learn_sigma=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
)


@pytest.mark.parametrize(
    "flags,differs",
    [
        ({}, {}),
        (
            dict(num_channels=64, num_res_blocks=2),
            dict(num_channels=64, num_res_blocks=2),
        ),
        (dict(channel_mult="1,2,2"), dict(channel_mult="1,2,2")),
        # The 512 px default starts at half the width.
        (
            dict(num_channels=64, channel_mult="0.5,1,2"),
            dict(num_channels=64, channel_mult="0.5,1,2"),
        ),
        # 8 is a downsample rate of 4: beyond the two levels, so no attention there.
        (dict(attention_resolutions="32,8"), dict(attention_ds=(1,))),
        (
            dict(channel_mult="1,2,2", attention_resolutions="16,8"),
            dict(channel_mult="1,2,2", attention_ds=(2, 4)),
        ),
        (dict(attention_resolutions=""), dict(attention_ds=())),
        (
            dict(sar_channels=1, learn_sigma=True),
            dict(sar_channels=1, learn_sigma=True),
        ),
        (dict(use_scale_shift_norm=False), dict(use_scale_shift_norm=False)),
        (dict(resblock_updown=True), dict(resblock_updown=True)),
        # Unreadable flags leave the weights' names and shapes unchanged.
        (dict(num_heads=2, use_new_attention_order=True, num_head_channels=16), {}),
    ],
)
def test_reads_back_the_flags_a_model_was_built_with(flags, differs):
    assert read_unet_flags(built(**flags)) == {**TINY_READ, **differs}


def test_one_level_has_no_resampling_to_read():
    read = read_unet_flags(built(channel_mult="2", attention_resolutions="32"))
    assert "resblock_updown" not in read
    assert read == {
        **{k: v for k, v in TINY_READ.items() if k != "resblock_updown"},
        "channel_mult": "2",
        "attention_ds": (1,),
    }


def test_a_state_dict_of_something_else_is_not_read():
    with pytest.raises(ValueError, match="U-Net"):
        read_unet_flags({"weight": th.zeros(3, 3)})


# -- a checkpoint that does not fit the flags -------------------------------------


def misfit_message(expected, found, **kwargs):
    with pytest.raises(ValueError) as err:
        check_state_dict_fits(expected, found, "run/model000010.pt", **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_misfit_names_the_flag_and_both_values():
    message = misfit_message(built(), built(num_channels=64))
    assert "run/model000010.pt" in message
    assert "was trained with `--num_channels 64`; the flags say 32" in message
    # The state dicts differ in hundreds of tensors; only the flag is named.
    assert "input_blocks" not in message and "--num_res_blocks" not in message


def test_a_misfit_names_only_the_flags_that_differ():
    message = misfit_message(
        built(), built(num_channels=64, num_res_blocks=2, learn_sigma=True)
    )
    assert (
        "was trained with `--num_channels 64 --num_res_blocks 2 --learn_sigma True`; "
        "the flags say 32, 1 and False" in message
    )
    for flag in ("--channel_mult", "--attention_resolutions", "--sar_channels"):
        assert flag not in message


def test_a_misfit_in_attention_is_in_resolutions_when_the_image_size_is_known():
    expected = built(channel_mult="1,2,2")
    found = built(channel_mult="1,2,2", attention_resolutions="16,8")
    with_size = misfit_message(expected, found, image_size=32)
    assert "`--attention_resolutions 16,8`; the flags say 16" in with_size
    without = misfit_message(expected, found)
    assert "--attention_resolutions" in without
    assert "downsample rates 2,4" in without and "downsample rates 2" in without


def test_a_misfit_that_the_weights_cannot_explain_lists_the_tensors():
    found = built()
    found["extra.weight"] = th.zeros(1)
    message = misfit_message(built(), found)
    assert "does not fit a model built from these flags" in message
    assert "unexpected: extra.weight" in message


# -- a checkpoint without config.json (the original code's) ------------------------

# The flags the original's sample.sh gives, with the tiny model's values.
SAMPLE_SH = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    learn_sigma=False,
    diffusion_steps=50,
    noise_schedule="linear",
)


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A tiny model saved as the original code leaves it: no config.json beside it."""
    path = tmp_path_factory.mktemp("original_run") / "ema_0.9999_000010.pt"
    th.save(built(), path)
    return path


def refusal(path, explicit):
    with pytest.raises(ValueError) as err:
        checkpoint_model_flags(path, explicit)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_sample_sh_flags_are_enough_and_the_rest_are_guided_diffusions_defaults(
    original_checkpoint,
):
    flags, conflicts, note = checkpoint_model_flags(original_checkpoint, SAMPLE_SH)
    assert conflicts == {}
    # guided-diffusion's defaults (script_util.model_and_diffusion_defaults of
    # openai/guided-diffusion) for what neither the flags nor the weights tell.
    original = dict(
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        use_new_attention_order=False,
        predict_xstart=False,
        rescale_timesteps=False,
    )
    assert {k: flags[k] for k in original} == original
    assert flags["sigma_small"] is False
    # what the weights tell, and what was given
    assert {k: flags[k] for k in ("channel_mult", "attention_resolutions")} == {
        "channel_mult": "1,2",
        "attention_resolutions": "16",
    }
    assert {k: flags[k] for k in SAMPLE_SH} == SAMPLE_SH
    assert "\n" not in note
    for k, v in {**original, "sigma_small": False}.items():
        assert f"--{k} {v}" in note
    assert "--channel_mult 1,2" in note and "--attention_resolutions 16" in note


@pytest.mark.parametrize(
    "left_out",
    [("diffusion_steps",), ("noise_schedule",), ("diffusion_steps", "noise_schedule")],
)
def test_without_the_steps_or_the_schedule_it_asks_for_exactly_those(
    original_checkpoint, left_out
):
    explicit = {k: v for k, v in SAMPLE_SH.items() if k not in left_out}
    message = refusal(original_checkpoint, explicit)
    assert "config.json" in message
    assert set(re.findall(r"--(\w+)", message)) == set(left_out)


def test_a_contradicted_width_and_a_missing_flag_are_named_in_one_message(
    original_checkpoint,
):
    explicit = {**SAMPLE_SH, "num_channels": 64}
    del explicit["diffusion_steps"]
    message = refusal(original_checkpoint, explicit)
    assert "--diffusion_steps" in message
    # the weights' value, to pass on the rerun
    assert "--num_channels 32" in message
    assert "--num_res_blocks" not in message and "--noise_schedule" not in message


def test_a_contradicted_depth_alone_is_named_before_the_model_is_built(
    original_checkpoint,
):
    message = refusal(original_checkpoint, {**SAMPLE_SH, "num_res_blocks": 2})
    assert "--num_res_blocks 1" in message
    assert "--diffusion_steps" not in message and "--num_channels" not in message
