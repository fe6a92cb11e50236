"""
Score the demo's translations against two trivial baselines and draw a picture.

    python scripts/demo_report.py --data_dir data/synthetic32 \
        --gen_dir logs/demo/sample_results/dpm++2m20/gen_opt --out logs/demo

--data_dir is a dataset written by scripts/make_synthetic_dataset.py (it holds
the class maps and the per-class mean colours the class accuracy needs).
Prints a table of SSIM, PSNR and class accuracy for the model, the training
set's mean image and the SAR copied to RGB; writes demo_metrics.json and
demo.png (SAR | generated | ground truth) into --out, and with
--update_assets copies the picture to assets/demo.png for the README.

A SEN12MS-like dataset (make_synthetic_dataset.py --format sen12ms; its
dataset.json says "format": "sen12ms") holds GeoTIFFs, so it is scored on the
8-bit pictures the sampling run wrote beside --gen_dir, scaled the way the
model saw its inputs:

* ground truth: gt_opt/ (the optical bands as the model saw them);
* SAR: cond_sar/ as it is in the picture (two polarisations as R=VV, G=VH,
  B=VV), its first channel (VV) for the "SAR copied to RGB" baseline;
* class maps: DATA_DIR/test/cls/<SAR name>.png;
* mean image: the optical rasters of DATA_DIR/train (the s2 partners of the s1
  files), read with the bands and range the model trained with. Those come
  from the training run's config.json beside the checkpoint that run.json
  (beside --gen_dir) names; when that config.json is gone, from the inputs
  run.json itself recorded.

Nodata SAR pixels (black in gen_opt/ and cond_sar/) are scored like the rest.
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.demo import report  # noqa: E402
from guided_diffusion.evaluation import metrics  # noqa: E402
from guided_diffusion.image_datasets import find_pairs  # noqa: E402
from guided_diffusion.io import results  # noqa: E402
from guided_diffusion.io.checkpoints import read_run_config  # noqa: E402
from guided_diffusion.io.rasters import Scaling  # noqa: E402
from guided_diffusion.translation.sampling import input_scaling  # noqa: E402

FIGURE_NAMES = {"ssim": "SSIM", "class_acc": "class accuracy"}
ASSET = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo.png"
)


def main():
    args = create_argparser().parse_args()
    test_dir = os.path.join(args.data_dir, "test")
    info_path = os.path.join(args.data_dir, "dataset.json")
    for path in (info_path, args.gen_dir):
        if not os.path.exists(path):
            raise ValueError(
                f"{path}: not found; pass --data_dir of a dataset made by "
                "scripts/make_synthetic_dataset.py and --gen_dir of its translated test set"
            )

    sen12ms = dataset_format(info_path) == "sen12ms"

    # -- the test set, its translations and the class colours ---------------------
    if sen12ms:
        gen, gt, sar, cls_maps = load_sampled_test_set(args.gen_dir, test_dir)
        sar_band = sar[..., 0]  # VV: cond_sar/ shows VV, VH as R=VV, G=VH, B=VV
    else:
        pairs = metrics.pair_folders(args.gen_dir, os.path.join(test_dir, "opt"))
        gen = np.stack([metrics.load_image(g) for _, g, _ in pairs])
        gt = np.stack([metrics.load_image(t) for _, _, t in pairs])
        stems = [
            os.path.splitext(os.path.relpath(t, os.path.join(test_dir, "opt")))[0]
            for _, _, t in pairs
        ]
        sar = np.stack([load_grey(test_dir, "sar", s) for s in stems])
        cls_maps = np.stack([load_grey(test_dir, "cls", s) for s in stems])
        sar_band = sar
    colours = report.load_class_colours(info_path)

    # -- the model and the two baselines -------------------------------------------
    if sen12ms:
        mean_image = sen12ms_mean_image(args.data_dir, args.gen_dir, gt.shape[1])
    else:
        mean_image = report.mean_image_baseline(
            os.path.join(args.data_dir, "train", "opt"), gt.shape[1], progress=True
        )
    candidates = [
        ("model", gen),
        ("training mean image", np.broadcast_to(mean_image, gt.shape)),
        ("SAR copied to RGB", report.sar_baseline(sar_band)),
    ]
    rows = [
        (label, report.score(images, gt, cls_maps, colours))
        for label, images in candidates
    ]
    print(f"{len(gt)} test images of {args.data_dir}")
    print(report.comparison_table(rows))
    model, baselines = rows[0][1], [s for _, s in rows[1:]]
    beats = {
        key: all(model[key] > s[key] for s in baselines)
        for key in ("ssim", "class_acc")
    }
    won = [name for key, name in FIGURE_NAMES.items() if beats[key]]
    print(
        f"the model beats both baselines on: {' and '.join(won) or 'neither SSIM nor class accuracy'}"
    )

    # -- results ------------------------------------------------------------------
    metrics_path = report.write_metrics(
        os.path.join(args.out, "demo_metrics.json"),
        rows,
        data_dir=os.path.abspath(args.data_dir),
        gen_dir=os.path.abspath(args.gen_dir),
        num_images=len(gt),
        model_beats_baselines=beats,
    )
    picture = os.path.join(args.out, "demo.png")
    report.make_picture(sar, gen, gt, picture, n=args.rows)
    print(f"wrote {metrics_path} and {picture}")
    if args.update_assets:
        print(f"copied the picture to {report.copy_to_assets(picture, ASSET)}")


def dataset_format(info_path):
    """The "format" of a generated dataset's dataset.json: png (the default) or sen12ms."""
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{info_path} cannot be read as JSON ({err}); write the dataset again "
            "with scripts/make_synthetic_dataset.py"
        ) from None
    fmt = info.get("format", "png") if isinstance(info, dict) else None
    if fmt not in ("png", "sen12ms"):
        raise ValueError(
            f"{info_path}: dataset format {fmt!r} is not one this report scores (png "
            "or sen12ms); write the dataset with scripts/make_synthetic_dataset.py"
        )
    return fmt


