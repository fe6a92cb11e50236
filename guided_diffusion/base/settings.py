"""
Every setting of the project, declared once: its name, default, help and group.

The declarations below produce

* the command-line flags of every script (:func:`add_to_parser`; booleans are given
  as ``--flag True|False``, as in guided-diffusion),
* the record of a run, ``config.json`` (every flag of the run, written by the
  training script), and what reading an older record gives (:func:`read_record`:
  settings it lacks take their defaults),
* what the factories, ``TrainLoop`` and the sampling code receive
  (:func:`defaults`, :func:`values`, :func:`resolve`).

Adding a setting is one :func:`declare` call here plus its use. The groups:
"model" (the U-Net), "diffusion" (the process), "data" (the training data),
"inputs" (what the SAR and optical files hold and how they are scaled),
"training" (the loop), "sampling" (translating images), "samples" (several samples
per input and their spread; apart from "sampling" so that a script offers it only
once it writes the spread), "run" (seed and batch, used by training and sampling
alike) and "speed" (levers that compute the same function faster, or nearly the
same in bfloat16).
"""

import argparse
import json
import re
from dataclasses import dataclass

from ..io import rasters
from . import samplers


@dataclass(frozen=True)
class Setting:
    """One setting: ``--name`` on the command line, ``name`` in a record."""

    name: str
    default: object
    help: str
    group: str
    choices: object = (
        None  # a sequence, or a function returning one (read at parse time)
    )

    def parse(self, text):
        """The value of a command-line string, typed by the default."""
        if isinstance(self.default, bool):
            return str2bool(text)
        if self.default is None:
            return text
        return type(self.default)(text)


# name -> Setting, in declaration order.
SETTINGS = {}

# Flags of model_and_diffusion_defaults() that describe how to sample, not what
# was trained: never taken from the training run's config.json.
SAMPLING_FLAGS = ("timestep_respacing",)

# Flags that change how a model trains or how fast it runs, but not what a trained
# model samples: dropout is off in eval mode, the loss type and its weighting only
# enter training, checkpointing and the fused attention kernel compute the same
# function.
NON_OUTPUT_FLAGS = (
    "dropout",
    "use_checkpoint",
    "use_sdpa",
    "use_kl",
    "rescale_learned_sigmas",
    "snr_gamma",
)


def declare(group, name, default, help, choices=None):
    """Declare a setting; a name may be declared once."""
    if name in SETTINGS:
        raise ValueError(f"setting {name!r} is declared twice")
    SETTINGS[name] = Setting(name, default, help, group, choices)
    return SETTINGS[name]


def names(*groups):
    """The names of the settings of these groups, in declaration order."""
    return [s.name for s in SETTINGS.values() if s.group in groups]


def defaults(*groups):
    """name -> default for the settings of these groups."""
    return {s.name: s.default for s in SETTINGS.values() if s.group in groups}


def values(args, *groups):
    """name -> value of these groups' settings, from an argparse namespace or a dict."""
    source = args if isinstance(args, dict) else vars(args)
    return {name: source[name] for name in names(*groups) if name in source}


def resolve(given, where, *groups):
    """
    The settings a component receives: the groups' defaults, then ``given``.

    :param given: name -> value; names of other groups' settings are ignored (so a
        script may pass every flag it has), undeclared names are an error.
    :param where: the component's name, for the error message.
    :raises TypeError: naming an undeclared setting.
    """
    unknown = [k for k in given if k not in SETTINGS]
    if unknown:
        raise TypeError(f"{where} got unknown setting(s): {', '.join(unknown)}")
    wanted = set(names(*groups))
    return {**defaults(*groups), **{k: v for k, v in given.items() if k in wanted}}


def add_to_parser(parser, *groups, overrides=None, unset=False, only=None):
    """
    Add a flag for every setting of the groups.

    :param overrides: name -> the default this script uses instead of the declared one.
    :param only: if given, just these names of the groups.
    :param unset: give the flags the default None, which marks a flag as not given
        (the sampling scripts then take the training run's record, else the default).
    """
    overrides = overrides or {}
    # "--sar_db_range -25,0": a value that starts like a negative number is a value
    # (Python 3.13 reads it so; earlier versions only "-25" and "-2.5")
    parser._negative_number_matcher = re.compile(r"^-\.?\d[\d.,:eE+-]*$")
    for s in SETTINGS.values():
        if s.group not in groups or (only is not None and s.name not in only):
            continue
        default = overrides.get(s.name, s.default)
        choices = s.choices() if callable(s.choices) else s.choices
        parser.add_argument(
            f"--{s.name}",
            default=None if unset else default,
            type=s.parse,
            choices=choices,
            help=f"{s.help} (default: {default!r})",
        )


