"""
Values computed in the test, not by the code under test: the calibration report
of a few pixels by hand, the Min-SNR weights by hand, the demo dataset's record
recomputed from the files it wrote, and the spread picture's colours against
viridis as matplotlib publishes it.
"""

import json

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.evaluation import calibration
from guided_diffusion.io import pictures


def test_calibration_report_of_four_pixels_by_hand():
    # one 2 x 2 image, the three channels alike; the last pixel has no SAR
    mean = np.full((1, 2, 2, 3), 100.0)
    truth = np.array([101.0, 110.0, 130.0, 100.0]).reshape(1, 2, 2, 1).repeat(3, axis=3)
    spread = np.array([1.0, 4.0, 20.0, 50.0]).reshape(1, 2, 2, 1).repeat(3, axis=3)
    valid = np.array([[[True, True], [True, False]]])
    report = calibration.calibration_report(mean, spread, truth, bins=3, valid=valid)
    # errors 1, 10, 30; within 2 spreads: 1 <= 2 yes, 10 <= 8 no, 30 <= 40 yes
    assert report["num_pixels"] == 3 and report["nodata_pixels"] == 1
    assert report["coverage_2sd"] == pytest.approx(2 / 3)
    assert report["mean_abs_error"] == pytest.approx(41 / 3)
    assert report["mean_spread"] == pytest.approx(25 / 3)
    rows = report["spread"]["table"]
    assert [
        (r["mean_uncertainty"], r["mean_abs_error"], r["pixels"]) for r in rows
    ] == [
        (1.0, 1.0, 1),
        (4.0, 10.0, 1),
        (20.0, 30.0, 1),
    ]
    assert report["spread"]["spearman"] == pytest.approx(1.0)
    assert report["spread"]["top_bottom_error_ratio"] == pytest.approx(30.0)
    # every pixel counted: the nodata pixel (error 0, spread 50) joins the top bin
    everything = calibration.calibration_report(mean, spread, truth, bins=3)
    assert everything["coverage_2sd"] == pytest.approx(3 / 4)
    assert everything["mean_abs_error"] == pytest.approx(41 / 4)


def test_min_snr_weights_by_hand():
    abar = np.array([0.8, 0.9, 0.5])  # SNR 4, 9, 1
    by_target = {
        gd.ModelMeanType.START_X: [4.0, 5.0, 1.0],  # min(SNR, 5)
        gd.ModelMeanType.EPSILON: [1.0, 5 / 9, 1.0],  # min(SNR, 5) / SNR
        gd.ModelMeanType.VELOCITY: [0.8, 0.5, 0.5],  # min(SNR, 5) / (SNR + 1)
    }
    for target, expected in by_target.items():
        got = gd.mse_loss_weights(abar, 5.0, target)
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=str(target))


def test_the_demo_dataset_record_matches_its_files(tmp_path):
    from guided_diffusion.demo.scenes import CLASSES, make_dataset

    make_dataset(
        tmp_path, num_train=2, num_test=1, image_size=32, seed=3, progress=False
    )
    info = json.loads((tmp_path / "dataset.json").read_text())
    train = tmp_path / "train"
    names = sorted(p.name for p in (train / "opt").iterdir())
    assert len(names) == info["num_train"] == 2
    assert len(list((tmp_path / "test" / "opt").iterdir())) == info["num_test"] == 1
    opt = np.stack(
        [np.asarray(Image.open(train / "opt" / n), np.float64) for n in names]
    )
    cls = np.stack([np.asarray(Image.open(train / "cls" / n)) for n in names])
    sar = np.stack(
        [np.asarray(Image.open(train / "sar" / n), np.float64) for n in names]
    )
    for c, share, rgb in zip(
        CLASSES, info["class_pixel_share"], info["class_mean_rgb"]
    ):
        members = cls == c.id
        assert share == pytest.approx(members.mean(), abs=1e-9), c.name
        if members.any():
            np.testing.assert_allclose(rgb, opt[members].mean(axis=0), atol=1e-3)
        else:
            assert rgb is None
    assert info["sar_mean"] == pytest.approx(sar.mean(), abs=1e-3)
    assert info["sar_std"] == pytest.approx(sar.std(), abs=1e-3)
    # R^2 of the colours given the class, straight from its definition
    fitted = np.zeros_like(opt)
    for c in np.unique(cls):
        fitted[cls == c] = opt[cls == c].mean(axis=0)
    r2 = (
        1
        - ((opt - fitted) ** 2).sum() / ((opt - opt.reshape(-1, 3).mean(0)) ** 2).sum()
    )
    assert info["explained_variance_share"] == pytest.approx(r2, abs=1e-6)


# viridis at 0, 0.5 and 1 as matplotlib's table gives it (#440154, #21918c, #fde725)
VIRIDIS_0, VIRIDIS_HALF, VIRIDIS_1 = (68, 1, 84), (33, 145, 140), (253, 231, 37)


def test_the_spread_picture_shows_the_channel_mean_on_viridis():
    spread = np.zeros((2, 3, 3))
    spread[0, 1] = (0, 32, 64)  # channel mean 32 = half the scale
    spread[0, 2] = (64, 64, 64)  # the top of the scale
    spread[1, 0] = (100, 200, 300)  # above it: the top colour
    spread[1, 1] = (32, 32, 32)
    valid = np.ones((2, 3), bool)
    valid[1, 2] = False  # no data: black
    picture, legend = pictures.spread_picture(
        spread, vmax=64, valid=valid, min_side=8
    )
    image = np.asarray(picture).astype(int)
    scale = 4  # the shorter side, 2 pixels, enlarged to at least 8
    # the map's top-left block is spread 0: the first pixel of that colour
    top, left = np.argwhere((image == VIRIDIS_0).all(axis=2))[0]
    assert top == legend.bar[1]  # the map and the bar start on the same row

    def block(row, col):
        pixels = image[top + row * scale : top + (row + 1) * scale,
                       left + col * scale : left + (col + 1) * scale]  # fmt: skip
        assert (pixels == pixels[0, 0]).all()  # one colour per model pixel
        return tuple(pixels[0, 0])

    expected = {(0, 0): VIRIDIS_0, (0, 1): VIRIDIS_HALF, (0, 2): VIRIDIS_1,
                (1, 0): VIRIDIS_1, (1, 1): VIRIDIS_HALF, (1, 2): (0, 0, 0)}  # fmt: skip
    for (row, col), colour in expected.items():
        np.testing.assert_allclose(
            block(row, col), colour, atol=3, err_msg=str((row, col))
        )
    # the map ends where its blocks do: the next pixel right is the white margin
    assert tuple(image[top, left + 3 * scale]) == (255, 255, 255)


@pytest.mark.parametrize("use_foreach", [True, False])
def test_the_ema_step_by_hand(use_foreach):
    import torch as th

    from guided_diffusion.nn import update_ema

    target = [th.tensor([1.0, 2.0]), th.tensor([[4.0]])]
    source = [th.tensor([3.0, -2.0]), th.tensor([[0.0]])]
    update_ema(target, source, rate=0.9, use_foreach=use_foreach)
    # 0.9 * target + 0.1 * source
    th.testing.assert_close(target[0], th.tensor([1.2, 1.6]))
    th.testing.assert_close(target[1], th.tensor([[3.6]]))
