"""Tests of the SEN12MS-like GeoTIFF writer and of the cross-polarised channel."""

import json
import math
import os
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from guided_diffusion.demo.report import load_class_colours
from guided_diffusion.demo.scenes import (
    CLASSES,
    DB_RANGE,
    DOUBLE_BOUNCE_SIGMA0_VH,
    SHADOW_SIGMA0_VH,
    generate_scene,
    make_dataset,
    simulate_cross_pol,
    simulate_sar,
)
from guided_diffusion.demo.sen12ms import make_sen12ms_dataset

ROOT = Path(__file__).resolve().parents[1]
ID = {c.name: c.id for c in CLASSES}
EULER_GAMMA = 0.5772156649015329
FIELDS = ("ploughed", "crop_yellow", "grassland", "crop_green")
S2_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10")
S2_ORDER += ("B11", "B12")
SEED, SIZE, LOOKS = 5, 32, 4
COUNTS = {"train": 12, "test": 3}


def speckle_db_bias(looks):
    """E[10 log10 G] for G ~ Gamma(L, 1/L), L an integer."""
    digamma = -EULER_GAMMA + sum(1.0 / j for j in range(1, looks))
    return 10 / math.log(10) * (digamma - math.log(looks))


def read_tif(path):
    """The pixels of a GeoTIFF and the metadata the tests look at."""
    with rasterio.open(path) as src:
        meta = dict(count=src.count, descriptions=src.descriptions, nodata=src.nodata)
        return src.read(), meta


