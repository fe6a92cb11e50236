"""
Defaults, factories and argparse helpers shared by the scripts.

The dicts returned by the ``*_defaults`` functions are the single source of truth:
the command-line flags are generated from them and the factories fill every
argument they are not given from them, so the two can never drift apart.
"""

import argparse

import torch as th

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import UNetModel

# The number of optical channels the model generates.
OPT_CHANNELS = 3

# Channel multipliers per level for the sizes guided-diffusion knows, plus 32 for
# small experiments and tests.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2),
}


def diffusion_defaults():
    """Defaults of the diffusion process (guided-diffusion's, plus sigma_small)."""
    return dict(
        learn_sigma=False,
        sigma_small=False,  # with learn_sigma False: posterior variance instead of beta_t
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def model_defaults():
    """Defaults of the U-Net (guided-diffusion's, plus use_sdpa and sar_channels)."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        use_sdpa=False,  # attention through scaled_dot_product_attention (same function)
        sar_channels=3,  # SAR channels fed to the model (1-channel SAR is replicated to 3)
    )


def model_and_diffusion_defaults():
    """Every flag that defines a model and its diffusion process."""
    return {**model_defaults(), **diffusion_defaults()}


def create_model_and_diffusion(**kwargs):
    """
    Build the U-Net and the diffusion process.

    :param kwargs: any keys of model_and_diffusion_defaults(); missing ones take
        their defaults.
    :return: a tuple (model, diffusion).
    """
    args = _with_defaults(
        kwargs, model_and_diffusion_defaults(), "create_model_and_diffusion"
    )
    model = create_model(
        **{k: args[k] for k in model_defaults()}, learn_sigma=args["learn_sigma"]
    )
    diffusion = create_gaussian_diffusion(
        steps=args["diffusion_steps"],
        **{k: args[k] for k in diffusion_defaults() if k != "diffusion_steps"},
    )
    return model, diffusion


def create_model(image_size, num_channels, num_res_blocks, learn_sigma=None, **kwargs):
    """
    Build the U-Net.

    :param kwargs: the other keys of model_defaults(); missing ones take their defaults.
    """
    positional = ("image_size", "num_channels", "num_res_blocks")
    defaults = {k: v for k, v in model_defaults().items() if k not in positional}
    args = _with_defaults(kwargs, defaults, "create_model")
    if learn_sigma is None:
        learn_sigma = diffusion_defaults()["learn_sigma"]

    channel_mult = parse_channel_mult(args["channel_mult"], image_size)
    attention_ds = []
    for res in str(args["attention_resolutions"]).split(","):
        res = res.strip()
        if not res:
            continue
        if not res.isdigit() or int(res) == 0 or image_size % int(res):
            raise ValueError(
                f"--attention_resolutions {args['attention_resolutions']!r}: each entry must be "
                f"a resolution that divides --image_size {image_size}, e.g. '16,8'"
            )
        attention_ds.append(image_size // int(res))

    return UNetModel(
        image_size=image_size,
        in_channels=OPT_CHANNELS + args["sar_channels"],
        model_channels=num_channels,
        out_channels=OPT_CHANNELS * 2 if learn_sigma else OPT_CHANNELS,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_ds),
        dropout=args["dropout"],
        channel_mult=channel_mult,
        use_checkpoint=args["use_checkpoint"],
        use_fp16=args["use_fp16"],
        num_heads=args["num_heads"],
        num_head_channels=args["num_head_channels"],
        num_heads_upsample=args["num_heads_upsample"],
        use_scale_shift_norm=args["use_scale_shift_norm"],
        resblock_updown=args["resblock_updown"],
        use_new_attention_order=args["use_new_attention_order"],
        use_sdpa=args["use_sdpa"],
    )


def parse_channel_mult(channel_mult, image_size):
    """
    The channel multipliers: from a string like "1,2,2,4", or the default for the
    image size when the string is empty.
    """
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            sizes = ", ".join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))
            raise ValueError(
                f"no default --channel_mult for --image_size {image_size} (defaults exist "
                f"for {sizes}); pass one, e.g. --channel_mult 1,2,2,4"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    try:
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    except ValueError:
        raise ValueError(
            f"--channel_mult {channel_mult!r}: expected comma-separated numbers like 1,2,2,4"
        ) from None


def create_gaussian_diffusion(*, steps=None, **kwargs):
    """
    Build the diffusion process, respaced when timestep_respacing is set.

    :param steps: the number of diffusion steps T (default: diffusion_steps).
    :param kwargs: the other keys of diffusion_defaults(); missing ones take their defaults.
    """
    defaults = diffusion_defaults()
    if steps is None:
        steps = defaults["diffusion_steps"]
    defaults.pop("diffusion_steps")
    args = _with_defaults(kwargs, defaults, "create_gaussian_diffusion")

    betas = gd.get_named_beta_schedule(args["noise_schedule"], steps)
    if args["use_kl"]:
        loss_type = gd.LossType.RESCALED_KL
    elif args["rescale_learned_sigmas"]:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if args["learn_sigma"]:
        var_type = gd.ModelVarType.LEARNED_RANGE
    elif args["sigma_small"]:
        var_type = gd.ModelVarType.FIXED_SMALL
    else:
        var_type = gd.ModelVarType.FIXED_LARGE
    timestep_respacing = args["timestep_respacing"] or [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X
        if args["predict_xstart"]
        else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=args["rescale_timesteps"],
    )


def _with_defaults(kwargs, defaults, where):
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"{where}() got unknown arguments: {', '.join(unknown)}")
    return {**defaults, **kwargs}


def add_dict_to_argparser(parser, default_dict):
    """
    Add a ``--key`` flag for every entry, typed by its default; booleans are given as
    ``--flag True`` or ``--flag False``.
    """
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    """The entries of an argparse namespace for the given keys."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse a boolean flag value: True/False, yes/no, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"boolean value expected (True or False), got {v!r}"
    )


def check_state_dict_fits(expected, found, path):
    """
    Raise a ValueError that names what differs when the state dict ``found`` (read
    from ``path``) does not fit the model whose state dict is ``expected``.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k} is {_shape(found[k])} in the file, {_shape(expected[k])} from the flags"
        for k in expected
        if k in found and _shape(found[k]) != _shape(expected[k])
    )
    problems = [
        f"{what}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path} does not fit a model built from these flags ({'; '.join(problems)}); "
            "pass the model flags it was trained with (they are in config.json of its "
            "training run; put that file next to the checkpoint to use them)"
        )


def _shape(value):
    return tuple(value.shape) if isinstance(value, th.Tensor) else type(value).__name__