def read_record(source):
    """
    A run's record with every declared setting: a setting the record lacks (it was
    written before the setting existed) takes its default; other keys are kept.

    :param source: a path to a JSON record, or the dict read from one.
    """
    if not isinstance(source, dict):
        with open(source) as f:
            source = json.load(f)
    return {**defaults(*{s.group for s in SETTINGS.values()}), **source}


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


# -- the U-Net (guided-diffusion's flags and defaults, plus use_sdpa and sar_channels) --

M = "model"
declare(M, "image_size", 64, "image side in pixels")
declare(M, "num_channels", 128, "channels of the first level")
declare(M, "num_res_blocks", 2, "residual blocks per level")
declare(M, "num_heads", 4, "attention heads")
declare(M, "num_heads_upsample", -1, "attention heads on the way up (-1: num_heads)")
declare(
    M, "num_head_channels", -1, "channels per head, instead of a head count (-1: off)"
)
declare(M, "attention_resolutions", "16,8", "feature-map sizes with attention")
declare(M, "channel_mult", "", "channel multiplier per level (empty: from image_size)")
declare(M, "dropout", 0.0, "dropout in the residual blocks")
declare(M, "use_checkpoint", False, "recompute activations in the backward pass")
declare(M, "use_scale_shift_norm", True, "the timestep scales and shifts the norm")
declare(M, "resblock_updown", False, "resample inside residual blocks")
declare(M, "use_fp16", False, "train in float16 with loss scaling (GPUs)")
declare(M, "use_new_attention_order", False, "split q, k, v before the heads")
declare(
    M,
    "use_sdpa",
    False,
    "attention through scaled_dot_product_attention (same function)",
)
declare(
    M,
    "sar_channels",
    3,
    "SAR channels: 1 (one polarisation), 2 (co- and cross-pol, VV and VH) or 3 "
    "(a grey image replicated, or RGB SAR, as the original)",
    choices=(1, 2, 3),
)

# -- the diffusion process (guided-diffusion's, plus sigma_small) -----------------------

D = "diffusion"
declare(D, "learn_sigma", False, "the model also outputs the variance")
declare(D, "sigma_small", False, "fixed variance: the posterior's instead of beta_t")
declare(D, "diffusion_steps", 1000, "timesteps T of the process")
declare(D, "noise_schedule", "linear", "beta schedule: linear or cosine")
declare(D, "timestep_respacing", "", "steps to sample with: '250', 'ddim50', '10,20'")
declare(D, "use_kl", False, "train on the variational bound")
declare(D, "predict_xstart", False, "the model predicts x_0 instead of the noise")
declare(
    D,
    "predict",
    "",
    "what the model predicts: eps (the noise), x_start (the clean image, the same as "
    "--predict_xstart True) or v (sqrt(abar) eps - sqrt(1 - abar) x_0); empty: as "
    "--predict_xstart says",
    choices=("", "eps", "x_start", "v"),
)
declare(D, "rescale_timesteps", False, "feed the model t scaled to [0, 1000)")
declare(D, "rescale_learned_sigmas", False, "scale the bound term as in improved DDPM")
declare(
    D,
    "snr_gamma",
    0.0,
    "Min-SNR-gamma loss weighting: the MSE of timestep t weighted as an x_0 error "
    "by min(SNR_t, gamma), e.g. 5 (Hang et al.'s; 0: off, as the SAR paper trained)",
)

# -- training data ------------------------------------------------------------------

A = "data"
declare(A, "data_dir_sar", "", "folder of the SAR training images")
declare(A, "data_dir_opt", "", "folder of the optical training images")
declare(A, "random_crop", False, "random crops instead of centre crops")
declare(A, "random_flip", False, "random horizontal flips (both images of a pair)")
declare(A, "num_workers", -1, "data loading processes per rank (-1: min(4, cores))")

# -- what the SAR and optical files hold (rasters.py): read by training, recorded in
# config.json, and read from there by sampling (which may describe its own files)

N = "inputs"
declare(
    N,
    "sar_input",
    "uint8",
    "SAR values: uint8 (8-bit images, as SEN1-2), or calibrated sigma0 in db, "
    "linear power or amplitude",
    choices=rasters.SAR_INPUTS,
)
declare(
    N,
    "sar_db_range",
    "",
    "dB mapped to [-1, 1]: LO,HI for every band or LO1,HI1,LO2,HI2 per band "
    "(empty: -25,0 for VV/HH and -32.5,0 for VH/HV, as SEN12MS-CR)",
)
declare(
    N,
    "sar_nodata",
    "",
    "SAR nodata value, 8-bit too: a number, nan, or none to ignore the file's "
    "(empty: the value the file declares; NaN always); the network sees -1 there "
    "and the output is nodata",
)
declare(
    N,
    "sar_bands",
    "",
    "SAR bands in model order, by name or 1-based index, e.g. VV,VH or 2,1 "
    "(empty: all bands, VV/HH before VH/HV where the file names them)",
)
declare(
    N,
    "opt_bands",
    "",
    "optical red, green and blue bands, 1-based, e.g. 4,3,2 for Sentinel-2 "
    "(empty: RGB images)",
)
declare(
    N,
    "opt_range",
    "",
    "optical values mapped to [-1, 1]: MIN,MAX, e.g. 0,3000 for Sentinel-2 L1C "
    "(empty: 8-bit)",
)

