"""
The procedural scenes of scenes.py written as a SEN12MS-like GeoTIFF tree.

SEN12MS (Schmitt et al. 2019) ships Sentinel-1 and Sentinel-2 patches as
GeoTIFFs, one folder per product and scene:

    ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif   Sentinel-1, VV and VH
    ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif   Sentinel-2, 13 bands
    ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p30.tif   land cover

make_sen12ms_dataset writes the generator's scenes in that shape, so that the
loaders for real Sentinel data (float dB SAR with two polarisations, 16-bit
multispectral optical images, NaN nodata, georeferencing) can be tested and
demonstrated without shipping any real data:

* SAR: float32, two bands in dB (band 1 VV, band 2 VH), 10 log10 of the
  speckled linear intensity. Some patches have a NaN strip along one edge, as
  patches cut at the edge of a Sentinel-1 swath do.
* Optical: uint16, the 13 Sentinel-2 L1C bands in the order B1, B2, B3, B4,
  B5, B6, B7, B8, B8A, B9, B10, B11, B12 as digital numbers (reflectance x
  10000). Bands 4, 3, 2 hold the rendered RGB image with 255 stretched to
  3000 (RGB_DN_SCALE); the other bands are placeholders.
* Land cover: uint8, one band, the generator's class ids.

Scene i of a split is drawn exactly as scenes.make_dataset draws it, so the
PNG and GeoTIFF datasets of one seed show the same scenes.

Only numpy, Pillow, rasterio and tqdm are used.
"""

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import Affine
from tqdm.auto import tqdm

from .scenes import (
    CLASSES,
    DOUBLE_BOUNCE_SIGMA0,
    DOUBLE_BOUNCE_SIGMA0_VH,
    SENSOR_SIDE,
    SHADOW_SIGMA0,
    SHADOW_SIGMA0_VH,
    _ColourStats,
    check_dataset_arguments,
    class_statistics,
    generate_scene,
)

# UTM zone 32N (central Europe) and Sentinel's 10 m grid, north up
CRS_EPSG = 32632
PIXEL_SIZE = 10.0

SAR_BANDS = ("VV", "VH")
S2_BANDS = (
    "B1",
    "B2",
    "B3",
    "B4",
    "B5",
    "B6",
    "B7",
    "B8",
    "B8A",
    "B9",
    "B10",
    "B11",
    "B12",
)
# 1-based band numbers of red, green and blue
RGB_BANDS = (4, 3, 2)
# An 8-bit RGB value v is written as round(v * RGB_DN_SCALE / 255): reading
# bands 4, 3, 2 and mapping 0..RGB_DN_SCALE linearly to 0..255 gives the
# rendered image back (3000 DN, a reflectance of 0.3, is a usual white point
# for displaying Sentinel-2 true colour).
RGB_DN_SCALE = 3000