def near(mask, radius):
    """Pixels within `radius` (Chebyshev distance) of a True pixel of mask."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def s1_to_s2(path):
    """The SEN12MS partner rule, written out: the s1 token becomes s2."""
    parts = path.split("/")
    parts[:-1] = [re.sub(r"^s1_", "s2_", p) for p in parts[:-1]]
    parts[-1] = re.sub(r"_s1_", "_s2_", parts[-1])
    return "/".join(parts)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("sen12ms")
    info = make_sen12ms_dataset(
        out,
        num_train=COUNTS["train"],
        num_test=COUNTS["test"],
        image_size=SIZE,
        seed=SEED,
        looks=LOOKS,
        nodata_share=0.4,
        progress=False,
    )
    return out, info


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    out = tmp_path_factory.mktemp("png")
    info = make_dataset(
        out,
        num_train=COUNTS["train"],
        num_test=COUNTS["test"],
        image_size=SIZE,
        seed=SEED,
        looks=LOOKS,
        progress=False,
    )
    return out, info


@pytest.fixture(scope="module")
def scenes():
    """The scenes drawn again, straight from the documented seed rule."""
    return {
        (split, i): generate_scene(
            np.random.default_rng(np.random.SeedSequence([SEED, s, i])), SIZE, LOOKS
        )
        for s, split in enumerate(("train", "test"))
        for i in range(COUNTS[split])
    }


@pytest.fixture(scope="module")
def sar_stack(tree, scenes):
    """VV, VH (dB), class maps and noise-free VV of every patch, pooled."""
    out, info = tree
    vv, vh, cls, sigma0 = [], [], [], []
    for patch in info["patches"]:
        data, _ = read_tif(out / patch["sar"])
        scene = scenes[patch["split"], patch["index"]]
        # double bounce and shadow have levels of their own
        keep = np.isfinite(data[0]) & ~near(
            np.isin(scene["cls"], (ID["roof_red"], ID["roof_grey"])), 2
        )
        vv.append(data[0][keep])
        vh.append(data[1][keep])
        cls.append(scene["cls"][keep])
        sigma0.append(scene["sigma0"][keep])
    return tuple(np.concatenate(a).astype(np.float64) for a in (vv, vh, cls, sigma0))


# ---------------------------------------------------------------------------
# the cross-polarised channel on hand-made class maps


@pytest.mark.parametrize("looks", [1, 4])
def test_vh_level_and_speckle_in_homogeneous_regions(looks):
    names = [c.name for c in CLASSES]
    cls_map = np.repeat(np.arange(len(CLASSES)), 48)[None, :].repeat(256, 0)
    rng = np.random.default_rng(7)
    _, _, sigma0 = simulate_sar(cls_map, rng, looks)
    vh, sigma0_vh = simulate_cross_pol(cls_map, sigma0, rng, looks)
    assert vh.dtype == sigma0_vh.dtype == np.float32
    for k, name in enumerate(names):
        inner = slice(k * 48 + 4, (k + 1) * 48 - 4)
        level = CLASSES[ID[name]].sigma0_vh
        np.testing.assert_allclose(sigma0_vh[:, inner], level, rtol=1e-6)
        # mean of the dB of Gamma(L, 1/L) speckle: 10 / ln 10 (digamma(L) - ln L)
        bias = np.mean(10 * np.log10(vh[:, inner].astype(np.float64) / level))
        assert bias == pytest.approx(speckle_db_bias(looks), abs=0.2), name
        cv = vh[:, inner].std() / vh[:, inner].mean()
        assert cv == pytest.approx(1 / np.sqrt(looks), rel=0.1), name


def test_vh_double_bounce_and_shadow():
    cls_map = np.full((48, 48), ID["crop_green"], np.uint8)
    cls_map[20:30, 20:30] = ID["roof_grey"]
    rng = np.random.default_rng(3)
    _, _, sigma0 = simulate_sar(cls_map, rng, 4, sensor_side="west")
    _, sigma0_vh = simulate_cross_pol(cls_map, sigma0, rng, 4, sensor_side="west")
    # the sensor is west: the west wall is lit, the ground east of it in shadow
    assert np.all(sigma0_vh[20:30, 20] == np.float32(DOUBLE_BOUNCE_SIGMA0_VH))
    assert np.all(sigma0_vh[20:30, 30] == np.float32(SHADOW_SIGMA0_VH))
    np.testing.assert_allclose(
        sigma0_vh[20:30, 21:30], CLASSES[ID["roof_grey"]].sigma0_vh
    )
    # much weaker than in VV, still brighter than the roofs
    assert DOUBLE_BOUNCE_SIGMA0_VH < sigma0[20, 20] / 5
    assert DOUBLE_BOUNCE_SIGMA0_VH > 5 * CLASSES[ID["roof_grey"]].sigma0_vh


def test_cross_pol_leaves_the_other_arrays_alone():
    plain = generate_scene(np.random.default_rng(11), SIZE)
    both = generate_scene(np.random.default_rng(11), SIZE, cross_pol=True)
    for key in plain:
        np.testing.assert_array_equal(plain[key], both[key])
    assert both["vh_linear"].shape == both["sigma0_vh"].shape == (SIZE, SIZE)


def test_field_classes_share_vv_but_not_vh():
    fields = [CLASSES[ID[n]] for n in FIELDS]
    assert len({c.sigma0 for c in fields}) == 1
    # bare ploughed soil, ripe cereal, grass, green crop: more canopy volume,
    # more depolarisation
    levels = [c.sigma0_vh_db for c in fields]
    assert levels == sorted(levels)
    for a, b in combinations(fields, 2):
        assert abs(a.sigma0_vh_db - b.sigma0_vh_db) >= 1.5, (a.name, b.name)
    # cross-pol is weaker than co-pol for every surface of the scene
    assert all(c.sigma0_vh <= c.sigma0 for c in CLASSES)


# ---------------------------------------------------------------------------
# layout, names, georeferencing


def test_layout_and_pairing(tree):
    out, info = tree
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    s1 = [f for f in files if f.startswith("train/") and "/s1_" in f]
    s2 = [f for f in files if f.startswith("train/") and "/s2_" in f]
    lc = [f for f in files if f.startswith("train/") and "/lc_" in f]
    assert len(s1) == len(s2) == len(lc) == COUNTS["train"]
    assert sorted(s1_to_s2(f) for f in s1) == s2
    assert sorted(f.replace("/s1_", "/lc_").replace("_s1_", "_lc_") for f in s1) == lc
    for f in s1:
        assert re.fullmatch(r"train/(ROIs\d+_[a-z]+)/s1_(\d+)/\1_s1_\2_p\d+\.tif", f), f
    # a couple of regions and scenes, as in SEN12MS
    assert len({f.split("/")[1] for f in s1}) >= 2
    assert len({f.rsplit("/", 1)[0] for f in s1}) >= 3

    sar = [f for f in files if f.startswith("test/sar/")]
    opt = [f for f in files if f.startswith("test/opt/")]
    cls = [f for f in files if f.startswith("test/cls/")]
    assert len(sar) == len(opt) == len(cls) == COUNTS["test"]
    assert sorted(s1_to_s2(f).replace("/sar/", "/opt/") for f in sar) == opt
    assert (
        sorted(f.replace("/sar/", "/cls/").removesuffix(".tif") + ".png" for f in sar)
        == cls
    )
    assert set(files) == set(s1 + s2 + lc + sar + opt + cls + ["dataset.json"]), (
        "unexpected files"
    )


def test_georeferencing(tree):
    out, info = tree
    origins = set()
    for patch in info["patches"]:
        partners = [patch["sar"], patch["opt"]] + (
            [patch["lc"]] if "lc" in patch else []
        )
        transforms = []
        for name in partners:
            with rasterio.open(out / name) as src:
                assert src.crs.to_epsg() == 32632, name
                assert (src.width, src.height) == (SIZE, SIZE)
                t = src.transform
                assert (t.a, t.b, t.d, t.e) == (10.0, 0.0, 0.0, -10.0), name
                transforms.append(tuple(t))
        # the products of one patch lie on top of each other
        assert len(set(transforms)) == 1
        origins.add(transforms[0][2:6:3])
    # every patch has its own place
    assert len(origins) == len(info["patches"])


# ---------------------------------------------------------------------------
# SAR


def test_sar_files_and_nodata(tree):
    out, info = tree
    recorded = {p["file"]: p for p in info["nodata_patches"]}
    with_border = 0
    for patch in info["patches"]:
        data, meta = read_tif(out / patch["sar"])
        assert meta["count"] == 2 and data.dtype == np.float32
        assert meta["descriptions"] == ("VV", "VH")
        assert meta["nodata"] is not None and math.isnan(meta["nodata"])
        nan = np.isnan(data)
        assert np.array_equal(nan[0], nan[1]), "NaN in one band only"
        assert np.all(np.isfinite(data[:, ~nan[0]]))
        assert int(nan[0].sum()) == patch["nodata_pixels"]
        if patch["sar"] not in recorded:
            assert not nan.any()
            continue
        with_border += 1
        entry = recorded[patch["sar"]]
        assert entry["pixels"] == patch["nodata_pixels"] > 0
        # turn the strip so that it lies along the west edge
        turns = {"west": 0, "north": 1, "east": 2, "south": 3}[entry["edge"]]
        strip = np.rot90(nan[0], turns)
        assert strip[:, 0].all() and not strip[:, -1].any()
        # a strip, not scattered pixels: each row is NaN from the edge inwards
        depth = strip.sum(axis=1)
        assert np.array_equal(strip, np.arange(SIZE)[None, :] < depth[:, None])
        assert depth.max() <= 0.4 * SIZE + 3
    assert with_border == len(recorded) >= 1
    assert with_border < len(info["patches"])
    assert info["nodata_pixels"] == sum(p["pixels"] for p in recorded.values())


def test_vv_is_the_db_of_the_png_datasets_intensity(tree, png, scenes):
    out, info = tree
    png_out, _ = png
    lo, hi = DB_RANGE
    for patch in info["patches"]:
        data, _ = read_tif(out / patch["sar"])
        scene = scenes[patch["split"], patch["index"]]
        valid = np.isfinite(data[0])
        expected = 10 * np.log10(scene["sar_linear"].astype(np.float64))
        np.testing.assert_allclose(data[0][valid], expected[valid], atol=2e-5)
        # and the PNG of the same seed is that dB, clipped and scaled
        png_sar = np.asarray(
            Image.open(png_out / patch["split"] / "sar" / f"{patch['index']:05d}.png")
        )
        scaled = np.clip((data[0][valid] - lo) / (hi - lo), 0, 1) * 255
        assert np.abs(scaled - png_sar[valid]).max() <= 0.5 + 1e-3


def test_vh_class_means_match_the_declared_levels(sar_stack):
    vv, vh, cls, sigma0 = sar_stack
    bias = speckle_db_bias(LOOKS)
    checked = 0
    for c in CLASSES:
        sel = cls == c.id
        if sel.sum() < 300:
            continue
        checked += 1
        # over many parcels the per-parcel offsets average out...
        assert vh[sel].mean() - bias == pytest.approx(c.sigma0_vh_db, abs=1.0), c.name
        # ...and with them taken out (the parcel's VV offset applies to VH
        # as well) only the speckle's closed-form bias is left
        offset_db = 10 * np.log10(sigma0[sel] / c.sigma0)
        residual = vh[sel] - c.sigma0_vh_db - offset_db
        assert residual.mean() == pytest.approx(bias, abs=0.25), c.name
    assert checked >= 5


def test_field_classes_differ_in_vh_as_declared(sar_stack):
    vv, vh, cls, _ = sar_stack
    ratios = {}
    for name in FIELDS:
        c = CLASSES[ID[name]]
        sel = cls == c.id
        assert sel.sum() >= 300, name
        # VH - VV: the parcels' offsets and the speckle biases cancel
        ratios[name] = (vh[sel] - vv[sel]).mean()
        assert ratios[name] == pytest.approx(c.sigma0_vh_db - c.sigma0_db, abs=0.4), (
            name
        )
    assert [ratios[n] for n in FIELDS] == sorted(ratios.values())


# ---------------------------------------------------------------------------
# optical and class maps


def test_optical_bands(tree, png):
    out, info = tree
    png_out, _ = png
    for patch in info["patches"]:
        data, meta = read_tif(out / patch["opt"])
        assert meta["count"] == 13 and data.dtype == np.uint16
        assert meta["descriptions"] == S2_ORDER
        rgb = np.stack([data[3], data[2], data[1]], axis=-1) * (255 / 3000)
        expected = np.asarray(
            Image.open(png_out / patch["split"] / "opt" / f"{patch['index']:05d}.png")
        )
        assert np.abs(rgb - expected).max() <= 0.5


def test_near_infrared_is_plausible(tree, scenes):
    out, info = tree
    red, nir, cls = [], [], []
    for patch in info["patches"]:
        data, _ = read_tif(out / patch["opt"])
        red.append(data[3].ravel())
        nir.append(data[7].ravel())
        cls.append(scenes[patch["split"], patch["index"]]["cls"].ravel())
    red, nir, cls = (np.concatenate(a).astype(np.float64) for a in (red, nir, cls))
    for name in ("crop_green", "grassland", "forest"):
        sel = cls == ID[name]
        assert nir[sel].mean() > 2 * red[sel].mean(), name
    water = cls == ID["water"]
    if water.any():
        assert nir[water].mean() < red[water].mean()


def test_class_maps(tree, png):
    out, info = tree
    png_out, _ = png
    for patch in info["patches"]:
        expected = np.asarray(
            Image.open(png_out / patch["split"] / "cls" / f"{patch['index']:05d}.png")
        )
        if patch["split"] == "train":
            data, meta = read_tif(out / patch["lc"])
            assert meta["count"] == 1 and data.dtype == np.uint8
            np.testing.assert_array_equal(data[0], expected)
        else:
            np.testing.assert_array_equal(
                np.asarray(Image.open(out / patch["cls"])), expected
            )


# ---------------------------------------------------------------------------
# dataset.json, determinism, arguments


def test_dataset_json(tree, png):
    out, info = tree
    png_out, png_info = png
    assert json.loads((out / "dataset.json").read_text()) == info
    assert info["format"] == "sen12ms"
    assert (info["seed"], info["image_size"], info["looks"]) == (SEED, SIZE, LOOKS)
    assert (info["num_train"], info["num_test"]) == (COUNTS["train"], COUNTS["test"])
    assert (info["crs"], info["pixel_size"]) == ("EPSG:32632", 10.0)
    assert info["optical_scale"]["dn"] == 3000 and info["optical_scale"]["rgb"] == 255
    for entry, c in zip(info["classes"], CLASSES, strict=True):
        assert (entry["id"], entry["name"]) == (c.id, c.name)
        assert entry["vv_db"] == pytest.approx(c.sigma0_db, abs=1e-3)
        assert entry["vh_db"] == pytest.approx(c.sigma0_vh_db, abs=1e-3)
    # the same scenes as the PNG dataset, so the same class colours
    assert info["class_mean_rgb"] == png_info["class_mean_rgb"]
    np.testing.assert_array_equal(
        load_class_colours(out / "dataset.json"),
        load_class_colours(png_out / "dataset.json"),
    )
    for flag in (
        "--data_dir_sar OUT/train",
        "--data_dir_opt OUT/train",
        "--sar_input db",
        "--sar_channels 2",
        "--opt_bands 4,3,2",
        "--opt_range 0,3000",
    ):
        assert flag in info["train_flags"]
    assert info["sample_flags"] == "--data_dir OUT/test"


def arrays(root):
    found = {}
    for p in sorted(root.rglob("*")):
        if p.suffix == ".tif":
            found[p.relative_to(root)] = read_tif(p)[0]
        elif p.suffix == ".png":
            found[p.relative_to(root)] = np.asarray(Image.open(p))
    return found


def test_same_seed_same_arrays(tmp_path):
    options = dict(num_train=4, num_test=1, image_size=SIZE, progress=False)
    options["nodata_share"] = 0.5
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        make_sen12ms_dataset(tmp_path / name, seed=seed, **options)
    first, second, other = (arrays(tmp_path / n) for n in "abc")
    assert len(first) == 3 * 4 + 3 * 1
    assert first.keys() == second.keys() == other.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        if "/s1_" in key.as_posix() or "/sar/" in key.as_posix():
            assert not np.array_equal(first[key], other[key], equal_nan=True), key
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (
        tmp_path / "b" / "dataset.json"
    ).read_bytes()

    # a smaller rerun leaves no unpaired patches behind, other files stay
    (tmp_path / "a" / "notes.txt").write_text("keep me")
    make_sen12ms_dataset(tmp_path / "a", seed=3, **dict(options, num_train=2))
    assert len(list((tmp_path / "a" / "train").rglob("*.tif"))) == 3 * 2
    assert (tmp_path / "a" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_train=0), "num_train"),
        (dict(num_test=-1), "num_test"),
        (dict(image_size=4), "image size"),
        (dict(seed=-1), "seed"),
        (dict(looks=0), "looks"),
        (dict(nodata_share=1.5), "nodata_share"),
    ],
)
def test_rejects_bad_arguments(tmp_path, change, message):
    options = dict(num_train=1, num_test=1, image_size=SIZE, seed=0, progress=False)
    with pytest.raises(ValueError, match=message):
        make_sen12ms_dataset(tmp_path / "out", **dict(options, **change))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# command line


def run_script(*args):
    env = dict(os.environ)
    # the scripts import the package; make it importable from the checkout
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_script_writes_sen12ms_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "data"
    small = ["--num_train", "3", "--num_test", "1", "--image_size", str(SIZE)]
    first = run_script("--out", str(out), "--format", "sen12ms", *small)
    assert first.returncode == 0, first.stderr
    assert f"--data_dir_sar {out / 'train'} --data_dir_opt {out / 'train'}" in (
        first.stdout
    )
    assert "--sar_input db --sar_channels 2 --opt_bands 4,3,2" in first.stdout
    assert f"--data_dir {out / 'test'}" in first.stdout
    info = json.loads((out / "dataset.json").read_text())
    assert info["format"] == "sen12ms" and info["num_train"] == 3
    assert len(list(out.rglob("*.tif"))) == 3 * 3 + 2
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    refused = run_script("--out", str(out), "--format", "sen12ms", *small)
    assert refused.returncode != 0
    assert "--overwrite" in refused.stderr and str(out) in refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_large_scene_is_the_generator_s_scene_on_one_grid(tmp_path):
    from guided_diffusion.demo.sen12ms import make_scene

    paths = make_scene(tmp_path, height=96, width=160, seed=4)
    rng = np.random.default_rng(np.random.SeedSequence([4, 2, 0]))
    scene = generate_scene(rng, 160, 4, cross_pol=True, feature_size=32)
    with rasterio.open(paths["sar"]) as src:
        sar, names, transform = src.read(), src.descriptions, src.transform
        assert src.crs.to_epsg() == 32632 and src.res == (10.0, 10.0)
    assert sar.shape == (2, 96, 160) and names == ("VV", "VH")
    expected = 10 * np.log10(scene["sar_linear"][:96].astype(np.float64))
    np.testing.assert_allclose(sar[0], expected, rtol=0, atol=1e-4)
    with rasterio.open(paths["opt"]) as src:
        opt = src.read([4, 3, 2])
        assert src.transform == transform  # SAR and optical share one grid
    np.testing.assert_allclose(
        opt.transpose(1, 2, 0).astype(np.float64) * 255 / 3000,
        scene["opt"][:96],
        atol=0.5,
    )
    assert (np.asarray(Image.open(paths["rgb"])) == scene["opt"][:96]).all()
    assert (np.asarray(Image.open(paths["cls"])) == scene["cls"][:96]).all()
    with pytest.raises(ValueError, match="image size must be at least"):
        make_scene(tmp_path, height=8, width=160, seed=4)


def _boundary_share(cls_map):
    """The share of pixels whose class differs from the pixel to their right."""
    return float((cls_map[:, 1:] != cls_map[:, :-1]).mean())


def test_a_large_scene_has_the_features_of_small_patches_when_asked():
    # parcels as large as in 32-pixel patches: class boundaries as dense as there,
    # and far denser than in one scene drawn at 256 pixels
    patches = np.mean([
        _boundary_share(generate_scene(np.random.default_rng(s), 32)["cls"]) for s in range(40)
    ])  # fmt: skip
    large = generate_scene(np.random.default_rng(1), 256, feature_size=32)["cls"]
    plain = generate_scene(np.random.default_rng(1), 256)["cls"]
    assert 0.6 < _boundary_share(large) / patches < 1.6
    assert _boundary_share(plain) < 0.5 * _boundary_share(large)
    # every kind of feature is there: fields, water, roads and houses
    present = set(np.unique(large).tolist())
    assert {ID["water"], ID["road"]} <= present
    assert {ID["roof_red"], ID["roof_grey"]} & present
