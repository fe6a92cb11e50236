"""
Translating SAR images into optical images with a trained model.

The pieces a sampling script and the training loop's validation share: loading
a checkpoint with the flags of its run, per-image noise and the samplers behind
one call. Nothing here parses flags or writes results.

Every image draws its noise from its own generator, seeded from (seed, the
image's name) through a stable hash, so its result does not depend on the batch
it shares, on the number of ranks or on the order the images are visited in.
"""

import os
from dataclasses import replace

import numpy as np
import torch as th

from .. import gaussian_diffusion as gd
from .. import logger
from ..base import samplers, settings
from ..base.consistency import ConsistencyModel
from ..base.seeds import hashed_seed
from ..base.settings import NON_OUTPUT_FLAGS, SAMPLING_FLAGS
from ..io.checkpoints import load_state_dict as _load_state_dict
from ..io.checkpoints import read_run_config
from ..io.rasters import FILE_SETTINGS, Scaling
from ..script_util import (
    OPT_CHANNELS,
    attention_downsample_rates,
    attention_resolutions_flag,
    check_state_dict_fits,
    create_gaussian_diffusion,
    create_model,
    diffusion_defaults,
    model_and_diffusion_defaults,
    model_defaults,
    parse_channel_mult,
    prediction_target,
    read_unet_flags,
)

# What a checkpoint without config.json must be given: the weights do not tell
# them, a default would give other images without a word, and the original's
# sample.sh gives them (the model's size, its number of steps and its schedule).
NEEDED_WITHOUT_CONFIG = ("image_size", "diffusion_steps", "noise_schedule")

# The paper's flags (README, sample.sh): the example a message asking for flags gives.
PAPER_FLAGS = {
    **model_and_diffusion_defaults(),
    "image_size": 256,
    "num_channels": 128,
    "num_res_blocks": 3,
    "learn_sigma": False,
    "diffusion_steps": 2000,
    "noise_schedule": "linear",
}


# A distilled student (config.json with a "distillation" record) samples with this
# sampler alone, and with this many steps when --timestep_respacing is not given:
# the bundled student scores its best SSIM and class accuracy at 2 calls, better
# than at 4 or 8, and is sharper than its teacher at 20 (benchmarks/RESULTS.md,
# "Distilled student against its teacher").
STUDENT_SAMPLER = "consistency"
STUDENT_STEPS = 2


def is_student(run_config) -> bool:
    """
    Whether a training run's record is a distilled student's: its config.json has a
    "distillation" record (scripts/image_distill.py writes it).

    :param run_config: :func:`read_run_config`'s record, or None.
    """
    return bool(run_config) and "distillation" in run_config


def checkpoint_is_student(model_path) -> bool:
    """
    Whether the checkpoint is a distilled student's (:func:`is_student` of the
    config.json beside it); False for a path that is no file.

    :raises ValueError: an unreadable config.json.
    """
    return os.path.isfile(model_path) and is_student(read_run_config(model_path))


def fitting_samplers(student) -> list[str]:
    """
    The samplers that sample a model: a student's (samplers.STUDENT_SAMPLERS), or a
    diffusion model's (every other registered one).

    :param student: the model is a distilled student.
    :return: names in samplers.SAMPLERS, in their registered order.
    """
    return samplers.samplers_for(student)


def default_sampler(model_path) -> str:
    """The sampler when none is given: :data:`STUDENT_SAMPLER` for a student's
    checkpoint, ddpm (the original's) for any other."""
    return STUDENT_SAMPLER if checkpoint_is_student(model_path) else "ddpm"


def check_sampler_fits(sampler, model_path):
    """
    Fail on a sampler that does not fit the checkpoint's model: a diffusion model's
    sampler would read a student's x_0 as one step of a trajectory (wrong images, no
    error), and the student's sampler a diffusion model's x_0 as its end.

    :param sampler: the sampler's name.
    :param model_path: a model or EMA file.
    :raises ValueError: one line naming the sampler(s) that fit.
    """
    student = checkpoint_is_student(model_path)
    fits = fitting_samplers(student)
    if sampler in samplers.SAMPLERS and sampler not in fits:
        if student:
            raise ValueError(
                f"--sampler {sampler}: {model_path} is a distilled student (its "
                f"config.json has a distillation record); sample it with --sampler "
                f"{STUDENT_SAMPLER}"
            )
        raise ValueError(
            f"--sampler {sampler} samples distilled students only; {model_path} is a "
            f"diffusion model: choose one of {', '.join(fits)}"
        )


