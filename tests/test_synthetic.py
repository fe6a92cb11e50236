"""Tests of the procedural SAR/optical scene generator and its dataset writer."""

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.demo.scenes import (
    CLASSES,
    DB_RANGE,
    DOUBLE_BOUNCE_SIGMA0,
    SHADOW_SIGMA0,
    explained_variance_share,
    generate_scene,
    make_dataset,
    simulate_sar,
)

ROOT = Path(__file__).resolve().parents[1]
ID = {c.name: c.id for c in CLASSES}
EULER_GAMMA = 0.5772156649015329


def scenes(size, count, seed=0):
    return [
        generate_scene(np.random.default_rng([seed, i]), size) for i in range(count)
    ]


def read(path):
    return np.asarray(Image.open(path))


def reference_r2(opts, cls_maps):
    """R^2 of the optical colour on the class map, straight from its definition."""
    pixels = np.concatenate([o.reshape(-1, 3) for o in opts]).astype(np.float64)
    labels = np.concatenate([c.reshape(-1) for c in cls_maps])
    within = 0.0
    for c in np.unique(labels):
        group = pixels[labels == c]
        within += np.sum((group - group.mean(axis=0)) ** 2)
    total = np.sum((pixels - pixels.mean(axis=0)) ** 2)
    return 1.0 - within / total


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    info = make_dataset(
        out, num_train=12, num_test=3, image_size=32, seed=5, progress=False
    )
    return out, info


# ---------------------------------------------------------------------------
# class table


def test_class_table_is_consistent():
    assert [c.id for c in CLASSES] == list(range(len(CLASSES)))
    assert len({c.name for c in CLASSES}) == len(CLASSES)
    for c in CLASSES:
        assert len(c.rgb) == 3 and all(0 <= v <= 255 for v in c.rgb)
        assert c.sigma0 > 0 and c.sigma0_vh > 0
        assert c.sigma0_db == pytest.approx(10 * np.log10(c.sigma0))
        assert c.sigma0_vh_db == pytest.approx(10 * np.log10(c.sigma0_vh))


def test_classes_share_backscatter_but_not_colour():
    # the SAR image alone must leave the colour of some pixels undecided: a
    # group of at least three classes with one sigma0 and clearly different
    # colours
    groups = {}
    for c in CLASSES:
        groups.setdefault(c.sigma0, []).append(c)
    largest = max(groups.values(), key=len)
    assert len(largest) >= 3
    for a, b in combinations(largest, 2):
        assert np.linalg.norm(np.subtract(a.rgb, b.rgb)) > 40, (a.name, b.name)


# ---------------------------------------------------------------------------
# radar simulation on hand-made class maps


def band_map(names, width=64, height=256):
    """Vertical bands of the named classes, each `width` pixels wide."""
    return np.repeat([ID[n] for n in names], width)[None, :].repeat(height, 0)


@pytest.mark.parametrize("looks", [1, 4])
def test_speckle_statistics_in_homogeneous_regions(looks):
    names = ["water", "crop_green", "forest", "roof_red"]
    cls_map = band_map(names).astype(np.uint8)
    sar, linear, sigma0 = simulate_sar(cls_map, np.random.default_rng(1), looks)
    assert sar.dtype == np.uint8 and linear.dtype == sigma0.dtype == np.float32

    means = {}
    for k, name in enumerate(names):
        # stay clear of the band edges, where roofs have double bounce and shadow
        inner = slice(k * 64 + 4, (k + 1) * 64 - 4)
        region = linear[:, inner].astype(np.float64)
        true_sigma0 = CLASSES[ID[name]].sigma0
        np.testing.assert_allclose(sigma0[:, inner], true_sigma0, rtol=1e-6)
        # Gamma(L, 1/L) speckle: mean 1, coefficient of variation 1/sqrt(L)
        assert region.mean() == pytest.approx(true_sigma0, rel=0.05)
        cv = region.std() / region.mean()
        assert cv == pytest.approx(1 / np.sqrt(looks), rel=0.1)
        # E[10 log10 G] = 10 / ln 10 * (digamma(L) - ln L), digamma(L) for integer L
        digamma = -EULER_GAMMA + sum(1.0 / j for j in range(1, looks))
        db_bias = 10 * np.log10(region / true_sigma0).mean()
        assert db_bias == pytest.approx(
            10 / np.log(10) * (digamma - np.log(looks)), abs=0.1
        )
        means[name] = region.mean()
    assert means["water"] < means["crop_green"] < means["forest"] < means["roof_red"]


