"""
Translating a whole SAR scene file into an optical GeoTIFF: the scene job
(jobs.SceneJob), which scripts/translate_scene.py builds from its flags and the web
page (guided_diffusion/page/app.py) from its controls; both call :func:`translate_scene`,
so they give the same pixels for the same job by construction.

:func:`translate_scene` reads the scene into scene-sized arrays (:func:`load_scene`),
runs the job (:class:`~guided_diffusion.translation.scene.SceneSampler`, :func:`sample_scene`)
and writes what the job asks for (scene_outputs.write_outputs: the GeoTIFF, the
quick-look PNG, a full-size PNG); scene_inputs.py prepares what it reads (--resample). With ``samples_per_input`` K above 1
(:func:`translate_scene_samples`) it translates the scene K times, each a whole
job of its own (:func:`sample_job`) seeded by
:func:`~guided_diffusion.translation.scene.scene_sample_seed` (sample 0 is the translation of
K = 1, written to the output as always; sample k > 0 goes to
scene_outputs.sample_path), then reads the K GeoTIFFs a band of rows at a time into
their mean, their spread and a picture of the spread
(scene_outputs.write_spread_outputs).
"""

import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import replace

import numpy as np
import torch as th
from tqdm.auto import tqdm

from .. import dist_util, logger
from ..base import samplers
from ..base.atomic import DiskFull, disk_of, write_json
from ..io.checkpoints import read_run_config
from ..io.rasters import RasterRows, SarStats, sar_bands_scaled
from ..io.sentinel1 import is_product
from .jobs import resolve
from .sampling import (
    BatchedModel,
    Bfloat16Model,
    load_prepared_model,
    runs_in_fp16,
    tf32_in_effect,
)
from .scene import (
    KEY_VERSION,
    JobMismatch,
    SceneArrays,
    SceneSampler,
    bands,
    key_differences,
    saved_under_older_rules,
    scene_bytes,
    scene_sample_seed,
)
from .scene_inputs import (
    array_rows,
    check_pixel_size,
    product_input,
    remove_product_input,
    resample_input,
    resampled_rows,
)
from .scene_outputs import (
    SAMPLES_SUBDIR,
    disk_needed,
    png_path,
    sample_path,
    write_outputs,
    write_spread_outputs,
)

# The small model that ships with the repository (DATA_FORMAT=sen12ms bash demo.sh
# --update_assets): 32-pixel tiles, VV and VH in dB, trained on generated scenes.
BUNDLED_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "assets", "scene_model", "model.pt",
)
# Its distilled few-step student (benchmarks/bench_distill.py --part bundle): the
# same network, sampled with the consistency sampler in 2 calls by default.
BUNDLED_STUDENT = os.path.join(
    os.path.dirname(os.path.dirname(BUNDLED_MODEL)), "scene_student", "model.pt"
)
# --memory auto keeps the arrays in memory while they take at most this share of
# the memory available when the job starts (shared by the processes of a machine).
MEMORY_SHARE = 0.5
# The file in the work folder that lists the finished samples of a run with
# --samples_per_input above 1 (and the settings they were made with).
SAMPLES_FILE = "samples.json"


class SceneError(RuntimeError):
    """A fault during the job, with what survived it."""


# Set by SIGINT and SIGTERM: the job saves at the end of the step and stops.
STOP = {"signal": None}


def _ask_to_stop(signum, frame):
    STOP["signal"] = signum


def scene_settings(job):
    """
    The checkpoint's flags, input scaling and diffusion for a scene job
    (:func:`~guided_diffusion.translation.jobs.resolve`).

    :param job: a :class:`~guided_diffusion.translation.jobs.SceneJob`.
    :return: its :class:`~guided_diffusion.translation.jobs.CheckpointSettings`.
    :raises ValueError: --output_units optical for a model of 8-bit optical images.
    """
    checkpoint = resolve(job)
    if job.output_units == "optical" and not checkpoint.scaling.opt_range:
        raise ValueError(
            "--output_units optical: the training run mapped 8-bit optical images, "
            "so there are no other units to write; use --output_units uint8"
        )
    return checkpoint


# -- the job --------------------------------------------------------------------------


