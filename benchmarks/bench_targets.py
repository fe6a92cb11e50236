"""
What the model predicts and how its loss is weighted, measured: eps, x_start and v
prediction, each with the plain loss and with Min-SNR-5 weighting (--snr_gamma 5),
trained for the same number of steps on the demo's generated scenes (8-bit PNGs,
data/synthetic32), two seeds each. Per run: validation SSIM every --val_interval steps during training
(the run's progress.csv), then the test set sampled K = 8 times per input, and
scored as single samples (sample 0, what a run without --samples_per_input gives)
and as the mean of the K samples: SSIM, PSNR, colour error, tint, class accuracy,
sharpness, and how well the spread of the K samples ranks the errors.

    python benchmarks/bench_targets.py                # ~70 min on 2 CPU cores
    python benchmarks/bench_targets.py --steps 20 --num_train 64 --num_test 8 \\
        --val_interval 10 --samples 2 --data_dir logs/bt_smoke/data --val_dir \\
        logs/bt_smoke/val --run_root logs/bt_smoke/runs --results '' --plot '' --figure ''  # a smoke run

Runs go to --run_root/<variant>_seed<seed>/; a rerun reuses finished training and
sampling, so an interrupted benchmark continues. Training runs first (all of
them, --jobs at a time, each with its share of the cores), then sampling, so the
wall time per run is not comparable and is not reported: every variant costs the
same per step (the target changes one line of the loss).
"""

import argparse
import concurrent.futures
import csv
import glob
import json
import os
import subprocess
import sys

import common
import numpy as np
import seams
from PIL import Image, ImageDraw, ImageFont

from guided_diffusion.demo import report
from guided_diffusion.evaluation import calibration, metrics
from guided_diffusion.io import pictures

REPO = os.path.dirname(common.BENCH_DIR)
# name -> training flags; the order is the table's
VARIANTS = {
    "eps": ["--predict", "eps"],
    "eps+minsnr": ["--predict", "eps", "--snr_gamma", "5"],
    "x_start": ["--predict", "x_start"],
    "x_start+minsnr": ["--predict", "x_start", "--snr_gamma", "5"],
    "v": ["--predict", "v"],
    "v+minsnr": ["--predict", "v", "--snr_gamma", "5"],
}
# the demo's model (demo.sh) with attention at 8 x 8 only, which halves a step's
# time on a CPU, as bench_polarisations.py trains it; the target comes from VARIANTS
MODEL_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 "
               "--attention_resolutions 8 --learn_sigma False --diffusion_steps 1000 "
               "--noise_schedule linear").split()  # fmt: skip
TRAIN_FLAGS = ("--lr 1e-3 --batch_size 32 --ema_rate 0.995 --keep_checkpoints 1 "
               "--val_sampler ddim --val_timestep_respacing ddim20").split()  # fmt: skip
COLOURS = [(31, 119, 180), (174, 199, 232), (214, 39, 40), (255, 152, 150),
           (44, 160, 44), (152, 223, 138)]  # fmt: skip


def shown(path):
    """A path as the table shows it: relative inside the repository, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def run(command, log_path=None, threads=None, log_dir=None):
    """
    Run a command from the repository root; its output goes to ``log_path``, its
    run folder ($OPENAI_LOGDIR) is ``log_dir``.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if log_dir:
        env["OPENAI_LOGDIR"] = log_dir
    print("$ " + " ".join(command) + (f"  > {shown(log_path)}" if log_path else ""),
          flush=True)  # fmt: skip
    if log_path:
        with open(log_path, "a") as log:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=log)
    else:
        proc = subprocess.run(command, cwd=REPO, env=env)
    if proc.returncode:
        where = f"; see {shown(log_path)}" if log_path else ""
        raise RuntimeError(f"{os.path.basename(command[1])} failed (status {proc.returncode}){where}")


def make_data(folder, num_train, num_test, seed):
    if os.path.isfile(os.path.join(folder, "dataset.json")):
        print(f"{shown(folder)}/dataset.json exists: using that dataset", flush=True)
        return
    run([sys.executable, "scripts/make_synthetic_dataset.py", "--out", folder, "--overwrite", "--image_size", "32", "--seed", str(seed),
         "--num_train", str(num_train), "--num_test", str(num_test)])  # fmt: skip


def run_dir(args, variant, seed):
    return os.path.join(args.run_root, f"{variant.replace('+', '_')}_seed{seed}")


