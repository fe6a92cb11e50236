"""
The translation jobs, typed: everything translating a folder (:class:`FolderJob`) or
a whole scene (:class:`SceneJob`) needs, each field written down.

The scripts build a job from their flags (:meth:`Sampling.from_flags`, given the
parsed flags as a dict), the web page from its controls (the constructor); the
library runs it (``folder.translate_folder``, ``scene_translation.translate_scene``)
and reads nothing else. A job renders the command line that runs it
(:meth:`Sampling.command`), which the page shows and never parses back. The fields'
defaults are the scripts' (the settings declared in settings.py, with the scripts'
own defaults for the batch size).

What the checkpoint's training run decides (the model and diffusion flags, how the
inputs are scaled) is resolved once per job by :func:`resolve`, from the flags the
job gives (``model_flags``, ``inputs``) and the run's ``config.json``.
"""

import os
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from ..base import settings
from ..base.samplers import SAMPLERS, sampler_options
from ..io.sentinel1 import is_product
from ..script_util import model_and_diffusion_defaults
from .samples import check_samples_per_input
from .sampling import (
    check_sampler,
    check_sampler_fits,
    checkpoint_settings,
    default_sampler,
    sampler_settings,
)


def _default(name):
    return settings.SETTINGS[name].default


class CheckpointSettings(NamedTuple):
    """What sampling a checkpoint takes from its training run (:func:`resolve`)."""

    flags: dict  # every model and diffusion flag
    scaling: object  # rasters.Scaling: how the files are read
    diffusion: object  # the respaced diffusion
    notes: list  # (is_warning, text) lines for the log


def resolve(job):
    """
    The checkpoint's settings for a job: its model and diffusion flags, its input
    scaling and the respaced diffusion (``sampling.checkpoint_settings``).

    :param job: a :class:`Sampling` (a folder or scene job).
    :return: a :class:`CheckpointSettings`.
    :raises ValueError: one line naming the flags to give or that the weights
        contradict, or an unreadable config.json.
    """
    given = {name: job.inputs.get(name) for name in settings.names("inputs")}
    return CheckpointSettings(*checkpoint_settings(job.model_path, job.model_flags, given))


