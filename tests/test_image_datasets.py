"""Pairing, loading, augmentation and sharding of SAR/optical training data."""

import os

import numpy as np
import pytest
import torch as th
from conftest import REAL_PAIRS
from PIL import Image

from guided_diffusion.image_datasets import (
    DataError,
    GlobalBatchSampler,
    PairedDataset,
    find_pairs,
    find_test_pairs,
    load_data,
    load_opt,
    load_sar,
    natural_key,
)


def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)


def save_pair(sar_path, opt_path, value, size=8):
    """A pair whose pixels carry ``value``, so a misalignment shows in the content."""
    save(sar_path, np.full((size, size), value, np.uint8))
    opt = np.zeros((size, size, 3), np.uint8)
    opt[..., 0], opt[..., 1], opt[..., 2] = value, 255 - value, 7
    save(opt_path, opt)


def to_uint8(x):
    return np.rint((np.asarray(x) + 1) * 127.5).astype(np.int64)


def assert_pairs_match(pairs, image_size=8):
    """Every SAR image carries the same value as the red channel of its partner."""
    dataset = PairedDataset(pairs, image_size)
    for i in range(len(pairs)):
        x = to_uint8(dataset[i, 0])
        assert x.shape == (6, image_size, image_size)
        value = x[0, 0, 0]
        assert (x[:3] == value).all()
        assert (x[3] == value).all() and (x[4] == 255 - value).all()
        assert (x[5] == 7).all()


