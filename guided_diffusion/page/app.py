"""
The web page that translates SAR images (scripts/app.py starts it).

Upload a SAR image or click an example, choose the model, the sampler, the steps,
the seed and the samples, and see the SAR and the optical result side by side,
with a progress bar over the sampling steps, the time it took and the downloads
(PNG, and GeoTIFF with the input's georeference when it had one). With K > 1
samples (the scripts' --samples_per_input K) the page shows sample 0 (the result
of K = 1), the samples' mean and a picture of their spread, and offers their files.

The same numbers as the scripts, by construction: :class:`Translator` builds the
job a script would build (jobs.FolderJob, jobs.SceneJob) from the page's controls,
runs it with the same library function, and shows the command line rendered from
the job (:meth:`Translator.command`).

* An image at the model's size (``image_size`` x ``image_size``) is translated as
  ``scripts/image_sample_realtime.py`` translates a file of the same base name in
  ``DATA/sar/`` (:func:`~guided_diffusion.translation.folder.translate_items`: the noise seeded
  by --seed and the file's name, nodata black, K samples, their mean and spread),
  and written under the page's names (:func:`~guided_diffusion.io.results.
  write_spread_files` for the samples' files).
* Any other size is a scene job, :func:`~guided_diffusion.translation.scene_translation.
  translate_scene`, the function of ``scripts/translate_scene.py``, asked to write
  what the page offers and nothing else.

Gradio is imported only by :func:`build_page`; the rest runs without it.
"""

import glob
import os
import shlex
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch as th
from PIL import Image

from .. import dist_util, logger
from ..base import samplers
from ..base.atomic import DiskFull, write_atomic
from ..base.image_files import IMAGE_EXTENSIONS, list_images
from ..io.checkpoints import newest_sampling_checkpoint
from ..io.geotiff import georeference, write_geotiff
from ..io.rasters import DataError, RasterRows, is_eight_bit, sar_bands_scaled
from ..io.results import write_spread_files
from ..translation import scene_outputs, scene_translation
from ..translation.folder import translate_items
from ..translation.jobs import FolderJob, Sampling, SceneJob, resolve
from ..translation.sampling import (
    STUDENT_STEPS,
    BatchedModel,
    checkpoint_is_student,
    fitting_samplers,
    load_prepared_model,
    sar_for_display,
    to_uint8,
)
from ..translation.scene import JobMismatch, SceneArrays

# the repository: guided_diffusion/page/app.py is three levels below it
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The generated SAR scenes for the bundled model, offered as examples.
EXAMPLES_DIR = os.path.join(REPO, "assets", "examples")
# The files an upload may be: the images the scripts read (image_files.py).
INPUT_EXTENSIONS = IMAGE_EXTENSIONS
# The page's names of samplers in samplers.SAMPLERS, in the order it shows them; a
# sampler registered without one here is offered under its registered name, after these.
SAMPLER_LABELS = {
    "dpm++2m": "DPM-Solver++", "ddim": "DDIM", "ddpm": "DDPM",
    "consistency": "Consistency (distilled student)",
}  # fmt: skip
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_SEED = "DPM-Solver++", 20, 0
# Samples per request (--samples_per_input): the most the page takes, and its default.
MAX_SAMPLES, DEFAULT_SAMPLES = 8, 1
# Loaded models kept at once (the last used).
CACHE_SIZE = 2
# Finished requests whose files are kept for download (the newest).
KEEP_REQUESTS = 16
# The images' height on the page, in CSS pixels.
IMAGE_HEIGHT = 360
# Small images are shown enlarged: with their pixels square, not blurred.
PAGE_CSS = (
    "#sar-view img, #result-view img, #mean-view img { width: 100%; height: 100%;"
    " object-fit: contain; image-rendering: pixelated; }"
)
# Tiles per network call on the scene route: larger batches run faster on a CPU
# than translate_scene.py's default of 8, and the result does not depend on it.
# Out of GPU memory, the page halves it until a call fits (sampling.BatchedModel).
SCENE_BATCH = 64


class PageError(ValueError):
    """A problem with a request that the page shows as a message."""


# -- a page that several people share -------------------------------------------------

# The limits' defaults (scripts/app.py's flags): an upload's megabytes; the pixels of
# an image the page translates, on a CPU and on a GPU (about minutes of the bundled
# model on 2 CPU cores, of the paper's 256-pixel model on one GPU); samples x steps,
# the network calls per image or tile (one sample of the paper's 250 DDPM steps);
# seconds per request; and the gigabytes the page's work folder keeps.
MAX_UPLOAD_MB = 256
MAX_PIXELS_CPU, MAX_PIXELS_GPU = 512 * 512, 4096 * 4096
MAX_SAMPLE_STEPS = 250
MAX_SECONDS = 600
MAX_WORK_GB = 4.0
# Gradio's copies of uploads and results: deleted this many seconds old, looked for
# this often.
GRADIO_CACHE_AGE, GRADIO_CACHE_EVERY = 3600, 900
# A request is stopped early when, after this share of its network calls, it would
# take longer than its time limit by this factor (the first calls' time varies).
PROJECT_AFTER, PROJECT_FACTOR = 0.05, 1.25


@dataclass(frozen=True)
class Limits:
    """
    What one request may ask of the page, each refused (or stopped) with a message
    that says the limit and what to do instead.

    :param upload_mb: the largest upload, in megabytes of 2**20 bytes (as Gradio,
        which refuses a larger one as it arrives, counts them).
    :param pixels: the most pixels of an image it translates; None: by the device
        (:data:`MAX_PIXELS_GPU` on a GPU, else :data:`MAX_PIXELS_CPU`).
    :param sample_steps: the most samples x steps per request.
    :param seconds: the longest a request may run.
    :param work_gb: the most gigabytes the work folder keeps (old requests' files
        are removed first).
    """

    upload_mb: float = MAX_UPLOAD_MB
    pixels: int | None = None
    sample_steps: int = MAX_SAMPLE_STEPS
    seconds: float = MAX_SECONDS
    work_gb: float = MAX_WORK_GB

    def resolved(self, device):
        """The limits with ``pixels`` set for ``device`` when it was left to it."""
        if self.pixels is not None:
            return self
        gpu = th.device(device).type == "cuda"
        return replace(self, pixels=MAX_PIXELS_GPU if gpu else MAX_PIXELS_CPU)

    @property
    def upload_bytes(self):
        return int(self.upload_mb * 2**20)

    def describe(self):
        """The limits in the page's words, one line."""
        side = int(self.pixels**0.5)
        return (
            f"uploads up to {self.upload_mb:g} MB, images up to {self.pixels:,} pixels "
            f"(about {side} x {side}), samples x steps up to {self.sample_steps}, "
            f"{self.seconds:g} s per request"
        )