def checkpoint(args, variant, seed):
    return os.path.join(run_dir(args, variant, seed), f"ema_0.995_{args.steps:06d}.pt")


def results_dir(args, variant, seed):
    return os.path.join(run_dir(args, variant, seed), "sample_results", args.sampler_dir)


def train(args, variant, seed):
    folder = run_dir(args, variant, seed)
    if os.path.isfile(checkpoint(args, variant, seed)):
        return
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(args.data_dir, "train")
    # the SAR is 8-bit grey (3 equal channels, as the demo trains)
    run([sys.executable, "scripts/image_train.py", "--data_dir_sar", os.path.join(data, "sar"),
         "--data_dir_opt", os.path.join(data, "opt"), *MODEL_FLAGS, *TRAIN_FLAGS, *VARIANTS[variant],
         "--val_data_dir", os.path.join(args.val_dir, "test"),
         "--val_num", str(args.val_num), "--val_interval", str(args.val_interval),
         "--log_interval", str(args.val_interval),
         "--seed", str(seed), "--max_steps", str(args.steps),
         "--save_interval", str(args.steps), "--resume_checkpoint", "auto"],
        os.path.join(folder, "train.log"), args.threads, folder)  # fmt: skip


def samples_of(args, seed):
    """K for the first seed's runs; the other seeds' runs give single samples."""
    return args.samples if seed == args.seeds[0] else 1


def sample(args, variant, seed):
    out = results_dir(args, variant, seed)
    if glob.glob(os.path.join(glob.escape(out), "samples_*.npz")):
        return
    folder = run_dir(args, variant, seed)
    run([sys.executable, "scripts/image_sample_realtime.py", "--data_dir",
         os.path.join(args.data_dir, "test"), "--model_path", checkpoint(args, variant, seed),
         "--sampler", args.sampler, "--timestep_respacing", args.respacing,
         "--batch_size", "64", "--seed", "0",
         "--samples_per_input", str(samples_of(args, seed))],
        os.path.join(folder, "sample.log"), args.threads, folder)  # fmt: skip


def load_folder(folder, names):
    return np.stack([metrics.load_image(os.path.join(folder, n)) for n in names])


def score_images(images, truth, cls_maps, colours):
    """The table's figures of one set of images against the truth."""
    scores = report.score(images, truth, cls_maps, colours)
    signed = np.mean([metrics.colour_error(a, b)[0] for a, b in zip(images, truth)], axis=0)
    absolute = np.mean([metrics.colour_error(a, b)[1] for a, b in zip(images, truth)])
    scores["colour_error"] = float(absolute)
    scores["tint"] = float(np.abs(signed).max())
    # detail against the truth's: the mean gradient of the whole set over the truth's
    scores["sharpness"] = float(
        sum(seams.mean_gradient(a) for a in images) / sum(seams.mean_gradient(b) for b in truth)
    )
    return scores


def score_run(args, variant, seed, colours):
    out = results_dir(args, variant, seed)
    truth_files = metrics.list_images(os.path.join(out, "gt_opt"))
    keys = list(truth_files)  # in natural order (image_files.list_images)
    names = [os.path.basename(truth_files[k]) for k in keys]
    truth = load_folder(os.path.join(out, "gt_opt"), names)
    cls_dir = os.path.join(args.data_dir, "test", "cls")
    cls_maps = np.stack(
        [metrics.load_image(os.path.join(cls_dir, k + ".png"))[..., 0] for k in keys]
    )
    single = score_images(load_folder(os.path.join(out, "gen_opt"), names), truth,
                          cls_maps, colours)  # fmt: skip
    scores = dict(single=single, val=validation_curve(args, variant, seed))
    if samples_of(args, seed) == 1:
        return scores
    scores["mean"] = score_images(load_folder(os.path.join(out, "gen_mean"), names),
                                  truth, cls_maps, colours)  # fmt: skip
    [npz] = glob.glob(os.path.join(glob.escape(out), "samples_*.npz"))
    m, s, t, sar, count, valid, _ = metrics.load_spread_inputs(
        npz, os.path.join(out, "gt_opt")
    )
    scores["spread"] = calibration.calibration_report(
        m, s, t, sar, samples_per_input=count, valid=valid
    )
    return scores