def translate_scene(job, checkpoint, *, on_sample=None, **options):
    """
    Translate ``job.input`` into ``job.output`` and the other files the job asks
    for (see :func:`_translate_scene_file` for the arguments), with GDAL's block
    cache held to :func:`gdal_cache_bytes`: its default (5% of the machine's
    memory) would otherwise fill up while a large scene is read and written, and
    memory-mapped scenes would no longer run in a flat amount of memory. With ``job.samples_per_input`` above 1, the K
    samples and their mean and spread (:func:`translate_scene_samples`).

    :param job: a :class:`~guided_diffusion.translation.jobs.SceneJob` (placed: its output and
        work folder absolute, :meth:`~guided_diffusion.translation.jobs.SceneJob.placed`).
    :param checkpoint: its :func:`scene_settings`.
    :param on_sample: called as on_sample(k, K) when sample k starts to be
        translated (K above 1 only), on every process; None for nothing.
    :return: True when the job finished, False when a signal stopped it (saved).
    """
    import rasterio

    flags, scaling, diffusion, _ = checkpoint
    product = is_product(job.input)
    if product:  # a Sentinel-1 product: its sigma0 GeoTIFF, written once, is the input
        job, scaling = product_input(job, scaling)
    width = RasterRows(job.input).width
    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(width)):
        if job.samples_per_input > 1:
            finished = translate_scene_samples(
                job, flags, scaling, diffusion, on_sample=on_sample, **options
            )
        else:
            finished = _translate_scene_file(job, flags, scaling, diffusion, **options)
    if product and finished and dist_util.is_main_process():
        remove_product_input(job)
    return finished


def translate_scene_samples(job, flags, scaling, diffusion, *, rank=0, world=1,
                            model=None, catch_signals=False, progress=None,
                            on_sample=None):  # fmt: skip
    """
    --samples_per_input K: translate the scene K times, then write the samples'
    mean, spread and spread picture (:func:`write_spread_outputs`).

    Sample k is a whole job of :func:`_translate_scene_file` with the seed
    :func:`~guided_diffusion.translation.scene.scene_sample_seed` (``job.seed`` for k = 0, so
    ``job.output`` is the translation of K = 1), written to :func:`sample_path`,
    saved in a work folder of its own (``job.work_dir`` for sample 0, its
    subfolder ``sample<k>`` for the others). ``job.work_dir`` lists the finished
    samples in :data:`SAMPLES_FILE` with the settings that made them: a rerun of
    the same command skips those, continues the sample that was stopped and
    translates the rest; a rerun with other settings is refused. The model is
    loaded once for every sample; a signal that stops a sample stops the run.

    :param job, flags, scaling, diffusion, rank, world, model, catch_signals,
        progress: as :func:`_translate_scene_file` (progress counts the tiles of
        the sample being translated).
    :param on_sample: see :func:`translate_scene`.
    :return: True when every file is written, False when a signal stopped it.
    :raises JobMismatch: the work folder lists samples made with other settings.
    :raises SceneError: as :func:`_translate_scene_file`, or the mean and spread
        could not be written.
    """
    count = job.samples_per_input
    tile, overlap = tile_overlap(job, flags)
    key = job_key(job, tile, overlap, flags)
    problem, done = None, []
    if dist_util.is_main_process():
        try:
            done = samples_done(job, key)
        except JobMismatch as err:
            problem = str(err)
    problem, done = dist_util.broadcast_object((problem, done))
    if problem:
        raise JobMismatch(problem)
    todo = [k for k in range(count) if k not in done]
    if done:
        logger.log(
            f"{len(done)} of {count} samples already translated ("
            + ", ".join(os.path.basename(sample_path(job, k)) for k in done)
            + ")"
        )
    for i, k in enumerate(todo):
        part = sample_job(job, k, later=len(todo) - i - 1, warned=i > 0)
        logger.log(f"sample {k} of {count} (seed {part.seed}): {sample_path(part, k)}")
        if model is None:  # once, for every sample
            model = load_scene_model(job, flags)
        if on_sample is not None:
            on_sample(k, count)
        finished = _translate_scene_file(
            part, flags, scaling, diffusion, rank=rank, world=world, model=model,
            catch_signals=catch_signals, progress=progress,
        )  # fmt: skip
        if not finished:
            return False
        if dist_util.is_main_process():
            record_sample_done(job, key, k)
    problem = None
    if dist_util.is_main_process():
        try:
            written = write_spread_outputs(job, scaling, count)
        except OSError as err:
            problem = (
                f"cannot write the mean and spread of {job.output} "
                f"({err.strerror or err}); the {count} samples are kept: free space "
                "and rerun the same command to write them"
            )
    # the other ranks wait for rank 0's write: they leave with its fault
    problem = dist_util.broadcast_object(problem)
    if problem:
        raise SceneError(problem)
    if dist_util.is_main_process():
        os.remove(os.path.join(job.work_dir, SAMPLES_FILE))
        shutil.rmtree(os.path.join(job.work_dir, SAMPLES_SUBDIR), ignore_errors=True)
        remove_work_dir(job.work_dir)
        kept = f"{job.output} (sample 0)" if job.geotiff else ""
        if job.keep_samples:
            kept += ", " + ", ".join(sample_path(job, k) for k in range(1, count))
        mean = written["mean"] if job.geotiff else png_path(written["mean"])
        logger.log(
            f"{count} samples: {kept.lstrip(', ') or 'not kept'}; their mean {mean}, "
            f"spread {written['spread']} and its picture {written['picture']}"
        )
    dist_util.barrier()
    return True