def student_respacing(respacing, num_timesteps) -> str:
    """
    A student's --timestep_respacing as the consistency sampler takes it: a plain
    count N (the student's network calls) becomes "trailingN" (T - 1 and every T / N
    below, base/consistency.trailing_timesteps); empty, :data:`STUDENT_STEPS`.

    :param respacing: the flag's value ("", "4", "trailing4").
    :param num_timesteps: the teacher's T (--diffusion_steps).
    :return: "trailingN".
    :raises ValueError: any other form ("ddim50", "10,20"), or N outside 1 .. T.
    """
    text = str(respacing or STUDENT_STEPS).strip()
    count = text[len("trailing") :] if text.startswith("trailing") else text
    if not count.isdigit() or not 1 <= int(count) <= num_timesteps:
        raise ValueError(
            f"--timestep_respacing {respacing}: a distilled student takes a number of "
            f"steps from 1 to {num_timesteps} (e.g. --timestep_respacing "
            f"{STUDENT_STEPS})"
        )
    return f"trailing{int(count)}"


def student_model(net, flags):
    """
    A student's network read as a consistency model (base/consistency.py), with its
    teacher's schedule, prediction target and timestep scaling from ``flags``.

    :param net: the network, holding the student's weights.
    :param flags: the student's model and diffusion flags (its teacher's).
    :return: a ConsistencyModel, called as the network is.
    """
    betas = gd.get_named_beta_schedule(flags["noise_schedule"], flags["diffusion_steps"])
    return ConsistencyModel(
        net,
        np.cumprod(1.0 - betas),  # the teacher's own T steps, not the respaced ones
        prediction_target(flags["predict"], flags["predict_xstart"]),
        OPT_CHANNELS,
        rescale_timesteps=flags["rescale_timesteps"],
    )


def sample_seed(seed: int, name: str) -> int:
    """
    The seed of one image's noise.

    :param seed: the run's seed.
    :param name: the image's relative path ("/" separators).
    :return: a 63-bit integer from SHA-256 of (seed, name); the same in every
        process and on every machine (Python's ``hash`` is salted per process).
    """
    return hashed_seed(int(seed), name)


def make_generators(seed, names, device="cpu") -> list[th.Generator]:
    """
    One seeded generator per image.

    :param seed: the run's seed.
    :param names: the images' relative paths, in batch order.
    :param device: where the generators live. CPU generators (the default) draw
        the same numbers whatever device the model runs on, to the bit; the samplers
        draw them into pinned memory and copy them to a GPU without making the host
        wait (:func:`~.samplers.noise_of_shape`). Generators on a GPU draw other
        numbers.
    :return: a list of th.Generator, one per name.
    """
    return [
        th.Generator(device=device).manual_seed(sample_seed(seed, name))
        for name in names
    ]


def check_sampler(sampler, eta=0.0, **options):
    """
    Fail early on a sampler name or option :func:`translate` would refuse.

    :param sampler: the sampler's name.
    :param eta: the noise scale; non-zero only for samplers that have one.
    :param options: the sampler's other options.
    :return: ``sampler``.
    :raises ValueError: naming the problem and the choices.
    """
    samplers.check_options(sampler, {"eta": eta, **options})
    return sampler


def sampler_settings(sampler, values):
    """
    The options of ``sampler`` from the settings of a run: every sampler option is a
    setting of the same name (settings.py, group "sampling"), so a sampler registered
    with a new option is configured by declaring one setting.

    :param values: setting name -> value (e.g. ``vars(args)``).
    :return: option name -> value, for :func:`translate`.
    :raises ValueError: another sampler's option set away from its default (``--eta
        0.5`` with ddpm), naming the option and the samplers that have it.
    """
    own = samplers.sampler_options(sampler)
    for name in {k for n in samplers.SAMPLERS for k in samplers.sampler_options(n)}:
        declared = settings.SETTINGS.get(name)
        if (
            name not in own
            and declared
            and values.get(name, declared.default) != declared.default
        ):
            samplers.check_options(sampler, {name: values[name]})  # raises, naming it
    return {k: values[k] for k in own if k in values}


