"""
Defaults, factories and argparse helpers shared by the scripts.

The ``*_defaults`` functions read the declarations of settings.py, the single source
of truth: the command-line flags are generated from them and the factories fill every
argument they are not given from them, so the two can never drift apart.
"""

import re

import torch as th

from . import gaussian_diffusion as gd
from .base import settings
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
    return settings.defaults("diffusion")


def model_defaults():
    """Defaults of the U-Net (guided-diffusion's, plus use_sdpa and sar_channels)."""
    return settings.defaults("model")


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
    return UNetModel(
        image_size=image_size,
        in_channels=OPT_CHANNELS + args["sar_channels"],
        model_channels=num_channels,
        out_channels=OPT_CHANNELS * 2 if learn_sigma else OPT_CHANNELS,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(
            args["attention_resolutions"], image_size
        ),
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


def attention_downsample_rates(attention_resolutions, image_size):
    """
    The downsample rates at which the U-Net attends, as guided-diffusion converts
    ``--attention_resolutions``: each resolution r becomes image_size // r.

    :param attention_resolutions: comma-separated resolutions, e.g. "16,8".
    :param image_size: the image size the resolutions refer to.
    :return: a tuple of rates, e.g. (16, 32) for "16,8" at 256 px.
    :raises ValueError: an entry that is not a resolution dividing image_size.
    """
    rates = []
    for res in str(attention_resolutions).split(","):
        res = res.strip()
        if not res:
            continue
        if not res.isdigit() or int(res) == 0 or image_size % int(res):
            raise ValueError(
                f"--attention_resolutions {attention_resolutions!r}: each entry must be "
                f"a resolution that divides --image_size {image_size}, e.g. '16,8'"
            )
        rates.append(image_size // int(res))
    return tuple(rates)


def attention_resolutions_flag(rates, image_size):
    """
    The ``--attention_resolutions`` value that gives these downsample rates; the
    inverse of :func:`attention_downsample_rates`.

    :param rates: downsample rates, e.g. (16, 32).
    :param image_size: the image size.
    :return: e.g. "16,8" for (16, 32) at 256 px; "" for no attention.
    :raises ValueError: a rate that does not divide image_size.
    """
    for rate in rates:
        if image_size % rate:
            raise ValueError(
                f"--image_size {image_size}: the model attends at downsample rate {rate}, "
                "so the image size must be a multiple of it"
            )
    return ",".join(str(image_size // rate) for rate in sorted(rates))


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
    target = prediction_target(args["predict"], args["predict_xstart"])
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.PREDICTION_TARGETS[target],
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=args["rescale_timesteps"],
        snr_gamma=args["snr_gamma"],
    )


def prediction_target(predict, predict_xstart):
    """
    What the model predicts, from ``--predict`` and the original's ``--predict_xstart``.

    ``--predict`` empty (its default, and what a ``config.json`` written before it
    existed reads as) leaves the choice to ``--predict_xstart``: x_start when it is
    True, else eps, as in the original. ``--predict_xstart False`` is its default
    too, so it never contradicts ``--predict``; ``--predict_xstart True`` does,
    unless ``--predict`` is x_start or empty.

    :param predict: "", "eps", "x_start" or "v" (None counts as "").
    :param predict_xstart: a bool.
    :return: "eps", "x_start" or "v" (a key of gaussian_diffusion.PREDICTION_TARGETS).
    :raises ValueError: an unknown target, or the two flags contradict each other.
    """
    predict = predict or ""  # None: not given
    if predict not in ("", *gd.PREDICTION_TARGETS):
        raise ValueError(
            f"--predict {predict!r}: choose eps, x_start or v (or leave it empty)"
        )
    if predict_xstart and predict not in ("", "x_start"):
        raise ValueError(
            f"--predict_xstart True contradicts --predict {predict}: give one "
            "(--predict_xstart True is --predict x_start)"
        )
    return predict or ("x_start" if predict_xstart else "eps")


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


str2bool = settings.str2bool


def read_unet_flags(state_dict):
    """
    The flags of a U-Net that the names and shapes of its tensors tell.

    The number of heads, the attention order, the image size and the diffusion
    flags leave no trace in the weights and are not read.

    :param state_dict: a state dict of :class:`UNetModel` (guided-diffusion's names).
    :return: a dict with num_channels, num_res_blocks, channel_mult (the flag's
        string, e.g. "1,1,2,2,4,4"), sar_channels, learn_sigma, use_scale_shift_norm,
        resblock_updown (only for a model that down- and upsamples), and
        attention_ds: the downsample rates of the levels that attend, increasing
        (``--attention_resolutions`` lists image_size // rate, see
        :func:`attention_resolutions_flag`).
    :raises ValueError: it is not the state dict of such a U-Net.
    """

    def shape(key):
        value = state_dict.get(key)
        if not isinstance(value, th.Tensor):
            raise ValueError(
                f"not the state dict of a guided-diffusion U-Net (no {key})"
            )
        return tuple(value.shape)

    def has(block, part, name):
        return f"output_blocks.{block}.{part}.{name}" in state_dict

    num_channels = shape("time_embed.0.weight")[1]
    out_channels = shape("out.2.weight")[0]
    if out_channels not in (OPT_CHANNELS, 2 * OPT_CHANNELS):
        raise ValueError(
            f"not the state dict of a U-Net that generates {OPT_CHANNELS} optical "
            f"channels (it outputs {out_channels})"
        )
    # The output blocks hold every level's structure: per level, num_res_blocks + 1
    # blocks from the deepest level up, each a residual block (part 0), then
    # attention (qkv) where the level attends, and in the level's last block an
    # upsample (a conv, or a residual block with resblock_updown), except at level 0.
    parts = {}
    for key in state_dict:
        match = re.match(r"output_blocks\.(\d+)\.(\d+)\.", key)
        if match:
            parts.setdefault(int(match[1]), set()).add(int(match[2]))
    upsamples = [
        n
        for n in sorted(parts)
        if any(
            has(n, m, "conv.weight") or has(n, m, "in_layers.0.weight")
            for m in parts[n] - {0}
        )
    ]
    per_level = upsamples[0] + 1 if upsamples else len(parts)
    levels = len(parts) // per_level if per_level else 0
    if (
        not levels
        or sorted(parts) != list(range(levels * per_level))
        or upsamples != [per_level * k + per_level - 1 for k in range(levels - 1)]
    ):
        raise ValueError(
            "not the state dict of a guided-diffusion U-Net (unexpected output blocks)"
        )

    def blocks_of(level):
        first = (levels - 1 - level) * per_level
        return range(first, first + per_level)

    widths = [
        shape(f"output_blocks.{blocks_of(level)[0]}.0.out_layers.3.weight")[0]
        for level in range(levels)
    ]
    flags = dict(
        num_channels=num_channels,
        num_res_blocks=per_level - 1,
        channel_mult=",".join(
            str(w // num_channels) if w % num_channels == 0 else f"{w / num_channels:g}"
            for w in widths
        ),
        attention_ds=tuple(
            2**level
            for level in range(levels)
            if any(has(n, 1, "qkv.weight") for n in blocks_of(level))
        ),
        # scale and shift take twice the block's width from the embedding.
        use_scale_shift_norm=shape("middle_block.0.emb_layers.1.weight")[0]
        == 2 * shape("middle_block.0.out_layers.3.weight")[0],
        sar_channels=shape("input_blocks.0.0.weight")[1] - OPT_CHANNELS,
        learn_sigma=out_channels == 2 * OPT_CHANNELS,
    )
    if upsamples:
        last = max(parts[upsamples[0]])
        flags["resblock_updown"] = has(upsamples[0], last, "in_layers.0.weight")
    return flags


# The order a message names read_unet_flags' flags in (attention_ds is
# --attention_resolutions).
_READ_ORDER = (
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "attention_ds",
    "use_scale_shift_norm",
    "resblock_updown",
    "sar_channels",
    "learn_sigma",
)


def check_state_dict_fits(expected, found, path, image_size=None):
    """
    Raise a ValueError when the state dict ``found`` (read from ``path``) does not
    fit the model whose state dict is ``expected``. The message names the flags
    that differ, with the trained and the given values, where the weights tell
    them; otherwise the tensors that differ.

    :param expected: the state dict of the model built from the flags.
    :param found: the state dict read from the file.
    :param path: the file, for the message.
    :param image_size: the image size of the flags, to name attention levels as
        ``--attention_resolutions`` values; without it they are downsample rates.
    :raises ValueError: a one-line message naming the file, what differs and what
        to do.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k} is {_shape(found[k])} in the file, {_shape(expected[k])} from the flags"
        for k in expected
        if k in found and _shape(found[k]) != _shape(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    differ = _flags_that_differ(expected, found, image_size)
    if differ:
        said = [given for _, given in differ.values()]
        said = ", ".join(said[:-1]) + " and " + said[-1] if len(said) > 1 else said[0]
        trained = " ".join(f"--{k} {value}" for k, (value, _) in differ.items())
        raise ValueError(
            f"{path} does not fit a model built from these flags: it was trained "
            f"with `{trained}`; the flags say {said}. Pass the trained values "
            "(config.json of its training run lists every flag)"
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
    raise ValueError(
        f"{path} does not fit a model built from these flags ({'; '.join(problems)}); "
        "pass the model flags it was trained with (they are in config.json of its "
        "training run; put that file next to the checkpoint to use them)"
    )


def _flags_that_differ(expected, found, image_size):
    """Flag name -> (trained value, given value) as text, for the readable flags."""
    try:
        given, trained = read_unet_flags(expected), read_unet_flags(found)
    except ValueError:
        return {}
    differ = {}
    for key in _READ_ORDER:
        if key in given and key in trained and given[key] != trained[key]:
            if key == "attention_ds":
                key, values = "attention_resolutions", (trained[key], given[key])
                differ[key] = tuple(_attention_text(v, image_size) for v in values)
            else:
                differ[key] = (str(trained[key]), str(given[key]))
    return differ


def _attention_text(rates, image_size):
    if image_size:
        try:
            return attention_resolutions_flag(rates, image_size) or '""'
        except ValueError:
            pass  # the flags' image size cannot be the trained one: show the rates
    return f"(downsample rates {','.join(map(str, rates)) or 'none'})"


def _shape(value):
    return tuple(value.shape) if isinstance(value, th.Tensor) else type(value).__name__