def sample_job(job, k, later=0, warned=False):
    """
    The job of sample k: its output (:func:`sample_path`), work folder
    (``job.work_dir``, or its subfolder ``sample<k>``) and seed
    (:func:`~guided_diffusion.translation.scene.scene_sample_seed`), with ``sample`` (k),
    ``run_seed`` (the run's seed), ``samples_after`` (``later``: the samples
    still to translate after this one, for the time estimate) and ``warned``
    (True: the input's warnings were given for an earlier sample, not again).
    """
    part = replace(job, sample=k, run_seed=job.seed, samples_after=later, warned=warned)
    if k:
        part = replace(
            part, output=sample_path(job, k), seed=scene_sample_seed(job.seed, k),
            work_dir=os.path.join(job.work_dir, f"sample{k}"),
        )  # fmt: skip
    return part


def samples_done(job, key):
    """
    The samples a stopped run of these settings finished (their GeoTIFFs there),
    from ``job.work_dir``'s :data:`SAMPLES_FILE` (written when the first sample
    is done).

    :param key: :func:`job_key` of the run (sample 0's).
    :return: a sorted list of sample indices.
    :raises JobMismatch: the file lists samples made with other settings.
    """
    path = os.path.join(job.work_dir, SAMPLES_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    older = saved_under_older_rules(saved["key"], key, job.work_dir)
    if older:
        raise JobMismatch(older)
    shown = key_differences(saved["key"], key)
    if shown:
        raise JobMismatch(
            f"{job.work_dir} holds {len(saved['done'])} finished sample(s) of a run "
            f"with other settings ({shown}); rerun with those to continue it, or "
            "delete the folder to start over"
        )
    return sorted(k for k in saved["done"] if os.path.exists(sample_path(job, k)))


def record_sample_done(job, key, k):
    """Add sample k to the finished samples in ``job.work_dir``'s :data:`SAMPLES_FILE`."""
    path = os.path.join(job.work_dir, SAMPLES_FILE)
    done = []
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)["done"]
    _write_json(path, {"key": key, "done": sorted({*done, k})})


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, value, indent=1)


def load_scene_model(job, flags):
    """
    The model of ``job.model_path``, loaded and prepared as the job says, called
    on at most ``job.batch_size`` tiles at a time (:class:`~guided_diffusion.translation.sampling.
    BatchedModel`: under --compile always that many, so that the last tiles of a
    step, whose count changes as the tiles move, compile nothing new).
    """
    model = load_prepared_model(job, flags, dist_util.dev())
    return BatchedModel(model, job.batch_size, pad=job.compile)


def tile_overlap(job, flags):
    """
    (tile, overlap) in pixels: the model's size and --overlap (-1: half a tile).

    :raises ValueError: an overlap of a tile or more, naming the flag.
    """
    tile = flags["image_size"]
    overlap = tile // 2 if job.overlap < 0 else job.overlap
    if not 0 <= overlap < tile:
        raise ValueError(
            f"--overlap {job.overlap}: give 0..{tile - 1} pixels (-1: half a tile)"
        )
    return tile, overlap


