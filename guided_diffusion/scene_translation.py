"""
Translating a whole SAR scene file into an optical GeoTIFF: the core of
scripts/translate_scene.py, shared with the web page (guided_diffusion/app.py).

The script parses its flags (:func:`parse_args`), sets up its processes and log,
and calls :func:`translate_scene_file`; the page parses the command line the
script would get with the same parser and calls the same function from a worker
thread, with one process, no signal handlers and a model it keeps loaded. So the
two give the same pixels for the same flags by construction.

:func:`translate_scene_file` reads the scene into scene-sized arrays
(:func:`load_scene`), runs the job (:class:`~guided_diffusion.scene.SceneSampler`,
:func:`sample_scene`) and writes the GeoTIFF and the quick-look PNG
(:func:`write_outputs`).
"""

import argparse
import math
import os
import signal
import sys
import time

import numpy as np
import torch as th
from PIL import Image
from tqdm.auto import tqdm

from . import dist_util, logger, samplers
from .rasters import (
    GeoTiffWriter,
    RasterRows,
    SarStats,
    georeference,
    grid_at_pixel_size,
    sar_bands_scaled,
    warp_to_grid,
)
from .sampling import (
    Bfloat16Model,
    add_sampling_flags,
    checkpoint_settings,
    load_model,
    prepare_model,
    read_run_config,
    read_sampling_args,
    sar_for_display,
    to_uint8,
)
from .scene import SceneArrays, SceneSampler, bands, scene_bytes
from .settings import str2bool

# Pixel sizes that differ by more than this share from the training data's are warned of.
PIXEL_SIZE_TOLERANCE = 0.2
QUICKLOOK_WIDTH = 1024
# The small model that ships with the repository (DATA_FORMAT=sen12ms bash demo.sh
# --update_assets): 32-pixel tiles, VV and VH in dB, trained on generated scenes.
BUNDLED_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "assets", "scene_model", "model.pt",
)
# --memory auto keeps the arrays in memory while they take at most this share of
# the memory available when the job starts.
MEMORY_SHARE = 0.5


class SceneError(RuntimeError):
    """A fault during the job, with what survived it."""


# Set by SIGINT and SIGTERM: the job saves at the end of the step and stops.
STOP = {"signal": None}


def _ask_to_stop(signum, frame):
    STOP["signal"] = signum


# -- flags --------------------------------------------------------------------------