def test_sar_uint8_is_the_clipped_db_of_the_linear_intensity():
    cls_map = band_map(["water", "grassland", "roof_grey"], width=32, height=32)
    sar, linear, _ = simulate_sar(cls_map, np.random.default_rng(2), looks=4)
    lo, hi = DB_RANGE
    db = 10 * np.log10(linear.astype(np.float64))
    expected = np.round(np.clip((db - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(sar, expected)
    # the three bands cover dark, middle and clipped-bright values
    assert sar.min() < 150 and sar.max() == 255


@pytest.mark.parametrize(
    "side, lit_column, shadow_column", [("west", 20, 30), ("east", 29, 19)]
)
def test_double_bounce_on_the_wall_facing_the_sensor(side, lit_column, shadow_column):
    cls_map = np.full((48, 48), ID["crop_yellow"], np.uint8)
    cls_map[20:30, 20:30] = ID["roof_red"]
    _, _, sigma0 = simulate_sar(
        cls_map, np.random.default_rng(3), looks=4, sensor_side=side
    )
    roof_level = CLASSES[ID["roof_red"]].sigma0
    assert np.all(sigma0[20:30, lit_column] == np.float32(DOUBLE_BOUNCE_SIGMA0))
    assert DOUBLE_BOUNCE_SIGMA0 > 10 * roof_level
    # the wall on the far side is not lit but throws radar shadow behind it
    far_wall = 29 if lit_column == 20 else 20
    np.testing.assert_allclose(sigma0[20:30, far_wall], roof_level, rtol=1e-6)
    assert np.all(sigma0[20:30, shadow_column] == np.float32(SHADOW_SIGMA0))
    # the top and bottom edges face neither way
    np.testing.assert_allclose(sigma0[20, 21:29], roof_level, rtol=1e-6)
    np.testing.assert_allclose(sigma0[19, 21:29], CLASSES[ID["crop_yellow"]].sigma0)


def test_simulate_sar_rejects_bad_arguments():
    cls_map = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="looks"):
        simulate_sar(cls_map, np.random.default_rng(0), looks=0)
    with pytest.raises(ValueError, match="sensor_side"):
        simulate_sar(cls_map, np.random.default_rng(0), sensor_side="up")
    with pytest.raises(ValueError, match="class ids"):
        simulate_sar(cls_map + len(CLASSES), np.random.default_rng(0))


# ---------------------------------------------------------------------------
# scenes


@pytest.mark.parametrize("size", [32, 64])
def test_scene_arrays(size):
    scene = generate_scene(np.random.default_rng(11), size)
    assert scene["opt"].shape == (size, size, 3) and scene["opt"].dtype == np.uint8
    for key, dtype in [
        ("sar", np.uint8),
        ("cls", np.uint8),
        ("sar_linear", np.float32),
        ("sigma0", np.float32),
    ]:
        assert scene[key].shape == (size, size) and scene[key].dtype == dtype, key
    assert scene["cls"].max() < len(CLASSES)
    assert np.all(scene["sigma0"] > 0) and np.all(scene["sar_linear"] > 0)
    again = generate_scene(np.random.default_rng(11), size)
    for key in scene:
        np.testing.assert_array_equal(scene[key], again[key])


def test_small_scenes_are_simple_not_noise():
    # at 32 px a scene is a handful of parcels: mostly large uniform areas,
    # yet more than one kind of land cover
    boundary, kinds = [], []
    for scene in scenes(32, 40):
        cls_map = scene["cls"]
        edge = np.zeros(cls_map.shape, bool)
        edge[:, :-1] |= cls_map[:, :-1] != cls_map[:, 1:]
        edge[:-1] |= cls_map[:-1] != cls_map[1:]
        boundary.append(edge.mean())
        kinds.append(len(np.unique(cls_map)))
    assert np.mean(boundary) < 0.25
    assert np.mean(kinds) >= 3


@pytest.mark.parametrize("size", [32, 64])
def test_class_map_explains_part_of_the_colour(size):
    batch = scenes(size, 200, seed=size)
    opts = [s["opt"] for s in batch]
    cls_maps = [s["cls"] for s in batch]
    share = explained_variance_share(opts, cls_maps)
    assert share == pytest.approx(reference_r2(opts, cls_maps), rel=1e-9)
    assert 0.5 <= share <= 0.85


def test_explained_variance_share_extremes():
    cls_map = np.zeros((4, 4), np.uint8)
    cls_map[:, 2:] = 3
    opt = np.zeros((4, 4, 3), np.uint8)
    opt[:, 2:] = (200, 40, 90)
    # colour fixed by class: all variance explained
    assert explained_variance_share([opt], [cls_map]) == pytest.approx(1.0)
    # one class for the whole image: nothing explained
    assert explained_variance_share([opt], [np.zeros_like(cls_map)]) == pytest.approx(
        0.0, abs=1e-12
    )
    # colour varies only inside each class (checkerboard): again nothing
    checker = np.zeros((4, 4, 3), np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 100
    assert explained_variance_share([checker], [cls_map]) == pytest.approx(
        0.0, abs=1e-12
    )


def test_sar_looks_like_sen12():
    sar = np.stack([s["sar"] for s in scenes(64, 30)]).astype(np.float64)
    # SEN1-2's 8-bit VV images are bright and low in contrast
    assert 150 <= sar.mean() <= 230
    assert 8 <= sar.reshape(30, -1).std(axis=1).mean() <= 35


# ---------------------------------------------------------------------------
# dataset on disk


def test_dataset_layout_and_modes(dataset):
    out, _ = dataset
    for split, count in [("train", 12), ("test", 3)]:
        names = {
            kind: sorted(p.name for p in (out / split / kind).iterdir())
            for kind in ("sar", "opt", "cls")
        }
        assert names["sar"] == names["opt"] == names["cls"]
        assert names["sar"] == [f"{i:05d}.png" for i in range(count)]
        for name in names["sar"]:
            images = {kind: Image.open(out / split / kind / name) for kind in names}
            assert images["sar"].mode == "L" and images["cls"].mode == "L"
            assert images["opt"].mode == "RGB"
            assert {im.size for im in images.values()} == {(32, 32)}
            assert read(out / split / "cls" / name).max() < len(CLASSES)


def test_dataset_json_matches_the_files(dataset):
    out, info = dataset
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk == info
    assert (info["seed"], info["image_size"]) == (5, 32)
    assert (info["num_train"], info["num_test"], info["looks"]) == (12, 3, 4)
    assert info["classes"] == [
        dict(
            id=c.id,
            name=c.name,
            rgb=list(c.rgb),
            sigma0=c.sigma0,
            sigma0_vh=c.sigma0_vh,
        )
        for c in CLASSES
    ]

    train = sorted((out / "train" / "opt").iterdir())
    opts = [read(p) for p in train]
    cls_maps = [read(out / "train" / "cls" / p.name) for p in train]
    assert info["explained_variance_share"] == pytest.approx(
        reference_r2(opts, cls_maps), abs=1e-6
    )
    pixels = np.concatenate([o.reshape(-1, 3) for o in opts]).astype(np.float64)
    labels = np.concatenate([c.reshape(-1) for c in cls_maps])
    for c in CLASSES:
        if np.any(labels == c.id):
            np.testing.assert_allclose(
                info["class_mean_rgb"][c.id], pixels[labels == c.id].mean(0), atol=1e-3
            )
        else:
            assert info["class_mean_rgb"][c.id] is None
    assert sum(info["class_pixel_share"]) == pytest.approx(1.0)
    sar = np.stack([read(p) for p in sorted((out / "train" / "sar").iterdir())])
    assert info["sar_mean"] == pytest.approx(sar.mean(), abs=1e-3)


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    options = dict(num_train=4, num_test=2, image_size=32, progress=False)
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        make_dataset(tmp_path / name, seed=seed, **options)
    first, second, other = (files(tmp_path / n) for n in "abc")
    assert len(first) == 3 * (4 + 2) + 1
    assert first == second
    for path, content in first.items():
        if path.suffix == ".png":
            assert other[path] != content, path
    # test scenes are not copies of training scenes
    for i in range(2):
        name = Path(f"{i:05d}.png")
        assert first["train/opt" / name] != first["test/opt" / name]


def test_make_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        make_dataset(tmp_path, num_train=0, num_test=1, image_size=32, seed=0)
    with pytest.raises(ValueError, match="image size"):
        make_dataset(tmp_path, num_train=1, num_test=1, image_size=4, seed=0)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# command line


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_script_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "data"
    small = ["--num_train", "3", "--num_test", "1", "--image_size", "32"]
    first = run_script("--out", str(out), *small)
    assert first.returncode == 0, first.stderr
    assert "explained" in first.stdout and str(out / "train" / "sar") in first.stdout
    (out / "notes.txt").write_text("keep me")
    before = files(out)

    refused = run_script("--out", str(out), *small)
    assert refused.returncode != 0
    assert "--overwrite" in refused.stderr and str(out) in refused.stderr
    assert files(out) == before

    # a smaller rerun leaves no unpaired scenes behind and keeps other files
    small[1] = "2"
    rerun = run_script("--out", str(out), *small, "--seed", "1", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    for kind in ("sar", "opt", "cls"):
        assert sorted(p.name for p in (out / "train" / kind).iterdir()) == [
            "00000.png",
            "00001.png",
        ]
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "dataset.json").read_text())["seed"] == 1