class Stopped(Exception):
    """A request stopped before its end: cancelled by its user, or out of time.
    Not a ValueError, so that nothing on the way up reads it as bad input."""


class Control:
    """
    One running request: its user can cancel it, and its time is limited. The
    model calls :meth:`check` before each network call, so a request stops within
    one network call of a cancel or of its time running out.

    :param seconds: the request's time limit. :param todo: what to do instead of
        a request stopped for time, in words (the script's command).
    """

    def __init__(self, seconds, todo=""):
        self.seconds = seconds
        self.todo = todo
        self.began = time.monotonic()
        self.first_call = None
        self.calls = 0
        self.fraction = 0.0  # of the request's network calls, from its progress
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def progress(self, done, total):
        self.fraction = done / total if total else 0.0

    def check(self):
        """Raise :class:`Stopped` when the request was cancelled, has run out of
        time, or would: its pace so far projects past the limit."""
        if self.cancelled:
            raise Stopped(
                f"Cancelled after {self.calls} network calls; nothing was kept."
            )
        now = time.monotonic()
        elapsed = now - self.began
        limit = f"the page's limit of {self.seconds:g} s per request (--max_seconds)"
        if elapsed > self.seconds:
            raise Stopped(f"Stopped after {elapsed:.0f} s, {limit}; {self.todo}")
        if self.first_call is None:
            self.first_call = now
        elif self.fraction >= PROJECT_AFTER:
            # the pace since the first call (loading the model not counted twice)
            whole = (self.first_call - self.began) + (
                now - self.first_call
            ) / self.fraction
            if whole > self.seconds * PROJECT_FACTOR:
                raise Stopped(
                    f"Stopped: at its pace it would take about {whole / 60:.0f} min, "
                    f"more than {limit}; {self.todo}"
                )
        self.calls += 1


class Checked(th.nn.Module):
    """The model, asking a :class:`Control` before each call whether to go on."""

    def __init__(self, model, control):
        super().__init__()
        self.model = model
        self.control = control

    def forward(self, x, t, **kwargs):
        self.control.check()
        return self.model(x, t, **kwargs)


# -- models -----------------------------------------------------------------------------


def find_models(model_paths=(), runs_dir=None, *, bundled=True):
    """
    The models the page offers, by run name (the checkpoint's folder).

    :param model_paths: model or EMA files (--model_path).
    :param runs_dir: a folder of training runs (--runs_dir): each run folder in it
        (or the folder itself) that holds checkpoints gives its newest one
        (:func:`~guided_diffusion.io.checkpoints.newest_sampling_checkpoint`).
    :param bundled: offer the bundled demo model and its distilled student too, last.
    :return: an ordered dict, name shown -> checkpoint path.
    :raises PageError: a --model_path that is no file, or a --runs_dir with no run.
    """
    paths = []
    for path in model_paths:
        if not os.path.isfile(path):
            raise PageError(f"--model_path {path}: no such file")
        paths.append(os.path.abspath(path))
    if runs_dir:
        if not os.path.isdir(runs_dir):
            raise PageError(f"--runs_dir {runs_dir}: no such folder")
        folders = [runs_dir] + sorted(
            os.path.join(runs_dir, n)
            for n in os.listdir(runs_dir)
            if os.path.isdir(os.path.join(runs_dir, n))
        )
        found = [p for p in map(newest_sampling_checkpoint, folders) if p]
        if not found:
            raise PageError(
                f"--runs_dir {runs_dir}: no run folder in it holds a checkpoint "
                "(ema_RATE_STEP.pt or modelSTEP.pt); give the folder that holds the "
                "runs, or the files with --model_path"
            )
        paths += [os.path.abspath(p) for p in found]
    shipped = {
        scene_translation.BUNDLED_MODEL: " (bundled demo)",
        scene_translation.BUNDLED_STUDENT: " (bundled demo, distilled student)",
    }
    if bundled:
        paths += [p for p in shipped if os.path.isfile(p)]
    models = OrderedDict()
    for path in dict.fromkeys(paths):  # each file once, in order
        run = os.path.basename(os.path.dirname(path))
        name = run + shipped.get(path, "")
        if name in models:
            name = f"{run} ({os.path.basename(path)})"
        models[name] = path
    return models


class ModelCache:
    """
    The last few models used, loaded: at most ``size`` at once, the least
    recently used dropped first. Thread-safe.

    :param size: how many to keep.
    """

    def __init__(self, size=CACHE_SIZE):
        self.size = size
        self._models = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job, flags):
        """
        The model of a job loaded as the sampling scripts load it
        (:func:`~guided_diffusion.translation.sampling.load_prepared_model`).

        :param job: a jobs.FolderJob or jobs.SceneJob.
        :param flags: the model flags of its checkpoint (jobs.resolve).
        """
        path = os.path.abspath(job.model_path)
        key = (path, os.path.getmtime(path), repr(sorted(flags.items())),
               job.use_bf16, job.channels_last, job.compile)  # fmt: skip
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_prepared_model(job, flags, dist_util.dev())
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model

    def loaded(self):
        """The checkpoints held now, least recently used first."""
        with self._lock:
            return [key[0] for key in self._models]

    def keep_only(self, model_path):
        """
        Release every model but those of ``model_path`` (to make room on the GPU).

        :return: the checkpoints released.
        """
        path = os.path.abspath(model_path)
        with self._lock:
            gone = [key for key in self._models if key[0] != path]
            for key in gone:
                del self._models[key]
        return [key[0] for key in gone]