def gdal_cache_bytes(width):
    """
    GDAL's block cache for a scene ``width`` pixels wide, in bytes (GDAL reads a
    value under 100000 as megabytes): room for two rows of 256-pixel blocks of
    four float32 bands, the widest the output or the input are written or read
    in, and at least 64 MiB. The rows go through once, so more would not help.
    """
    return max(64 * 2**20, 2 * width * 256 * 4 * 4)


def _translate_scene_file(job, flags, scaling, diffusion, *, rank=0, world=1,
                          model=None, catch_signals=False, progress=None):  # fmt: skip
    """
    Translate ``job.input`` into ``job.output`` (and its quick-look PNG), saving
    the job in ``job.work_dir`` as it goes and removing it when done.

    :param job: :func:`parse_args`'s namespace.
    :param flags, scaling, diffusion: :func:`scene_settings`'s.
    :param rank, world: this process and the number of processes (set up by the
        caller; more than one needs torch.distributed).
    :param model: the checkpoint already loaded (and prepared) for
        ``job.model_path``; None loads it.
    :param catch_signals: stop at the end of the step on SIGINT and SIGTERM, saved
        (only from the main thread).
    :param progress: called as progress(tiles done, tiles in all, steps done,
        steps) while sampling, on the main process.
    :return: True when the job finished, False when a signal stopped it (saved).
    :raises SceneError: the arrays or the output could not be written, saying
        what survived.
    """
    tile, overlap = tile_overlap(job, flags)
    # a collective, before anything that may fail on one rank only
    ranks_here = ranks_on_this_machine()

    def _raise_together(err, job):
        """Every rank calls it, with what went wrong on it (None: nothing): all
        raise when any rank failed (this rank's own error where it had one)."""
        found = dist_util.problem_anywhere(None if err is None else str(err))
        if found is None:
            return
        if err is not None:
            raise err
        raise SceneError(
            f"cannot read {job.input} on rank {found[0]} ({found[1]}); every rank "
            "skips it"
        )

    # -- the scene, into scene-sized arrays ----------------------------------------------
    # Reading fails on one rank or all (a truncated file, a file a machine does not
    # see): the ranks agree on it before the next collective, and give up together.
    try:
        source = RasterRows(job.input)
    except Exception as err:
        _raise_together(err, job)
    _raise_together(None, job)
    trained = ((read_run_config(job.model_path) or {}).get("inputs") or {}).get("pixel_size")
    if job.resample:
        reader = resample_input(job, source, trained)
    else:
        reader = source
        if not job.warned:
            check_pixel_size(source, trained, job.input)
    height, width = reader.height, reader.width
    sar_channels = scaling.sar_channels
    # a scene smaller than a tile is padded to one (edge pixels repeated)
    padded = (max(height, tile), max(width, tile))
    need = scene_bytes(*padded, sar_channels, flags["learn_sigma"])
    use_disk = arrays_on_disk(job.memory, need, available_memory(), ranks_here)
    arrays = SceneArrays(
        os.path.join(job.work_dir, f"arrays-rank{rank}") if use_disk else None
    )
    each = f" in each of {ranks_here} processes on this machine" if ranks_here > 1 else ""
    logger.log(
        f"{width}x{height} pixels: the scene's arrays take {need / 2**30:.2f} GiB{each} "
        + (f"in memory-mapped files in {arrays.folder}" if use_disk else "in memory")
    )
    try:
        try:
            try:
                stats = load_scene(reader, scaling, arrays, padded, sar_channels)
            except OSError as err:
                raise SceneError(
                    f"cannot hold the scene's arrays in {arrays.folder or 'memory'} "
                    f"({err.strerror or err}): free space there, or give --work_dir on "
                    "a larger disk"
                ) from None
        except Exception as err:
            _raise_together(err, job)
        _raise_together(None, job)
        if not job.warned:  # once for K samples
            need = disk_needed(job, source.height, source.width)
            disk = disk_of(job.output)
            free = shutil.disk_usage(disk).free
            logger.log(
                f"the outputs will need at most {need / 1e6:,.1f} MB on the disk at "
                f"{disk} ({free / 1e6:,.0f} MB free)"
                + ("" if need <= free else ": free space before the job ends, or "
                   "give --output on a larger disk")
            )  # fmt: skip
            if stats.nodata:
                logger.log(f"{stats.nodata} of {stats.pixels} SAR pixels are nodata")
            warning = stats.clipping_warning()
            if warning:
                logger.warn(warning)
        finished = sample_scene(
            job, flags, diffusion, arrays, tile, overlap, rank, world, model=model,
            catch_signals=catch_signals, progress=progress,
        )  # fmt: skip
        problem = None
        if finished and dist_util.is_main_process():
            try:
                if job.resample:
                    rows = resampled_rows(job, scaling, arrays, reader, source)
                else:
                    rows = array_rows(arrays, width)
                write_outputs(job, scaling, rows, source.height, source.width)
            except OSError as err:
                problem = (
                    f"cannot write {job.output} ({err.strerror or err}); the finished "
                    f"job is saved in {job.work_dir}: free space and rerun the same "
                    "command to write it"
                )
        # the other ranks wait for rank 0's write: they leave with its fault
        problem = dist_util.broadcast_object(problem)
        if problem:
            raise SceneError(problem)
    finally:
        arrays.remove()
    dist_util.barrier()
    if finished and dist_util.is_main_process():
        remove_work_dir(job.work_dir)
    return finished


