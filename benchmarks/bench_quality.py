"""
Quality against cost of the samplers: SSIM, PSNR, sharpness and wall time per image on the
demo's test scenes with the demo's trained model, for DDPM with 250 / 100 / 50
steps, DDIM with 50 / 25 / 10 and DPM-Solver++(2M) with 25 / 20 / 10 / 5 (one
model evaluation per step for all three).

    bash demo.sh                                    # trains the model first
    python benchmarks/bench_quality.py              # the newest EMA of logs/demo, data/synthetic32/test
    python benchmarks/bench_quality.py --model_path RUN/ema_0.9999_100000.pt --data_dir DATA/test

The model and diffusion flags (diffusion_steps included) come from config.json
beside the checkpoint. Every image's noise depends on --seed and its name only,
so all samplers start from the same noise.
"""

import argparse
import glob
import os
import re
import sys
import time

import common
import numpy as np
import seams
import torch as th

from guided_diffusion import dist_util
from guided_diffusion.base.samplers import SAMPLERS
from guided_diffusion.evaluation import metrics
from guided_diffusion.image_datasets import (
    DataError,
    find_test_pairs,
    load_opt,
    load_sar,
)
from guided_diffusion.io.checkpoints import read_run_config
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    diffusion_defaults,
    prediction_target,
    str2bool,
)
from guided_diffusion.translation.sampling import (
    input_scaling,
    load_model,
    make_generators,
    resolve_model_flags,
    to_uint8,
    translate,
)

REPO = os.path.dirname(common.BENCH_DIR)
DEMO_RUN = os.path.join(REPO, "logs", "demo")
DEMO_TEST = os.path.join(REPO, "data", "synthetic32", "test")
ROWS = "ddpm:250,ddpm:100,ddpm:50,ddim:50,ddim:25,ddim:10,dpm++2m:25,dpm++2m:20,dpm++2m:10,dpm++2m:5"
QUICK_ROWS = "ddpm:10,ddim:5,dpm++2m:5"


def shown(path):
    """A path as the table shows it: relative inside the repository, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def newest_ema(folder):
    """The EMA file of the highest step in ``folder``, or None."""
    steps = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "ema_*_*.pt")):
        match = re.search(r"_(\d{6,})\.pt$", path)
        if match:
            steps[path] = int(match.group(1))
    return max(steps, key=steps.get) if steps else None


def respaced_diffusion(flags, sampler, steps):
    """The model's diffusion with ``steps`` timesteps, strided as DDIM wants for ddim."""
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{
            k: flags[k]
            for k in diffusion_defaults()
            if k not in ("diffusion_steps", "timestep_respacing")
        },
        timestep_respacing=respacing,
    )


def score_sampler(model, flags, sampler, steps, sar, gt, names, args):
    """
    Translate every image with one sampler; returns (SSIMs, PSNRs, sharpness, seconds
    per image), sharpness the mean gradient of all images over the truth's.
    """
    diffusion = respaced_diffusion(flags, sampler, steps)
    device = sar.device
    generated, elapsed = [], 0.0
    for start in range(0, len(names), args.batch_size):
        piece = slice(start, start + args.batch_size)
        gens = make_generators(args.seed, names[piece])
        common.synchronize(device)
        begin = time.perf_counter()
        out = translate(
            model,
            diffusion,
            sar[piece],
            sampler=sampler,
            generators=gens,
            use_bf16=args.use_bf16,
        )
        common.synchronize(device)
        elapsed += time.perf_counter() - begin
        generated.append(to_uint8(out))
    generated = np.concatenate(generated)
    ssim = [metrics.ssim_rgb(g, t) for g, t in zip(generated, gt)]
    psnr = [metrics.psnr(g, t) for g, t in zip(generated, gt)]
    sharpness = sum(seams.mean_gradient(g) for g in generated) / sum(
        seams.mean_gradient(t) for t in gt
    )
    return ssim, psnr, sharpness, elapsed / len(names)


