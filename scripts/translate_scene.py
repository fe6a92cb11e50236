"""
Translate a whole georeferenced SAR scene of any size into an optical GeoTIFF.

    python scripts/translate_scene.py --input SCENE.tif --output OUT.tif \\
        --model_path RUN/ema_0.9999_200000.pt --sampler dpm++2m --timestep_respacing 20

The sampler runs on one scene-sized state; the network sees overlapping tiles of
the model's training size (--overlap pixels shared, half a tile by default), and
their predictions are fused at every step with a smooth window
(guided_diffusion/translation/scene.py), so there are no seams and no tile draws colours of
its own. The noise is drawn once per scene pixel from --seed: the result does not
depend on --batch_size (tiles per network call), on the number of processes
(mpiexec / torchrun share the tiles) or on --memory.

The input is read the way the training run read its data (its config.json: SAR
kind, bands, dB ranges); --sar_input, --sar_nodata and --sar_bands describe this
scene's file if it comes in another form; --resample translates it at the
training data's pixel size. The output has the input's CRS and transform (or
ground control points), is tiled, compressed and has overviews, 8-bit RGB by
default (--output_units optical: the optical values of the training data,
float32, through its --opt_range). Nodata in the input is nodata in the output.
A quick-look PNG (SAR | result) is written beside it.

--samples_per_input K translates the scene K times: OUTPUT is sample 0 (the
translation without the flag, to the bit), OUTPUT_sample1.tif ... the others
(seeds from --seed and k), and from them OUTPUT_mean.tif (their mean),
OUTPUT_spread.tif (per pixel and channel their standard deviation, divisor
K - 1) and OUTPUT_spread.png (the spread as a colour scale with its legend).

Long jobs are saved every --save_every steps (and on SIGINT or SIGTERM) in the
work folder (OUTPUT.work); running the same command again continues from there
to the same result (with K samples: the finished ones are kept, the stopped one
continues). The scene's arrays live in memory or, for scenes larger than memory,
in memory-mapped files there (--memory).

An archive in one run: --input a folder (its .tif, .tiff, .jp2 and .img files and
Sentinel-1 products, *.SAFE and S1*_*.zip), a quoted glob or a list file (.txt,
.lst: a path a line, # comments) and --output a folder: each scene goes to
OUTPUT/<its name>.tif (with its own OUTPUT/<name>.tif.work). Scenes whose output is
complete are skipped, a stopped one continues; a scene that cannot be read gets one
line and the run goes on, to a summary and exit status 1 when any failed. Under
mpiexec / torchrun the ranks share whole scenes when there are more scenes than
ranks, else the tiles of each.

Without --model_path, the small model bundled in assets/scene_model/ (trained on
generated scenes) is used. image_sample_realtime.py, by contrast, translates a
folder of patches at the model's size, resizing larger inputs as training did.
"""

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.base.settings import str2bool  # noqa: E402
from guided_diffusion.io.rasters import DataError  # noqa: E402
from guided_diffusion.translation.archive import (  # noqa: E402
    archive_outputs,
    archive_scenes,
    is_archive,
    translate_archive,
)
from guided_diffusion.translation.jobs import SceneJob  # noqa: E402
from guided_diffusion.translation.sampling import add_sampling_flags, write_log  # noqa: E402
from guided_diffusion.translation.scene import JobMismatch  # noqa: E402
from guided_diffusion.translation.scene_translation import (  # noqa: E402
    BUNDLED_MODEL,
    MEMORY_SHARE,
    STOP,
    SceneError,
    scene_settings,
    translate_scene,
)


def main():
    job, scenes = parse_run()
    checkpoint = scene_settings(job)
    dist_util.setup_dist()
    # tiles of one size: cuDNN's search runs once per batch size (under --compile
    # once; otherwise also for each rank's last, shorter batch of a step)
    dist_util.configure_numerics(use_tf32=job.use_tf32, cudnn_benchmark=True)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    logger.configure(dir=os.path.dirname(job.output), format_strs=["stdout"])
    write_log(checkpoint.notes)
    for note in dist_util.setup_notes():  # the CPU threads of each rank under MPI
        logger.log(note)
    if scenes is not None:
        status = translate_archive(job, scenes, checkpoint, rank, world)
        dist_util.cleanup()
        sys.exit(status)
    finished = translate_scene(
        job, checkpoint, rank=rank, world=world, catch_signals=True
    )
    dist_util.cleanup()
    if not finished:
        sys.exit(128 + STOP["signal"])


