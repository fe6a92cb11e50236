"""
Translate a folder of SAR images into optical images with a trained model.

The folder holds sar/ and, optionally, opt/ (ground truth, paired by name). Model
flags not given on the command line come from config.json of the checkpoint's
training run (beside the checkpoint). Without one (a checkpoint of the original
code) the architecture is read off the weights, and the flags the weights do not
tell (image size, heads, attention order, diffusion flags) must be given.

One process (CPU or one GPU):
    python scripts/image_sample_realtime.py --data_dir DATA --model_path RUN/ema_0.9999_200000.pt \\
        --batch_size 8 --num_samples 100 --timestep_respacing 250
Several GPUs, each translating its own share:
    mpiexec -n 4 python scripts/image_sample_realtime.py ...
DDIM with 50 steps: --sampler ddim --timestep_respacing ddim50 (or --use_ddim True).
Faster: --sampler dpm++2m --timestep_respacing 20; --use_sdpa True --channels_last True
compute the same function faster, --use_bf16 True nearly the same (GPUs, recent CPUs).

Results go to $OPENAI_LOGDIR/sample_results/<sampler><steps>/ (else to a new
./logs/<date>_<time> folder): gen_opt/, cond_sar/, gt_opt/ with one PNG per input,
run.json and samples_NxHxWx3.npz. Running the same command again continues where
it stopped; each image's noise depends only on --seed and its name. A folder made
with other settings that decide the images (checkpoint, sampler, steps, eta, seed,
clipping, bf16, samples per input, model and diffusion flags, input scaling, and
the precisions the model ran in: fp16, TF32) is refused; speed levers may differ.

Several samples per input, and how sure the model is: --samples_per_input 8 draws
8 samples of every input (sample 0, in gen_opt/, is the one sample of a run without
the flag) and adds gen_samples/<k>/ (samples 1..7), gen_mean/ (their mean),
gen_spread/ (their per-pixel standard deviation as a colour scale with its legend)
and spread_arrays/ (both as float arrays), and mean and spread to the npz. It takes
8 times as long; --batch_size stays the images per network call.

The files are read the way the training run read its own (config.json: SAR kind,
bands and dB ranges, optical bands and range); --sar_input, --sar_nodata and
--sar_bands describe this folder's files when they come in another form. Nodata
SAR pixels are black (0) in gen_opt/.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.base.atomic import DiskFull  # noqa: E402
from guided_diffusion.image_datasets import DataError  # noqa: E402
from guided_diffusion.translation.folder import translate_folder  # noqa: E402
from guided_diffusion.translation.jobs import FolderJob, resolve  # noqa: E402
from guided_diffusion.translation.sampling import add_sampling_flags  # noqa: E402

DEFAULT_DATA_DIR = "/path/to/test"  # edit me, or pass --data_dir


def main():
    job = parse_args()
    checkpoint = resolve(job)
    dist_util.setup_dist()
    # images of one size at a fixed batch (a shorter last one, padded under --compile)
    dist_util.configure_numerics(use_tf32=job.use_tf32, cudnn_benchmark=True)
    logger.configure(append=True)  # a rerun must not wipe the first run's log
    for note in dist_util.setup_notes():  # the CPU threads of each rank under MPI
        logger.log(note)
    translate_folder(job, checkpoint)
    dist_util.cleanup()


def create_argparser():
    """This script's flags: the settings of SAMPLING_GROUPS (settings.py), the
    "inputs" settings and the model and diffusion flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sampling_flags(parser, SAMPLING_GROUPS, SAMPLING_OVERRIDES)
    return parser


def parse_args(argv=None):
    """The checked job of the command line (a jobs.FolderJob)."""
    args = create_argparser().parse_args(argv)
    if args.data_dir == DEFAULT_DATA_DIR and not os.path.isdir(args.data_dir):
        raise ValueError(
            f"--data_dir {args.data_dir}: no such folder; pass a folder with sar/ (and "
            "optional opt/) or edit DEFAULT_DATA_DIR at the top of this script"
        )
    return FolderJob.from_flags(vars(args))


# The settings of a sampling run (settings.py), and this script's own defaults.
SAMPLING_GROUPS = ("sampling", "samples", "run", "speed")
SAMPLING_OVERRIDES = {"data_dir": DEFAULT_DATA_DIR, "batch_size": 8}


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DiskFull as err:
        print(
            f"error: {err}; the images written before it are kept: free space and "
            "rerun the same command to continue",
            file=sys.stderr,
        )
        sys.exit(2)