def main():
    args = parse_args()
    run_config = read_run_config(args.model_path)
    if run_config is None:
        raise ValueError(
            f"no config.json beside {args.model_path}: this benchmark takes the model and "
            "diffusion flags (diffusion_steps included) from the training run's config.json"
        )
    flags, _ = resolve_model_flags({}, run_config)
    device = dist_util.dev()
    model = load_model(args.model_path, flags, device)

    pairs = find_test_pairs(args.data_dir)
    pairs = pairs if args.num < 0 else pairs[: args.num]
    if any(opt is None for _, opt, _ in pairs):
        raise DataError(
            f"--data_dir {args.data_dir}: the scores need the ground truth in {args.data_dir}/opt"
        )
    size = flags["image_size"]
    names = [name for _, _, name in pairs]
    scaling, _ = input_scaling(run_config, {}, flags["sar_channels"])
    sar = th.from_numpy(
        np.stack([load_sar(s, size, scaling=scaling) for s, _, _ in pairs])
    ).to(device)
    gt = to_uint8(
        th.from_numpy(
            np.stack([load_opt(o, size, scaling=scaling) for _, o, _ in pairs])
        )
    )

    # Warm-up: the first calls of a process set up kernels and would count against
    # whichever sampler ran first.
    translate(
        model,
        respaced_diffusion(flags, "dpm++2m", 2),
        sar[: args.batch_size],
        sampler="dpm++2m",
        use_bf16=args.use_bf16,
    )

    rows = []
    for sampler, steps in args.rows:
        print(f"{sampler} {steps} steps ...", flush=True)
        ssim, psnr, sharpness, seconds = score_sampler(
            model, flags, sampler, steps, sar, gt, names, args
        )
        finite = [p for p in psnr if np.isfinite(p)]
        infinite = len(psnr) - len(finite)
        rows.append(
            [
                sampler,
                steps,
                f"{np.mean(ssim):.4f}",
                f"{np.mean(finite):.2f}" if finite else "inf",
                f"{sharpness:.2f}",
                f"{seconds:.4f}",
                f"{infinite} identical image(s) (PSNR inf) left out of the mean"
                if infinite
                else "",
            ]
        )
    header = [
        "sampler",
        "steps (= model evaluations)",
        "SSIM",
        "PSNR dB",
        "sharpness",
        "s per image",
        "notes",
    ]
    common.report(
        "Quality against cost of the samplers",
        common.markdown_table(header, rows),
        [
            f"model: {shown(args.model_path)} (diffusion_steps {flags['diffusion_steps']}, "
            f"{prediction_target(flags.get('predict'), flags['predict_xstart'])} "
            f"prediction, {size} px)",
            f"data: {len(names)} test pairs of {shown(args.data_dir)}, batch {args.batch_size}, seed {args.seed}"
            + (", bfloat16 autocast" if args.use_bf16 else ", float32"),
            "SSIM (RGB, scikit-image defaults) and PSNR on uint8 images, means over the images; "
            "sharpness: the mean gradient magnitude of the images over the truth's (1: as "
            "much detail as the truth; seams.py); time: translate() per image, after a warm-up",
        ],
        args.results,
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_path",
        default="",
        help=f"default: the newest EMA file in {shown(DEMO_RUN)}",
    )
    parser.add_argument(
        "--data_dir", default=DEMO_TEST, help="a folder with sar/ and opt/"
    )
    parser.add_argument("--rows", default=ROWS, help="comma-separated sampler:steps")
    parser.add_argument(
        "--num", type=int, default=-1, help="the first N test pairs (-1: all)"
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_bf16", type=str2bool, default=False)
    parser.add_argument(
        "--results",
        default=common.DEFAULT_RESULTS,
        help="append the table here ('' for nowhere)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"rows {QUICK_ROWS} on 2 images: seconds"
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.num = QUICK_ROWS, 2
    if not args.model_path:
        args.model_path = newest_ema(DEMO_RUN)
        if args.model_path is None:
            parser.error(
                f"no EMA checkpoint in {DEMO_RUN}: run `bash demo.sh` first, or pass --model_path"
            )
    if not os.path.isfile(args.model_path):
        parser.error(f"--model_path {args.model_path}: no such file")
    if not os.path.isdir(args.data_dir):
        parser.error(
            f"--data_dir {args.data_dir}: no such folder; run `bash demo.sh` first, or pass a folder with sar/ and opt/"
        )
    if args.batch_size < 1 or args.num == 0:
        parser.error("--batch_size must be positive and --num -1 or positive")
    try:
        args.rows = [
            (s, int(n)) for s, n in (row.rsplit(":", 1) for row in args.rows.split(","))
        ]
    except ValueError:
        parser.error(
            f"--rows {args.rows!r}: expected sampler:steps pairs like ddim:50,dpm++2m:20"
        )
    for sampler, steps in args.rows:
        if sampler not in SAMPLERS or steps < 2:
            parser.error(
                f"--rows: {sampler}:{steps}; samplers are {', '.join(SAMPLERS)}, with 2 or more steps"
            )
    return args


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
