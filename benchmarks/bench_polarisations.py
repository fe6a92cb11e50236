"""
Does the second polarisation reach the model? The same training budget on the
generated SEN12MS-like GeoTIFFs with VV alone (--sar_bands VV --sar_channels 1) and
with VV and VH (--sar_channels 2), for two seeds each; SSIM, PSNR and class
accuracy of the translated test scenes.

    python benchmarks/bench_polarisations.py                  # ~30 min on 2 CPU cores
    python benchmarks/bench_polarisations.py --steps 50 --num_train 64 --num_test 8 --results ''   # a smoke run

The generator gives the four field classes one VV level and different VH levels
(guided_diffusion/demo/scenes.py cites the figures), so VH tells fields apart
that VV cannot: class accuracy is where a model that uses VH should gain.
Runs go to --run_root/<variant>_seed<seed>/; a rerun reuses finished training and
translations, so an interrupted benchmark continues.
"""

import argparse
import json
import os
import subprocess
import sys

import common
import numpy as np

from guided_diffusion.demo import report
from guided_diffusion.evaluation import metrics

REPO = os.path.dirname(common.BENCH_DIR)
VARIANTS = {
    "VV": ["--sar_bands", "VV", "--sar_channels", "1"],
    "VV+VH": ["--sar_channels", "2"],
}
# The demo's model and training (demo.sh): x_start prediction learns on a CPU budget;
# attention at 8 x 8 only, which halves a step's time on a CPU.
MODEL_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 "
               "--attention_resolutions 8 --learn_sigma False --diffusion_steps 1000 "
               "--noise_schedule linear --predict_xstart True").split()  # fmt: skip
TRAIN_FLAGS = ("--lr 1e-3 --batch_size 32 --ema_rate 0.995 --log_interval 100 "
               "--keep_checkpoints 1 --sar_input db --opt_bands 4,3,2 "
               "--opt_range 0,3000").split()  # fmt: skip
SAMPLE_FLAGS = (
    "--sampler ddim --timestep_respacing ddim50 --batch_size 64 --seed 0".split()
)


def shown(path):
    """A path as the table shows it: relative inside the repository, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def run(command, env=None):
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=REPO, env=env)
    if proc.returncode:
        sys.exit(f"bench_polarisations: {command[1]} failed (status {proc.returncode})")


def make_data(args):
    if os.path.isfile(os.path.join(args.data_dir, "dataset.json")):
        print(f"{args.data_dir}/dataset.json exists: using that dataset", flush=True)
        return
    run([sys.executable, "scripts/make_synthetic_dataset.py", "--format", "sen12ms",
         "--out", args.data_dir, "--overwrite", "--image_size", "32",
         "--num_train", str(args.num_train), "--num_test", str(args.num_test)])  # fmt: skip


def train_and_sample(args, variant, seed):
    """:return: the folder of the translated test scenes."""
    run_dir = os.path.join(args.run_root, f"{variant.replace('+', '_')}_seed{seed}")
    env = {**os.environ, "OPENAI_LOGDIR": run_dir}
    checkpoint = os.path.join(run_dir, f"ema_0.995_{args.steps:06d}.pt")
    if not os.path.isfile(checkpoint):
        train = os.path.join(args.data_dir, "train")
        run([sys.executable, "scripts/image_train.py", "--data_dir_sar", train,
             "--data_dir_opt", train, *MODEL_FLAGS, *TRAIN_FLAGS, *VARIANTS[variant],
             "--seed", str(seed), "--max_steps", str(args.steps),
             "--save_interval", str(args.steps), "--resume_checkpoint", "auto"],
            env)  # fmt: skip
    # no scaling flag: the run's config.json says how to read the test GeoTIFFs
    run([sys.executable, "scripts/image_sample_realtime.py", "--data_dir",
         os.path.join(args.data_dir, "test"), "--model_path", checkpoint,
         *SAMPLE_FLAGS], env)  # fmt: skip
    return os.path.join(run_dir, "sample_results", "ddim50")


def score(out_dir, data_dir):
    """SSIM, PSNR and class accuracy of gen_opt/ against gt_opt/ and the class maps."""
    pairs = metrics.pair_folders(
        os.path.join(out_dir, "gen_opt"), os.path.join(out_dir, "gt_opt")
    )
    gen = np.stack([metrics.load_image(g) for _, g, _ in pairs])
    gt = np.stack([metrics.load_image(t) for _, _, t in pairs])
    cls_dir = os.path.join(data_dir, "test", "cls")
    cls_maps = np.stack(
        [metrics.load_image(os.path.join(cls_dir, os.path.basename(t)))[..., 0]
         for _, _, t in pairs]
    )  # fmt: skip
    colours = report.load_class_colours(os.path.join(data_dir, "dataset.json"))
    return report.score(gen, gt, cls_maps, colours)


def main():
    args = parse_args()
    make_data(args)
    rows, by_variant = [], {v: [] for v in VARIANTS}
    for variant in VARIANTS:
        for seed in args.seeds:
            scores = score(train_and_sample(args, variant, seed), args.data_dir)
            by_variant[variant].append(scores)
            rows.append([variant, seed, f"{scores['ssim']:.4f}", f"{scores['psnr']:.2f}",
                         f"{scores['class_acc']:.4f}"])  # fmt: skip
    for variant, runs in by_variant.items():
        mean = {k: np.mean([r[k] for r in runs]) for k in ("ssim", "psnr", "class_acc")}
        rows.append([f"{variant} (mean)", "", f"{mean['ssim']:.4f}",
                     f"{mean['psnr']:.2f}", f"{mean['class_acc']:.4f}"])  # fmt: skip
    with open(os.path.join(args.data_dir, "dataset.json")) as f:
        info = json.load(f)
    common.report(
        "VV alone against VV+VH on the generated SEN12MS-like data",
        common.markdown_table(
            ["SAR bands", "seed", "SSIM", "PSNR dB", "class accuracy"], rows
        ),
        [
            f"data: {shown(args.data_dir)}, "
            f"{info.get('num_train')} training and {info.get('num_test')} test patches of "
            f"{info.get('image_size')} px (2-band float32 dB SAR, 13-band uint16 optical)",
            f"training: {args.steps} steps, batch 32, the demo's model ({' '.join(MODEL_FLAGS)}); "
            f"sampling: {' '.join(SAMPLE_FLAGS)}",
            "class accuracy: share of test pixels whose generated colour is nearest the "
            "training mean colour of their true class (guided_diffusion/demo/report.py)",
        ],
        args.results,
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", default=os.path.join(REPO, "data", "sen12ms32"))
    parser.add_argument(
        "--run_root", default=os.path.join(REPO, "logs", "bench_polarisations")
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=64)
    parser.add_argument("--results", default=common.DEFAULT_RESULTS,
                        help="append the table here ('' for nowhere)")  # fmt: skip
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps < 1:
        parser.error("--steps must be positive")
    return args


if __name__ == "__main__":
    main()
