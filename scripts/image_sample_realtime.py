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

import numpy as np
import torch as th
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.atomic import DiskFull  # noqa: E402
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
    write_spread_result,
)
from guided_diffusion.sampling import (  # noqa: E402
    BatchedModel,
    add_sampling_flags,
    checkpoint_settings,
    load_model,
    prepare_model,
    read_sampling_args,
    sar_for_display,
    tf32_in_effect,
    to_uint8,
    write_log,
)
from guided_diffusion.uncertainty import (  # noqa: E402
    SpreadAccumulator,
    check_samples_per_input,
    grey_levels,
    translate_samples,
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
    # images of one size at a fixed batch (a shorter last one, padded under --compile)
    dist_util.configure_numerics(use_tf32=args.use_tf32, cudnn_benchmark=True)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    logger.configure(append=True)  # a rerun must not wipe the first run's log
    write_log(notes)
    for note in dist_util.setup_notes():  # the CPU threads of each rank under MPI
        logger.log(note)
    pairs = find_test_pairs(args.data_dir)
    pairs = pairs if args.num_samples < 0 else pairs[: args.num_samples]
    outputs = output_names([name for _, _, name in pairs], args.data_dir)
    model = load_model(args.model_path, flags, dist_util.dev(), use_bf16=args.use_bf16)
    # The folder records the precisions the model runs in: a CPU runs fp16 in float32
    # and has no TF32.
    flags["use_fp16"] = model.dtype == th.float16
    use_tf32 = tf32_in_effect(args.use_tf32, dist_util.dev())
    model = prepare_model(model, channels_last=args.channels_last, compile=args.compile)
    # under --compile the last batch is padded: one input shape, compiled once
    model = BatchedModel(model, args.batch_size, pad=args.compile)

    # -- claim the results folder (rank 0), share the work ------------------------
    out_dir = os.path.join(
        logger.get_dir(), "sample_results", f"{args.sampler}{diffusion.num_timesteps}"
    )
    run = {
        "model_path": os.path.abspath(args.model_path),
        "data_dir": os.path.abspath(args.data_dir),
        **{k: getattr(args, k) for k in ("seed", "sampler", "clip_denoised")},
        "samples_per_input": args.samples_per_input,
        **args.options,
        **{k: getattr(args, k) for k in ("use_bf16", "channels_last", "compile")},
        "use_tf32": use_tf32,
        **flags,
        "inputs": scaling.record(),
    }
    claim = claim_folder(out_dir, run, pairs, outputs) if rank == 0 else None
    problem, todo = dist_util.broadcast_object(claim)
    if problem:
        raise UsageError(problem)
    count = args.samples_per_input
    each = f"{count} samples each, " if count > 1 else ""
    logger.log(
        f"{len(pairs) - len(todo)} of {len(pairs)} images already in {out_dir}; "
        f"translating {len(todo)} with {args.sampler}, {diffusion.num_timesteps} steps, "
        f"{each}on {world} process(es)"
    )

    # -- translate this rank's share ----------------------------------------------
    size = flags["image_size"]
    mine = [pairs[i] for i in todo[rank::world]]
    bar = tqdm(total=len(mine), unit="image", desc="images", disable=rank != 0)
    warned, nodata_images = False, 0
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start : start + args.batch_size]
        names = [name for _, _, name in batch]
        loaded = [load_sar_patch(p, size, scaling) for p, _, _ in batch]
        valid = np.stack([mask for _, mask, _ in loaded])[..., None]  # (N, H, W, 1)
        sar = th.from_numpy(np.stack([arr for arr, _, _ in loaded]))
        sar = sar.to(dist_util.dev())
        # samples[k][i]: sample k of input i, uint8, nodata (no SAR, so no
        # translation) black; sample 0 is the run's single sample when K = 1
        samples, spread = [], [SpreadAccumulator() for _ in batch]
        for _, generated in translate_samples(
            model, diffusion, sar, names, seed=args.seed, samples_per_input=count,
            sampler=args.sampler, clip_denoised=args.clip_denoised,
            progress=rank == 0, use_bf16=args.use_bf16, **args.options,
        ):  # fmt: skip
            samples.append(np.where(valid, to_uint8(generated), 0).astype(np.uint8))
            if count > 1:
                for acc, image in zip(
                    spread, np.where(valid, grey_levels(generated), 0)
                ):
                    acc.add(image)
        for i, ((_, opt_path, name), (_, mask, stats), sar_img) in enumerate(
            zip(batch, loaded, sar_for_display(to_uint8(sar)))
        ):
            warning = None if warned else stats.clipping_warning()
            if warning:
                warned = True
                logger.warn(warning)
            if not mask.all():
                nodata_images += 1
                if stats.all_nodata:
                    logger.log(f"{name}: every SAR pixel is nodata; its output is too")
            truth = None
            if opt_path is not None:
                truth = to_uint8(load_opt(opt_path, size, scaling=scaling)[None])[0]
            if count > 1:
                write_spread_result(
                    out_dir, outputs[name], [s[i] for s in samples],
                    *spread[i].result(), valid=mask,
                )  # fmt: skip
            write_result(out_dir, outputs[name], sar_img, samples[0][i], truth)
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
            f"results in {out_dir}; arrays in "
            f"{write_npz(out_dir, pairs, outputs, count)}"
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
    check_samples_per_input(args.samples_per_input)
    return args


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
