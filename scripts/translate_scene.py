"""
Translate a whole georeferenced SAR scene of any size into an optical GeoTIFF.

    python scripts/translate_scene.py --input SCENE.tif --output OUT.tif \\
        --model_path RUN/ema_0.9999_200000.pt --sampler dpm++2m --timestep_respacing 20

The sampler runs on one scene-sized state; the network sees overlapping tiles of
the model's training size (--overlap pixels shared, half a tile by default), and
their predictions are fused at every step with a smooth window
(guided_diffusion/tiling.py), so there are no seams and no tile draws colours of
its own. The noise is drawn once per scene pixel from --seed: the result does not
depend on --batch_size (tiles per network call).

The input is read the way the training run read its data (its config.json: SAR
kind, bands, dB ranges); --sar_input, --sar_nodata and --sar_bands describe this
scene's file if it comes in another form. The output has the input's CRS and
transform (or ground control points), is tiled, compressed and has overviews,
8-bit RGB by default (--output_units optical: the optical values of the training
data, float32, through its --opt_range). Nodata in the input is nodata in the
output. A quick-look PNG (SAR | result) is written beside it.

image_sample_realtime.py, by contrast, translates a folder of patches at the
model's size, resizing larger inputs as training did.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch as th
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger, samplers  # noqa: E402
from guided_diffusion.rasters import (  # noqa: E402
    DataError,
    georeference,
    read_raster,
    sar_bands_scaled,
    write_geotiff,
)
from guided_diffusion.sampling import (  # noqa: E402
    Bfloat16Model,
    add_sampling_flags,
    checkpoint_settings,
    load_model,
    prepare_model,
    read_run_config,
    read_sampling_args,
    sar_for_display,
    to_uint8,
    write_log,
)
from guided_diffusion.tiling import TiledDenoiser  # noqa: E402

# Pixel sizes that differ by more than this share from the training data's are warned of.
PIXEL_SIZE_TOLERANCE = 0.2
QUICKLOOK_WIDTH = 1024


def main():
    args = parse_args()
    flags, scaling, diffusion, notes = checkpoint_settings(
        args.model_path, args.explicit, args.inputs
    )
    dist_util.setup_dist()
    logger.configure(dir=os.path.dirname(args.output), format_strs=["stdout"])
    write_log(notes)

    # -- the scene ----------------------------------------------------------------
    raster = read_raster(args.input)
    sar, valid, stats = sar_bands_scaled(raster, scaling)
    if stats.nodata:
        logger.log(f"{stats.nodata} of {stats.pixels} SAR pixels are nodata")
    warning = stats.clipping_warning()
    if warning:
        logger.warn(warning)
    check_pixel_size(raster, read_run_config(args.model_path), args.input)
    tile = flags["image_size"]
    height, width = valid.shape
    sar = th.from_numpy(sar.astype(np.float32))[None]
    if sar.shape[1] == 1 and scaling.sar_channels == 3:
        sar = sar.repeat(1, 3, 1, 1)  # grey replicated, as the model was trained
    # a scene smaller than a tile is padded to one (edge pixels repeated)
    pad = (0, max(0, tile - width), 0, max(0, tile - height))
    sar = th.nn.functional.pad(sar, pad, mode="replicate") if any(pad) else sar
    device = dist_util.dev()
    sar = sar.to(device)

    # -- the model and the tiled denoiser ------------------------------------------
    model = load_model(args.model_path, flags, device, use_bf16=args.use_bf16)
    model = prepare_model(model, channels_last=args.channels_last, compile=args.compile)
    net = Bfloat16Model(model) if args.use_bf16 else model
    overlap = tile // 2 if args.overlap < 0 else args.overlap
    if not 0 <= overlap < tile:
        raise ValueError(
            f"--overlap {args.overlap}: give 0..{tile - 1} pixels (-1: half a tile)"
        )
    steps = len(samplers.descending(diffusion))
    bar = tqdm(
        total=0, unit="tile", desc="tiles", disable=not dist_util.is_main_process()
    )
    timing = {}

    def tiles_done(count):
        bar.update(count)
        if "first" not in timing:  # the estimate, from the first batch of tiles
            timing["first"] = time.perf_counter() - timing["began"]
            total = timing["first"] * calls * steps
            about = f"{total:.0f} s" if total < 90 else f"{total / 60:.1f} min"
            logger.log(
                f"the first {count} tile(s) took {timing['first']:.1f} s: about "
                f"{about} for the scene"
            )

    tiled = TiledDenoiser(
        lambda cond: samplers.Denoiser(diffusion, net, cond, clip_denoised=args.clip_denoised),
        diffusion, sar, tile, overlap=overlap, batch_size=args.batch_size,
        rank=dist_util.get_rank(), world=dist_util.get_world_size(),
        all_reduce=all_reduce if dist_util.get_world_size() > 1 else None,
        progress=tiles_done,
    )  # fmt: skip
    calls = math.ceil(len(tiled.mine) / args.batch_size)
    bar.total = steps * len(tiled.mine)
    logger.log(
        f"{width}x{height} pixels: {len(tiled.grid)} tiles of {tile} px (overlap {overlap}), "
        f"{steps} {args.sampler} steps, {calls} network calls of up to {args.batch_size} "
        f"tiles per step on {dist_util.get_world_size()} process(es)"
    )

    # -- sample ---------------------------------------------------------------------
    generator = th.Generator().manual_seed(args.seed)
    x = samplers.noise_of_shape((1, 3, *sar.shape[2:]), generator, device)
    timing["began"] = time.perf_counter()
    with th.no_grad():
        x = samplers.run(args.sampler, tiled, x, generator=generator, **args.options)
    bar.close()

    # -- write ----------------------------------------------------------------------
    if dist_util.is_main_process():
        x = x[..., :height, :width].cpu().clamp(-1, 1)
        write_outputs(args, raster, scaling, x, sar[..., :height, :width].cpu(), valid)
    dist_util.barrier()
    dist_util.cleanup()


def all_reduce(tensor):
    th.distributed.all_reduce(tensor)


def check_pixel_size(raster, run_config, path):
    """Warn when the scene's pixels differ from the training data's by > 20%."""
    trained = ((run_config or {}).get("inputs") or {}).get("pixel_size")
    if not trained or not raster.pixel_size:
        return
    ratio = max(a / b for a, b in zip(raster.pixel_size, trained))
    ratio = max(ratio, max(b / a for a, b in zip(raster.pixel_size, trained)))
    if ratio > 1 + PIXEL_SIZE_TOLERANCE:
        logger.warn(
            f"warning: {path} has {raster.pixel_size[0]:g} x {raster.pixel_size[1]:g} "
            f"pixels, the training data {trained[0]:g} x {trained[1]:g}: the model sees "
            "objects at another scale; resample the scene to the training pixel size "
            "(e.g. gdalwarp -tr) for results like the training data's"
        )


def write_outputs(args, raster, scaling, x, sar, valid):
    """The GeoTIFF and the quick-look PNG."""
    if args.output_units == "optical":
        if not scaling.opt_range:
            raise ValueError(
                "--output_units optical: the training run mapped 8-bit optical images, "
                "so there are no other units to write; use --output_units uint8"
            )
        lo, hi = scaling.opt_range
        image = ((x[0].numpy().astype(np.float64) + 1) / 2 * (hi - lo) + lo).astype(
            np.float32
        )
        image[:, ~valid] = np.nan
        nodata = float("nan")
    else:
        image = to_uint8(x)[0].transpose(2, 0, 1).copy()
        image[:, ~valid] = 0
        nodata = 0
    write_geotiff(
        args.output, image, georeference(args.input), nodata=nodata,
        names=("red", "green", "blue"),
    )  # fmt: skip
    logger.log(
        f"wrote {args.output} ({image.shape[2]}x{image.shape[1]}, {image.dtype})"
    )
    quicklook = os.path.splitext(args.output)[0] + "_quicklook.png"
    write_quicklook(quicklook, sar_for_display(to_uint8(sar))[0], to_uint8(x)[0], valid)
    logger.log(f"wrote {quicklook}")


def write_quicklook(path, sar, result, valid, width=QUICKLOOK_WIDTH):
    """SAR | result side by side, downscaled so the pair is at most ``width`` wide."""
    result = np.where(valid[..., None], result, 0).astype(np.uint8)
    sar = np.broadcast_to(sar, result.shape)
    gap = np.full((result.shape[0], 4, 3), 255, np.uint8)
    both = Image.fromarray(np.concatenate([sar, gap, result], axis=1))
    if both.width > width:
        both = both.resize(
            (width, max(1, round(both.height * width / both.width))), Image.BOX
        )
    tmp = f"{path}.tmp-{os.getpid()}.png"
    both.save(tmp)
    os.replace(tmp, path)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="the SAR scene (GeoTIFF)")
    parser.add_argument("--output", required=True, help="the optical GeoTIFF to write")
    parser.add_argument("--overlap", type=int, default=-1,
                        help="pixels shared by neighbouring tiles (-1: half a tile)")  # fmt: skip
    parser.add_argument("--output_units", choices=("uint8", "optical"), default="uint8",
                        help="8-bit RGB, or the training data's optical values (float32)")  # fmt: skip
    add_sampling_flags(
        parser, overrides={"batch_size": 8},
        skip=("data_dir", "num_samples"),
    )  # fmt: skip
    args = read_sampling_args(parser)
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input}: no such file")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError("--output must not be the --input file")
    if args.batch_size < 1:
        raise ValueError("--batch_size (tiles per network call) must be positive")
    # the folder is made now: a missing one must not fail the job at its end
    args.output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    return args


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
