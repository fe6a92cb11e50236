"""
Write a paired SAR/optical dataset of procedurally generated scenes.

    python scripts/make_synthetic_dataset.py --out data/synth64 --image_size 64

Train on it with
    --data_dir_sar data/synth64/train/sar --data_dir_opt data/synth64/train/opt
and sample from it with
    --data_dir data/synth64/test
"""

import argparse
import sys
from pathlib import Path

from guided_diffusion.demo.scenes import CLASSES, make_dataset


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the dataset to")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", type=float, default=4, help="speckle looks L")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (its PNGs under train/ and test/ are replaced)",
    )
    return parser


def main():
    args = create_argparser().parse_args()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        sys.exit(
            f"--out {out} is not empty. Pass --overwrite to replace the dataset "
            "in it (PNGs under train/ and test/ and dataset.json; other files "
            "are kept), or choose a new folder."
        )
    try:
        info = make_dataset(
            out,
            num_train=args.num_train,
            num_test=args.num_test,
            image_size=args.image_size,
            seed=args.seed,
            looks=args.looks,
        )
    except ValueError as err:
        sys.exit(f"make_synthetic_dataset: {err}")

    print(
        f"wrote {info['num_train']} training and {info['num_test']} test pairs of "
        f"{info['image_size']}x{info['image_size']} pixels (seed {info['seed']}, "
        f"{info['looks']:g} looks) to {out}"
    )
    print(
        "share of optical colour variance explained by the class map: "
        f"{info['explained_variance_share']:.3f}"
    )
    print(f"8-bit SAR mean {info['sar_mean']:.1f}, std {info['sar_std']:.1f}")
    print("class            pixels  mean RGB (train)")
    for cls, share, mean in zip(
        CLASSES, info["class_pixel_share"], info["class_mean_rgb"], strict=True
    ):
        rgb = "-" if mean is None else " ".join(f"{v:5.1f}" for v in mean)
        print(f"  {cls.name:<14} {100 * share:5.1f}%  {rgb}")
    print(
        f"train with: --data_dir_sar {out / 'train' / 'sar'} --data_dir_opt {out / 'train' / 'opt'}"
    )
    print(f"sample with: --data_dir {out / 'test'}")
    print(f"details: {out / 'dataset.json'}")


if __name__ == "__main__":
    main()
