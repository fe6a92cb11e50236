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
clipping, bf16, model and diffusion flags, input scaling) is refused; speed levers
may differ.

The files are read the way the training run read its own (config.json: SAR kind,
bands and dB ranges, optical bands and range); --sar_input, --sar_nodata and
--sar_bands describe this folder's files when they come in another form. Nodata
SAR pixels are black (0) in gen_opt/.
"""

import argparse
import os
import sys

import numpy as np
import torch as th
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.image_datasets import (  # noqa: E402
    DataError,
    find_test_pairs,
    load_opt,
)
from guided_diffusion.rasters import load_sar_patch  # noqa: E402
from guided_diffusion.results import (  # noqa: E402
    claim_folder,
    output_names,
    write_npz,
    write_result,
)
from guided_diffusion.sampling import (  # noqa: E402
    add_sampling_flags,
    checkpoint_settings,
    load_model,
    make_generators,
    prepare_model,
    read_sampling_args,
    sar_for_display,
    to_uint8,
    translate,
    write_log,
)

DEFAULT_DATA_DIR = "/path/to/test"  # edit me, or pass --data_dir


class UsageError(ValueError):
    """A flag or file the user has to fix; its message is one line."""


def main():
    args = parse_args()
    flags, scaling, diffusion, notes = checkpoint_settings(
        args.model_path, args.explicit, args.inputs
    )

    # -- processes, log folder, inputs, model ---------------------------------------
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    logger.configure(append=True)  # a rerun must not wipe the first run's log
    write_log(notes)
    pairs = find_test_pairs(args.data_dir)
    pairs = pairs if args.num_samples < 0 else pairs[: args.num_samples]
    outputs = output_names([name for _, _, name in pairs], args.data_dir)
    model = load_model(args.model_path, flags, dist_util.dev(), use_bf16=args.use_bf16)
    # The folder records the precision the model runs in: a CPU runs fp16 in float32.
    flags["use_fp16"] = model.dtype == th.float16
    model = prepare_model(model, channels_last=args.channels_last, compile=args.compile)

    # -- claim the results folder (rank 0), share the work ------------------------
    out_dir = os.path.join(
        logger.get_dir(), "sample_results", f"{args.sampler}{diffusion.num_timesteps}"
    )
    run = {
        "model_path": os.path.abspath(args.model_path),
        "data_dir": os.path.abspath(args.data_dir),
        **{k: getattr(args, k) for k in ("seed", "sampler", "clip_denoised")},
        **args.options,
        **{k: getattr(args, k) for k in ("use_bf16", "channels_last", "compile")},
        **flags,
        "inputs": scaling.record(),
    }
    claim = claim_folder(out_dir, run, pairs, outputs) if rank == 0 else None
    problem, todo = dist_util.broadcast_object(claim)
    if problem:
        raise UsageError(problem)
    logger.log(
        f"{len(pairs) - len(todo)} of {len(pairs)} images already in {out_dir}; "
        f"translating {len(todo)} with {args.sampler}, {diffusion.num_timesteps} steps, "
        f"on {world} process(es)"
    )

    # -- translate this rank's share ----------------------------------------------
    size = flags["image_size"]
    mine = [pairs[i] for i in todo[rank::world]]
    bar = tqdm(total=len(mine), unit="image", desc="images", disable=rank != 0)
    warned, nodata_images = False, 0
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start : start + args.batch_size]
        loaded = [load_sar_patch(p, size, scaling) for p, _, _ in batch]
        sar = th.from_numpy(np.stack([arr for arr, _, _ in loaded]))
        sar = sar.to(dist_util.dev())
        generated = translate(
            model, diffusion, sar, sampler=args.sampler,
            generators=make_generators(args.seed, [name for _, _, name in batch]),
            clip_denoised=args.clip_denoised, progress=rank == 0, use_bf16=args.use_bf16,
            **args.options,
        )  # fmt: skip
        for (_, opt_path, name), (_, valid, stats), sar_img, gen_img in zip(
            batch, loaded, sar_for_display(to_uint8(sar)), to_uint8(generated)
        ):
            warning = None if warned else stats.clipping_warning()
            if warning:
                warned = True
                logger.warn(warning)
            if not valid.all():
                # no SAR there, so no translation: nodata (black) in the output
                nodata_images += 1
                gen_img = np.where(valid[..., None], gen_img, 0).astype(np.uint8)
                if stats.all_nodata:
                    logger.log(f"{name}: every SAR pixel is nodata; its output is too")
            truth = None
            if opt_path is not None:
                truth = to_uint8(load_opt(opt_path, size, scaling=scaling)[None])[0]
            write_result(out_dir, outputs[name], sar_img, gen_img, truth)
        bar.update(len(batch))
    bar.close()

    # -- all generated images in one file -----------------------------------------
    counts = dist_util.all_gather_object(len(mine))  # also waits for every rank
    nodata_counts = dist_util.all_gather_object(nodata_images)
    if rank == 0:
        logger.log(f"translated {' + '.join(map(str, counts))} images (per process)")
        if sum(nodata_counts):
            logger.log(
                f"{sum(nodata_counts)} image(s) had nodata SAR pixels, black (0) in "
                "gen_opt/"
            )
        logger.log(
            f"results in {out_dir}; arrays in {write_npz(out_dir, pairs, outputs)}"
        )
    dist_util.cleanup()


def parse_args():
    """The namespace (see sampling.read_sampling_args)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sampling_flags(parser, SAMPLING_GROUPS, SAMPLING_OVERRIDES)
    args = read_sampling_args(parser)
    if not os.path.isdir(args.data_dir):
        raise UsageError(
            f"--data_dir {args.data_dir}: no such folder; pass a folder with sar/ (and "
            "optional opt/) or edit DEFAULT_DATA_DIR at the top of this script"
        )
    if args.num_samples == 0 or args.num_samples < -1 or args.batch_size < 1:
        raise UsageError(
            "--num_samples must be -1 (all) or positive, --batch_size positive"
        )
    return args


# The settings of a sampling run (settings.py), and this script's own defaults.
SAMPLING_GROUPS = ("sampling", "run", "speed")
SAMPLING_OVERRIDES = {"data_dir": DEFAULT_DATA_DIR, "batch_size": 8}


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