# -- seed and batch, shared by training and sampling --------------------------------

R = "run"
declare(R, "seed", 0, "seed of every random stream (per rank and step, or per image)")
declare(R, "batch_size", 1, "images per process and step")

# -- speed levers (the same function, or nearly in bfloat16) -------------------------

S = "speed"
declare(
    S, "use_bf16", False, "the model under bfloat16 autocast (GPUs, AVX512-BF16 CPUs)"
)
declare(S, "channels_last", False, "NHWC weights and activations (the same function)")
declare(S, "compile", False, "torch.compile the model (minutes of compiling first)")
declare(
    S,
    "use_tf32",
    False,
    "TensorFloat-32 in float32 matrix products and convolutions on NVIDIA GPUs of "
    "the Ampere generation or newer: faster, but with a 10-bit mantissa, so the "
    "last digits differ (False: IEEE float32 throughout, as on a CPU)",
)

# -- the training loop --------------------------------------------------------------

T = "training"
declare(
    T, "schedule_sampler", "uniform", "timestep sampler: uniform, loss-second-moment"
)
declare(T, "lr", 1e-4, "AdamW learning rate")
declare(T, "weight_decay", 0.0, "AdamW weight decay")
declare(
    T, "lr_anneal_steps", 0, "decay lr linearly to 0 over N steps, then stop (0: off)"
)
declare(T, "max_steps", 0, "stop and save at this step (0: run until stopped)")
declare(T, "microbatch", -1, "split a batch into pieces of this size (-1: no split)")
declare(T, "ema_rate", "0.9999", "comma-separated EMA rates")
declare(T, "log_interval", 10, "steps between log lines")
declare(T, "save_interval", 10000, "steps between checkpoints")
declare(
    T, "keep_checkpoints", 0, "keep only the newest N complete checkpoints (0: all)"
)
declare(T, "resume_checkpoint", "", "a model or EMA file to resume from, or 'auto'")
declare(T, "fp16_scale_growth", 1e-3, "growth of the fp16 loss scale")
declare(
    T, "fused_optim", True, "fused AdamW, multi-tensor grad norm and EMA (same values)"
)
declare(
    T, "val_data_dir", "", "a folder with sar/ and opt/ to translate during training"
)
declare(T, "val_interval", 0, "steps between validations (0: at every save)")
declare(T, "val_num", 8, "how many validation pairs")
declare(
    T,
    "val_sampler",
    "dpm++2m",
    "validation sampler",
    choices=lambda: list(samplers.SAMPLERS),
)
declare(T, "val_timestep_respacing", "20", "validation sampling steps")
declare(T, "progress", False, "a progress bar over the steps")

# -- sampling -----------------------------------------------------------------------

P = "sampling"
declare(P, "data_dir", "", "a folder with sar/ and, optionally, opt/ (ground truth)")
declare(
    P, "model_path", "", "a model or EMA file; its run's config.json gives the model"
)
declare(P, "num_samples", -1, "the first N inputs in name order (-1: all)")
declare(P, "clip_denoised", True, "clip every x_0 prediction to [-1, 1]")
declare(P, "sampler", "", "the sampler (empty: consistency for a distilled student; "
        "else ddpm, or ddim with --use_ddim True)",
        choices=lambda: ["", *samplers.SAMPLERS])  # fmt: skip
declare(P, "use_ddim", False, "the original's flag: the same as --sampler ddim")
declare(P, "eta", 0.0, "DDIM's noise scale (0: deterministic)")
declare(P, "solver_order", 2, "DPM-Solver++'s order: 2, or 1 (which is DDIM)")
declare(
    P, "lower_order_final", 2, "DPM-Solver++: first-order final updates (at least 1)"
)

# -- several samples per input (guided_diffusion/translation/samples.py) ---------------------

K = "samples"
declare(
    K,
    "samples_per_input",
    1,
    "samples per input: K > 1 also writes their mean and per-pixel spread (standard "
    "deviation); sample 0 is the single sample of K = 1 (1: one sample, no more files)",
)

del M, D, A, N, R, S, T, P, K
