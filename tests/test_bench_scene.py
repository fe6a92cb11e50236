"""
The seam ratio of benchmarks/bench_scene.py (benchmarks/seams.py) against closed
forms: a ramp that rises alike in both directions has ratio 1 on any lines, a step
of s on a border line over a ramp of slope k gives (k + s) / k, and the border
lines of a tile grid are where its tiles start and end.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.translation.tiling import tile_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seams  # noqa: E402

H, W, K = 48, 64, 1.5


def ramp(channels=3):
    """K (x + y) in every channel: every neighbour difference is K."""
    y, x = np.mgrid[0:H, 0:W]
    return np.repeat((K * (x + y))[..., None], channels, axis=2)


@pytest.mark.parametrize(
    "rows, cols", [([16], []), ([], [8, 40]), ([1, 47], [1, 63]), ([16, 32], [16])]
)
def test_ramp_ratio_is_one(rows, cols):
    ratio, on, off = seams.seam_ratio(ramp(), rows, cols)
    assert ratio == pytest.approx(1.0)
    assert on == pytest.approx(K) and off == pytest.approx(K)


def test_step_on_a_line():
    s = 12.0
    image = ramp()
    image[:, 32:] += s  # a jump between columns 31 and 32 in all channels
    ratio, on, off = seams.seam_ratio(image, [], [32])
    assert on == pytest.approx(K + s) and off == pytest.approx(K)
    assert ratio == pytest.approx((K + s) / K)
    # a second line without a step halves the excess on the lines
    ratio, _, _ = seams.seam_ratio(image, [], [16, 32])
    assert ratio == pytest.approx((K + s / 2) / K)
    # the same step off the lines raises the mean elsewhere instead
    ratio, on, off = seams.seam_ratio(image, [], [16])
    other = H * (W - 2) + W * (H - 1)  # differences off the line
    assert on == pytest.approx(K)
    assert off == pytest.approx(K + s * H / other)


def test_channels_are_averaged_and_rows_count():
    image = ramp()
    image[24:, :, 1] += 30.0  # one channel of three steps by 30 at row 24
    ratio, on, off = seams.seam_ratio(image, [24], [])
    assert on == pytest.approx(K + 10.0) and off == pytest.approx(K)
    # grey images are one channel
    grey = ramp(1)[..., 0]
    grey[24:] += 10.0
    assert seams.seam_ratio(grey, [24], [])[0] == pytest.approx(ratio)


def test_border_lines_of_a_tile_grid():
    # 32-px tiles without overlap on 96 x 100: the last column of tiles is moved
    # inwards to start at 68, so lines at 32, 64, 68 and 96; none on the edges
    rows, cols = seams.grid_lines(tile_grid(96, 100, 32, 0), 32, 96, 100)
    assert rows == [32, 64]
    assert cols == [32, 64, 68, 96]
    # half a tile of overlap: a line every 16 px
    rows, cols = seams.grid_lines(tile_grid(64, 64, 32, 16), 32, 64, 64)
    assert rows == cols == [16, 32, 48]


def test_shifted_lines():
    # the control lines half a grid step away; those that leave the image go
    assert seams.shifted_lines([16, 32, 48], 8, 64) == [24, 40, 56]
    assert seams.shifted_lines([32, 64, 68, 96], 16, 100) == [48, 80, 84]


def test_bad_lines():
    with pytest.raises(ValueError):
        seams.seam_ratio(ramp(), [], [])
    with pytest.raises(ValueError):
        seams.seam_ratio(ramp(), [0], [])
    with pytest.raises(ValueError):
        seams.seam_ratio(ramp(), [], [W])


def test_sharpness_is_the_ratio_of_mean_gradients():
    # a ramp of slope 2K against one of slope K: every difference twice as large
    assert seams.mean_gradient(ramp()) == pytest.approx(K)
    assert seams.sharpness(2 * ramp(), ramp()) == pytest.approx(2.0)
    # a checkerboard of +-1 has every difference 2; a flat image none
    y, x = np.mgrid[0:H, 0:W]
    board = np.where((x + y) % 2, 1.0, -1.0)
    assert seams.mean_gradient(board) == pytest.approx(2.0)
    assert seams.sharpness(np.zeros((H, W)), board) == 0.0
