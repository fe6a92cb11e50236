"""
Score the demo's translations against two trivial baselines and draw a picture.

    python scripts/demo_report.py --data_dir data/synthetic32 \
        --gen_dir logs/demo/sample_results/ddim50/gen_opt --out logs/demo

--data_dir is a dataset written by scripts/make_synthetic_dataset.py (it holds
the class maps and the per-class mean colours the class accuracy needs).
Prints a table of SSIM, PSNR and class accuracy for the model, the training
set's mean image and the SAR copied to RGB; writes demo_metrics.json and
demo.png (SAR | generated | ground truth) into --out, and with
--update_assets copies the picture to assets/demo.png for the README.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import metrics  # noqa: E402
from guided_diffusion.demo import report  # noqa: E402

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

    # -- the test set, its translations and the class colours ---------------------
    pairs = metrics.pair_folders(args.gen_dir, os.path.join(test_dir, "opt"))
    gen = np.stack([metrics.load_image(g) for _, g, _ in pairs])
    gt = np.stack([metrics.load_image(t) for _, _, t in pairs])
    stems = [
        os.path.splitext(os.path.relpath(t, os.path.join(test_dir, "opt")))[0]
        for _, _, t in pairs
    ]
    sar = np.stack([load_grey(test_dir, "sar", s) for s in stems])
    cls_maps = np.stack([load_grey(test_dir, "cls", s) for s in stems])
    colours = report.load_class_colours(info_path)

    # -- the model and the two baselines -------------------------------------------
    mean_image = report.mean_image_baseline(
        os.path.join(args.data_dir, "train", "opt"), gt.shape[1], progress=True
    )
    candidates = [
        ("model", gen),
        ("training mean image", np.broadcast_to(mean_image, gt.shape)),
        ("SAR copied to RGB", report.sar_baseline(sar)),
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
    parser.add_argument("--data_dir", required=True, help="the synthetic dataset")
    parser.add_argument("--gen_dir", required=True, help="translations of its test set")
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