# Placeholder reflectances of the bands other than B2-B4, per class, in the
# order B1, B5, B6, B7, B8, B8A, B9, B10, B11, B12. They are not measured
# spectra, only the textbook shapes: vegetation dark in the red edge's start
# and bright in the near infrared (B6-B8A), soil rising slowly towards the
# shortwave infrared (B11, B12), water dark beyond the visible, B9 (water
# vapour) and B10 (cirrus) low everywhere.
_OTHER_BANDS = ("B1", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
_OTHER_REFLECTANCE = {
    "water": (0.06, 0.03, 0.02, 0.02, 0.02, 0.015, 0.01, 0.002, 0.01, 0.005),
    "road": (0.10, 0.12, 0.13, 0.13, 0.14, 0.14, 0.10, 0.003, 0.16, 0.14),
    "bare_soil": (0.09, 0.20, 0.22, 0.23, 0.25, 0.26, 0.20, 0.004, 0.32, 0.27),
    "ploughed": (0.07, 0.13, 0.15, 0.16, 0.17, 0.18, 0.14, 0.003, 0.24, 0.20),
    "crop_green": (0.05, 0.12, 0.30, 0.38, 0.42, 0.44, 0.30, 0.002, 0.20, 0.10),
    "crop_yellow": (0.08, 0.22, 0.26, 0.28, 0.30, 0.31, 0.24, 0.003, 0.33, 0.25),
    "grassland": (0.05, 0.14, 0.28, 0.33, 0.36, 0.37, 0.27, 0.002, 0.22, 0.12),
    "forest": (0.04, 0.07, 0.20, 0.26, 0.28, 0.29, 0.20, 0.002, 0.13, 0.06),
    "urban_ground": (0.09, 0.13, 0.15, 0.16, 0.17, 0.17, 0.13, 0.003, 0.19, 0.16),
    "roof_red": (0.08, 0.25, 0.27, 0.28, 0.29, 0.29, 0.22, 0.003, 0.32, 0.26),
    "roof_grey": (0.10, 0.16, 0.17, 0.17, 0.18, 0.18, 0.14, 0.003, 0.20, 0.17),
}
_OTHER_TABLE = np.array([_OTHER_REFLECTANCE[c.name] for c in CLASSES], dtype=np.float64)
_CLASS_GREY = np.array([np.mean(c.rgb) for c in CLASSES], dtype=np.float64)

# (ROI and season, scene number) of the patches of each split; patch i goes
# to group i mod len(groups), so every group is used when there are enough
# patches. The test split has a region of its own, as SEN12MS users split by
# region.
GROUPS = {
    "train": (("ROIs1158_spring", 1), ("ROIs1158_spring", 2), ("ROIs1868_summer", 1)),
    "test": (("ROIs1970_fall", 1),),
}
# Upper-left UTM corner of each group's grid of patches, metres. The grids
# are 100 km apart and their rows at most _GRID_WIDTH wide, so no two patches
# overlap.
_GROUP_ORIGIN = {
    ("ROIs1158_spring", 1): (300000.0, 5600000.0),
    ("ROIs1158_spring", 2): (400000.0, 5600000.0),
    ("ROIs1868_summer", 1): (500000.0, 5500000.0),
    ("ROIs1970_fall", 1): (600000.0, 5400000.0),
}
_GRID_WIDTH = 80000.0

# The flags of scripts/image_train.py and scripts/image_sample.py for this
# layout; OUT is the folder that holds dataset.json.
TRAIN_FLAGS = (
    "--data_dir_sar OUT/train --data_dir_opt OUT/train --sar_input db "
    "--sar_channels 2 --opt_bands 4,3,2 --opt_range 0,{scale}"
).format(scale=RGB_DN_SCALE)
SAMPLE_FLAGS = "--data_dir OUT/test"

# The nodata strip: width as a share of the side, and the largest slope of a
# slanted swath edge (pixels across per pixel along).
_BORDER_WIDTH = (0.1, 0.4)
_BORDER_SLANT = 0.15
_EDGES = ("west", "east", "north", "south")


def _patch_names(split, index):
    """
    File paths of patch `index` of a split, relative to the dataset folder.

    :return: dict with "sar", "opt" and, for train, "lc" (the class map as a
        GeoTIFF) or, for test, "cls" (the class map as a PNG named after the
        SAR file).
    """
    groups = GROUPS[split]
    roi, scene = groups[index % len(groups)]
    patch = index // len(groups) + 1

    def name(product):
        return f"{roi}_{product}_{scene}_p{patch}.tif"

    if split == "train":
        return dict(
            sar=f"train/{roi}/s1_{scene}/{name('s1')}",
            opt=f"train/{roi}/s2_{scene}/{name('s2')}",
            lc=f"train/{roi}/lc_{scene}/{name('lc')}",
        )
    stem = name("s1")[: -len(".tif")]
    return dict(
        sar=f"test/sar/{stem}.tif",
        opt=f"test/opt/{name('s2')}",
        cls=f"test/cls/{stem}.png",
    )


def _transform(split, index, size):
    """North-up 10 m transform of a patch: the groups' patches tile a grid."""
    groups = GROUPS[split]
    group = groups[index % len(groups)]
    columns = max(1, int(_GRID_WIDTH // (size * PIXEL_SIZE)))
    row, col = divmod(index // len(groups), columns)
    x0, y0 = _GROUP_ORIGIN[group]
    return Affine(
        PIXEL_SIZE,
        0.0,
        x0 + col * size * PIXEL_SIZE,
        0.0,
        -PIXEL_SIZE,
        y0 - row * size * PIXEL_SIZE,
    )


def _border(rng, size, share):
    """
    The nodata strip of one patch, or None for a patch without one.

    :param rng: numpy Generator used for this patch's strip only.
    :param size: side of the patch.
    :param share: chance that the patch has a strip.
    :return: None or (edge name, (size, size) boolean mask of the strip).
    """
    if not rng.random() < share:
        return None
    edge = _EDGES[rng.integers(len(_EDGES))]
    width = rng.uniform(*_BORDER_WIDTH) * size
    # half of the strips have a slanted inner edge, as the edge of a swath
    # crosses the patch grid at an angle
    slant = rng.uniform(-_BORDER_SLANT, _BORDER_SLANT) if rng.random() < 0.5 else 0.0
    y, x = np.mgrid[0:size, 0:size] + 0.5
    depth, along = {
        "west": (x, y),
        "east": (size - x, y),
        "north": (y, x),
        "south": (size - y, x),
    }[edge]
    return edge, depth < width + slant * (along - size / 2)


def _optical_bands(opt, cls_map):
    """
    The 13 Sentinel-2 bands of a rendered scene as uint16 digital numbers.

    :param opt: (H, W, 3) uint8 RGB image.
    :param cls_map: (H, W) class ids.
    :return: (13, H, W) uint16 array in the order of S2_BANDS.
    """
    rgb = opt.astype(np.float64)
    # the placeholder bands follow the pixel's brightness relative to its
    # class colour, so they carry the parcels' and pixels' variation too
    brightness = np.clip(rgb.mean(axis=-1) / _CLASS_GREY[cls_map], 0.25, 4.0)
    other = _OTHER_TABLE[cls_map] * brightness[..., None] * 10000.0
    bands = np.zeros((len(S2_BANDS),) + cls_map.shape)
    for k, name in enumerate(_OTHER_BANDS):
        bands[S2_BANDS.index(name)] = other[..., k]
    for channel, band in enumerate(RGB_BANDS):
        bands[band - 1] = rgb[..., channel] * RGB_DN_SCALE / 255.0
    return np.clip(np.round(bands), 0, 65535).astype(np.uint16)


def _write_tif(path, data, transform, descriptions, *, nodata=None, units=None):
    """Write a (bands, H, W) array as a deflate-compressed GeoTIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=CRS.from_epsg(CRS_EPSG),
        transform=transform,
        compress="deflate",
    )
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for band, description in enumerate(descriptions, start=1):
            dst.set_band_description(band, description)
            if units is not None:
                dst.set_band_unit(band, units)


def _remove_stale(out_dir):
    """
    Delete the images of an earlier dataset in the folders this writer uses.

    That is the GeoTIFFs and PNGs of both layouts (this one and the PNG
    layout of scenes.make_dataset) under train/ and test/; other files stay.
    """
    folders = [
        out_dir / s / k for s in ("train", "test") for k in ("sar", "opt", "cls")
    ]
    folders += [
        product
        for roi in (out_dir / "train").glob("ROIs*")
        if roi.is_dir()
        for product in roi.iterdir()
        if product.is_dir() and re.fullmatch(r"(s1|s2|lc)_\d+", product.name)
    ]
    for folder in folders:
        for pattern in ("*.tif", "*.png"):
            for stale in folder.glob(pattern):
                stale.unlink()


def _check_arguments(num_train, num_test, image_size, seed, looks, nodata_share):
    check_dataset_arguments(num_train, num_test, image_size, seed, looks)
    if not 0 <= nodata_share <= 1:
        raise ValueError(
            f"nodata_share is the share of patches with a nodata border and must "
            f"lie in [0, 1], got {nodata_share}"
        )


def _db(value):
    return round(10.0 * float(np.log10(value)), 3)


def make_sen12ms_dataset(
    out_dir,
    *,
    num_train,
    num_test,
    image_size,
    seed,
    looks=4,
    nodata_share=0.25,
    progress=True,
):
    """
    Write the generated scenes as a SEN12MS-like tree of GeoTIFFs.

    Layout (patch numbers pN; see GROUPS for the regions):
    out_dir/train/ROIs1158_spring/{s1_1,s2_1,lc_1}/ROIs1158_spring_{s1,s2,lc}_1_pN.tif
    (likewise for the other training groups), out_dir/test/sar/<s1 name>.tif,
    out_dir/test/opt/<s2 name>.tif, out_dir/test/cls/<s1 stem>.png, and
    out_dir/dataset.json. An s1 file's partner is found by replacing the s1
    token with s2 in folder and file name.

    Scene i of a split is drawn from SeedSequence([seed, split, i]) (split 0
    for train, 1 for test) exactly as scenes.make_dataset draws it; the VH
    speckle is drawn after it from the same generator, so VV is the dB of the
    PNG dataset's linear intensity. Whether patch i has a nodata border, and
    its shape, come from SeedSequence([seed, split, i, 1]). The same seed
    gives the same arrays. GeoTIFFs and PNGs already in the folders of this
    layout and of the PNG layout under train/ and test/ are deleted first.

    :param out_dir: folder to write to (created if missing).
    :param num_train: number of training patches (at least 1).
    :param num_test: number of test patches.
    :param image_size: side of the square patches in pixels.
    :param seed: non-negative integer seed.
    :param looks: number of looks of the speckle.
    :param nodata_share: chance that a patch's SAR image has a NaN strip
        along one edge (10-40% of the side wide, half of them slanted).
    :param progress: show a progress bar.
    :return: the dict written to dataset.json.
    """
    _check_arguments(num_train, num_test, image_size, seed, looks, nodata_share)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)

    stats = _ColourStats()
    db_moments = np.zeros((2, 3))
    patches, nodata_patches = [], []
    splits = (("train", num_train), ("test", num_test))
    with tqdm(
        total=num_train + num_test, disable=not progress, desc="SEN12MS-like patches"
    ) as bar:
        for split_index, (split, count) in enumerate(splits):
            for i in range(count):
                rng = np.random.default_rng(
                    np.random.SeedSequence([seed, split_index, i])
                )
                scene = generate_scene(rng, image_size, looks, cross_pol=True)
                border_rng = np.random.default_rng(
                    np.random.SeedSequence([seed, split_index, i, 1])
                )
                border = _border(border_rng, image_size, nodata_share)
                names = _patch_names(split, i)
                transform = _transform(split, i, image_size)

                sar = 10.0 * np.log10(
                    np.stack([scene["sar_linear"], scene["vh_linear"]]).astype(
                        np.float64
                    )
                )
                sar = sar.astype(np.float32)
                if border is not None:
                    sar[:, border[1]] = np.nan
                _write_tif(
                    out_dir / names["sar"],
                    sar,
                    transform,
                    SAR_BANDS,
                    nodata=float("nan"),
                    units="dB",
                )
                _write_tif(
                    out_dir / names["opt"],
                    _optical_bands(scene["opt"], scene["cls"]),
                    transform,
                    S2_BANDS,
                )
                if split == "train":
                    _write_tif(
                        out_dir / names["lc"],
                        scene["cls"][None],
                        transform,
                        ("class",),
                    )
                    stats.add(scene["opt"], scene["cls"])
                    for band in range(2):
                        valid = sar[band][np.isfinite(sar[band])].astype(np.float64)
                        db_moments[band] += (valid.size, valid.sum(), np.sum(valid**2))
                else:
                    path = out_dir / names["cls"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(scene["cls"]).save(path)

                nodata_pixels = 0 if border is None else int(border[1].sum())
                patches.append(
                    dict(split=split, index=i, nodata_pixels=nodata_pixels, **names)
                )
                if border is not None:
                    nodata_patches.append(
                        dict(file=names["sar"], edge=border[0], pixels=nodata_pixels)
                    )
                bar.update()

    means = stats.class_means()
    db_mean = db_moments[:, 1] / db_moments[:, 0]
    db_std = np.sqrt(db_moments[:, 2] / db_moments[:, 0] - db_mean**2)
    info = dict(
        format="sen12ms",
        seed=seed,
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        looks=looks,
        nodata_share=nodata_share,
        crs=f"EPSG:{CRS_EPSG}",
        pixel_size=PIXEL_SIZE,
        sensor_side=SENSOR_SIDE,
        sar_bands=list(SAR_BANDS),
        sar_units="dB",
        sar_nodata="nan",
        optical_bands=list(S2_BANDS),
        optical_rgb_bands=list(RGB_BANDS),
        optical_scale=dict(
            dn=RGB_DN_SCALE,
            rgb=255,
            note=f"bands 4,3,2 = round(8-bit R,G,B * {RGB_DN_SCALE} / 255); "
            "the other bands are placeholders",
        ),
        classes=[
            dict(
                asdict(c),
                rgb=list(c.rgb),
                vv_db=round(c.sigma0_db, 3),
                vh_db=round(c.sigma0_vh_db, 3),
            )
            for c in CLASSES
        ],
        double_bounce_db=dict(
            VV=_db(DOUBLE_BOUNCE_SIGMA0), VH=_db(DOUBLE_BOUNCE_SIGMA0_VH)
        ),
        shadow_db=dict(VV=_db(SHADOW_SIGMA0), VH=_db(SHADOW_SIGMA0_VH)),
        **class_statistics(stats, means),
        sar_db_mean={b: round(float(m), 3) for b, m in zip(SAR_BANDS, db_mean)},
        sar_db_std={b: round(float(s), 3) for b, s in zip(SAR_BANDS, db_std)},
        nodata_patches=nodata_patches,
        nodata_pixels=sum(p["pixels"] for p in nodata_patches),
        patches=patches,
        train_flags=TRAIN_FLAGS,
        sample_flags=SAMPLE_FLAGS,
        flags_note="OUT stands for the folder that holds this dataset.json",
    )
    with open(out_dir / "dataset.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def make_scene(out_dir, *, height, width, seed, looks=4, name="scene", feature_size=32):
    """
    One large georeferenced scene and its truth, for translating whole scenes.

    The generator draws a square scene of the longer side (larger sizes hold more
    parcels, rivers and roads, not bigger ones), cropped to height x width. Files,
    all on one 10 m grid in EPSG:32632:

    * ``{name}_s1.tif``: VV and VH in dB, float32, as the SEN12MS-like patches;
    * ``{name}_s2.tif``: the 13 Sentinel-2-like bands, uint16 (RGB in 4,3,2 at
      3000 DN = 255);
    * ``{name}_rgb.png`` and ``{name}_cls.png``: the 8-bit optical truth and the
      class map.

    :param out_dir: folder to write to (created if missing).
    :param height: rows of the scene, at least MIN_SIZE.
    :param width: columns of the scene, at least MIN_SIZE.
    :param seed: non-negative seed; the same seed gives the same files.
    :param looks: speckle looks.
    :param name: the files' common prefix.
    :param feature_size: parcels, roads, rivers and houses as large as in the
        generated patches of this size (32: those the bundled model learned
        from), as many as the scene holds; None: the features of one scene of the
        scene's size (far larger).
    :return: a dict of the four paths ("sar", "opt", "rgb", "cls").
    """
    check_dataset_arguments(1, 0, min(height, width), seed, looks)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, 0]))
    scene = generate_scene(
        rng, max(height, width), looks, cross_pol=True, feature_size=feature_size
    )
    crop = (slice(0, height), slice(0, width))
    linear = np.stack([scene["sar_linear"][crop], scene["vh_linear"][crop]])
    sar = (10.0 * np.log10(linear.astype(np.float64))).astype(np.float32)
    opt, cls_map = scene["opt"][crop], scene["cls"][crop]
    transform = Affine(PIXEL_SIZE, 0, 500000.0, 0, -PIXEL_SIZE, 5400000.0)
    paths = {
        kind: out_dir / f"{name}_{suffix}"
        for kind, suffix in (("sar", "s1.tif"), ("opt", "s2.tif"),
                             ("rgb", "rgb.png"), ("cls", "cls.png"))
    }  # fmt: skip
    _write_tif(paths["sar"], sar, transform, SAR_BANDS, nodata=float("nan"), units="dB")
    _write_tif(paths["opt"], _optical_bands(opt, cls_map), transform, S2_BANDS)
    Image.fromarray(np.ascontiguousarray(opt)).save(paths["rgb"])
    Image.fromarray(np.ascontiguousarray(cls_map)).save(paths["cls"])
    return {k: str(v) for k, v in paths.items()}