def load_sampled_test_set(gen_dir, test_dir):
    """
    A SEN12MS-like test set as its sampling run wrote it: the translations in
    gen_dir, the ground truth in gt_opt/ and the SAR pictures in cond_sar/ beside
    it, the class maps in test_dir/cls.

    :return: uint8 arrays gen (N, H, W, 3), gt (N, H, W, 3), sar (N, H, W, 3) and
        the class maps (N, H, W), in the order of metrics.pair_folders.
    """
    out_dir = results.results_dir(gen_dir)
    gt_dir = os.path.join(out_dir, results.GT_DIR)
    sar_dir = os.path.join(out_dir, results.SAR_DIR)
    for folder in (gt_dir, sar_dir):
        if not os.path.isdir(folder):
            raise ValueError(
                f"{folder} is missing: a SEN12MS-like test set is scored on the "
                "gt_opt/ and cond_sar/ that scripts/image_sample_realtime.py writes "
                f"beside gen_opt/; pass as --gen_dir the gen_opt/ of a run on {test_dir}"
            )
    pairs = metrics.pair_folders(gen_dir, gt_dir)
    gen = np.stack([metrics.load_image(g) for _, g, _ in pairs])
    gt = np.stack([metrics.load_image(t) for _, _, t in pairs])
    stems = [os.path.splitext(os.path.relpath(t, gt_dir))[0] for _, _, t in pairs]
    sar = []
    for stem in stems:
        path = results.sar_picture(out_dir, stem)
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} is missing: the sampling run wrote no SAR picture of {stem}; "
                f"delete {out_dir} and translate {test_dir} again"
            )
        sar.append(metrics.load_image(path))
    cls_maps = np.stack([load_grey(test_dir, "cls", s) for s in stems])
    return gen, gt, np.stack(sar), cls_maps


def training_scaling(gen_dir):
    """
    How the model read its optical training images: the "inputs" of its training
    run's config.json, found through run.json beside gen_dir (the checkpoint it
    names); the inputs run.json recorded when that config.json is gone.

    :return: (rasters.Scaling, the file it was read from).
    """
    out_dir = results.results_dir(gen_dir)
    run_path = os.path.join(out_dir, results.RUN_FILE)
    try:
        run = results.read_run(out_dir)
    except ValueError as err:
        raise ValueError(
            f"{err}; pass as --gen_dir the gen_opt/ folder of a run of "
            "scripts/image_sample_realtime.py, which writes run.json beside it"
        ) from None
    model_path, recorded = run.get("model_path"), run.get("inputs")
    config = read_run_config(model_path) if model_path else None
    if config is not None:
        scaling, _ = input_scaling(config, {}, config.get("sar_channels", 3))
        source = os.path.join(
            os.path.dirname(os.path.abspath(model_path)), "config.json"
        )
        if recorded:
            sampled = Scaling.from_record(recorded)
            if (sampled.opt_bands, sampled.opt_range) != (
                scaling.opt_bands,
                scaling.opt_range,
            ):
                print(
                    f"warning: the ground truth in gt_opt/ was read as {run_path} says "
                    f"({describe_optical(sampled)}), the training images as {source} "
                    f"says ({describe_optical(scaling)}); the mean image follows the "
                    "training",
                    file=sys.stderr,
                )
        return scaling, source
    if not recorded:
        raise ValueError(
            f"{run_path} names no checkpoint with a config.json beside it and records "
            "no inputs; translate the test set again with scripts/image_sample_realtime.py"
        )
    return Scaling.from_record(recorded), run_path


def describe_optical(scaling):
    """How a Scaling reads optical files, in a few words."""
    if not scaling.opt_range:
        return "8-bit RGB"
    bands = ",".join(map(str, scaling.opt_bands)) or "1,2,3"
    lo, hi = scaling.opt_range
    return f"bands {bands}, {lo:g}..{hi:g} mapped to 0..255"


def sen12ms_mean_image(data_dir, gen_dir, image_size):
    """The mean-image baseline of a SEN12MS-like tree: its s2 training rasters."""
    scaling, source = training_scaling(gen_dir)
    train_dir = os.path.join(data_dir, "train")
    pairs = find_pairs(train_dir, train_dir)
    print(
        f"mean training image: the {len(pairs)} optical rasters of {train_dir}, "
        f"{describe_optical(scaling)} (as {source} says)"
    )
    return report.mean_image_baseline(
        [opt for _, opt, _ in pairs], image_size, progress=True, scaling=scaling
    )


def load_grey(test_dir, kind, stem):
    """The single-band image test_dir/kind/stem.png (SAR or class map) as uint8."""
    path = os.path.join(test_dir, kind, stem + ".png")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} is missing: the test set lacks the {kind} image of {stem}; "
            "write the dataset again with scripts/make_synthetic_dataset.py"
        )
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def create_argparser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_dir",
        required=True,
        help="the synthetic dataset (PNG or SEN12MS-like, as its dataset.json says)",
    )
    parser.add_argument(
        "--gen_dir",
        required=True,
        help="translations of its test set (for a SEN12MS-like dataset the gen_opt/ "
        "of a sampling run: its gt_opt/, cond_sar/ and run.json are read too)",
    )
    parser.add_argument(
        "--out", required=True, help="folder for the metrics and picture"
    )
    parser.add_argument("--rows", type=int, default=8, help="scenes in the picture")
    parser.add_argument(
        "--update_assets",
        action="store_true",
        help=f"also copy the picture to {ASSET} (the README's figure)",
    )
    return parser


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
