"""
Write a paired SAR/optical dataset of procedurally generated scenes.

    python scripts/make_synthetic_dataset.py --out data/synth64 --image_size 64

Train on it with
    --data_dir_sar data/synth64/train/sar --data_dir_opt data/synth64/train/opt
and sample from it with
    --data_dir data/synth64/test

With --format sen12ms the same scenes are written as a SEN12MS-like tree of
GeoTIFFs instead (SAR VV and VH in dB, 13-band 16-bit optical images, NaN
nodata borders; see guided_diffusion/demo/sen12ms.py); the script prints the
flags to train and sample with.

With --format scene it writes one large georeferenced scene instead, for
scripts/translate_scene.py (rivers, roads and parcels crossing any tiling):

    python scripts/make_synthetic_dataset.py --format scene --width 1024 --height 768 \
        --out data/scene
"""

import argparse
import sys
from pathlib import Path

from guided_diffusion.demo.scenes import CLASSES, make_dataset
from guided_diffusion.demo.sen12ms import make_scene, make_sen12ms_dataset


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the dataset to")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--num_test", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", type=float, default=4, help="speckle looks L")
    parser.add_argument(
        "--format",
        choices=("png", "sen12ms", "scene"),
        default="png",
        help="png: 8-bit PNGs in train|test/{sar,opt,cls}; sen12ms: a SEN12MS-like "
        "GeoTIFF tree (float dB VV+VH, 13-band uint16 optical); scene: one large "
        "scene (scene_s1.tif, scene_s2.tif, scene_rgb.png, scene_cls.png)",
    )
    parser.add_argument("--width", type=int, default=1024, help="scene only: columns")
    parser.add_argument("--height", type=int, default=768, help="scene only: rows")
    parser.add_argument(
        "--feature_size",
        type=int,
        default=32,
        help="scene only: parcels, roads and houses as large as in generated patches "
        "of this size (32: those the bundled model learned from)",
    )
    parser.add_argument(
        "--nodata_share",
        type=float,
        default=0.25,
        help="sen12ms only: share of SAR patches with a NaN border along one edge",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out (its images under train/ and test/ are replaced)",
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
            "in it (images under train/ and test/ and dataset.json; other files "
            "are kept), or choose a new folder."
        )
    if args.format == "sen12ms":
        write_sen12ms(args, out)
        return
    if args.format == "scene":
        write_scene(args, out)
        return
    info = make(make_dataset, args, out)

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


def write_scene(args, out):
    """Write one large scene and print its files and how to translate it."""
    try:
        paths = make_scene(
            out, height=args.height, width=args.width, seed=args.seed, looks=args.looks,
            feature_size=args.feature_size,
        )  # fmt: skip
    except ValueError as err:
        sys.exit(f"make_synthetic_dataset: {err}")
    print(
        f"wrote a {args.width}x{args.height} scene (seed {args.seed}, {args.looks:g} "
        f"looks, features of {args.feature_size}-pixel patches, EPSG:32632, 10 m "
        f"pixels): SAR {paths['sar']}, optical {paths['opt']}, "
        f"8-bit truth {paths['rgb']}, classes {paths['cls']}"
    )
    print(
        f"translate it with: python scripts/translate_scene.py --input {paths['sar']} "
        f"--output {out / 'translated.tif'} --sampler ddim --timestep_respacing ddim20 "
        "--batch_size 64"
    )


def make(maker, args, out, **extra):
    """The data set of ``maker`` with the flags every format shares; a value it
    refuses ends the script with its one-line message."""
    try:
        return maker(
            out, num_train=args.num_train, num_test=args.num_test,
            image_size=args.image_size, seed=args.seed, looks=args.looks, **extra,
        )  # fmt: skip
    except ValueError as err:
        sys.exit(f"make_synthetic_dataset: {err}")


def write_sen12ms(args, out):
    """Write the GeoTIFF tree and print what it holds and how to use it."""
    info = make(make_sen12ms_dataset, args, out, nodata_share=args.nodata_share)

    print(
        f"wrote {info['num_train']} training and {info['num_test']} test patches of "
        f"{info['image_size']}x{info['image_size']} pixels (seed {info['seed']}, "
        f"{info['looks']:g} looks) as SEN12MS-like GeoTIFFs ({info['crs']}, "
        f"{info['pixel_size']:g} m pixels) to {out}"
    )
    print(
        f"{len(info['nodata_patches'])} SAR patches have a NaN border "
        f"({info['nodata_pixels']} pixels)"
    )
    means, stds = info["sar_db_mean"], info["sar_db_std"]
    print(
        "SAR dB (train): "
        + ", ".join(f"{b} mean {means[b]:.1f} std {stds[b]:.1f}" for b in means)
    )
    print("class            VV dB  VH dB  pixels  mean RGB (train)")
    for cls, share, mean in zip(
        info["classes"], info["class_pixel_share"], info["class_mean_rgb"], strict=True
    ):
        rgb = "-" if mean is None else " ".join(f"{v:5.1f}" for v in mean)
        print(
            f"  {cls['name']:<14} {cls['vv_db']:6.1f} {cls['vh_db']:6.1f} "
            f"{100 * share:5.1f}%  {rgb}"
        )
    print(f"train with: {info['train_flags'].replace('OUT', str(out))}")
    print(f"sample with: {info['sample_flags'].replace('OUT', str(out))}")
    print(f"details: {out / 'dataset.json'}")


if __name__ == "__main__":
    main()