class StepCounter(th.nn.Module):
    """
    The model, counting its calls: each sampler here calls the network once per
    step, so the count is the steps done. It computes what the model computes.

    :param model: the network. :param on_call: called with the calls so far.
    """

    def __init__(self, model, on_call):
        super().__init__()
        self.model = model
        self.on_call = on_call
        self.calls = 0

    def forward(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        self.calls += 1
        self.on_call(self.calls)
        return out


# -- requests ---------------------------------------------------------------------------


@dataclass
class Result:
    """
    One translated upload.

    :param sar: the SAR as shown, (H, W, 3) uint8.
    :param image: the optical result, (H, W, 3) uint8 (nodata black).
    :param png: the result as a PNG file. :param geotiff: the result as a GeoTIFF
        with the input's georeference, or None when the input had none.
    :param seconds: from the request to the result.
    :param route: "patch" (at the model's size) or "scene" (tiles).
    :param command: the script's command line that gives the same pixels.
    :param notes: lines worth showing (clipping, nodata).
    :param samples: K, the samples drawn; the image and its files are sample 0.
    :param mean: with K > 1, the samples' mean as a PNG (8-bit values).
    :param spread: with K > 1, the picture of their spread (PNG, with its legend).
    :param files: with K > 1, the downloads beside the result's: the mean, the
        spread picture and the spread's values.
    """

    sar: np.ndarray
    image: np.ndarray
    png: str
    geotiff: str | None
    seconds: float
    route: str
    command: str
    notes: list = field(default_factory=list)
    samples: int = 1
    mean: str | None = None
    spread: str | None = None
    files: list = field(default_factory=list)

    def downloads(self):
        """The files offered: the result (PNG, GeoTIFF), then the samples' ones."""
        return [self.png] + ([self.geotiff] if self.geotiff else []) + self.files

    def summary(self):
        """The lines the page shows under the images."""
        how = (
            "at the model's size, as scripts/image_sample_realtime.py translates it"
            if self.route == "patch"
            else "as a whole scene in overlapping tiles, as scripts/translate_scene.py "
            "translates it"
        )
        height, width = self.image.shape[:2]
        samples = []
        if self.samples > 1:
            samples.append(
                f"{self.samples} samples: the result is sample 0, the same as with one "
                "sample; beside it their mean and their spread (per pixel, the "
                "standard deviation of the samples, divisor K - 1, in grey levels)."
            )
        lines = [
            f"Translated {width} x {height} pixels in {self.seconds:.1f} s, {how}.",
            *samples,
            *self.notes,
            f"The same pixels from the command line: `{self.command}`",
        ]
        return "\n\n".join(lines)


def check_upload(path):
    """
    Refuse what cannot be a SAR image before it is read.

    :raises PageError: no file, an empty one, or another kind of file, each
        named with what to upload instead.
    """
    if not path:
        raise PageError(
            "No SAR image: upload a PNG, TIFF or GeoTIFF, or click an example"
        )
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise PageError(f"{name}: the upload is gone; upload it again")
    if not name.lower().endswith(INPUT_EXTENSIONS):
        raise PageError(
            f"{name}: not a SAR image file; upload a PNG, TIFF or GeoTIFF "
            f"({', '.join(INPUT_EXTENSIONS)})"
        )
    if os.path.getsize(path) == 0:
        raise PageError(f"{name} is empty (0 bytes); upload the SAR image again")


def sar_preview(path, scaling, sar_channels):
    """
    The SAR of a file as the model sees it, for display: scaled as the scene
    translator scales it (:func:`~guided_diffusion.translation.scene_translation.load_scene`),
    two polarisations as the usual composite.

    :return: ((H, W, 3) uint8, the file's SarStats).
    :raises DataError: the file cannot be read, or its bands do not fit the model.
    """
    reader = RasterRows(path)
    arrays = SceneArrays()
    stats = scene_translation.load_scene(
        reader, scaling, arrays, (reader.height, reader.width), sar_channels
    )
    sar = arrays.read("sar", (0, reader.height))
    shown = sar_for_display(to_uint8(sar[None]))[0]
    return np.ascontiguousarray(np.broadcast_to(shown, (*shown.shape[:2], 3))), stats


# How a model's SAR values are given, in the page's words (Scaling.sar_input).
SAR_UNITS = {"db": "in dB", "power": "as linear power", "amplitude": "as amplitude",
             "uint8": "as 8-bit values"}  # fmt: skip


def _listed(words):
    """'VV', 'VV and VH', 'HH, HV and VV'."""
    words = [str(w) for w in words]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def model_reads(flags, scaling):
    """What a model reads, in the page's words: 'VV and VH in dB (2 bands)'."""
    n = flags["sar_channels"]
    unit = SAR_UNITS.get(scaling.sar_input, scaling.sar_input)
    names = scaling.sar_band_names
    bands = f"{n} band{'s' if n != 1 else ''}"
    named = names and len(names) == n
    text = f"{_listed(names)} {unit} ({bands})" if named else f"{bands} {unit}"
    # a grey image is replicated to three channels, as the model was trained
    return text + (", or one grey band" if n == 3 else "")


class Translator:
    """
    Translate uploads with the models offered, as the scripts would.

    :param models: name shown -> checkpoint path (:func:`find_models`).
    :param work_dir: where each request's files go (a new temporary folder by
        default); the newest :data:`KEEP_REQUESTS` requests' files are kept.
    :param cache_size: loaded models kept at once.
    :param limits: what one request may ask (:class:`Limits`, its defaults by
        default).
    """

    def __init__(self, models, work_dir=None, cache_size=CACHE_SIZE, limits=None):
        if not models:
            raise PageError("no model to offer: give --model_path or --runs_dir")
        self.models = OrderedDict(models)
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="sar2opt-page-")
        os.makedirs(self.work_dir, exist_ok=True)
        self.cache = ModelCache(cache_size)
        self.limits = (limits or Limits()).resolved(dist_util.dev())
        self._lock = threading.Lock()
        self._count = 0
        # one request translates at a time, whoever calls (Gradio's queue does the
        # same for the page; a script may call translate from several threads)
        self._worker = threading.Lock()
        self._running = {}  # the user's session -> the Control of its request

    def expect(self, session):
        """
        Note that a request of ``session`` is on its way (the page's Translate
        button says so before the request joins the queue), so that Cancel reaches
        it while it waits there.
        """
        if session is not None:
            with self._lock:
                self._running.setdefault(session, Control(self.limits.seconds))

    def cancel(self, session):
        """
        Cancel the request of a user's session, if one runs or waits for the
        worker: it stops at its next network call (a waiting one as it starts)
        and its files are removed.

        :return: whether there was one.
        """
        with self._lock:
            control = self._running.get(session)
        if control is not None:
            control.cancel()
        return control is not None

    def model_path(self, name):
        """
        :param name: a model's name as the page shows it.
        :return: its checkpoint. :raises PageError: no model of that name.
        """
        if name not in self.models:
            raise PageError(
                f"no model {name!r}: choose one of {', '.join(self.models)}"
            )
        return self.models[name]

    def _message(self, err, path, model_name, scaling=None):
        """An error of the library as the page shows it: the upload by its name,
        and for a file that does not fit, what the model reads."""
        text = str(err).replace(path, os.path.basename(path))
        if isinstance(err, DataError) and "cannot read" not in text and scaling:
            text += f". The model {model_name} reads {scaling.describe()}"
        return text

    def _check_bands(self, path, model_name, flags, scaling):
        """
        Refuse, in the page's words, a file whose bands the model cannot read (the
        scripts' rule, :func:`~guided_diffusion.io.rasters.sar_bands_scaled`, on its
        first row): what the model reads, what the file has, what to do on the page.

        :raises PageError: the bands do not fit. :raises DataError: unreadable.
        """
        raster = RasterRows(path).read(0, 1)
        try:
            sar_bands_scaled(raster, scaling)
        except DataError:
            pass
        else:
            return
        name, n, count = os.path.basename(path), flags["sar_channels"], raster.count
        reads = model_reads(flags, scaling)
        has = raster.describe_bands() + (
            " of 8-bit values" if is_eight_bit(raster) else ""
        )
        if count > n:
            taken = _listed(range(1, n + 1))
            names = scaling.sar_band_names
            as_ = f" as {_listed(names)}" if names and len(names) == n else ""
            todo = (
                f"upload a file with just those bands (of this file's bands, "
                f"{taken} would be read{as_}), or choose a model trained on "
                f"{count}-band SAR under Model"
            )
        else:
            # as many bands as it reads, but other values or other polarisations
            like = "files like this one" if count == n else f"{count}-band SAR"
            todo = f"choose a model trained on {like} under Model, or upload a file with {reads}"
        raise PageError(
            f"{name} has {has}, but the model {model_name} reads {reads}: {todo}."
        )

    def _request_dir(self, need=0):
        """
        A new folder for a request's files, after the oldest requests' folders are
        removed: all but the newest :data:`KEEP_REQUESTS`, and as many more as it
        takes for ``need`` bytes to fit within the limit on the work folder.
        """
        with self._lock:
            self._count += 1
            folder = os.path.join(self.work_dir, f"request-{self._count:06d}")
            done = sorted(glob.glob(os.path.join(self.work_dir, "request-*")))
            gone = done[: max(len(done) - KEEP_REQUESTS + 1, 0)]
            kept = [(old, folder_bytes(old)) for old in done[len(gone) :]]
            room = self.limits.work_gb * 1e9 - need
            while kept and sum(size for _, size in kept) > room:
                gone.append(kept.pop(0)[0])
            for old in gone:
                shutil.rmtree(old, ignore_errors=True)
            os.makedirs(folder)
        return folder

    def job(self, route, path, model_path, sampler, steps, seed, samples=1, folder=""):
        """
        The job that translates ``path`` this way: the folder job of
        scripts/image_sample_realtime.py for the file's folder (route "patch"), or
        the scene job of scripts/translate_scene.py (route "scene") writing into
        ``folder`` what the page offers (no quick-look, samples 1..K-1 not kept,
        a GeoTIFF only for a file with a place, full-size PNGs).

        :param samples: K (--samples_per_input).
        :return: a jobs.FolderJob or jobs.SceneJob.
        """
        common = dict(
            model_path=model_path, sampler=sampler, seed=seed, samples_per_input=samples,
            model_flags={"timestep_respacing": str(steps)},
        )  # fmt: skip
        if route == "patch":
            return FolderJob(**common, data_dir=os.path.dirname(path), out_dir=folder)
        output = os.path.join(
            folder, os.path.splitext(os.path.basename(path))[0] + "_optical.tif"
        )
        # tiles per network call change the speed, never the pixels
        return SceneJob(
            **common, input=path, output=output, batch_size=SCENE_BATCH,
            quicklook=False, geotiff=bool(georeference(path)), png=True,
            keep_samples=False,
        ).placed()  # fmt: skip

    def command(self, job, path):
        """The command line of the script that runs ``job`` on the upload ``path``,
        as the page shows it: the upload by its name, paths under here relative, the
        page's own folders as placeholders."""
        shown = {job.model_path: _shown_path(job.model_path)}
        if isinstance(job, FolderJob):
            shown[job.data_dir] = "DATA"
            argv = job.command(shown) + [
                f"  # with {os.path.basename(path)} in DATA/sar/"
            ]
        else:
            shown.update({job.input: _shown_path(job.input), job.output: "OUT.tif"})
            argv = job.command(shown)
        return " ".join(a if a.startswith("  #") else shlex.quote(a) for a in argv)

    def sampler_choices(self, model_name):
        """
        The samplers that fit a model, as the page shows them (a distilled student:
        the consistency sampler alone; a diffusion model: the others).

        :param model_name: a key of ``models``.
        :return: shown name -> registered name (:func:`sampler_choices`).
        """
        return sampler_choices(checkpoint_is_student(self.model_path(model_name)))

    def settings(self, model_path, steps=None):
        """
        The settings of a model, resolved from its checkpoint once per request
        (jobs.resolve).

        :param steps: the respaced steps, None for the training run's.
        :return: a jobs.CheckpointSettings.
        """
        flags = {} if steps is None else {"timestep_respacing": str(steps)}
        return resolve(Sampling(model_path=model_path, model_flags=flags))

    def describe(self, path, model_name):
        """
        What an upload is and how it will be translated, before it is.

        :return: (the SAR as shown, a line of text).
        :raises PageError: as :meth:`translate` would for a bad file.
        """
        check_upload(path)
        model_path = self.model_path(model_name)
        scaling = None
        try:
            flags, scaling, _, _ = self.settings(model_path)
            self._check_bands(path, model_name, flags, scaling)
            sar, _ = sar_preview(path, scaling, flags["sar_channels"])
        except (DataError, ValueError) as err:
            raise PageError(self._message(err, path, model_name, scaling)) from None
        height, width = sar.shape[:2]
        size = flags["image_size"]
        how = (
            "at the model's size" if (height, width) == (size, size)
            else f"as a whole scene, in tiles of {size} px"
        )  # fmt: skip
        return (
            sar,
            f"{os.path.basename(path)}: {width} x {height} pixels, translated {how}",
        )

    def translate(self, path, model_name, sampler, steps, seed, progress=None, samples=1,
                  session=None):  # fmt: skip
        """
        Translate one upload, once or ``samples`` times, within the page's
        :class:`Limits`; one request at a time.

        :param path: the uploaded file (its base name seeds the noise, as a file
            of that name in the sampling script's folder).
        :param model_name: a key of ``models``.
        :param sampler: a name in samplers.SAMPLERS ("dpm++2m").
        :param steps: the respaced steps (--timestep_respacing).
        :param seed: --seed.
        :param progress: called as progress(steps done, steps) while sampling, the
            steps of every sample counted (K times --timestep_respacing).
        :param samples: K (--samples_per_input), 1 to :data:`MAX_SAMPLES`.
        :param session: the user's session: :meth:`cancel` with it stops the request.
        :return: a :class:`Result`.
        :raises PageError: with the message to show; a request refused, failed,
            cancelled or stopped leaves no files behind.
        """
        with self._lock:
            control = Control(self.limits.seconds)
            if session is not None:
                control = self._running.setdefault(session, control)
        try:
            check_upload(path)
            model_path = self.model_path(model_name)
            if steps is None or int(steps) != steps or steps < 1:
                raise PageError(f"steps {steps}: give a whole number of 1 or more")
            if seed is None or int(seed) != seed or seed < 0:
                raise PageError(f"seed {seed}: give a whole number of 0 or more")
            if (
                samples is None
                or int(samples) != samples
                or not 1 <= samples <= MAX_SAMPLES
            ):
                raise PageError(
                    f"samples {samples}: give a whole number from 1 to {MAX_SAMPLES}"
                )
            steps, seed, samples = int(steps), int(seed), int(samples)
            control.todo = self.instead(path, model_path, sampler, steps, seed, samples)
            self._check_request(path, steps, samples, control.todo)
            with self._worker:
                control.began = time.monotonic()  # the wait for the worker not counted
                began = time.perf_counter()
                if control.cancelled:
                    raise Stopped("Cancelled before it started; nothing was kept.")
                result = self._translate(
                    path, model_name, model_path, sampler, steps, seed, samples,
                    progress, control,
                )  # fmt: skip
        except Stopped as err:
            logger.log(f"request for {os.path.basename(path)}: {err}")
            raise PageError(str(err)) from None
        finally:
            with self._lock:
                if self._running.get(session) is control:
                    del self._running[session]
        result.seconds = time.perf_counter() - began
        return result

    def instead(self, path, model_path, sampler, steps, seed, samples):
        """What to do with a file the page's limits refuse, in words: the scene
        script's command for it, which has no such limits."""
        job = SceneJob(
            model_path=model_path, sampler=sampler, seed=seed, samples_per_input=samples,
            model_flags={"timestep_respacing": str(steps)}, input=path,
            output=os.path.join(self.work_dir, "OUT.tif"),
        )  # fmt: skip
        return (
            "translate it on the server with the scene script, which has no such "
            f"limit: `{self.command(job, path)}`"
        )

    def _check_request(self, path, steps, samples, instead):
        """Refuse an upload larger than the limit, or more samples x steps."""
        name, limits = os.path.basename(path), self.limits
        size = os.path.getsize(path)
        if size > limits.upload_bytes:
            raise PageError(
                f"{name} is {megabytes(size)} MB, more than the {limits.upload_mb:g} MB "
                f"the page takes (--max_upload_mb); {instead}"
            )
        if samples * steps > limits.sample_steps:
            raise PageError(
                f"{samples} sample{'s' if samples > 1 else ''} x {steps} steps is "
                f"{samples * steps} network calls per image, more than the page's "
                f"{limits.sample_steps} (--max_sample_steps): choose fewer steps or "
                f"samples, or {instead}"
            )

    def _check_pixels(self, path, height, width, instead):
        if height * width > self.limits.pixels:
            raise PageError(
                f"{os.path.basename(path)} is {width} x {height} = {height * width:,} "
                f"pixels, more than the {self.limits.pixels:,} the page translates per "
                f"request (--max_pixels); {instead}"
            )

    def _translate(self, path, model_name, model_path, sampler, steps, seed, samples,
                   progress, control):  # fmt: skip
        """:meth:`translate`'s work, its request's folder removed when it fails."""

        def report(done, total):
            control.progress(done, total)
            if progress is not None:
                progress(done, total)

        scaling = folder = None
        try:
            try:
                probe = RasterRows(path)
                self._check_pixels(path, probe.height, probe.width, control.todo)
                checkpoint = self.settings(model_path, steps)  # once per request
                flags, scaling = checkpoint.flags, checkpoint.scaling
                self._check_bands(path, model_name, flags, scaling)
                size = flags["image_size"]
                route = (
                    "patch" if (probe.height, probe.width) == (size, size) else "scene"
                )
                job = self.job(route, path, model_path, sampler, steps, seed, samples,
                               self.work_dir)  # fmt: skip
                need = request_bytes(job, probe.height, probe.width)
                if need > self.limits.work_gb * 1e9:
                    raise PageError(
                        f"{os.path.basename(path)} would need about {need / 1e9:.1f} GB "
                        f"of the page's work folder, more than its {self.limits.work_gb:g} "
                        f"GB (--max_work_gb); {control.todo}"
                    )
                folder = self._request_dir(need)
                job = self.job(
                    route, path, model_path, sampler, steps, seed, samples, folder
                )
                job.check()
                translate = self._patch if route == "patch" else self._scene
                result = self._within_memory(
                    lambda: translate(path, job, checkpoint, folder, report, control),
                    route, path, model_path, model_name,
                )  # fmt: skip
            except BaseException:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                raise
        except (DataError, ValueError, FileNotFoundError, JobMismatch,
                scene_translation.SceneError) as err:  # fmt: skip
            raise PageError(self._message(err, path, model_name, scaling)) from None
        except DiskFull as err:
            raise PageError(f"{err}: free space on the server and try again") from None
        result.command = self.command(job, path)
        return result

    def _within_memory(self, translate, route, path, model_path, model_name):
        """
        ``translate()``, and once more when the device ran out of memory with other
        models loaded: they are released first (the scene route has already halved
        its tiles per call down to one, :class:`~guided_diffusion.translation.sampling.BatchedModel`).

        :raises PageError: out of memory with this model alone, saying so; the
            page goes on with the next request.
        """
        try:
            return translate()
        except th.OutOfMemoryError:
            pass  # out of the except block, so its frames' tensors are freed below
        released = self.cache.keep_only(model_path)
        if th.cuda.is_available():
            th.cuda.empty_cache()
        if released:
            names = ", ".join(n for n, p in self.models.items() if p in released)
            logger.warn(
                f"out of memory: released {names or len(released)}, trying again"
            )
            try:
                result = translate()
            except th.OutOfMemoryError:
                pass
            else:
                result.notes.append(
                    f"Out of GPU memory with other models loaded: released {names}."
                )
                return result
            if th.cuda.is_available():
                th.cuda.empty_cache()
        unit = "image" if route == "patch" else "tile"
        message = (
            f"Out of GPU memory translating {os.path.basename(path)} with {model_name}, "
            f"even at one {unit} per network call and no other model loaded: free the "
            "GPU (another program may use it) or choose a smaller model"
        )
        logger.warn(message)
        raise PageError(message)

    def _patch(self, path, job, checkpoint, folder, progress, control):
        """An image at the model's size, as scripts/image_sample_realtime.py
        translates a file of that name (folder.translate_items)."""
        flags, scaling, diffusion, _ = checkpoint
        model = Checked(self.cache.get(job, flags), control)
        name = os.path.basename(path)
        count = job.samples_per_input
        steps = diffusion.num_timesteps * count  # the calls of every sample
        counter = StepCounter(model, lambda done: progress(done, steps))
        (done,) = translate_items(
            counter, diffusion, [(path, None, name)], job, flags["image_size"], scaling,
            device=dist_util.dev(),
        )  # fmt: skip
        image = done.samples[0]
        notes = []
        if not done.valid.all():
            notes.append(f"{int((~done.valid).sum())} nodata SAR pixels are black.")
        warning = done.stats.clipping_warning()
        if warning:
            notes.append(warning.replace(path, name))
        shown = np.ascontiguousarray(
            np.broadcast_to(done.sar, (*done.sar.shape[:2], 3))
        )
        png, geotiff = _write_result(folder, name, image, path, done.valid)
        result = Result(
            shown, image, png, geotiff, 0.0, "patch", "", notes, samples=count
        )
        if count > 1:
            # the sampling script's files of K samples, named after the result
            stem = os.path.join(folder, os.path.splitext(name)[0] + "_optical")
            result.files = [
                stem + "_mean.png",
                stem + "_spread.png",
                stem + "_spread.npz",
            ]
            write_spread_files(
                *result.files, count, done.mean, done.spread, valid=done.valid
            )
            result.mean, result.spread = result.files[:2]
        return result

    def _scene(self, path, job, checkpoint, folder, progress, control):
        """Any other size, as scripts/translate_scene.py translates it
        (scene_translation.translate_scene), writing what the page offers."""
        flags, scaling, _, _ = checkpoint
        sar, stats = sar_preview(path, scaling, scaling.sar_channels)
        # this request's tiles per call, halved (and kept for its samples) when a
        # call does not fit in the GPU's memory; each call asks the control first
        model = BatchedModel(
            Checked(self.cache.get(job, flags), control),
            job.batch_size,
            pad=job.compile,
        )
        count = job.samples_per_input
        current = {"sample": 0}

        def tiles(done, total, step, steps):
            within = min(steps * done / max(total, 1), steps)
            progress(current["sample"] * steps + within, count * steps)

        def starts(k, samples):
            current["sample"] = k

        scene_translation.translate_scene(
            job, checkpoint, model=model, progress=tiles, on_sample=starts
        )
        png = scene_outputs.png_path(job.output)
        image = np.asarray(Image.open(png).convert("RGB"))
        notes = []
        if model.shrunk:
            first, last = model.shrunk[0][0], model.batch_size
            notes.append(
                f"Out of GPU memory at {first} tiles per network call: translated at "
                f"{last} tile{'s' if last > 1 else ''} per call (the same pixels)."
            )
        if stats.nodata:
            notes.append(
                f"{stats.nodata} of {stats.pixels} SAR pixels are nodata (black)."
            )
        warning = stats.clipping_warning()
        if warning:
            notes.append(warning.replace(path, os.path.basename(path)))
        geotiff = job.output if job.geotiff else None
        result = Result(
            sar, image, png, geotiff, 0.0, "scene", "", notes, samples=count
        )
        if count > 1:
            paths = scene_outputs.spread_paths(job.output)
            result.mean = scene_outputs.png_path(paths["mean"])
            result.spread = paths["picture"]
            result.files = [result.mean, *([paths["mean"]] if job.geotiff else []),
                            result.spread, paths["spread"]]  # fmt: skip
        return result