def validation_curve(args, variant, seed):
    """[(step, val_ssim)] from the run's progress.csv."""
    curve = []
    with open(os.path.join(run_dir(args, variant, seed), "progress.csv")) as f:
        for row in csv.DictReader(f):
            if row.get("val_ssim") not in (None, ""):
                curve.append((int(float(row["step"])), float(row["val_ssim"])))
    return curve


def in_parallel(jobs, work, args):
    """Run ``work(args, variant, seed)`` for every job, --jobs at a time."""
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(work, args, v, s): (v, s) for v, s in jobs}
        failed = []
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except RuntimeError as err:
                failed.append(f"{futures[future][0]} seed {futures[future][1]}: {err}")
    if failed:
        sys.exit("bench_targets: " + "; ".join(failed))


def main():
    args = parse_args()
    make_data(args.data_dir, args.num_train, args.num_test, 0)
    # validation pairs of their own (another generator seed), not the test set
    make_data(args.val_dir, 1, args.val_num, 1)
    # seed 0 of every variant first, so a shortened run still compares them all
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    in_parallel(jobs, train, args)
    in_parallel(jobs, sample, args)
    colours = report.load_class_colours(os.path.join(args.data_dir, "dataset.json"))
    scores = {job: score_run(args, *job, colours) for job in jobs}
    write_report(args, scores)
    if args.plot:
        plot_curves(args, scores, args.plot)
        print(f"wrote {args.plot}")
    if args.figure:
        variant = args.figure_variant or best_variant(args, scores)
        spread_error_figure(args, variant, args.figure)
        print(f"wrote {args.figure} ({variant})")


def row_of(label, seed, s):
    return [label, seed, f"{s['ssim']:.4f}", f"{s['psnr']:.2f}", f"{s['colour_error']:.1f}",
            f"{s['tint']:.1f}", f"{s['class_acc']:.4f}", f"{s['sharpness']:.2f}"]  # fmt: skip


def averaged(runs, key):
    return {k: float(np.mean([r[key][k] for r in runs]))
            for k in ("ssim", "psnr", "colour_error", "tint", "class_acc", "sharpness")}  # fmt: skip


def write_report(args, scores):
    header = ["target + weighting", "seed", "SSIM", "PSNR dB", "colour error",
              "tint", "class accuracy", "sharpness"]  # fmt: skip
    single, means, spread = [], [], []
    for variant in args.variants:
        runs = [scores[(variant, s)] for s in args.seeds]
        for seed, r in zip(args.seeds, runs):
            single.append(row_of(variant, seed, r["single"]))
        single.append(row_of(f"**{variant} (mean of seeds)**", "", averaged(runs, "single")))
        first = scores[(variant, args.seeds[0])]
        means.append(row_of(variant, args.seeds[0], first["mean"]))
        rep = [first["spread"]]
        spread.append([
            variant,
            f"{100 * np.mean([x['coverage_2sd'] for x in rep]):.1f}%",
            f"{np.mean([x['mean_spread'] for x in rep]):.1f}",
            f"{np.mean([x['mean_abs_error'] for x in rep]):.1f}",
            f"{np.mean([x['spread']['spearman'] for x in rep]):.3f}",
            f"{np.mean([x['sar_edges']['spearman'] for x in rep]):.3f}",
            f"{np.mean([x['spread']['top_bottom_error_ratio'] for x in rep]):.2f}",
            f"{np.mean([x['sar_edges']['top_bottom_error_ratio'] for x in rep]):.2f}",
        ])  # fmt: skip
    calibrated = scores[(args.variants[0], args.seeds[0])]["spread"]["coverage_2sd_calibrated"]
    with open(os.path.join(args.data_dir, "dataset.json")) as f:
        info = json.load(f)
    table = "\n\n".join([
        "Single samples (sample 0 of each test input):\n\n"
        + common.markdown_table(header, single),
        f"The mean of K = {args.samples} samples per input (seed {args.seeds[0]}'s runs):\n\n"
        + common.markdown_table(header, means),
        f"The spread of the K = {args.samples} samples against the error of their mean "
        f"(seed {args.seeds[0]}'s runs):\n\n"
        + common.markdown_table(
            ["target + weighting", "truth within mean +- 2 spread", "mean spread",
             "mean abs error", "Spearman: spread", "Spearman: SAR edges",
             "error ratio top/bottom bin: spread", "same: SAR edges"], spread),
    ])  # fmt: skip
    notes = [
        f"data: {shown(args.data_dir)}, {info.get('num_train')} training and "
        f"{info.get('num_test')} test patches of {info.get('image_size')} px; validation: "
        f"the first {args.val_num} pairs of {shown(args.val_dir)}/test (generator seed 1)",
        f"training: {args.steps} steps, batch 32, seeds {', '.join(map(str, args.seeds))}, "
        f"{' '.join(MODEL_FLAGS)} {' '.join(TRAIN_FLAGS)}; Min-SNR: --snr_gamma 5",
        f"{args.jobs} runs at a time, {args.threads} torch thread(s) each; "
        f"sampling: --sampler {args.sampler} --timestep_respacing {args.respacing} --seed 0 "
        f"--samples_per_input {args.samples} for seed {args.seeds[0]}'s runs, 1 for the others",
        "colour error: mean absolute difference per pixel and channel (grey levels); tint: "
        "the largest |mean signed difference| of a channel over the test set; class "
        "accuracy: share of pixels whose colour is nearest the training mean colour of "
        "their class; sharpness: mean gradient magnitude of the images over the truth's "
        "(1: as much detail as the truth)",
        "spread: the K samples' standard deviation; a calibrated model has the truth "
        f"within mean +- 2 spread {100 * calibrated:.1f}% of the time at this K; "
        "Spearman: rank correlation of the uncertainty with the error of the mean, per "
        "pixel; error ratio: mean error of the most over the least uncertain tenth",
    ]
    if args.plot:
        notes.append(f"validation SSIM against training step: {shown(args.plot)}")
    common.report(
        "Prediction target and loss weighting on the demo's generated scenes",
        table, notes, args.results,
    )


