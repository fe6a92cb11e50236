"""
Translate a whole georeferenced SAR scene of any size into an optical GeoTIFF.

    python scripts/translate_scene.py --input SCENE.tif --output OUT.tif \\
        --model_path RUN/ema_0.9999_200000.pt --sampler dpm++2m --timestep_respacing 20

The sampler runs on one scene-sized state; the network sees overlapping tiles of
the model's training size (--overlap pixels shared, half a tile by default), and
their predictions are fused at every step with a smooth window
(guided_diffusion/scene.py), so there are no seams and no tile draws colours of
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

Without --model_path, the small model bundled in assets/scene_model/ (trained on
generated scenes) is used. image_sample_realtime.py, by contrast, translates a
folder of patches at the model's size, resizing larger inputs as training did.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger, scene_translation  # noqa: E402
from guided_diffusion.rasters import DataError  # noqa: E402
from guided_diffusion.sampling import write_log  # noqa: E402
from guided_diffusion.scene import JobMismatch  # noqa: E402
from guided_diffusion.scene_translation import (  # noqa: E402
    STOP,
    SceneError,
    scene_settings,
    translate_scene_file,
)


def main():
    args = parse_args()
    flags, scaling, diffusion, notes = scene_settings(args)
    dist_util.setup_dist()
    # tiles of one size: cuDNN's search runs once per batch size (under --compile
    # once; otherwise also for each rank's last, shorter batch of a step)
    dist_util.configure_numerics(use_tf32=args.use_tf32, cudnn_benchmark=True)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    logger.configure(dir=os.path.dirname(args.output), format_strs=["stdout"])
    write_log(notes)
    for note in dist_util.setup_notes():  # the CPU threads of each rank under MPI
        logger.log(note)
    finished = translate_scene_file(
        args, flags, scaling, diffusion, rank=rank, world=world, catch_signals=True
    )
    dist_util.cleanup()
    if not finished:
        sys.exit(128 + STOP["signal"])


def parse_args():
    """The checked flags (guided_diffusion/scene_translation.py holds the parser)."""
    return scene_translation.parse_args(description=__doc__)


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError, JobMismatch, SceneError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