def arrays_on_disk(memory, need, available, ranks_here=1):
    """
    Whether a job's arrays go to memory-mapped files (--memory).

    :param memory: "ram", "mmap" or "auto".
    :param need: bytes of one process's arrays (:func:`~guided_diffusion.translation.scene.scene_bytes`).
    :param available: bytes of memory available on this machine.
    :param ranks_here: the processes on this machine, each holding arrays of its
        own: "auto" keeps them in memory while all of them together take at most
        :data:`MEMORY_SHARE` of ``available``.
    """
    if memory != "auto":
        return memory == "mmap"
    return need * ranks_here > MEMORY_SHARE * available


def ranks_on_this_machine():
    """The processes of the group on this machine, this one included; every process
    must call it (a collective; :func:`~guided_diffusion.dist_util.processes_on_this_machine`)."""
    return dist_util.processes_on_this_machine()


def saved_job_view(run, folder):
    """
    What this process reads in ``folder``, for :func:`check_saved_jobs_agree`:
    None (no saved job), (step, digest of job.json) or ("refused", the message of
    a job saved with other settings).
    """
    try:
        step = run.saved_step(folder)
    except JobMismatch as err:
        return ("refused", str(err))
    if step is None:
        return None
    with open(os.path.join(folder, "job.json"), "rb") as f:
        return (step, hashlib.sha256(f.read()).hexdigest()[:12])


def check_saved_jobs_agree(views, folder):
    """
    The saved job every process continues from, when all read the same one.

    Only rank 0 saves a job, and every rank reads it back from the work folder:
    ranks on machines that do not share that folder would continue from different
    steps (or start over), and the scene would be made of several jobs.

    :param views: every rank's :func:`saved_job_view`, indexed by rank.
    :param folder: the work folder (for the messages).
    :return: the saved step, or None when no rank reads a saved job.
    :raises JobMismatch: the ranks read different things (one line naming each
        rank's and what to do), or the job was saved with other settings.
    """
    views = [tuple(v) if isinstance(v, list) else v for v in views]
    if len(set(views)) == 1:
        view = views[0]
        if view is not None and view[0] == "refused":
            raise JobMismatch(view[1])
        return None if view is None else view[0]
    seen = {}
    for rank, view in enumerate(views):
        seen.setdefault(view, []).append(str(rank))

    def shown(view):
        if view is None:
            return "none"
        if view[0] == "refused":
            return "a job of other settings"
        return f"step {view[0]} (job.json {view[1]})"

    which = "; ".join(f"rank {', '.join(r)}: {shown(v)}" for v, r in seen.items())
    raise JobMismatch(
        f"the processes read different saved jobs in {folder} ({which}): only rank 0 "
        "saves there, so every machine must see the same folder; give --work_dir a "
        "folder on a file system that every machine shares, or delete the folder on "
        "every machine to start over"
    )