def best_variant(args, scores):
    """The variant with the highest single-sample SSIM, averaged over the seeds."""
    return max(args.variants,
               key=lambda v: np.mean([scores[(v, s)]["single"]["ssim"] for s in args.seeds]))  # fmt: skip


def spread_error_figure(args, variant, path, rows=4, scale=4):
    """
    Test scenes of seed 0's run of ``variant``, one per row: SAR, truth, sample 0,
    the mean of the K samples, its error |truth - mean| and the spread, the last
    two on one colour scale (grey levels, channels averaged), nodata black.
    """
    out = results_dir(args, variant, args.seeds[0])
    [npz] = glob.glob(os.path.join(glob.escape(out), "samples_*.npz"))
    with np.load(npz) as data:
        names = [str(n) for n in data["names"]]
        mean, spread, valid = data["mean"], data["spread"], data["valid"]
    # the first scenes with data everywhere, so the maps are not half black
    chosen = [i for i in range(len(names)) if valid[i].all()][:rows]
    vmax = pictures.SPREAD_MAX
    titles = ["SAR", "truth", "sample 0", f"mean of {args.samples}", "error of the mean",
              f"spread of {args.samples}"]  # fmt: skip
    font = ImageFont.load_default()
    size, gap, pad, head = 32 * scale, 6, 10, 22
    bar_left = pad + len(titles) * (size + gap) + 6
    width = bar_left + 16 + 50
    height = head + len(chosen) * (size + gap) + pad + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (size + gap), 6), title, fill="black", font=font)

    def block(image):
        return Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.NEAREST)

    for r, i in enumerate(chosen):
        stem = os.path.splitext(names[i])[0]
        truth = metrics.load_image(os.path.join(out, "gt_opt", stem + ".png"))
        error = np.abs(truth.astype(np.float64) - mean[i]).mean(axis=2)
        tiles = [
            metrics.load_image(os.path.join(out, "cond_sar", stem + ".png")),
            truth,
            metrics.load_image(os.path.join(out, "gen_opt", stem + ".png")),
            np.rint(mean[i]).clip(0, 255),
            pictures.colour_map(error / vmax),
            pictures.colour_map(spread[i].mean(axis=2) / vmax),
        ]
        y = head + r * (size + gap)
        for c, tile in enumerate(tiles):
            canvas.paste(block(tile), (pad + c * (size + gap), y))
    # one colour bar for both maps: vmax at the top
    bar_h = len(chosen) * (size + gap) - gap
    bar = pictures.colour_map(np.linspace(1, 0, bar_h))[:, None, :].repeat(16, axis=1)
    canvas.paste(Image.fromarray(bar), (bar_left, head))
    for value in pictures.tick_values(vmax):
        row = head + int(round((1 - value / vmax) * (bar_h - 1)))
        draw.line([(bar_left + 16, row), (bar_left + 20, row)], fill="black")
        label = f"{value:g}" + ("+" if value == vmax else "")
        draw.text((bar_left + 23, row - 6), label, fill="black", font=font)
    draw.text((pad, height - 16), f"{variant}, seed {args.seeds[0]}: error and spread in "
              "grey levels (channels averaged), one colour scale", fill="black", font=font)  # fmt: skip
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def plot_curves(args, scores, path, size=(760, 440)):
    """Validation SSIM against step, one line per variant (the mean of its seeds)."""
    curves = {}
    for variant in args.variants:
        per_seed = [dict(scores[(variant, s)]["val"]) for s in args.seeds]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        curves[variant] = [(st, float(np.mean([c[st] for c in per_seed]))) for st in steps]
    points = [p for c in curves.values() for p in c]
    if not points:
        return
    width, height = size
    left, right, top, bottom = 60, 170, 30, 45
    x_max = max(st for st, _ in points)
    y_lo = np.floor(min(v for _, v in points) * 20) / 20
    y_hi = np.ceil(max(v for _, v in points) * 20) / 20
    y_hi = max(y_hi, y_lo + 0.05)

    def xy(step, value):
        x = left + (width - left - right) * step / x_max
        y = top + (height - top - bottom) * (y_hi - value) / (y_hi - y_lo)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 8), f"Validation SSIM ({args.val_num} pairs, mean of "
              f"{len(args.seeds)} seeds) against training step", fill="black", font=font)  # fmt: skip
    x0, y0 = xy(0, y_lo)
    x1, y1 = xy(x_max, y_hi)
    for value in np.arange(y_lo, y_hi + 1e-9, 0.05):
        _, y = xy(0, value)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{value:.2f}", fill="black", font=font)
    tick = next(t for t in (25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10**9)
                if x_max / t <= 8)  # fmt: skip
    for step in range(0, x_max + 1, tick):
        x, _ = xy(step, y_lo)
        draw.line([(x, y0), (x, y0 + 4)], fill="black")
        draw.text((x - 10, y0 + 8), f"{int(round(step))}", fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 30, height - 18), "training step", fill="black", font=font)
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for i, (variant, curve) in enumerate(curves.items()):
        colour = COLOURS[list(VARIANTS).index(variant) % len(COLOURS)]  # one per variant
        line = [xy(st, v) for st, v in curve]
        dashed = "minsnr" in variant
        for a, b in zip(line, line[1:]):
            draw.line([a, b], fill=colour, width=2 if dashed else 3)
        for x, y in line:
            r = 3
            shape = draw.rectangle if dashed else draw.ellipse
            shape([x - r, y - r, x + r, y + r], fill=colour)
        ly = top + 20 * i
        draw.line([(x1 + 15, ly + 6), (x1 + 40, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 46, ly), variant, fill="black", font=font)
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", default=os.path.join(REPO, "data", "synthetic32"))
    parser.add_argument("--val_dir", default=os.path.join(REPO, "data", "synthetic32_val"))
    parser.add_argument("--run_root", default=os.path.join(REPO, "logs", "bench_targets"))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=64)
    parser.add_argument("--val_num", type=int, default=16, help="validation pairs")
    parser.add_argument("--val_interval", type=int, default=25)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8,
                        help="samples per test input for the first seed's runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--results", default=common.DEFAULT_RESULTS,
                        help="append the tables here ('' for nowhere)")  # fmt: skip
    parser.add_argument("--plot", default=os.path.join(REPO, "assets", "targets_val_ssim.png"),
                        help="the validation curves' PNG ('' for none)")  # fmt: skip
    parser.add_argument("--figure", default=os.path.join(REPO, "assets", "spread_error.png"),
                        help="test scenes with their error and spread maps ('' for none)")
    parser.add_argument("--figure_variant", default="",
                        help="the variant the figure shows (default: the best single-sample SSIM)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose of {', '.join(VARIANTS)}")
    if args.steps < 1 or args.samples < 2:
        parser.error("--steps must be positive and --samples at least 2")
    args.respacing = f"ddim{args.sample_steps}" if args.sampler == "ddim" else str(args.sample_steps)
    args.sampler_dir = f"{args.sampler}{args.sample_steps}"
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    return args


if __name__ == "__main__":
    main()
