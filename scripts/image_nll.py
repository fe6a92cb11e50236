"""
Bits per dimension of a trained model on a paired test folder: the variational
bound on -log p(optical | SAR), computed over every timestep (as guided-diffusion's
image_nll.py, with the SAR condition).

    python scripts/image_nll.py --data_dir DATA --model_path RUN/ema_0.9999_200000.pt --num_samples 64
    mpiexec -n 4 python scripts/image_nll.py ...   (each rank scores its own share)

DATA holds sar/ and opt/ paired by name. Model flags not given come from the
training run's config.json beside the checkpoint; without one, the architecture is
read off the weights and the other flags (image size, heads, attention order,
diffusion flags) must be given. Writes nll.json (the mean, every image's bits/dim,
and whether TF32 was in effect: --use_tf32 on a CUDA GPU) to $OPENAI_LOGDIR, else a new ./logs/<date>_<time> folder.
"""

import argparse
import os
import sys

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.base import settings  # noqa: E402
from guided_diffusion.base.atomic import DiskFull, write_json  # noqa: E402
from guided_diffusion.image_datasets import (  # noqa: E402
    DataError,
    find_test_pairs,
    load_opt,
    load_sar,
)
from guided_diffusion.translation.sampling import (  # noqa: E402
    add_model_flags,
    checkpoint_is_student,
    checkpoint_settings,
    explicit_model_flags,
    load_model,
    tf32_in_effect,
    write_log,
)


def main():
    args = create_argparser().parse_args()
    if not os.path.isfile(args.model_path):
        raise FileNotFoundError(
            f"--model_path {args.model_path!r}: no such file (a model or EMA checkpoint)"
        )
    if checkpoint_is_student(args.model_path):
        raise ValueError(
            f"--model_path {args.model_path}: a distilled student (its config.json has a "
            "distillation record) is not a diffusion model and has no likelihood; give "
            "its teacher (the record's 'teacher')"
        )
    flags, scaling, diffusion, notes = checkpoint_settings(
        args.model_path,
        explicit_model_flags(args),
        {k: getattr(args, k) for k in settings.names("inputs")},
    )

    dist_util.setup_dist()
    # images of one size at a fixed batch (but the last)
    dist_util.configure_numerics(use_tf32=args.use_tf32, cudnn_benchmark=True)
    logger.configure()
    write_log(notes)
    for note in dist_util.setup_notes():  # the CPU threads of each rank under MPI
        logger.log(note)
    pairs = [p for p in find_test_pairs(args.data_dir) if p[1] is not None]
    if not pairs:
        raise DataError(
            f"--data_dir {args.data_dir}: the likelihood needs ground truth in its opt/ folder"
        )
    if args.num_samples > 0:
        pairs = pairs[: args.num_samples]
    mine = pairs[dist_util.get_rank() :: dist_util.get_world_size()]

    model = load_model(args.model_path, flags, dist_util.dev())
    th.manual_seed(args.seed + dist_util.get_rank())  # the noise of the bound's terms

    results = {}
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start : start + args.batch_size]
        sar = th.from_numpy(
            np.stack(
                [load_sar(s, flags["image_size"], scaling=scaling) for s, _, _ in chunk]
            )
        )
        opt = th.from_numpy(
            np.stack(
                [load_opt(o, flags["image_size"], scaling=scaling) for _, o, _ in chunk]
            )
        )
        out = diffusion.calc_bpd_loop(
            model, opt.to(dist_util.dev()), clip_denoised=args.clip_denoised,
            condition=sar.to(dist_util.dev()), progress=dist_util.is_main_process(),
        )  # fmt: skip
        for (_, _, name), bpd, prior in zip(
            chunk, out["total_bpd"].tolist(), out["prior_bpd"].tolist()
        ):
            results[name] = {"bpd": bpd, "prior_bpd": prior}
        logger.log(
            f"rank {dist_util.get_rank()}: {start + len(chunk)}/{len(mine)} images, bpd {out['total_bpd'].mean():.4f}"
        )

    gathered = {
        k: v for part in dist_util.all_gather_object(results) for k, v in part.items()
    }
    if dist_util.is_main_process():
        mean = float(np.mean([r["bpd"] for r in gathered.values()]))
        path = os.path.join(logger.get_dir(), "nll.json")
        report = {
            "model_path": args.model_path,
            "use_tf32": tf32_in_effect(args.use_tf32, dist_util.dev()),
            "num_images": len(gathered),
            "bpd": mean,
            "per_image": gathered,
        }
        write_json(path, report, indent=2)
        logger.log(f"{len(gathered)} images: {mean:.4f} bits/dim; written to {path}")
    dist_util.barrier()
    dist_util.cleanup()


def create_argparser():
    """The script's flags: the run's, the speed and inputs groups, the model's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings.add_to_parser(
        parser,
        "sampling",
        "run",
        only=(
            "data_dir",
            "model_path",
            "batch_size",
            "num_samples",
            "clip_denoised",
            "seed",
        ),
        overrides={"batch_size": 8},
    )
    settings.add_to_parser(parser, "speed", only=("use_tf32",))
    settings.add_to_parser(parser, "inputs", unset=True)
    add_model_flags(parser)
    return parser


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError, DiskFull) as err:
        sys.exit(f"error: {err}")