def available_memory():
    """Bytes of memory available now (MemAvailable), or all of it where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_scene(reader, scaling, arrays, padded, sar_channels):
    """
    Scale the scene's SAR a band of rows at a time into the arrays "sar" and
    "valid", padded to ``padded`` (height, width) by repeating edge pixels.

    :return: the :class:`SarStats` of the whole file.
    """
    height, width = reader.height, reader.width
    arrays.create("sar", sar_channels, *padded)
    arrays.create("valid", 1, *padded)
    parts = []
    for top, bottom in bands(height):
        data, valid, stats = sar_bands_scaled(reader.read(top, bottom), scaling)
        parts.append(stats)
        data = data.astype(np.float32)
        if len(data) == 1 and sar_channels == 3:
            data = np.repeat(data, 3, axis=0)  # grey replicated, as the model was trained
        valid = valid[None].astype(np.float32)
        if padded[1] > width:
            extra = ((0, 0), (0, 0), (0, padded[1] - width))
            data, valid = np.pad(data, extra, mode="edge"), np.pad(valid, extra)
        arrays.write("sar", top, data)
        arrays.write("valid", top, valid)
    if padded[0] > height:
        last = arrays.read("sar", (height - 1, height))
        arrays.write("sar", height, last.repeat(1, padded[0] - height, 1))
    return SarStats.combined(parts)


def sample_scene(job, flags, diffusion, arrays, tile, overlap, rank, world, *,
                 model=None, catch_signals=False, progress=None):  # fmt: skip
    """
    Run (or continue) the job on the scene in ``arrays``.

    :param model: the loaded model, or None to load ``job.model_path``.
    :param catch_signals: see :func:`translate_scene`.
    :param progress: see :func:`translate_scene`.
    :return: True when it finished, False when a signal stopped it (saved).
    """
    device = dist_util.dev()
    if model is None:
        model = load_scene_model(job, flags)
    if not isinstance(model, BatchedModel):
        model = BatchedModel(model, job.batch_size, pad=job.compile)
    net = Bfloat16Model(model) if job.use_bf16 else model
    keep = ("pred_xstart", "log_variance") if flags["learn_sigma"] else ("pred_xstart",)

    def denoise(xs, sar, t):
        denoiser = samplers.Denoiser(
            diffusion, net, sar.to(device), clip_denoised=job.clip_denoised
        )
        out = denoiser(xs.to(device), t)
        return {k: out[k].float().cpu() for k in keep}

    timing = {"tiles": 0}

    def tiles_done(count):
        bar.update(count)
        timing["tiles"] += count
        if progress is not None and dist_util.is_main_process():
            progress(timing["tiles"], timing["total"], run.step, steps)
        if "first" not in timing:  # the estimate, from the first batch of tiles
            timing["first"] = time.perf_counter() - timing["began"]
            total = timing["first"] * calls * (steps - run.step)
            later = job.samples_after
            if later:  # the samples after this one, from their first step
                whole = total + later * timing["first"] * calls * steps
                scene = f"this sample, {_duration(whole)} for it and {later} more"
            elif job.samples_per_input > 1:
                scene = "this sample, the last"
            else:
                scene = "the scene"
            logger.log(
                f"the first {count} tile(s) took {timing['first']:.1f} s: about "
                f"{_duration(total)} for {scene}"
            )

    fuser_args = dict(
        denoise=denoise, tile=tile, overlap=overlap, batch_size=job.batch_size,
        rank=rank, world=world, learned_variance=flags["learn_sigma"],
        progress=tiles_done,
    )  # fmt: skip
    run = SceneSampler(
        arrays, fuser_args, diffusion, job.sampler, job.options, job.seed,
        all_reduce=all_reduce if world > 1 else None, shift_tiles=job.shift_tiles,
        key=job_key(job, tile, overlap, flags),
    )  # fmt: skip
    steps = len(run.timesteps)
    views = dist_util.all_gather_object(saved_job_view(run, job.work_dir))
    saved = check_saved_jobs_agree(views, job.work_dir)
    if saved is None:
        run.start()
    else:
        run.resume(job.work_dir)
        logger.log(f"continuing the job saved at step {saved} of {steps} in {job.work_dir}")
    calls = math.ceil(len(run.fuser.mine) / job.batch_size)
    moving = (
        f", inner tiles moved by up to {run.fuser.max_shift} px every step"
        if job.shift_tiles and run.fuser.max_shift else ""
    )  # fmt: skip
    logger.log(
        f"{len(run.fuser.grid)} tiles of {tile} px (overlap {overlap}{moving}), {steps} "
        f"{job.sampler} steps, {calls} network calls of up to {job.batch_size} tiles "
        f"per step on {world} process(es); saved every {job.save_every} steps in "
        f"{job.work_dir}"
    )
    timing["total"] = run.tiles_left()
    which = ""
    if job.samples_per_input > 1:
        which = f"sample {job.sample} of {job.samples_per_input}, "
    bar = tqdm(
        total=timing["total"], unit="tile",
        desc=f"{which}step {run.step + 1}/{steps}", disable=not dist_util.is_main_process(),
    )  # fmt: skip

    def should_stop():
        stop = th.tensor([float(STOP["signal"] or 0)])
        if world > 1:
            all_reduce(stop, op=th.distributed.ReduceOp.MAX)
        STOP["signal"] = int(stop.item()) or None
        return STOP["signal"] is not None

    def on_step(done):
        bar.set_description(f"{which}step {min(done + 1, steps)}/{steps}")

    handlers = {}
    if catch_signals:
        STOP["signal"] = None  # a stop of an earlier job in this process is done with
        handlers = {
            s: signal.signal(s, _ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)
        }
    timing["began"] = time.perf_counter()
    try:
        with th.no_grad():
            finished = run.run(
                save_every=job.save_every,
                folder=job.work_dir if dist_util.is_main_process() else None,
                should_stop=should_stop if catch_signals else None, on_step=on_step,
            )  # fmt: skip
    except OSError as err:  # a full disk, a folder gone
        saved = run.saved_step(job.work_dir)
        kept = (
            f"the job saved at step {saved} of {steps} in {job.work_dir} survives: "
            "rerun the same command to continue it"
            if saved else "nothing was saved yet"
        )  # fmt: skip
        where = "" if isinstance(err, DiskFull) else f" ({err.filename or job.work_dir})"
        raise SceneError(f"{err.strerror or err}{where}; {kept}") from None
    finally:
        bar.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if not finished:
        name = signal.Signals(STOP["signal"]).name
        logger.log(
            f"stopped by {name} after step {run.step} of {steps}; the job is saved in "
            f"{job.work_dir}: run the same command again to continue it"
        )
    return finished


def job_key(job, tile, overlap, flags):
    """
    The settings that decide the result: a saved job continues only under them.
    Sample k > 0 of --samples_per_input (``job.sample``, :func:`sample_job`) adds
    "sample": k to the run's seed; sample 0's are those of a run with one sample.
    The precisions the network runs in on this process's device are added where
    they are not IEEE float32 (so a job saved before they were recorded, all in
    float32, continues): "use_fp16" for a float16 model on a GPU
    (:func:`~guided_diffusion.translation.sampling.runs_in_fp16`), "use_tf32" for TF32 on CUDA.

    :param flags: the model flags (``use_fp16``: the model trained in float16).
    """
    stat = os.stat(job.input)
    model = os.stat(job.model_path)
    key = {
        "input": os.path.abspath(job.input), "input_bytes": stat.st_size,
        "input_mtime": stat.st_mtime, "model": os.path.abspath(job.model_path),
        "model_mtime": model.st_mtime, "sampler": job.sampler,
        "options": job.options, "timestep_respacing": job.timestep_respacing,
        "seed": job.seed if job.run_seed is None else job.run_seed, "tile": tile, "overlap": overlap,
        "shift_tiles": job.shift_tiles,
        "clip_denoised": job.clip_denoised, "use_bf16": job.use_bf16,
        "resample": job.resample,
        "inputs": {k: v for k, v in job.inputs.items() if v is not None},
    }  # fmt: skip
    device = dist_util.dev()
    if runs_in_fp16(flags["use_fp16"], device, job.use_bf16):
        key["use_fp16"] = True
    if tf32_in_effect(job.use_tf32, device):
        key["use_tf32"] = True
    if job.sample:
        key["sample"] = job.sample
    # the meaning of these settings (a job saved under another is refused)
    key["version"] = KEY_VERSION
    return key


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def all_reduce(tensor, op=None):
    """Sum (or ``op``) a CPU tensor in place across the processes."""
    moved = tensor.to(dist_util.dev())
    if op is None:
        th.distributed.all_reduce(moved)
    else:
        th.distributed.all_reduce(moved, op=op)
    tensor.copy_(moved.cpu())


def remove_work_dir(folder):
    """Remove a finished job's work folder (its saved state and nothing else)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        temporary = ".tmp" in name  # a write that was killed half way
        if name == "job.json" or name.endswith((".f32", ".pt", ".tif")) or temporary:
            os.remove(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError:
        pass  # the user put something else there: keep it






# -- the outputs ----------------------------------------------------------------------





