# Bytes a request writes in the work folder per pixel, beyond a scene's GeoTIFFs
# (scene_outputs.disk_needed): the PNGs and the saved job, generously (4 to 15
# measured).
WORK_BYTES_PER_PIXEL = 64


def request_bytes(job, height, width):
    """At most the bytes a request's files take in the work folder."""
    if isinstance(job, FolderJob):
        # the PNG, the GeoTIFF and with K > 1 the mean, spread and its values
        return (
            WORK_BYTES_PER_PIXEL * height * width * (1 + (job.samples_per_input > 1))
            + 2**20
        )
    pixels = height * width
    return scene_outputs.disk_needed(job, height, width) + WORK_BYTES_PER_PIXEL * pixels


def megabytes(size):
    """Bytes in MB (2**20 bytes) as a message shows them: '0.126', '3.41', '1,250.0'."""
    mb = size / 2**20
    return f"{mb:,.1f}" if mb >= 10 else f"{mb:.3g}"


def folder_bytes(folder):
    """The bytes of the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # removed meanwhile
    return total


def _shown_path(path):
    """A path as a command line shows it: relative to here when under here, and an
    upload (in a temporary folder) by its name."""
    rel = os.path.relpath(path)
    if not rel.startswith(".."):
        return rel
    return (
        path if not path.startswith(tempfile.gettempdir()) else os.path.basename(path)
    )


def _write_result(folder, name, image, source, valid):
    """
    The result as a PNG, and as a GeoTIFF with the input's georeference when it
    has one (a Cloud-Optimized GeoTIFF, its dataset mask the SAR's valid pixels,
    the bands named, as translate_scene.py writes them).

    :param valid: (H, W) bool, the pixels where the SAR has data.
    :return: (png path, GeoTIFF path or None).
    """
    stem = os.path.join(folder, os.path.splitext(name)[0] + "_optical")
    write_png(stem + ".png", image)
    georef = georeference(source)
    if not georef:
        return stem + ".png", None
    write_geotiff(stem + ".tif", np.ascontiguousarray(image.transpose(2, 0, 1)), georef,
                  names=("red", "green", "blue"), valid=valid, cog=True)  # fmt: skip
    return stem + ".png", stem + ".tif"


def find_examples(folders):
    """The example SAR files in ``folders`` (not in subfolders), in natural order."""
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise PageError(f"--examples {folder}: no such folder")
        found += [os.path.join(folder, n) for n in list_images(folder, recursive=False)]
    return found


# -- the page ---------------------------------------------------------------------------


def sampler_choices(student=None):
    """
    The samplers the page offers: those registered in samplers.SAMPLERS when the
    page is built, those of :data:`SAMPLER_LABELS` first.

    :param student: True: those that sample a distilled student; False: those that
        sample a diffusion model (``sampling.fitting_samplers``); None: every one.
    :return: shown name -> registered name.
    """
    names = [n for n in SAMPLER_LABELS if n in samplers.SAMPLERS]
    names += [n for n in samplers.SAMPLERS if n not in SAMPLER_LABELS]
    if student is not None:
        names = [n for n in names if n in fitting_samplers(student)]
    return {SAMPLER_LABELS.get(n, n): n for n in names}


def sampler_update(translator, model_name, sampler_name):
    """
    The sampler and steps controls for a newly chosen model: the samplers that fit
    it; the sampler shown kept when it fits, else the model's first with its steps
    (a student's :data:`~guided_diffusion.translation.sampling.STUDENT_STEPS`, a
    diffusion model's :data:`DEFAULT_STEPS`).

    :return: (the sampler's choices, the sampler shown, the steps, or None to keep
        them).
    """
    fits = list(translator.sampler_choices(model_name))
    if sampler_name in fits:
        return fits, sampler_name, None
    first = DEFAULT_SAMPLER if DEFAULT_SAMPLER in fits else fits[0]
    student = checkpoint_is_student(translator.model_path(model_name))
    return fits, first, STUDENT_STEPS if student else DEFAULT_STEPS


def build_page(translator, examples=()):
    """
    The Gradio page; requests queue, one at a time.

    :param translator: a :class:`Translator`.
    :param examples: SAR files offered as examples.
    :return: a gradio.Blocks, not launched.
    """
    import gradio as gr

    names = list(translator.models)
    choices = sampler_choices()

    def preview(path, model_name):
        if not path:
            return None, ""
        try:
            sar, text = translator.describe(path, model_name)
        except PageError as err:
            return None, f"**Cannot use this file.** {err}"
        return sar, text

    # Gradio finds its progress bar as a default argument
    def run(path, model_name, sampler_name, steps, seed, samples=DEFAULT_SAMPLES,
            request: gr.Request = None, progress=gr.Progress()):  # noqa: B008  # fmt: skip
        progress(0, desc="starting")
        count = samples if samples and samples == int(samples) and samples >= 1 else 1

        def report(done, total):
            each = total / count  # the steps of one sample
            k = min(int(done // each), int(count) - 1)
            step = min(int(done - k * each) + 1, int(each))
            which = f"sample {k + 1}/{int(count)}, " if count > 1 else ""
            progress(done / total, desc=f"{which}step {step}/{int(each)}")

        try:
            if sampler_name not in choices:
                raise PageError(
                    f"sampler {sampler_name}: choose one of {', '.join(choices)}"
                )
            result = translator.translate(
                path, model_name, choices[sampler_name], steps, seed, progress=report,
                samples=samples, session=session_of(request),
            )  # fmt: skip
        except PageError as err:
            # one message, where the result's text goes; gr.Error would mark each
            # output "Error" beside a toast of the same words
            return None, None, None, None, f"**Not translated.** {err}", None
        return (result.sar, result.png, result.mean, result.spread, result.summary(),
                result.downloads())  # fmt: skip

    def expect(request: gr.Request = None):
        translator.expect(session_of(request))

    def cancel(request: gr.Request = None):
        if translator.cancel(session_of(request)):
            return "**Cancelled.** The request stops at its next network call; its files are removed."
        return "Nothing to cancel: no request of yours is running."

    limits = translator.limits

    # Gradio keeps its own copies of uploads and results: those older than an hour
    # are deleted every quarter of an hour, so that they too stay bounded
    with gr.Blocks(title="SAR to optical", analytics_enabled=False,
                   delete_cache=(GRADIO_CACHE_EVERY, GRADIO_CACHE_AGE)) as page:  # fmt: skip
        gr.Markdown(
            "# SAR to optical\n"
            "Upload a SAR image (PNG, TIFF or GeoTIFF, scaled as the model's training "
            "run read its data) or click an example, then **Translate**. An image at "
            "the model's size is translated as `scripts/image_sample_realtime.py` "
            "does; a larger one as a whole scene in tiles, as "
            "`scripts/translate_scene.py` does: the same pixels for the same "
            "settings and file name. With **Samples** above 1 the page also shows "
            "the samples' mean and where they disagree (their spread)."
            f"\n\nThis page translates {limits.describe()}; a request that would "
            "take longer, or a larger file, goes to `scripts/translate_scene.py` on "
            "the server (a refusal gives its command)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label=f"SAR image (up to {limits.upload_mb:g} MB)",
                    file_types=list(INPUT_EXTENSIONS), elem_id="sar-upload",
                )  # fmt: skip
                model = gr.Dropdown(
                    names, value=names[0], label="Model", elem_id="model"
                )
                fits, first, first_steps = sampler_update(
                    translator, names[0], DEFAULT_SAMPLER
                )
                # every sampler is a valid value (a client of the API may choose
                # any model), and the page shows those that fit the model chosen
                # (set as the page loads, and when the model changes)
                sampler = gr.Radio(
                    list(choices), value=first, label="Sampler", elem_id="sampler"
                )
                steps = gr.Slider(
                    1, 1000, value=first_steps or DEFAULT_STEPS, step=1, label="Steps",
                    elem_id="steps",
                )  # fmt: skip
                seed = gr.Number(
                    value=DEFAULT_SEED, precision=0, label="Seed", elem_id="seed"
                )
                samples = gr.Slider(
                    1, MAX_SAMPLES, value=DEFAULT_SAMPLES, step=1, label="Samples",
                    info="above 1: their mean and spread too, in that many times the time",
                    elem_id="samples",
                )  # fmt: skip
                with gr.Row():
                    go = gr.Button("Translate", variant="primary", elem_id="translate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=2):
                with gr.Row():
                    sar_view = gr.Image(label="SAR", type="numpy", format="png",
                                        height=IMAGE_HEIGHT, interactive=False,
                                        elem_id="sar-view")  # fmt: skip
                    result_view = gr.Image(label="Optical (generated)", type="filepath",
                                           format="png", height=IMAGE_HEIGHT,
                                           interactive=False, elem_id="result-view")  # fmt: skip
                with gr.Row():
                    mean_view = gr.Image(label="Mean of the samples", type="filepath",
                                         format="png", height=IMAGE_HEIGHT,
                                         interactive=False, visible=False,
                                         elem_id="mean-view")  # fmt: skip
                    spread_view = gr.Image(label="Spread of the samples", type="filepath",
                                           format="png", height=IMAGE_HEIGHT,
                                           interactive=False, visible=False,
                                           elem_id="spread-view")  # fmt: skip
                info = gr.Markdown(elem_id="info")
                downloads = gr.File(label="Downloads", file_count="multiple",
                                    interactive=False, elem_id="downloads")  # fmt: skip
        if examples:
            gr.Examples(
                examples=[[p] for p in examples], inputs=[upload], label="Examples",
                example_labels=[os.path.basename(p) for p in examples],
            )  # fmt: skip
        upload.change(preview, [upload, model], [sar_view, info], api_name=False)

        def model_chosen(model_name, sampler_name):
            fits, shown, new_steps = sampler_update(
                translator, model_name, sampler_name
            )
            kept = gr.update() if new_steps is None else gr.update(value=new_steps)
            return gr.update(choices=fits, value=shown), kept

        model.change(model_chosen, [model, sampler], [sampler, steps], api_name=False)
        page.load(model_chosen, [model, sampler], [sampler, steps], api_name=False)
        samples.change(
            lambda k: [gr.update(visible=k > 1)] * 2, [samples], [mean_view, spread_view],
            api_name=False,
        )  # fmt: skip
        go.click(
            run, [upload, model, sampler, steps, seed, samples],
            [sar_view, result_view, mean_view, spread_view, info, downloads],
            api_name="translate",
        )  # fmt: skip
        # not queued, so that a request waiting in the queue can be cancelled
        go.click(expect, None, None, queue=False, api_name=False)
        # not queued: it must not wait behind the request it stops (nor stop it
        # through Gradio, which would mark every output "Error")
        stop.click(cancel, None, [info], queue=False, api_name="cancel")
    page.queue(default_concurrency_limit=1)
    return page


def session_of(request):
    """The user's session of a Gradio request (one browser tab, one client)."""
    return getattr(request, "session_hash", None)


def is_loopback(host):
    """Whether ``host`` is an address only this machine reaches."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: others may reach it


def reach_warning(host, port, auth):
    """
    The line logged when the page serves beyond this machine: who can reach it,
    and whether it asks for a password; None on a loopback address.
    """
    if is_loopback(host):
        return None
    where = "any interface of this machine" if host in ("0.0.0.0", "::") else host
    who = f"anyone who can reach {where} on port {port} can open the page"
    if auth:
        users = ", ".join(sorted({user for user, _ in auth}))
        return f"serving on {host}:{port}: {who}; it asks for a user and password ({users})"
    return (
        f"serving on {host}:{port}: {who} and translate with this machine's device; the "
        "page has no authentication: give --auth USER:PASS (or --auth_file) to ask for "
        "a password, or serve on 127.0.0.1"
    )


def launch(page, translator, examples=(), *, host="127.0.0.1", port=7860, quiet=True,
           auth=None):  # fmt: skip
    """
    Serve the page in the background (no public share link). Uploads larger than
    the translator's limit are refused by Gradio as they arrive; serving on an
    address other machines reach logs who can.

    :param page: :func:`build_page`'s. :param translator: the page's :class:`Translator`.
    :param examples: the example files (their folders are served).
    :param auth: [(user, password), ...] the page asks for (Gradio's login), or None.
    :return: the page's address.
    :raises PageError: the port cannot be served on.
    """
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in examples})
    warning = reach_warning(host, port, auth)
    if warning:
        logger.warn(warning)
    try:
        page.launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True,
            quiet=quiet, show_error=True, css=PAGE_CSS,
            allowed_paths=[*folders, translator.work_dir], auth=auth or None,
            max_file_size=translator.limits.upload_bytes,
        )  # fmt: skip
    except OSError:
        # Gradio's own text speaks of its environment variables and launch()
        raise PageError(
            f"--port {port}: cannot serve there on {host} (another program, or "
            "another page, uses the port); give a free port with --port"
        ) from None
    return page.local_url


def write_png(path, image):
    """Write ``image`` ((H, W, C) uint8) as a PNG at ``path``, atomically."""
    write_atomic(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