def random_pairs(root, n, size=10, seed=0):
    """Pairs with random asymmetric content; the SAR is the optical's red channel."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        opt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        save(root / "sar" / f"{i}.png", opt[..., 0])
        save(root / "opt" / f"{i}.png", opt)
    return str(root / "sar"), str(root / "opt")


def take(iterator, n):
    batches = []
    for _ in range(n):
        batch, kwargs = next(iterator)
        assert kwargs == {}
        batches.append(batch)
    return batches


# -- discovery and pairing ---------------------------------------------------


def test_natural_key_orders_numbers_by_value():
    names = ["10.png", "a10/b.png", "2.png", "a2/b.png", "1.png", "b/1.png"]
    assert sorted(names, key=natural_key) == [
        "1.png",
        "2.png",
        "10.png",
        "a2/b.png",
        "a10/b.png",
        "b/1.png",
    ]


def sen12_names(sensor):
    names = []
    for roi, season in (("ROIs1158", "spring"), ("ROIs1868", "summer")):
        for scene in (1, 12):
            for patch in (3, 30, 100):
                folder = f"{roi}_{season}/{sensor}_{scene}"
                names.append(f"{folder}/{roi}_{season}_{sensor}_{scene}_p{patch}.png")
    return names


def test_sen12_two_roots(tmp_path):
    for i, (s1, s2) in enumerate(zip(sen12_names("s1"), sen12_names("s2"))):
        save_pair(tmp_path / "sar" / s1, tmp_path / "opt" / s2, 10 * i)
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    assert [name for _, _, name in pairs] == sen12_names("s1")
    assert [os.path.relpath(o, tmp_path / "opt") for _, o, _ in pairs] == sen12_names(
        "s2"
    )
    assert_pairs_match(pairs)


def test_sen12_one_root(tmp_path):
    for i, (s1, s2) in enumerate(zip(sen12_names("s1"), sen12_names("s2"))):
        save_pair(tmp_path / s1, tmp_path / s2, 10 * i)
    pairs = find_pairs(str(tmp_path), str(tmp_path))
    assert [name for _, _, name in pairs] == sen12_names("s1")
    assert_pairs_match(pairs)
    # under one root a file of neither sensor is as unpaired as a lone s1 file
    save(tmp_path / "extra.png", np.zeros((8, 8), np.uint8))
    os.remove(tmp_path / sen12_names("s2")[4])
    with pytest.raises(DataError) as err:
        find_pairs(str(tmp_path), str(tmp_path))
    assert str(tmp_path / sen12_names("s1")[4]) in str(err.value)
    assert str(tmp_path / "extra.png") in str(err.value)
    assert "1 other unpaired file:" in str(err.value)


def test_numeric_names_and_subfolders(tmp_path):
    names = ["1.png", "2.png", "10.png", "a/3.png", "a/20.png"]
    # written in an order that neither alphabetical nor creation order would fix
    for name, value in zip(reversed(names), (5, 40, 80, 120, 200)):
        save_pair(tmp_path / "sar" / name, tmp_path / "opt" / name, value)
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    assert [name for _, _, name in pairs] == names
    assert_pairs_match(pairs)


def test_partner_may_differ_in_extension_only(tmp_path):
    save(tmp_path / "sar" / "1.tif", np.full((8, 8), 50, np.uint8))
    save(tmp_path / "opt" / "1.png", np.full((8, 8, 3), 50, np.uint8))
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    assert pairs == [
        (str(tmp_path / "sar" / "1.tif"), str(tmp_path / "opt" / "1.png"), "1.tif")
    ]
    save(tmp_path / "opt" / "1.jpg", np.full((8, 8, 3), 50, np.uint8))
    with pytest.raises(DataError, match="1.tif") as err:
        find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    assert "1.png" in str(err.value) and "1.jpg" in str(err.value)


def test_hidden_files_and_non_images_are_ignored(tmp_path):
    save_pair(tmp_path / "sar" / "1.png", tmp_path / "opt" / "1.png", 9)
    save(tmp_path / "sar" / ".2.png", np.zeros((8, 8), np.uint8))
    save(tmp_path / "sar" / ".cache" / "3.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "opt" / "notes.txt").write_text("not an image")
    assert len(find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))) == 1


def test_unpaired_files_are_named(tmp_path):
    for name in ("1.png", "2.png", "3.png"):
        save_pair(tmp_path / "sar" / name, tmp_path / "opt" / name, 9)
    os.rename(tmp_path / "opt" / "3.png", tmp_path / "opt" / "4.png")
    with pytest.raises(DataError) as err:
        find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    message = str(err.value)
    assert str(tmp_path / "sar" / "3.png") in message
    assert str(tmp_path / "opt" / "4.png") in message
    assert "1.png" not in message.split(";")[0]
    assert "\n" not in message
    assert "s1" in message and "same relative path" in message


def test_many_unpaired_files_are_counted(tmp_path):
    for i in range(8):
        save(tmp_path / "sar" / f"{i}.png", np.zeros((8, 8), np.uint8))
    save(tmp_path / "opt" / "other.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError) as err:
        find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    message = str(err.value)
    named = [i for i in range(8) if str(tmp_path / "sar" / f"{i}.png") in message]
    assert named == [0, 1, 2, 3, 4]
    assert "8 other unpaired files" in message and "4 more" in message


def test_missing_and_empty_folders(tmp_path):
    save(tmp_path / "sar" / "1.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(tmp_path / "opt")):
        find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        find_pairs(str(tmp_path / "sar"), str(tmp_path / "nowhere"))


def test_test_pairs_with_and_without_ground_truth(tmp_path):
    for name in ("2.png", "10.png"):
        save(tmp_path / "sar" / name, np.zeros((8, 8), np.uint8))
    assert find_test_pairs(str(tmp_path)) == [
        (str(tmp_path / "sar" / "2.png"), None, "2.png"),
        (str(tmp_path / "sar" / "10.png"), None, "10.png"),
    ]
    save(tmp_path / "opt" / "10.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="2.png"):
        find_test_pairs(str(tmp_path))
    save(tmp_path / "opt" / "2.png", np.zeros((8, 8, 3), np.uint8))
    assert [o for _, o, _ in find_test_pairs(str(tmp_path))] == [
        str(tmp_path / "opt" / "2.png"),
        str(tmp_path / "opt" / "10.png"),
    ]
    with pytest.raises(DataError, match="sar"):
        find_test_pairs(str(tmp_path / "opt"))


# -- image loading -------------------------------------------------------------


def test_downscale_is_box_halving_then_center_crop(tmp_path):
    # constant 4x4 blocks survive two BOX halvings as single pixels, exactly
    blocks = np.random.default_rng(0).integers(0, 256, (8, 16), dtype=np.uint8)
    save(tmp_path / "wide.png", np.kron(blocks, np.ones((4, 4), np.uint8)))
    x = to_uint8(load_sar(str(tmp_path / "wide.png"), 8))
    # 64x32 -> 32x16 -> 16x8, then the middle 8 of 16 columns
    assert x.shape == (3, 8, 8)
    np.testing.assert_array_equal(x[0], blocks[:, 4:12])
    np.testing.assert_array_equal(x[1], x[0])
    np.testing.assert_array_equal(x[2], x[0])


def test_small_image_is_upsampled(tmp_path):
    opt = np.zeros((5, 7, 3), np.uint8)
    opt[:, :, 0] = 200
    opt[:, 4:, 1] = 255
    save(tmp_path / "small.png", opt)
    x = to_uint8(load_opt(str(tmp_path / "small.png"), 16))
    assert x.shape == (3, 16, 16)
    assert (x[0] == 200).all() and (x[2] == 0).all()
    assert x[1, :, :4].mean() < 60 < 200 < x[1, :, -4:].mean()


def test_sar_modes_and_channels(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    save(tmp_path / "l.png", grey)
    x3 = to_uint8(load_sar(str(tmp_path / "l.png"), 8, sar_channels=3))
    x1 = to_uint8(load_sar(str(tmp_path / "l.png"), 8, sar_channels=1))
    assert x3.shape == (3, 8, 8) and x1.shape == (1, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(x3[c], grey)
    np.testing.assert_array_equal(x1[0], grey)

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 150, 200]])
    rgb = np.repeat(colours[:, None], 4, axis=1).astype(np.uint8)  # 4 rows x 4 pixels
    save(tmp_path / "rgb.png", rgb)
    x3 = to_uint8(load_sar(str(tmp_path / "rgb.png"), 4, sar_channels=3))
    np.testing.assert_array_equal(x3.transpose(1, 2, 0), rgb)
    x1 = to_uint8(load_sar(str(tmp_path / "rgb.png"), 4, sar_channels=1))
    luma = colours @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert np.abs(x1[0] - luma[:, None]).max() <= 1


def test_values_scale_to_minus_one_one(tmp_path):
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    save(tmp_path / "ramp.png", ramp)
    x = load_sar(str(tmp_path / "ramp.png"), 16, sar_channels=1)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0], ramp / 127.5 - 1, atol=1e-6)
    assert x.min() == -1 and x.max() == 1


def test_optical_palette_and_alpha_become_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 128
    save(tmp_path / "rgba.png", rgba)
    Image.new("P", (8, 8), 3).save(tmp_path / "p.png")
    assert (
        to_uint8(load_opt(str(tmp_path / "rgba.png"), 8))[:, 0, 0] == (10, 20, 30)
    ).all()
    assert load_opt(str(tmp_path / "p.png"), 8).shape == (3, 8, 8)


def test_16_bit_sar_is_refused(tmp_path):
    save(tmp_path / "sar16.png", np.full((8, 8), 4000, np.uint16))
    with pytest.raises(DataError, match="8-bit") as err:
        load_sar(str(tmp_path / "sar16.png"), 8)
    assert str(tmp_path / "sar16.png") in str(err.value)
    save(tmp_path / "opt16.tif", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(DataError, match="opt16.tif"):
        load_opt(str(tmp_path / "opt16.tif"), 8)


def test_pair_of_different_sizes_is_refused(tmp_path):
    save(tmp_path / "sar" / "1.png", np.zeros((8, 8), np.uint8))
    save(tmp_path / "opt" / "1.png", np.zeros((8, 9, 3), np.uint8))
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    with pytest.raises(DataError) as err:
        PairedDataset(pairs, 8)[0, 0]
    assert str(tmp_path / "sar" / "1.png") in str(err.value)
    assert str(tmp_path / "opt" / "1.png") in str(err.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_one_line_error(tmp_path, num_workers):
    for i in range(4):
        save_pair(tmp_path / "sar" / f"{i}.png", tmp_path / "opt" / f"{i}.png", i)
    (tmp_path / "opt" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a PNG")
    batches = load_data(
        data_dir_sar=str(tmp_path / "sar"),
        data_dir_opt=str(tmp_path / "opt"),
        batch_size=4,
        image_size=8,
        deterministic=True,
        num_workers=num_workers,
    )
    with pytest.raises(DataError) as err:
        next(batches)
    assert str(tmp_path / "opt" / "2.png") in str(err.value)
    assert "\n" not in str(err.value)


# -- augmentation ----------------------------------------------------------------


def test_crop_and_flip_are_shared_by_the_pair(tmp_path):
    rng = np.random.default_rng(2)
    opt = rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)
    save(tmp_path / "sar" / "1.png", opt[..., 0])
    save(tmp_path / "opt" / "1.png", opt)
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    dataset = PairedDataset(pairs, 8, random_crop=True, random_flip=True)
    center = PairedDataset(pairs, 8)[0, 0]
    seen = set()
    for aug_seed in range(40):
        x = dataset[0, aug_seed]
        assert x.shape == (6, 8, 8)
        np.testing.assert_array_equal(x[0], x[3])
        np.testing.assert_array_equal(x[0], x[1])
        seen.add(x.tobytes())
        np.testing.assert_array_equal(x, dataset[0, aug_seed])
    assert len(seen) > 10 and center.tobytes() not in seen


def test_flip_mirrors_columns(tmp_path):
    opt = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    save(tmp_path / "o.png", opt)
    plain = load_opt(str(tmp_path / "o.png"), 8)
    np.testing.assert_array_equal(
        load_opt(str(tmp_path / "o.png"), 8, flip=True), plain[:, :, ::-1]
    )


# -- order and sharding ----------------------------------------------------------


def test_epoch_orders():
    def indices(sampler, n):
        it = iter(sampler)
        return [[i for i, _ in next(it)] for _ in range(n)]

    shuffled = indices(GlobalBatchSampler(10, 4, seed=5), 4)
    # 10 // 4 = 2 batches per epoch; the last 2 items of each epoch are dropped
    epoch0, epoch1 = shuffled[0] + shuffled[1], shuffled[2] + shuffled[3]
    assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8
    assert epoch0 != epoch1
    assert epoch0 == list(np.random.default_rng([5, 0]).permutation(10)[:8])
    assert indices(GlobalBatchSampler(10, 4, seed=6), 2) != shuffled[:2]
    ordered = indices(GlobalBatchSampler(10, 4, deterministic=True), 3)
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_aug_seeds_depend_on_position_not_rank_count():
    single = iter(GlobalBatchSampler(12, 6, seed=1))
    halves = [
        iter(GlobalBatchSampler(12, 3, rank=r, world_size=2, seed=1)) for r in (0, 1)
    ]
    for _ in range(5):
        assert next(single) == next(halves[0]) + next(halves[1])
    seeds = [s for _, s in next(single)]
    assert len(set(seeds)) == len(seeds)


def test_two_ranks_equal_one_process_at_twice_the_batch(tmp_path):
    dir_sar, dir_opt = random_pairs(tmp_path, 10)
    common = dict(
        data_dir_sar=dir_sar,
        data_dir_opt=dir_opt,
        image_size=8,
        random_crop=True,
        random_flip=True,
        seed=3,
        num_workers=0,
    )
    single = take(load_data(batch_size=4, world_size=1, rank=0, **common), 5)
    ranks = [
        take(load_data(batch_size=2, world_size=2, rank=r, **common), 5) for r in (0, 1)
    ]
    for k in range(5):
        assert th.equal(th.cat([ranks[0][k], ranks[1][k]]), single[k])
    # the two ranks read disjoint halves of each global batch
    assert not th.equal(ranks[0][0], ranks[1][0])


def test_start_batch_resumes_exactly(tmp_path):
    dir_sar, dir_opt = random_pairs(tmp_path, 7)
    common = dict(
        data_dir_sar=dir_sar,
        data_dir_opt=dir_opt,
        batch_size=3,
        image_size=8,
        random_crop=True,
        random_flip=True,
        num_workers=0,
    )
    fresh = take(load_data(**common), 6)
    resumed = take(load_data(start_batch=3, **common), 3)
    for a, b in zip(fresh[3:], resumed):
        assert th.equal(a, b)
    assert not th.equal(fresh[0], fresh[2])


def test_workers_do_not_change_the_data(tmp_path):
    dir_sar, dir_opt = random_pairs(tmp_path, 9)
    common = dict(
        data_dir_sar=dir_sar,
        data_dir_opt=dir_opt,
        batch_size=2,
        image_size=8,
        random_crop=True,
        random_flip=True,
    )
    in_process = take(load_data(num_workers=0, **common), 6)
    workers = take(load_data(num_workers=2, **common), 6)
    for a, b in zip(in_process, workers):
        assert th.equal(a, b)


def test_too_few_pairs_for_a_global_batch(tmp_path):
    dir_sar, dir_opt = random_pairs(tmp_path, 5)
    with pytest.raises(DataError, match="--batch_size") as err:
        load_data(
            data_dir_sar=dir_sar,
            data_dir_opt=dir_opt,
            batch_size=3,
            image_size=8,
            rank=0,
            world_size=2,
        )
    assert dir_sar in str(err.value) and "5 pairs" in str(err.value)


# -- real data ---------------------------------------------------------------------


def test_real_sen12_pairs():
    pairs = find_pairs(f"{REAL_PAIRS}/sar", f"{REAL_PAIRS}/opt")
    assert len(pairs) == 15
    for sar, opt, name in pairs:
        assert os.path.basename(sar) == os.path.basename(opt) == name
    assert natural_key(pairs[0][2]) < natural_key(pairs[-1][2])
    assert pairs[0][2] == "ROIs1158_spring_90_p33.png"
    batches = load_data(
        data_dir_sar=f"{REAL_PAIRS}/sar",
        data_dir_opt=f"{REAL_PAIRS}/opt",
        batch_size=15,
        image_size=64,
        deterministic=True,
        num_workers=0,
    )
    batch, kwargs = next(batches)
    assert kwargs == {}
    assert batch.shape == (15, 6, 64, 64) and batch.dtype == th.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert th.equal(batch[:, 0], batch[:, 1]) and th.equal(batch[:, 0], batch[:, 2])
    # SAR and optical of a pair are different images of the same place
    assert not th.equal(batch[:, 0], batch[:, 3])
