"""
Score generated optical images against their ground truth: SSIM (RGB and
grey), PSNR, colour error and, given the Inception network, FID.

    python scripts/image_evaluate.py --gen_dir results/opt --gt_dir data/test/opt \
        --inception inception-2015-12-05.pt

Images are paired by relative path without extension. Writes metrics.json
(means; FID) and per_image.csv into --out, by default the parent folder of
--gen_dir. The Inception file may also be given as $SAR2OPT_INCEPTION.

A run sampled with --samples_per_input K > 1 keeps the mean and spread of its
samples in its samples_*.npz; found beside --gen_dir (or given with --spread),
they are evaluated too: how often the truth lies within mean +- 2 spread, and the
error of the mean per spread bin, beside the same table for a naive baseline (the
SAR image's edge magnitude). Written to metrics.json ("spread") and
calibration.txt.
"""

import argparse
import os
import sys
import warnings

import torch as th

from guided_diffusion.base import image_files
from guided_diffusion.base.atomic import DiskFull, write_text
from guided_diffusion.evaluation import calibration, metrics


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    args = create_argparser().parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if th.cuda.is_available() else "cpu"
    elif device == "cuda" and not th.cuda.is_available():
        fail("--device cuda: no CUDA device is available; use --device cpu or auto")
    if args.batch_size < 1:
        fail(f"--batch_size {args.batch_size}: must be at least 1")
    if args.spread_bins < 1:
        fail(f"--spread_bins {args.spread_bins}: must be at least 1")

    try:
        for flag, folder in (("--gen_dir", args.gen_dir), ("--gt_dir", args.gt_dir)):
            if not os.path.isdir(folder):
                fail(f"{flag} {folder}: no such folder")
            if not metrics.list_images(folder):
                extensions = ", ".join(image_files.IMAGE_EXTENSIONS)
                fail(f"{flag} {folder}: no images ({extensions}) in it")
        metrics.pair_folders(args.gen_dir, args.gt_dir)  # fail before any long work
        spread_npz = metrics.find_spread_npz(args.spread, args.gen_dir)
        net, fid_note = open_inception(args.inception, device)
        records = metrics.compare_folders(args.gen_dir, args.gt_dir)
        spread = None
        if spread_npz is not None:
            spread = score_spread(spread_npz, args)
        fid = None
        if net is not None:
            fid, fid_note = score_fid(net, args, device)
    except ValueError as e:
        fail(e)

    out = args.out or os.path.dirname(os.path.abspath(args.gen_dir))
    summary = metrics.summarize(records)
    json_path, _ = metrics.write_report(
        out,
        summary,
        records,
        gen_dir=os.path.abspath(args.gen_dir),
        gt_dir=os.path.abspath(args.gt_dir),
        fid=fid,
        fid_note=fid_note,
        **({} if spread is None else {"spread": spread}),
    )
    print(metrics.format_summary(summary, fid))
    written = [json_path, "per_image.csv"]
    if spread is not None:
        text = calibration.format_calibration(spread)
        write_text(os.path.join(out, "calibration.txt"), text)
        print(f"\n{text}", end="")
        written.append("calibration.txt")
    print(f"wrote {', '.join(written[:-1])} and {written[-1]}")


def score_spread(npz_path, args):
    """The calibration report of a run's mean and spread (evaluation/calibration.py)."""
    mean, spread, truth, sar, count, valid, note = metrics.load_spread_inputs(
        npz_path, args.gt_dir
    )
    report = calibration.calibration_report(
        mean, spread, truth, sar, samples_per_input=count, bins=args.spread_bins,
        valid=valid,
    )
    return {"npz": os.path.abspath(npz_path), **report, "sar_edges_note": note}


def open_inception(path, device):
    """Load the FID network, or return (None, why FID is skipped)."""
    try:
        return metrics.load_inception(metrics.find_inception(path), device), None
    except FileNotFoundError as e:
        print(f"FID skipped: {e}", file=sys.stderr)
        return None, f"FID skipped: {e}"


def score_fid(net, args, device):
    """FID between the two folders, with a note that carries any warning."""
    features = [
        metrics.compute_features(
            net,
            map(metrics.load_image, metrics.list_images(folder).values()),
            args.batch_size,
            device,
        )
        for folder in (args.gen_dir, args.gt_dir)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = metrics.fid_from_features(*features)
    note = (
        f"Inception-v3 features of {len(features[0])} generated and "
        f"{len(features[1])} ground-truth images"
    )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
        note += f"; warning: {warning.message}"
    return fid, note


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--gen_dir", required=True, help="generated images")
    parser.add_argument("--gt_dir", required=True, help="ground-truth images")
    parser.add_argument("--out", help="output folder (default: parent of --gen_dir)")
    parser.add_argument(
        "--inception",
        help=f"{metrics.INCEPTION_FILE} for FID (default: ${metrics.INCEPTION_ENV})",
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="images per FID batch"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--spread",
        default="auto",
        help="the samples_*.npz of a run with --samples_per_input above 1 (or its "
        "folder), whose mean and spread to evaluate against --gt_dir; auto: the one "
        "beside --gen_dir, if it holds a spread; off: none (default: auto)",
    )
    parser.add_argument(
        "--spread_bins", type=int, default=10,
        help="quantile bins of the calibration tables (default: 10)",
    )  # fmt: skip
    return parser


if __name__ == "__main__":
    try:
        main()
    except DiskFull as err:
        fail(f"{err}: free space and run the evaluation again")