@dataclass(frozen=True)
class Sampling:
    """
    How a checkpoint samples: what a folder job and a scene job share.

    :param model_path: a model or EMA file; its run's config.json gives the model.
    :param sampler: a name in samplers.SAMPLERS that fits the model
        (``sampling.fitting_samplers``: "consistency" for a distilled student).
    :param options: the sampler's options (``eta`` of ddim, ``solver_order`` and
        ``lower_order_final`` of dpm++2m); those left out take their defaults.
    :param seed: the seed of every image's noise (with the image's name).
    :param clip_denoised: clip every x_0 prediction to [-1, 1].
    :param samples_per_input: K samples of every input (K > 1 adds their mean and
        spread).
    :param batch_size: images (folder) or tiles (scene) per network call.
    :param use_bf16, channels_last, compile, use_tf32: the speed settings.
    :param model_flags: the model and diffusion flags given (``timestep_respacing``
        among them); the others come from the checkpoint's config.json.
    :param inputs: the "inputs" settings given, describing these files (the others
        as the training run read its data).
    """

    model_path: str = ""
    sampler: str = "ddpm"
    options: dict = field(default_factory=dict)
    seed: int = _default("seed")
    clip_denoised: bool = _default("clip_denoised")
    samples_per_input: int = _default("samples_per_input")
    batch_size: int = 8
    use_bf16: bool = _default("use_bf16")
    channels_last: bool = _default("channels_last")
    compile: bool = _default("compile")
    use_tf32: bool = _default("use_tf32")
    model_flags: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    # the script that runs the job, relative to the repository, and the flags its
    # command shows whatever their values
    SCRIPT = ""
    ALWAYS = ()

    def __post_init__(self):
        # every option of the sampler, at its default where not given: jobs of the
        # same sampling compare (and are recorded) alike however they were built
        if self.sampler in SAMPLERS:
            options = {**sampler_options(self.sampler), **self.options}
            object.__setattr__(self, "options", options)

    @property
    def timestep_respacing(self):
        """The steps to sample with, as given (None: the training run's record)."""
        return self.model_flags.get("timestep_respacing")

    @classmethod
    def from_flags(cls, values):
        """
        The job of a script's parsed flags.

        :param values: flag name -> value: every flag of the script (``vars()`` of
            its parsed namespace); model, diffusion and "inputs" flags None where
            not given.
        :return: the checked job (:meth:`check`).
        :raises ValueError: a one-line message naming the flag.
        """
        if values.get("use_ddim") and values.get("sampler") not in ("", "ddim", None):
            raise ValueError(
                f"--use_ddim True contradicts --sampler {values['sampler']}; give one"
            )
        # not given: ddim with the original's --use_ddim, else the model's own
        # (a distilled student's is "consistency", a diffusion model's ddpm)
        own_default = default_sampler(values.get("model_path") or "")
        sampler = values.get("sampler") or ("ddim" if values.get("use_ddim") else own_default)
        explicit = {
            k: values[k]
            for k in model_and_diffusion_defaults()
            if values.get(k) is not None
        }
        inputs = {
            k: values[k] for k in settings.names("inputs") if values.get(k) is not None
        }
        special = {"sampler", "options", "model_flags", "inputs"}
        own = {
            f.name: values[f.name]
            for f in fields(cls)
            if f.name in values and f.name not in special
        }
        job = cls(
            **own,
            sampler=sampler,
            options=sampler_settings(sampler, values),
            model_flags=explicit,
            inputs=inputs,
        )
        return job.check()

    def check(self):
        """
        :return: the job, when its values can run.
        :raises ValueError: one line naming the flag and what to do.
        """
        if self.model_flags.get("use_fp16") and self.use_bf16:
            raise ValueError(
                "--use_fp16 True and --use_bf16 True ask for two precisions; give one "
                "(a model trained with --use_fp16 samples in bfloat16 with --use_bf16 "
                "True alone)"
            )
        if not self.model_path:
            raise ValueError(
                "--model_path is required: a model or EMA file of a training run"
            )
        if not os.path.isfile(self.model_path):
            raise ValueError(f"--model_path {self.model_path}: no such file")
        check_sampler(self.sampler, **self.options)
        check_sampler_fits(self.sampler, self.model_path)
        check_samples_per_input(self.samples_per_input)
        return self

    def _flags(self):
        """flag -> value of the command line, the job's own fields first."""
        return {
            "model_path": self.model_path,
            "sampler": self.sampler,
            **{k: v for k, v in self.model_flags.items() if k == "timestep_respacing"},
            "seed": self.seed,
            **self.options,
            **{k: v for k, v in self.model_flags.items() if k != "timestep_respacing"},
            **self.inputs,
        }

    def command(self, shown=None):
        """
        The command line that runs this job: the script and the flags whose values
        differ from the script's defaults (the checkpoint, sampler, steps and seed
        always).

        :param shown: value -> how to show it (a path in another form).
        :return: a list of strings, starting with "python" and the script.
        """
        shown = shown or {}
        always = {"model_path", "sampler", "timestep_respacing", "seed", *self.ALWAYS}
        defaults = {f.name: f.default for f in fields(self)}
        defaults.update(sampler_options(self.sampler))
        argv = ["python", self.SCRIPT]
        for name, value in self._flags().items():
            if name not in always and name in defaults and value == defaults[name]:
                continue
            if name in SWITCHES:  # given bare, as argparse's store_true reads them
                argv += [f"--{name}"] if value else []
                continue
            argv += [f"--{name}", str(shown.get(value, value))]
        return argv


# Flags that are given without a value (argparse's store_true).
SWITCHES = ("resample",)


@dataclass(frozen=True)
class FolderJob(Sampling):
    """
    Translate a folder of SAR patches (scripts/image_sample_realtime.py).

    :param data_dir: a folder with sar/ and, optionally, opt/ (ground truth).
    :param num_samples: the first N inputs in name order (-1: all).
    :param out_dir: the results folder; empty: ``sample_results/<sampler><steps>``
        in the log folder.
    """

    data_dir: str = ""
    num_samples: int = _default("num_samples")
    out_dir: str = ""

    SCRIPT = "scripts/image_sample_realtime.py"
    ALWAYS = ("data_dir",)

    def check(self):
        if not os.path.isdir(self.data_dir):
            raise ValueError(
                f"--data_dir {self.data_dir}: no such folder; pass a folder with sar/ "
                "(and optional opt/)"
            )
        if self.num_samples == 0 or self.num_samples < -1 or self.batch_size < 1:
            raise ValueError(
                "--num_samples must be -1 (all) or positive, --batch_size positive"
            )
        return super().check()

    def _flags(self):
        return {
            "data_dir": self.data_dir,
            **super()._flags(),
            "num_samples": self.num_samples,
            "clip_denoised": self.clip_denoised,
            "samples_per_input": self.samples_per_input,
            "batch_size": self.batch_size,
            **self._speed(),
        }

    def _speed(self):
        return {
            k: getattr(self, k)
            for k in ("use_bf16", "channels_last", "compile", "use_tf32")
        }