def create_argparser():
    """This script's flags: the scene's own, the sampling settings (settings.py),
    the "inputs" settings and the model and diffusion flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True,
                        help="the SAR scene (GeoTIFF); or an archive: a folder, a "
                             "quoted glob or a list file (.txt, .lst) of scenes")  # fmt: skip
    parser.add_argument("--output", required=True,
                        help="the optical GeoTIFF to write; for an archive the folder "
                             "of the outputs, one <scene name>.tif each")  # fmt: skip
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
    parser.add_argument("--cog", type=str2bool, default=True,
                        help="write Cloud-Optimized GeoTIFFs (overviews and tiles laid "
                             "out for reading over a network); False: plain tiled "
                             "GeoTIFFs")  # fmt: skip
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
        parser, ("sampling", "samples", "run", "speed"), overrides={"batch_size": 8},
        skip=("data_dir", "num_samples"),
    )  # fmt: skip
    parser.set_defaults(model_path=BUNDLED_MODEL)
    helps = {
        "model_path": "a model or EMA file; its run's config.json gives the model and "
        "the input scaling (default: the bundled demo model, "
        "assets/scene_model/model.pt)",
        "samples_per_input": "translate the scene K times: OUTPUT is sample 0 (the "
        "translation of K = 1), OUTPUT_sample1.tif ... the others (seeds from --seed "
        "and k), then OUTPUT_mean.tif, OUTPUT_spread.tif (per-pixel standard "
        "deviation, divisor K - 1) and OUTPUT_spread.png; K times the time",
    }  # fmt: skip
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    return parser


def parse_args(argv=None):
    """The checked job of the command line (a jobs.SceneJob, its output and work
    folder absolute, the output's folder made), for one scene."""
    job, scenes = parse_run(argv)
    if scenes is not None:
        raise ValueError(f"--input {job.input}: several scenes; use parse_run")
    return job


def parse_run(argv=None):
    """
    The command line's job and, for an archive (--input a folder, a glob or a list
    file: archive.is_archive), its scenes.

    :return: (job, None) for one scene: the checked jobs.SceneJob (output and work
        folder absolute, the output's folder made); (job, pairs) for an archive:
        the job with --output the folder (made) and --work_dir as given, checked on
        its first scene that exists, and the (scene, output) pairs
        (archive.archive_outputs).
    :raises ValueError: a flag that cannot run, or no scenes, or two scenes of the
        same name (one line).
    """
    args = create_argparser().parse_args(argv)
    if os.path.abspath(args.model_path) == BUNDLED_MODEL:
        print(
            f"--model_path: the bundled demo model {os.path.relpath(BUNDLED_MODEL)}, "
            "trained on generated scenes only: give your own for real data",
            file=sys.stderr,
        )
    values = vars(args)
    if not is_archive(args.input):
        return SceneJob.from_flags(values).placed(), None
    folder = os.path.abspath(args.output)
    if os.path.isfile(folder):
        raise ValueError(
            f"--output {args.output}: --input {args.input} names several scenes, so "
            "--output names the folder of their outputs, not a file"
        )
    scenes = archive_outputs(archive_scenes(args.input), folder)
    # the flags are checked once, with a scene that exists (a missing one fails alone)
    err = None
    for scene, output in scenes:
        try:
            job = SceneJob.from_flags({**values, "input": scene, "output": output})
            break
        except ValueError as error:
            if not str(error).startswith("--input"):
                raise
            err = error
    else:
        raise err
    os.makedirs(folder, exist_ok=True)
    work_dir = os.path.abspath(args.work_dir) if args.work_dir else folder + ".work"
    return replace(job, input=args.input, output=folder, work_dir=work_dir), scenes


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError, JobMismatch, SceneError,
            dist_util.FailedElsewhere) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
