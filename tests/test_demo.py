"""
The demo: its scores and picture (guided_diffusion/demo/report.py), and
demo.sh end to end at a tiny budget, so a change elsewhere cannot break the
demo unnoticed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.demo import report

REPO = Path(__file__).resolve().parents[1]

# Three well separated colours: every colour's own class is its unique nearest.
COLOURS = np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0]], dtype=np.float64)


def paint(cls_maps, colours=COLOURS):
    """Images whose every pixel has the colour of the given class map entry."""
    return colours[cls_maps].astype(np.uint8)


@pytest.fixture
def cls_maps():
    return np.random.default_rng(0).integers(0, 3, (4, 8, 8))


# -- class accuracy -----------------------------------------------------------------


def test_class_accuracy_is_one_for_the_class_colours(cls_maps):
    assert report.class_accuracy(paint(cls_maps), cls_maps, COLOURS) == 1.0


def test_class_accuracy_is_zero_for_the_next_class_colour(cls_maps):
    images = paint((cls_maps + 1) % 3)
    assert report.class_accuracy(images, cls_maps, COLOURS) == 0.0


def test_class_accuracy_counts_the_right_pixels(cls_maps):
    images = paint(cls_maps)
    wrong = np.zeros(cls_maps.shape, bool)
    wrong.reshape(-1)[::5] = True  # 52 of 256 pixels
    images[wrong] = paint((cls_maps[wrong] + 1) % 3)
    expected = 1 - wrong.sum() / wrong.size
    assert report.class_accuracy(images, cls_maps, COLOURS) == expected


def test_class_accuracy_takes_the_nearest_colour_not_the_exact_one():
    # (90, 10, 0) is 91.1 from black and 110.5 from red: nearer to black
    images = np.array([[[[90, 10, 0], [110, 10, 0]]]], dtype=np.uint8)
    assert report.class_accuracy(images, np.array([[[0, 1]]]), COLOURS) == 1.0
    assert report.class_accuracy(images, np.array([[[1, 0]]]), COLOURS) == 0.0


def test_class_accuracy_ties_go_to_the_lower_class_id():
    # (100, 0, 0) lies exactly half way between black (class 0) and red (class 1)
    images = np.array([[[[100, 0, 0]]]], dtype=np.uint8)
    assert report.class_accuracy(images, np.array([[[0]]]), COLOURS) == 1.0
    assert report.class_accuracy(images, np.array([[[1]]]), COLOURS) == 0.0


def test_class_accuracy_unknown_colour_is_never_nearest(cls_maps):
    colours = COLOURS.copy()
    colours[2] = np.nan  # a class that never occurred in the training set
    images = paint(cls_maps)
    expected = np.mean(cls_maps != 2)
    assert report.class_accuracy(images, cls_maps, colours) == expected


def test_class_accuracy_rejects_ids_without_a_colour(cls_maps):
    with pytest.raises(ValueError, match="class ids"):
        report.class_accuracy(paint(cls_maps), cls_maps + 1, COLOURS)


# -- baselines, scores, table -------------------------------------------------------


def test_mean_image_baseline_is_the_pixelwise_mean(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    expected = np.round(images.astype(np.float64).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(report.mean_image_baseline(tmp_path, 16), expected)


def test_mean_image_baseline_needs_images(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        report.mean_image_baseline(tmp_path, 16)


def test_sar_baseline_replicates_the_band():
    sar = np.random.default_rng(2).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    rgb = report.sar_baseline(sar)
    assert rgb.shape == (3, 8, 8, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], sar)


def test_score_against_closed_forms(cls_maps):
    gts = paint(cls_maps) + 20
    same = report.score(gts, gts, cls_maps, COLOURS + 20)
    assert same["ssim"] == pytest.approx(1.0)
    assert same["psnr"] == float("inf") and same["psnr_inf_count"] == len(gts)
    assert same["class_acc"] == 1.0
    # a constant error of 10 grey levels: MSE 100, PSNR 10 log10(255^2 / 100)
    off = report.score(gts + 10, gts, cls_maps, COLOURS + 20)
    assert off["psnr"] == pytest.approx(10 * np.log10(255**2 / 100))
    assert off["psnr_inf_count"] == 0


def test_comparison_table_lists_every_row():
    rows = [
        ("model", dict(ssim=0.812, psnr=24.31, class_acc=0.9)),
        ("mean", dict(ssim=0.25, psnr=14.0, class_acc=0.2)),
    ]
    lines = report.comparison_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["model", "0.812", "24.31", "0.900"]
    assert lines[2].split() == ["mean", "0.250", "14.00", "0.200"]


def test_load_class_colours_by_id_with_nan_for_unseen(tmp_path):
    info = dict(
        classes=[dict(id=1, name="b"), dict(id=0, name="a"), dict(id=2, name="c")],
        class_mean_rgb=[[10, 20, 30], [1.5, 2.5, 3.5], None],
    )
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(info))
    colours = report.load_class_colours(path)
    np.testing.assert_array_equal(colours[:2], [[1.5, 2.5, 3.5], [10, 20, 30]])
    assert np.isnan(colours[2]).all()


def test_write_metrics_writes_infinite_psnr_as_null(tmp_path):
    rows = [("same", dict(ssim=1.0, psnr=float("inf"), class_acc=1.0))]
    path = report.write_metrics(tmp_path / "m.json", rows, num_images=3)
    assert json.loads(path.read_text()) == dict(
        num_images=3, rows=dict(same=dict(ssim=1.0, psnr=None, class_acc=1.0))
    )


# -- picture ------------------------------------------------------------------------


def test_make_picture_layout(tmp_path):
    rng = np.random.default_rng(3)
    sar = rng.integers(0, 256, (3, 8, 10), dtype=np.uint8)
    gen, gt = rng.integers(0, 256, (2, 3, 8, 10, 3), dtype=np.uint8)
    path = tmp_path / "picture.png"
    size = report.make_picture(sar, gen, gt, path, n=8, scale=3)
    sep, title = report.SEPARATOR, report.TITLE_HEIGHT
    width, height = 3 * 30 + 4 * sep, title + 3 * 24 + 4 * sep  # 3 rows: all there is
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (width, height) == size
        picture = np.asarray(img.convert("RGB"))
    # the generated image of the second scene, enlarged 3x by repeating pixels
    top, left = title + sep + (24 + sep), sep + (30 + sep)
    np.testing.assert_array_equal(
        picture[top : top + 24, left : left + 30], np.kron(gen[1], np.ones((3, 3, 1)))
    )
    sar_tile = np.kron(sar[1], np.ones((3, 3)))  # single band, shown as grey
    np.testing.assert_array_equal(
        picture[top : top + 24, sep : sep + 30], np.stack([sar_tile] * 3, axis=-1)
    )
    assert not list(tmp_path.glob("*.tmp-*"))


def test_copy_to_assets_copies_the_file(tmp_path):
    picture = tmp_path / "demo.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(picture)
    target = tmp_path / "assets" / "demo.png"
    assert report.copy_to_assets(picture, target) == target
    assert target.read_bytes() == picture.read_bytes()


# -- demo.sh end to end -------------------------------------------------------------

TINY_DEMO = dict(
    NUM_TRAIN="64",
    NUM_TEST="4",
    STEPS="2",
    MODEL_FLAGS="--image_size 32 --num_channels 32 --num_res_blocks 1 "
    "--channel_mult 1,2 --attention_resolutions 16 --learn_sigma False",
    DIFFUSION_FLAGS="--diffusion_steps 50 --noise_schedule linear --predict_xstart True",
    TRAIN_FLAGS="--lr 1e-3 --batch_size 4 --ema_rate 0.995 --num_workers 0",
    SAMPLER="ddim",
    SAMPLE_STEPS="2",
)


def test_demo_end_to_end(tmp_path, run_in_process):
    asset = REPO / "assets" / "demo.png"
    asset_before = asset.read_bytes() if asset.exists() else None
    data, run = tmp_path / "data", tmp_path / "run"
    env = {
        **os.environ,
        **TINY_DEMO,
        "DATA_DIR": str(data),
        "RUN_DIR": str(run),
        # the scripts must run with this interpreter, where the package is installed
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    figures = json.loads((run / "demo_metrics.json").read_text())
    assert figures["num_images"] == 4
    assert list(figures["rows"]) == [
        "model",
        "training mean image",
        "SAR copied to RGB",
    ]
    for scores in figures["rows"].values():
        assert -1 <= scores["ssim"] <= 1 and 0 <= scores["class_acc"] <= 1
        assert scores["psnr"] is None or scores["psnr"] > 0
    for label in figures["rows"]:
        assert label in proc.stdout  # the table was printed
    with Image.open(run / "demo.png") as img:
        sep, title = report.SEPARATOR, report.TITLE_HEIGHT
        assert img.size == (3 * 128 + 4 * sep, title + 4 * 128 + 5 * sep)
    assert (asset.read_bytes() if asset.exists() else None) == asset_before

    # the report refuses a test image without a translation, and names it (in
    # this process: demo.sh above launched the script for real)
    gen_dir = run / "sample_results" / "ddim2" / "gen_opt"
    (gen_dir / "00002.png").unlink()
    proc = run_in_process(
        REPO / "scripts" / "demo_report.py",
        ["--data_dir", data, "--gen_dir", gen_dir, "--out", run],
    )
    assert proc.returncode == 2
    assert "00002.png" in proc.stderr and "Traceback" not in proc.stderr
