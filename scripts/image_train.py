"""
Train a conditional diffusion model that translates SAR images into optical images.

One process (CPU or one GPU), no launcher needed:
    python scripts/image_train.py --data_dir_sar DATA/sar --data_dir_opt DATA/opt $MODEL_FLAGS ...
Several GPUs on one machine (either launcher):
    mpiexec -n 4 python scripts/image_train.py ...
    torchrun --nproc_per_node 4 scripts/image_train.py ...

Faster, computing the same function: --use_sdpa True --channels_last True (and
--compile True for long runs); bfloat16 on CPUs with AVX512-BF16 and on GPUs:
--use_bf16 True. benchmarks/bench_train.py measures each of them.

Checkpoints and logs go to $OPENAI_LOGDIR, else to a new ./logs/<date>_<time> folder
(printed first). Ctrl-C (or SIGTERM) saves a checkpoint and exits;
--resume_checkpoint auto continues from the newest complete checkpoint.
"""

import argparse
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.base import settings  # noqa: E402
from guided_diffusion.base.atomic import DiskFull  # noqa: E402
from guided_diffusion.evaluation.validation import (  # noqa: E402
    Validator,
    built_on_main_process,
)
from guided_diffusion.image_datasets import DataError, find_pairs, load_data  # noqa: E402
from guided_diffusion.io.checkpoints import (  # noqa: E402
    latest_run_dir,
    remove_stale_temp_files,
    write_config,
)
from guided_diffusion.io.rasters import Scaling, resolve  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (  # noqa: E402
    TRAINING_GROUPS,
    TrainLoop,
    check_precision,
)


def main():
    args = create_argparser().parse_args()
    for flag in ("data_dir_sar", "data_dir_opt"):
        if not getattr(args, flag):
            sys.exit(
                f"--{flag} is required: the folder of the {flag[-3:].upper()} training images"
            )
    check_precision(args.use_fp16, args.use_bf16)

    dist_util.setup_dist()

    # -- model, diffusion, data ---------------------------------------------------
    th.manual_seed(args.seed)  # the same initial weights on every rank
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys())
    )

    # pair the folders and read the first pair now: a bad path or file fails
    # before a run folder is made, and the first pair fixes the band names and
    # dB ranges every later file, validation and sampling use
    notes = []  # logged once the run folder's log exists
    pairs = find_pairs(args.data_dir_sar, args.data_dir_opt, notes)
    scaling, facts = resolve(Scaling.from_settings(args), pairs[0][0], pairs[0][1])

    def data(start_batch):
        return load_data(
            data_dir_sar=args.data_dir_sar,
            data_dir_opt=args.data_dir_opt,
            batch_size=args.batch_size,
            image_size=args.image_size,
            random_crop=args.random_crop,
            random_flip=args.random_flip,
            scaling=scaling,
            seed=args.seed,
            start_batch=start_batch,
            num_workers=None if args.num_workers < 0 else args.num_workers,
            pairs=pairs,
        )

    # None on ranks > 0
    validator = None
    if args.val_data_dir:
        validator = built_on_main_process(lambda: build_validator(args, scaling))

    # -- the run folder, once the inputs are known to be usable --------------------
    run_dir = None
    if args.resume_checkpoint == "auto" and not os.environ.get("OPENAI_LOGDIR"):
        run_dir = latest_run_dir("logs") if dist_util.is_main_process() else None
    logger.configure(dir=run_dir, append=bool(args.resume_checkpoint))
    if dist_util.is_main_process():
        remove_stale_temp_files(logger.get_dir())
        config = {
            **vars(args),
            "inputs": {**scaling.record(), **facts},
            "world_size": dist_util.get_world_size(),
            "torch": th.__version__,
        }
        logger.log(f"configuration written to {write_config(config, logger.get_dir())}")
        logger.log(f"inputs: {scaling.describe()}")
        for note in dist_util.setup_notes() + notes:
            logger.log(note)

    # -- train --------------------------------------------------------------------
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        validator=validator,
        **vars(args),  # the settings (schedule_sampler by name, batch_size, lr, ...)
    )
    n_params = sum(p.numel() for p in model.parameters())
    stop = (
        f"stops at step {args.max_steps}"
        if args.max_steps
        else "runs until stopped (Ctrl-C saves and exits)"
    )
    logger.log(
        f"training {n_params / 1e6:.1f}M parameters on {dist_util.get_world_size()} process(es), "
        f"global batch {loop.global_batch}, from step {loop.step}; {stop}; checkpoints every "
        f"{args.save_interval} steps in {logger.get_dir()}"
    )
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints are in {logger.get_dir()}")
    dist_util.cleanup()


def build_validator(args, scaling):
    """A float32 copy of the model and a respaced diffusion for the fast sampler."""
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    flags.update(use_fp16=False, timestep_respacing=args.val_timestep_respacing)
    model, diffusion = create_model_and_diffusion(**flags)
    return Validator(
        model=model.to(dist_util.dev()),
        diffusion=diffusion,
        data_dir=args.val_data_dir,
        image_size=args.image_size,
        scaling=scaling,
        num=args.val_num,
        sampler=args.val_sampler,
        seed=args.seed,
    )


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings.add_to_parser(parser, *TRAINING_GROUPS, "inputs", "model", "diffusion")
    return parser


if __name__ == "__main__":
    try:
        main()
    except (
        DataError,
        ValueError,
        FileNotFoundError,
        FloatingPointError,
        DiskFull,
    ) as err:
        sys.exit(f"error: {err}")