def prepare_model(model, *, channels_last=False, compile=False):
    """
    Switch on the sampling speed levers that act on the model itself; both compute
    the same function.

    :param model: the U-Net; converted to channels_last in place.
    :param channels_last: store the weights in channels_last (NHWC) memory, so the
        convolutions run, and hand on their results, in that layout.
    :param compile: wrap the model in ``torch.compile`` (compiled at the first call,
        which takes minutes; later calls with the same shapes reuse the code).
    :return: the module to pass to :func:`translate`; it shares the model's
        parameters, and the model's state_dict keeps its plain names.
    """
    if channels_last:
        model.to(memory_format=th.channels_last)
    return th.compile(model) if compile else model


class BatchedModel(th.nn.Module):
    """
    The network called on at most ``batch_size`` images at a time: a larger batch
    goes through in parts, whose outputs are concatenated (every image's output
    depends on that image alone).

    Two things a GPU needs:

    * ``pad``: every call is filled up to the batch size by repeating its last
      image, and the copies' outputs are dropped, so that a compiled network sees
      one input shape (a folder's last batch, a rank's last tiles of a step) and
      is compiled once. A batch of another size can change the last bits of the
      others' results, so only under --compile.
    * Out of device memory, the failed part is tried again at half its size, the
      allocator's cache freed first, until it fits; the size that fits is kept for
      the calls after it (:attr:`shrunk` lists each change) and said in the log.
      One image that does not fit raises the error.

    :param model: the network, called as model(x, t, **kwargs).
    :param batch_size: images per call at most (--batch_size).
    :param pad: fill every call up to the batch size (under --compile).
    """

    def __init__(self, model, batch_size, *, pad=False):
        super().__init__()
        self.model = model
        self.batch_size = int(batch_size)
        self.pad = pad
        self.shrunk = []  # (images per call that failed, images per call since)

    def forward(self, x, t, **kwargs):
        n = x.shape[0]
        if n == self.batch_size or (n < self.batch_size and not self.pad):
            return self._call(x, t, kwargs, n, self.batch_size)
        outputs, start = [], 0
        while start < n:
            stop = min(start + self.batch_size, n)
            outputs.append(self._call(x, t, kwargs, n, self.batch_size, start, stop))
            start = stop
        return th.cat(outputs)

    def _call(self, x, t, kwargs, n, size, start=0, stop=None):
        """The images [start, stop) through the network, halving on out of memory."""
        stop = n if stop is None else stop
        count = stop - start
        calls = count if not self.pad else max(count, size)
        try:

            def part(value):
                if not (th.is_tensor(value) and value.dim() and value.shape[0] == n):
                    return value
                value = value[start:stop]
                if calls > count:  # the padding: the last image again
                    extra = value[-1:].expand(calls - count, *value.shape[1:])
                    value = th.cat([value, extra])
                return value

            out = self.model(part(x), part(t), **{k: part(v) for k, v in kwargs.items()})
            return out[:count] if calls > count else out
        except th.OutOfMemoryError:
            if calls == 1:
                raise
        # out of the except block, so that the error's frames (and the tensors
        # they hold) are gone before the cache is freed and the smaller try
        self.batch_size = calls // 2
        self.shrunk.append((calls, self.batch_size))
        if th.cuda.is_available():
            th.cuda.empty_cache()
        logger.warn(
            f"out of memory at {calls} images per network call: {self.batch_size} "
            "from now on (the same images)"
        )
        parts, at = [], start
        while at < stop:
            end = min(at + self.batch_size, stop)
            parts.append(self._call(x, t, kwargs, n, self.batch_size, at, end))
            at = end
        return th.cat(parts)