def build_parser(description=None):
    """
    The parser of scripts/translate_scene.py's flags.

    :param description: the help's text (the script's docstring).
    :return: an argparse.ArgumentParser.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="the SAR scene (GeoTIFF)")
    parser.add_argument("--output", required=True, help="the optical GeoTIFF to write")
    parser.add_argument("--overlap", type=int, default=-1,
                        help="pixels shared by neighbouring tiles (-1: half a tile)")  # fmt: skip
    parser.add_argument("--shift_tiles", type=str2bool, default=True,
                        help="move the inner tiles by a few pixels (up to a quarter "
                             "tile) at every step, so that no tile border stays in "
                             "one place; False keeps the grid fixed")  # fmt: skip
    parser.add_argument("--output_units", choices=("uint8", "optical"), default="uint8",
                        help="8-bit RGB, or the training data's optical values (float32)")  # fmt: skip
    parser.add_argument("--resample", action="store_true",
                        help="translate at the training data's pixel size (from its "
                             "config.json), and bring the result back to the input's grid")  # fmt: skip
    parser.add_argument("--save_every", type=int, default=5,
                        help="save the job every N steps (and when stopped, and at the "
                             "end); rerunning the command continues it (0: only then)")  # fmt: skip
    parser.add_argument("--work_dir", default="",
                        help="where the saved job (and memory-mapped arrays) live; "
                             "default OUTPUT.work beside the output, removed when done")  # fmt: skip
    parser.add_argument("--memory", choices=("auto", "ram", "mmap"), default="auto",
                        help="keep the scene's arrays in memory (ram) or in "
                             "memory-mapped files in the work folder (mmap); auto: "
                             f"mmap when they would take over {MEMORY_SHARE:.0%}% of "
                             "the available memory")  # fmt: skip
    add_sampling_flags(
        parser, overrides={"batch_size": 8},
        skip=("data_dir", "num_samples"),
    )  # fmt: skip
    parser.set_defaults(model_path=BUNDLED_MODEL)
    for action in parser._actions:
        if action.dest == "model_path":
            action.help = (
                "a model or EMA file; its run's config.json gives the model and the "
                "input scaling (default: the bundled demo model, "
                "assets/scene_model/model.pt)"
            )
    return parser


def parse_args(argv=None, description=None, *, announce=True):
    """
    Parse and check the script's flags.

    :param argv: the arguments (default: the command line's).
    :param description: the help's text.
    :param announce: say on stderr when the bundled demo model is used.
    :return: the namespace of :func:`~guided_diffusion.sampling.read_sampling_args`,
        ``output`` and ``work_dir`` made absolute (the output's folder is made).
    :raises ValueError: a one-line message naming the flag.
    """
    args = read_sampling_args(build_parser(description), argv)
    if announce and os.path.abspath(args.model_path) == BUNDLED_MODEL:
        print(
            f"--model_path: the bundled demo model {os.path.relpath(BUNDLED_MODEL)}, "
            "trained on generated scenes only: give your own for real data",
            file=sys.stderr,
        )
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input}: no such file")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError("--output must not be the --input file")
    if args.batch_size < 1:
        raise ValueError("--batch_size (tiles per network call) must be positive")
    if args.save_every < 0:
        raise ValueError("--save_every must be 0 (save only when stopped and at the end) or more")
    # the folder is made now: a missing one must not fail the job at its end
    args.output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    args.work_dir = os.path.abspath(args.work_dir or args.output + ".work")
    return args


def scene_settings(args):
    """
    The checkpoint's flags, input scaling and diffusion for the parsed flags.

    :return: (flags, scaling, diffusion, log lines) of
        :func:`~guided_diffusion.sampling.checkpoint_settings`.
    :raises ValueError: --output_units optical for a model of 8-bit optical images.
    """
    flags, scaling, diffusion, notes = checkpoint_settings(
        args.model_path, args.explicit, args.inputs
    )
    if args.output_units == "optical" and not scaling.opt_range:
        raise ValueError(
            "--output_units optical: the training run mapped 8-bit optical images, "
            "so there are no other units to write; use --output_units uint8"
        )
    return flags, scaling, diffusion, notes


# -- the job --------------------------------------------------------------------------


def translate_scene_file(args, flags, scaling, diffusion, **options):
    """
    Translate ``args.input`` into ``args.output`` (see :func:`_translate_scene_file`
    for the arguments), with GDAL's block cache held to :func:`gdal_cache_bytes`:
    its default (5% of the machine's memory) would otherwise fill up while a
    large scene is read and written, and memory-mapped scenes would no longer run
    in a flat amount of memory.
    """
    import rasterio

    width = RasterRows(args.input).width
    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(width)):
        return _translate_scene_file(args, flags, scaling, diffusion, **options)


def gdal_cache_bytes(width):
    """
    GDAL's block cache for a scene ``width`` pixels wide, in bytes (GDAL reads a
    value under 100000 as megabytes): room for two rows of 256-pixel blocks of
    four float32 bands, the widest the output or the input are written or read
    in, and at least 64 MiB. The rows go through once, so more would not help.
    """
    return max(64 * 2**20, 2 * width * 256 * 4 * 4)


def _translate_scene_file(args, flags, scaling, diffusion, *, rank=0, world=1,
                          model=None, catch_signals=False, progress=None):  # fmt: skip
    """
    Translate ``args.input`` into ``args.output`` (and its quick-look PNG), saving
    the job in ``args.work_dir`` as it goes and removing it when done.

    :param args: :func:`parse_args`'s namespace.
    :param flags, scaling, diffusion: :func:`scene_settings`'s.
    :param rank, world: this process and the number of processes (set up by the
        caller; more than one needs torch.distributed).
    :param model: the checkpoint already loaded (and prepared) for
        ``args.model_path``; None loads it.
    :param catch_signals: stop at the end of the step on SIGINT and SIGTERM, saved
        (only from the main thread).
    :param progress: called as progress(tiles done, tiles in all, steps done,
        steps) while sampling, on the main process.
    :return: True when the job finished, False when a signal stopped it (saved).
    :raises SceneError: the arrays or the output could not be written, saying
        what survived.
    """
    tile = flags["image_size"]
    overlap = tile // 2 if args.overlap < 0 else args.overlap
    if not 0 <= overlap < tile:
        raise ValueError(
            f"--overlap {args.overlap}: give 0..{tile - 1} pixels (-1: half a tile)"
        )

    # -- the scene, into scene-sized arrays ----------------------------------------------
    source = RasterRows(args.input)
    trained = ((read_run_config(args.model_path) or {}).get("inputs") or {}).get("pixel_size")
    if args.resample:
        reader = resample_input(args, source, trained)
    else:
        reader = source
        check_pixel_size(source, trained, args.input)
    height, width = reader.height, reader.width
    sar_channels = scaling.sar_channels
    # a scene smaller than a tile is padded to one (edge pixels repeated)
    padded = (max(height, tile), max(width, tile))
    need = scene_bytes(*padded, sar_channels, flags["learn_sigma"])
    use_disk = args.memory == "mmap" or (
        args.memory == "auto" and need > MEMORY_SHARE * available_memory()
    )
    arrays = SceneArrays(
        os.path.join(args.work_dir, f"arrays-rank{rank}") if use_disk else None
    )
    logger.log(
        f"{width}x{height} pixels: the scene's arrays take {need / 2**30:.2f} GiB "
        + (f"in memory-mapped files in {arrays.folder}" if use_disk else "in memory")
    )
    try:
        try:
            stats = load_scene(reader, scaling, arrays, padded, sar_channels)
        except OSError as err:
            raise SceneError(
                f"cannot hold the scene's arrays in {arrays.folder or 'memory'} "
                f"({err.strerror or err}): free space there, or give --work_dir on "
                "a larger disk"
            ) from None
        if stats.nodata:
            logger.log(f"{stats.nodata} of {stats.pixels} SAR pixels are nodata")
        warning = stats.clipping_warning()
        if warning:
            logger.warn(warning)
        finished = sample_scene(
            args, flags, diffusion, arrays, tile, overlap, rank, world, model=model,
            catch_signals=catch_signals, progress=progress,
        )  # fmt: skip
        if finished and dist_util.is_main_process():
            try:
                if args.resample:
                    rows = resampled_rows(args, scaling, arrays, reader, source)
                else:
                    rows = array_rows(arrays, width)
                write_outputs(args, scaling, rows, source.height, source.width)
            except OSError as err:
                raise SceneError(
                    f"cannot write {args.output} ({err.strerror or err}); the finished "
                    f"job is saved in {args.work_dir}: free space and rerun the same "
                    "command to write it"
                ) from None
    finally:
        arrays.remove()
    dist_util.barrier()
    if finished and dist_util.is_main_process():
        remove_work_dir(args.work_dir)
    return finished


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


def sample_scene(args, flags, diffusion, arrays, tile, overlap, rank, world, *,
                 model=None, catch_signals=False, progress=None):  # fmt: skip
    """
    Run (or continue) the job on the scene in ``arrays``.

    :param model: the loaded model, or None to load ``args.model_path``.
    :param catch_signals: see :func:`translate_scene_file`.
    :param progress: see :func:`translate_scene_file`.
    :return: True when it finished, False when a signal stopped it (saved).
    """
    device = dist_util.dev()
    if model is None:
        model = load_model(args.model_path, flags, device, use_bf16=args.use_bf16)
        model = prepare_model(model, channels_last=args.channels_last, compile=args.compile)
    net = Bfloat16Model(model) if args.use_bf16 else model
    keep = ("pred_xstart", "log_variance") if flags["learn_sigma"] else ("pred_xstart",)

    def denoise(xs, sar, t):
        denoiser = samplers.Denoiser(
            diffusion, net, sar.to(device), clip_denoised=args.clip_denoised
        )
        out = denoiser(xs.to(device), t)
        return {k: out[k].float().cpu() for k in keep}

    timing = {"tiles": 0}

    def tiles_done(count):
        bar.update(count)
        timing["tiles"] += count
        if progress is not None and dist_util.is_main_process():
            progress(timing["tiles"], timing["total"], job.step, steps)
        if "first" not in timing:  # the estimate, from the first batch of tiles
            timing["first"] = time.perf_counter() - timing["began"]
            total = timing["first"] * calls * (steps - job.step)
            about = f"{total:.0f} s" if total < 90 else f"{total / 60:.1f} min"
            logger.log(
                f"the first {count} tile(s) took {timing['first']:.1f} s: about "
                f"{about} for the scene"
            )

    fuser_args = dict(
        denoise=denoise, tile=tile, overlap=overlap, batch_size=args.batch_size,
        rank=rank, world=world, learned_variance=flags["learn_sigma"],
        progress=tiles_done,
    )  # fmt: skip
    job = SceneSampler(
        arrays, fuser_args, diffusion, args.sampler, args.options, args.seed,
        all_reduce=all_reduce if world > 1 else None, shift_tiles=args.shift_tiles,
        key=job_key(args, tile, overlap),
    )  # fmt: skip
    steps = len(job.timesteps)
    saved = job.saved_step(args.work_dir)
    if saved is None:
        job.start()
    else:
        job.resume(args.work_dir)
        logger.log(f"continuing the job saved at step {saved} of {steps} in {args.work_dir}")
    calls = math.ceil(len(job.fuser.mine) / args.batch_size)
    moving = (
        f", inner tiles moved by up to {job.fuser.max_shift} px every step"
        if args.shift_tiles and job.fuser.max_shift else ""
    )  # fmt: skip
    logger.log(
        f"{len(job.fuser.grid)} tiles of {tile} px (overlap {overlap}{moving}), {steps} "
        f"{args.sampler} steps, {calls} network calls of up to {args.batch_size} tiles "
        f"per step on {world} process(es); saved every {args.save_every} steps in "
        f"{args.work_dir}"
    )
    timing["total"] = job.tiles_left()
    bar = tqdm(
        total=timing["total"], unit="tile",
        desc=f"step {job.step + 1}/{steps}", disable=not dist_util.is_main_process(),
    )  # fmt: skip

    def should_stop():
        stop = th.tensor([float(STOP["signal"] or 0)])
        if world > 1:
            all_reduce(stop, op=th.distributed.ReduceOp.MAX)
        STOP["signal"] = int(stop.item()) or None
        return STOP["signal"] is not None

    def on_step(done):
        bar.set_description(f"step {min(done + 1, steps)}/{steps}")

    handlers = {}
    if catch_signals:
        STOP["signal"] = None  # a stop of an earlier job in this process is done with
        handlers = {
            s: signal.signal(s, _ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)
        }
    timing["began"] = time.perf_counter()
    try:
        with th.no_grad():
            finished = job.run(
                save_every=args.save_every,
                folder=args.work_dir if dist_util.is_main_process() else None,
                should_stop=should_stop if catch_signals else None, on_step=on_step,
            )  # fmt: skip
    except OSError as err:  # a full disk, a folder gone
        saved = job.saved_step(args.work_dir)
        kept = (
            f"the job saved at step {saved} of {steps} in {args.work_dir} survives: "
            "rerun the same command to continue it"
            if saved else "nothing was saved yet"
        )  # fmt: skip
        raise SceneError(
            f"{err.strerror or err} ({err.filename or args.work_dir}); {kept}"
        ) from None
    finally:
        bar.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if not finished:
        name = signal.Signals(STOP["signal"]).name
        logger.log(
            f"stopped by {name} after step {job.step} of {steps}; the job is saved in "
            f"{args.work_dir}: run the same command again to continue it"
        )
    return finished


def job_key(args, tile, overlap):
    """The settings that decide the result: a saved job continues only under them."""
    stat = os.stat(args.input)
    model = os.stat(args.model_path)
    return {
        "input": os.path.abspath(args.input), "input_bytes": stat.st_size,
        "input_mtime": stat.st_mtime, "model": os.path.abspath(args.model_path),
        "model_mtime": model.st_mtime, "sampler": args.sampler,
        "options": args.options, "timestep_respacing": args.timestep_respacing,
        "seed": args.seed, "tile": tile, "overlap": overlap,
        "shift_tiles": args.shift_tiles,
        "clip_denoised": args.clip_denoised, "use_bf16": args.use_bf16,
        "resample": args.resample,
        "inputs": {k: v for k, v in args.inputs.items() if v is not None},
    }  # fmt: skip


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
        if name == "job.json" or name.endswith((".f32", ".pt", ".tmp", ".tif")):
            os.remove(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError:
        pass  # the user put something else there: keep it


def check_pixel_size(raster, trained, path):
    """Warn when the scene's pixels differ from the training data's by > 20%."""
    if not trained or not raster.pixel_size:
        return
    ratio = max(a / b for a, b in zip(raster.pixel_size, trained))
    ratio = max(ratio, max(b / a for a, b in zip(raster.pixel_size, trained)))
    if ratio > 1 + PIXEL_SIZE_TOLERANCE:
        logger.warn(
            f"warning: {path} has {raster.pixel_size[0]:g} x {raster.pixel_size[1]:g} "
            f"pixels, the training data {trained[0]:g} x {trained[1]:g}: the model sees "
            "objects at another scale; add --resample to translate it at the training "
            "pixel size (and bring the result back to this grid)"
        )


def resample_input(args, source, trained):
    """--resample: the scene warped to the training pixel size, in the work folder."""
    if not trained:
        raise ValueError(
            "--resample: the training run recorded no pixel size (its data were not "
            "georeferenced), so there is nothing to resample to; leave --resample out"
        )
    transform, width, height = grid_at_pixel_size(args.input, trained)
    path = os.path.join(args.work_dir, "input_resampled.tif")
    if dist_util.is_main_process():
        os.makedirs(args.work_dir, exist_ok=True)
        warp_to_grid(args.input, path, transform, width, height)
    dist_util.barrier()
    px = source.pixel_size
    logger.log(
        f"--resample: {source.width}x{source.height} pixels of {px[0]:g} x {px[1]:g} "
        f"to {width}x{height} of {trained[0]:g} x {trained[1]:g} (the training data's)"
    )
    return RasterRows(path)


# -- the outputs ----------------------------------------------------------------------


def array_rows(arrays, width):
    """The result's rows from the job's arrays: (x, valid, SAR) of rows [top, bottom)."""

    def rows(top, bottom):
        x = arrays.read("x", (top, bottom))[:, :, :width].clamp(-1, 1)
        valid = arrays.read("valid", (top, bottom))[0, :, :width].numpy() > 0.5
        return x, valid, arrays.read("sar", (top, bottom))[:, :, :width]

    return rows


def resampled_rows(args, scaling, arrays, reader, source):
    """
    --resample: the result written on the training grid, warped back onto the
    input's grid; validity and the SAR from the input itself.
    """
    on_grid = os.path.join(args.work_dir, "result_resampled.tif")
    back = os.path.join(args.work_dir, "result_back.tif")
    georef = georeference(reader.path)
    with GeoTiffWriter(
        on_grid, 3, reader.height, reader.width, np.float32, georef, nodata=float("nan")
    ) as out:  # fmt: skip
        for top, _, x, valid, _ in _rows_of(array_rows(arrays, reader.width), reader.height):
            image = x.numpy().copy()
            image[:, ~valid] = np.nan
            out.write(top, image)
    with rasterio_open(args.input) as src:
        transform = src.transform
    warp_to_grid(on_grid, back, transform, source.width, source.height)

    def rows(top, bottom):
        sar, valid, _ = sar_bands_scaled(source.read(top, bottom), scaling)
        with rasterio_open(back) as src:
            x = src.read(window=((top, bottom), (0, source.width)))
        valid &= np.isfinite(x).all(axis=0)
        x = th.from_numpy(np.nan_to_num(x, nan=-1.0)).clamp(-1, 1)
        return x, valid, th.from_numpy(sar.astype(np.float32))

    return rows


def _rows_of(rows, height):
    for top, bottom in bands(height):
        yield (top, bottom, *rows(top, bottom))


def rasterio_open(path):
    import rasterio

    return rasterio.open(path)


def quicklook_path(output):
    """The quick-look PNG written beside ``output``."""
    return os.path.splitext(output)[0] + "_quicklook.png"


def write_outputs(args, scaling, rows, height, width):
    """
    The GeoTIFF and the quick-look PNG, a band of rows at a time.

    :param rows: (top, bottom) -> the result (3, h, W) in [-1, 1], valid (h, W)
        and the scaled SAR (C, h, W) of those rows.
    """
    if args.output_units == "optical":
        lo, hi = scaling.opt_range
        dtype, nodata = np.float32, float("nan")
    else:
        dtype, nodata = np.uint8, 0
    # the quick-look keeps every step-th row and column (then shrinks to its width)
    step = max(1, (2 * width + 4) // QUICKLOOK_WIDTH)
    looks = {"sar": [], "result": [], "valid": []}
    with GeoTiffWriter(
        args.output, 3, height, width, dtype, georeference(args.input), nodata=nodata,
        names=("red", "green", "blue"),
    ) as out:  # fmt: skip
        for top, bottom, x, valid, sar in _rows_of(rows, height):
            if args.output_units == "optical":
                image = ((x.double().numpy() + 1) / 2 * (hi - lo) + lo).astype(np.float32)
                image[:, ~valid] = np.nan
            else:
                image = to_uint8(x[None])[0].transpose(2, 0, 1).copy()
                image[:, ~valid] = 0
            out.write(top, image)
            keep = [r - top for r in range(top, bottom) if r % step == 0]
            sar = sar[:, keep, ::step]
            looks["sar"].append(sar_for_display(to_uint8(sar[None]))[0])
            looks["result"].append(to_uint8(x[None, :, keep, ::step])[0])
            looks["valid"].append(valid[keep, ::step])
    logger.log(f"wrote {args.output} ({width}x{height}, {np.dtype(dtype).name})")
    quicklook = quicklook_path(args.output)
    write_quicklook(
        quicklook, *(np.concatenate(looks[k]) for k in ("sar", "result", "valid"))
    )
    logger.log(f"wrote {quicklook}")


def write_quicklook(path, sar, result, valid, width=QUICKLOOK_WIDTH):
    """SAR | result side by side, downscaled so the pair is at most ``width`` wide."""
    result = np.where(valid[..., None], result, 0).astype(np.uint8)
    sar = np.broadcast_to(sar, result.shape)
    gap = np.full((result.shape[0], 4, 3), 255, np.uint8)
    both = Image.fromarray(np.concatenate([sar, gap, result], axis=1))
    if both.width > width:
        both = both.resize(
            (width, max(1, round(both.height * width / both.width))), Image.BOX
        )
    tmp = f"{path}.tmp-{os.getpid()}.png"
    both.save(tmp)
    os.replace(tmp, path)