@dataclass(frozen=True)
class SceneJob(Sampling):
    """
    Translate a whole SAR scene file into an optical GeoTIFF
    (scripts/translate_scene.py).

    :param input: the SAR scene (GeoTIFF), or a Sentinel-1 GRD product (its .SAFE
        folder, its .zip or its manifest.safe).
    :param output: the optical GeoTIFF to write (absolute).
    :param overlap: pixels shared by neighbouring tiles (-1: half a tile).
    :param shift_tiles: move the inner tiles by a few pixels at every step.
    :param output_units: "uint8" (8-bit RGB) or "optical" (float32, the training
        data's optical values).
    :param resample: translate at the training data's pixel size.
    :param save_every: save the job every N steps (0: only when stopped, and at the
        end).
    :param work_dir: the saved job's folder (absolute; the scripts' default is
        OUTPUT.work).
    :param memory: the arrays in memory ("ram"), in memory-mapped files ("mmap") or
        as the memory available allows ("auto").

    What the job writes besides the GeoTIFF:

    :param quicklook: the quick-look PNG (SAR | result) beside the output.
    :param geotiff: False: no GeoTIFF of the result (nor of the samples' mean) is
        kept (what a later pass needs of it stays in the work folder).
    :param cog: the GeoTIFFs as Cloud-Optimized GeoTIFFs (True), or plain tiled
        GeoTIFFs (False).
    :param png: the result (and the samples' mean) as 8-bit PNGs beside the output,
        at full size: OUTPUT.png (OUTPUT_mean.png).
    :param keep_samples: with K > 1, keep samples 1..K-1 beside the output; False:
        in the work folder, removed with it.

    Set by the runner for sample k of K (a caller leaves them):

    :param sample: k; :param run_seed: the run's seed (``seed`` is then sample
        k's); :param samples_after: the samples still to translate after this one
        (for the time estimate); :param warned: the input's warnings were given
        for an earlier sample.
    """

    input: str = ""
    output: str = ""
    overlap: int = -1
    shift_tiles: bool = True
    output_units: str = "uint8"
    resample: bool = False
    save_every: int = 5
    work_dir: str = ""
    memory: str = "auto"
    quicklook: bool = True
    geotiff: bool = True
    cog: bool = True
    png: bool = False
    keep_samples: bool = True
    sample: int = 0
    run_seed: int | None = None
    samples_after: int = 0
    warned: bool = False

    SCRIPT = "scripts/translate_scene.py"
    ALWAYS = ("input", "output")

    def check(self):
        if not (os.path.isfile(self.input) or is_product(self.input)):
            raise ValueError(
                f"--input {self.input}: no such file (give a SAR GeoTIFF, or a "
                "Sentinel-1 GRD product: its .SAFE folder or .zip)"
            )
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            raise ValueError("--output must not be the --input file")
        if self.batch_size < 1:
            raise ValueError("--batch_size (tiles per network call) must be positive")
        if self.save_every < 0:
            raise ValueError(
                "--save_every must be 0 (save only when stopped and at the end) or more"
            )
        if self.output_units not in ("uint8", "optical"):
            raise ValueError(f"--output_units {self.output_units}: uint8 or optical")
        if self.memory not in ("auto", "ram", "mmap"):
            raise ValueError(f"--memory {self.memory}: auto, ram or mmap")
        return super().check()

    def placed(self):
        """
        The job with its output and work folder absolute (work folder: OUTPUT.work
        when not given), and the output's folder made (a missing one must not
        fail the job at its end).
        """
        from dataclasses import replace

        output = os.path.abspath(self.output)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        return replace(
            self, output=output, work_dir=os.path.abspath(self.work_dir or output + ".work")
        )

    def _flags(self):
        return {
            "input": self.input,
            "output": self.output,
            **super()._flags(),
            "samples_per_input": self.samples_per_input,
            "batch_size": self.batch_size,
            "overlap": self.overlap,
            "shift_tiles": self.shift_tiles,
            "output_units": self.output_units,
            "resample": self.resample,
            "save_every": self.save_every,
            "memory": self.memory,
            "cog": self.cog,
            # the default work folder is shown as the default
            **({"work_dir": self.work_dir} if self.work_dir not in ("", self.output + ".work") else {}),
            "clip_denoised": self.clip_denoised,
            **{
                k: getattr(self, k)
                for k in ("use_bf16", "channels_last", "compile", "use_tf32")
            },
        }