class Bfloat16Model(th.nn.Module):
    """
    A model called under bfloat16 autocast, its output cast back to float32, so that
    only the network runs in bfloat16 and a sampler's arithmetic stays float32.

    :param model: the model to wrap, called as model(x, t, **kwargs).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        with th.autocast(x.device.type, dtype=th.bfloat16):
            out = self.model(x, t, **kwargs)
        return out.float()


def translate(
    model,
    diffusion,
    sar,
    *,
    sampler="ddpm",
    generators=None,
    clip_denoised=True,
    eta=0.0,
    progress=False,
    use_bf16=False,
    **options,
) -> th.Tensor:
    """
    Generate the optical images of a batch of SAR images.

    The number of steps is the diffusion's (respaced) ``num_timesteps``. The
    model is switched to eval mode for the call and back afterwards.

    :param model: the U-Net, taking cat([x_t, sar]) as input.
    :param diffusion: the (respaced) diffusion process.
    :param sar: (N, C_sar, H, W) in [-1, 1], on the model's device.
    :param sampler: a name in :data:`guided_diffusion.base.samplers.SAMPLERS`.
    :param generators: None for the global generator, or one th.Generator per
        image (see :func:`make_generators`).
    :param clip_denoised: clip each step's x_start prediction to [-1, 1].
    :param eta: DDIM's noise scale (0: deterministic); only for samplers that
        have one (ddim).
    :param progress: show a progress bar over the steps.
    :param use_bf16: run the model under bfloat16 autocast (fast on GPUs and on
        CPUs with AVX512-BF16); the sampler's own arithmetic stays float32.
    :param options: the sampler's other options, e.g. ``solver_order`` and
        ``lower_order_final`` of dpm++2m (see :mod:`~guided_diffusion.base.samplers`).
    :return: generated optical images, (N, 3, H, W) in [-1, 1].
    """
    options = samplers.check_options(sampler, {"eta": eta, **options})
    shape = (sar.shape[0], OPT_CHANNELS, *sar.shape[2:])
    was_training = model.training
    model.eval()
    denoiser = samplers.Denoiser(
        diffusion, Bfloat16Model(model) if use_bf16 else model, sar,
        clip_denoised=clip_denoised,
    )  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=diffusion.num_timesteps, desc="sampling", unit="step", leave=False)
    try:
        x_T = samplers.noise_of_shape(shape, generators, sar.device)
        return samplers.run(
            sampler, denoiser, x_T, generator=generators,
            callback=None if bar is None else (lambda i, out: bar.update()), **options,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


def to_uint8(images) -> np.ndarray:
    """
    :param images: (N, C, H, W) in [-1, 1], a tensor or an array.
    :return: (N, H, W, C) uint8, ``((x + 1) * 127.5)`` rounded and clamped to [0, 255].
    """
    x = th.as_tensor(images).detach().to("cpu", th.float32)
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(th.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def sar_for_display(images) -> np.ndarray:
    """
    SAR as a picture: one channel grey, three as they are, and two polarisations
    as the usual composite red = co-pol (VV), green = cross-pol (VH), blue = co-pol.

    :param images: (N, H, W, C) uint8, C in 1, 2, 3.
    :return: (N, H, W, 1 or 3) uint8.
    """
    images = np.asarray(images)
    if images.shape[-1] == 2:
        return images[..., [0, 1, 0]]
    return images


def add_model_flags(parser):
    """
    Add every model and diffusion flag to an argparse parser with the default None,
    which marks a flag as not given: it then takes config.json's value, else the
    default (see :func:`explicit_model_flags` and :func:`resolve_model_flags`).
    """
    settings.add_to_parser(parser, "model", "diffusion", unset=True)


def explicit_model_flags(args):
    """The model and diffusion flags given on the command line, name -> value."""
    keys = model_and_diffusion_defaults()
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def resolve_model_flags(explicit, run_config):
    """
    The model and diffusion flags to sample with.

    :param explicit: the flags given on the command line, name -> value.
    :param run_config: the training run's config.json (:func:`read_run_config`),
        or None.
    :return: (flags, conflicts): every key of model_and_diffusion_defaults(),
        taken from ``explicit``, else from ``run_config`` (except
        :data:`SAMPLING_FLAGS`), else the default; and name -> (explicit value,
        config value) for the explicit flags that differ from the config.
    """
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(explicit) - set(defaults))
    if unknown:
        raise TypeError(f"not model or diffusion flags: {', '.join(unknown)}")
    trained = {
        k: run_config[k]
        for k in defaults
        if run_config and k in run_config and k not in SAMPLING_FLAGS
    }
    conflicts = {
        k: (v, trained[k])
        for k, v in explicit.items()
        # a flag that does not change the images (use_sdpa, ...) may differ freely
        if k in trained and v != trained[k] and k not in NON_OUTPUT_FLAGS
    }
    return {**defaults, **trained, **explicit}, conflicts


def checkpoint_model_flags(model_path, explicit):
    """
    The model and diffusion flags to sample a checkpoint with.

    With a ``config.json`` beside the checkpoint, :func:`resolve_model_flags` gives
    them. Without one (a checkpoint of the original code), the architecture flags not
    given are read off the weights (:func:`read_unet_flags`), and
    :data:`NEEDED_WITHOUT_CONFIG` must be given: a default would sample a 2000-step
    model as a 1000-step one without a word. Every other flag takes
    guided-diffusion's default, as the original's ``sample.sh`` left it.

    :param model_path: a model or EMA file.
    :param explicit: the flags given on the command line, name -> value.
    :return: (flags, conflicts, note): the flags and conflicts of
        :func:`resolve_model_flags`, and a line for the log naming the flags read
        off the weights and the defaults taken (None with a config.json).
    :raises ValueError: a one-line message naming the flags to give and those the
        weights contradict (with the weights' values), or a config.json or
        checkpoint that cannot be read.
    """
    run_config = read_run_config(model_path)
    if run_config is not None:
        return (*resolve_model_flags(explicit, run_config), None)
    given, _ = resolve_model_flags(explicit, None)  # the defaults, then the flags
    # Only the shapes are needed; load_model reads the file again, a second or two
    # against the minutes sampling takes, for checkpoints without a record only.
    read = read_unet_flags(_load_state_dict(model_path))
    # Both at once, so that one rerun fixes what is missing and what is wrong.
    problems = []
    missing = [k for k in NEEDED_WITHOUT_CONFIG if k not in explicit]
    if missing:
        example = " ".join(f"--{k} {PAPER_FLAGS[k]}" for k in missing)
        problems.append(
            f"its weights do not tell {', '.join(f'--{k}' for k in missing)}: give "
            f"{'it' if len(missing) == 1 else 'them'} (the paper's model: {example})"
        )
    contradicted = _contradicted_by_weights(explicit, read)
    if contradicted:
        trained = " ".join(f"--{k} {w}" for k, (w, _) in contradicted.items())
        said = ", ".join(f"--{k} {g}" for k, (_, g) in contradicted.items())
        problems.append(
            f"its weights were trained with `{trained}`, not {said}: pass the "
            "trained values"
        )
    if problems:
        raise ValueError(
            f"{model_path} has no config.json beside it; {'; '.join(problems)}"
        )
    read["attention_resolutions"] = attention_resolutions_flag(
        read.pop("attention_ds"), explicit["image_size"]
    )
    taken = {
        k: read[k]
        for k in model_and_diffusion_defaults()
        if k in read and k not in explicit
    }
    learn_sigma = explicit.get("learn_sigma", read["learn_sigma"])
    defaulted = [
        k
        for k in model_and_diffusion_defaults()
        if k not in explicit
        and k not in read
        # use_fp16 sets only the precision, and float32 (the default) is the
        # faithful one; the others do not change the images
        and k not in ("use_fp16", *SAMPLING_FLAGS, *NON_OUTPUT_FLAGS)
        # the fixed variances are chosen between only when it is not learned
        and not (k == "sigma_small" and learn_sigma)
        # the target is the original's --predict_xstart, unless --predict is given
        and k != "predict"
        and not (k == "predict_xstart" and explicit.get("predict"))
    ]
    note = f"no config.json beside {model_path}: {_shown(taken)} read off its weights"
    if defaulted:
        defaults = _shown({k: given[k] for k in defaulted})
        note += f"; guided-diffusion's defaults taken for the rest: {defaults}"
    return {**given, **taken}, {}, note


def _shown(flags):
    """Flags as a command line gives them: ``--name value``, "" for an empty value."""
    return " ".join(f"--{k} {v}" if v != "" else f'--{k} ""' for k, v in flags.items())


def _contradicted_by_weights(explicit, read):
    """
    The given flags that the weights contradict, as name -> (the weights' value,
    the given value), in the order of :func:`read_unet_flags`' flags. Attention is
    compared where the image size is given, since the flag lists image_size // rate.

    :param explicit: the flags given on the command line, name -> value.
    :param read: :func:`read_unet_flags` of the checkpoint.
    """
    image_size = explicit.get("image_size")
    contradicted = {}
    for k in read:
        if k == "attention_ds":
            if image_size and "attention_resolutions" in explicit:
                given = explicit["attention_resolutions"]
                rates = attention_downsample_rates(given, image_size)
                if sorted(rates) != sorted(read[k]):
                    contradicted["attention_resolutions"] = (
                        attention_resolutions_flag(read[k], image_size) or '""',
                        given or '""',
                    )
        elif k == "channel_mult":
            given = explicit.get(k)
            if given and parse_channel_mult(given, image_size) != parse_channel_mult(
                read[k], image_size
            ):
                contradicted[k] = (read[k], given)
        elif k in explicit and explicit[k] != read[k]:
            contradicted[k] = (read[k], explicit[k])
    return contradicted


def input_scaling(run_config, given, sar_channels):
    """
    How to read the inputs of a model: its training run's record, then the
    "inputs" settings given now. Those describing the files (sar_input,
    sar_nodata, sar_bands) may differ freely; a dB range or optical scaling other
    than the one the model learned on is used, and reported as a conflict.

    :param run_config: :func:`read_run_config`'s record, or None (a checkpoint of
        the original code, or of a run before rasters: 8-bit, as then).
    :param given: setting name -> value given on the command line (None: not given).
    :param sar_channels: the model's.
    :return: (rasters.Scaling, name -> (given value, recorded value) conflicts).
    """
    recorded = (run_config or {}).get("inputs")
    base = Scaling.from_record(recorded) if recorded else Scaling()
    base = replace(base, sar_channels=sar_channels)
    scaling, changed = base.updated(given)
    conflicts = {
        k: (given[k], getattr(base, k))
        for k in changed
        if recorded and k not in FILE_SETTINGS
    }
    return scaling, conflicts


def add_sampling_flags(
    parser, groups=("sampling", "run", "speed"), overrides=None, skip=()
):
    """
    The flags of a script that samples a checkpoint: the groups' settings (but
    ``skip``), the "inputs" settings and the model and diffusion flags (those two
    unset: they default to the training run's record, see :func:`checkpoint_settings`).
    """
    only = [n for n in settings.names(*groups) if n not in skip]
    settings.add_to_parser(parser, *groups, overrides=overrides, only=only)
    settings.add_to_parser(parser, "inputs", unset=True)
    add_model_flags(parser)


def checkpoint_settings(model_path, explicit, given_inputs):
    """
    What sampling a checkpoint needs from its training run: the model and
    diffusion flags, the input scaling and the (respaced) diffusion.

    :param explicit: the model and diffusion flags given on the command line.
    :param given_inputs: the "inputs" settings given (None where not given).
    :return: (flags, scaling, diffusion, log): ``log`` holds the lines to log once
        the log is set up, as (is_warning, text). A distilled student's
        ``timestep_respacing`` is given as "trailingN" (:func:`student_respacing`).
    :raises ValueError: as :func:`checkpoint_model_flags`, or a student's steps
        that are no count.
    """
    flags, conflicts, read_note = checkpoint_model_flags(model_path, explicit)
    run_config = read_run_config(model_path)
    scaling, input_conflicts = input_scaling(run_config, given_inputs, flags["sar_channels"])
    config_path = os.path.join(
        os.path.dirname(os.path.abspath(model_path)), "config.json"
    )
    log = [(False, read_note)] if read_note else []
    for k, (mine, trained) in {**conflicts, **input_conflicts}.items():
        log.append(
            (True, f"warning: --{k} {mine} differs from {k}={trained!r} in "
                   f"{config_path}; using {mine}")
        )  # fmt: skip
    log.append((False, f"inputs: {scaling.describe()}"))
    if is_student(run_config):
        given = flags["timestep_respacing"]
        flags = {
            **flags,
            "timestep_respacing": student_respacing(given, flags["diffusion_steps"]),
        }
        log.append(
            (False, f"a distilled student: --timestep_respacing {given or '(not given)'} "
                    f"samples at {flags['timestep_respacing']} of its teacher's "
                    f"{flags['diffusion_steps']} steps")
        )  # fmt: skip
    diffusion = create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{k: flags[k] for k in diffusion_defaults() if k != "diffusion_steps"},
    )
    return flags, scaling, diffusion, log


def write_log(lines):
    """Log the lines of :func:`checkpoint_settings`."""
    for is_warning, text in lines:
        (logger.warn if is_warning else logger.log)(text)


def runs_in_fp16(use_fp16, device, use_bf16=False):
    """
    Whether a model trained with ``use_fp16`` samples in float16 (see
    :func:`load_model`): on a device other than the CPU, unless ``use_bf16`` asks
    for bfloat16 autocast, which then runs on its float32 weights.

    :param use_fp16: the model's flag (its training run's).
    :param device: where it runs.
    :param use_bf16: --use_bf16.
    """
    return bool(use_fp16) and th.device(device).type != "cpu" and not use_bf16


def tf32_in_effect(use_tf32, device):
    """Whether --use_tf32 changes the arithmetic: on CUDA devices only (a CPU's
    float32 is IEEE float32 whatever the setting)."""
    return bool(use_tf32) and th.device(device).type == "cuda"


def load_prepared_model(job, flags, device):
    """
    The model of a job (jobs.Sampling), loaded (:func:`load_model`) and prepared
    with its speed settings (:func:`prepare_model`).

    :param flags: the model flags (jobs.resolve).
    """
    model = load_model(job.model_path, flags, device, use_bf16=job.use_bf16)
    return prepare_model(model, channels_last=job.channels_last, compile=job.compile)


def load_model(model_path, model_flags, device, *, use_bf16=False):
    """
    Build the U-Net from flags and load a checkpoint into it, strictly.

    A model trained with ``use_fp16`` runs in float16 on a GPU. On a CPU, whose
    float16 kernels are slow where they exist, it runs in float32, said in one log
    line: the checkpoint holds the float32 master weights, so nothing is lost.
    With ``use_bf16`` it keeps those float32 weights on a GPU too, and runs under
    bfloat16 autocast alone (float16 weights under bfloat16 autocast would be cast
    at every call and mix the two formats), also said in the log.

    :param model_path: a model or EMA file (a plain state dict).
    :param model_flags: model flags (keys of model_and_diffusion_defaults();
        diffusion keys are ignored, missing keys take their defaults).
    :param device: where to put the model.
    :param use_bf16: the caller runs the model under bfloat16 autocast (see
        :func:`translate`): a ``use_fp16`` model then keeps its float32 weights.
    :return: the model in eval mode, in float16 when :func:`runs_in_fp16`
        (``model.dtype`` tells); a distilled student's (:func:`is_student`) wrapped
        in a ConsistencyModel (:func:`student_model`; the network is its ``net``).
    :raises FileNotFoundError: no such file.
    :raises ValueError: the file is not a state dict, or its names and shapes
        do not fit a model built from ``model_flags``.
    """
    flags = {**model_and_diffusion_defaults(), **model_flags}
    use_fp16 = runs_in_fp16(flags["use_fp16"], device, use_bf16)
    if flags["use_fp16"] and not use_fp16:
        if th.device(device).type == "cpu":
            where = "on a CPU "
        else:  # --use_bf16 True on a GPU: one precision, the one asked for now
            where = "with --use_bf16 True "
        how = "bfloat16 autocast (--use_bf16 True)" if use_bf16 else "float32"
        logger.log(
            f"use_fp16 True (trained in float16): {where}{model_path} samples in "
            f"{how} on its float32 weights"
        )
    model = create_model(
        **{k: flags[k] for k in model_defaults() if k != "use_fp16"},
        use_fp16=use_fp16,
        learn_sigma=flags["learn_sigma"],
    )
    state_dict = _load_state_dict(model_path)
    check_state_dict_fits(
        model.state_dict(), state_dict, model_path, image_size=flags["image_size"]
    )
    model.load_state_dict(state_dict, strict=True)
    if use_fp16:
        model.convert_to_fp16()
    if checkpoint_is_student(model_path):
        model = student_model(model, flags)
    return model.to(device).eval()
