"""
The side-by-side pictures (guided_diffusion.io.pictures), against pictures built by
hand pixel by pixel: where the panels and the gaps fall, the enlargement, grey as RGB,
and the PNG written atomically.
"""

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.base import atomic
from guided_diffusion.io.pictures import columns_side_by_side, side_by_side, write_png

W = 255  # the white background


def panel(value, h=2, w=3, channels=3):
    """A panel of one colour (value, value + 1, value + 2), or grey ``value``."""
    if channels is None:
        return np.full((h, w), value, np.uint8)
    return np.stack(
        [np.full((h, w), value + c, np.uint8) for c in range(channels)], axis=-1
    )


def test_two_by_two_with_gaps_is_the_picture_drawn_by_hand():
    a, b, c, d = (panel(v, h=1, w=2) for v in (10, 20, 30, 40))
    got = side_by_side([[a, b], [c, d]], gap=1)
    # each letter one RGB pixel, "." a white one: panels 1x2, gaps 1 wide
    A, B, C, D, _ = (10, 11, 12), (20, 21, 22), (30, 31, 32), (40, 41, 42), (W, W, W)
    want = np.array(
        [
            [A, A, _, B, B],
            [_, _, _, _, _],
            [C, C, _, D, D],
        ],
        np.uint8,
    )
    assert np.array_equal(got, want)


def test_a_margin_surrounds_the_grid_and_the_background_is_chosen():
    got = side_by_side(
        [[panel(5, h=1, w=1, channels=None)]], gap=3, margin=2, background=0
    )
    want = np.zeros((5, 5, 3), np.uint8)
    want[2, 2] = 5
    assert np.array_equal(got, want)


def test_scale_repeats_each_pixel_and_leaves_the_gap_as_given():
    grey = np.array([[1, 2], [3, 4]], np.uint8)
    got = side_by_side([[grey, grey]], gap=1, scale=2)
    one = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], np.uint8)
    assert got.shape == (4, 4 + 1 + 4, 3)
    for channel in range(3):
        assert np.array_equal(got[:, :4, channel], one)
        assert np.array_equal(got[:, 5:, channel], one)
    assert (got[:, 4] == W).all()


def test_scale_equals_pil_nearest_resize_of_the_whole_grid():
    # the validation grid's old recipe: lay out, then enlarge the whole picture
    rng = np.random.default_rng(0)
    panels = [[rng.integers(0, 256, (3, 5, 3), dtype=np.uint8) for _ in range(2)]]
    small = Image.fromarray(side_by_side(panels, gap=2))
    enlarged = np.asarray(
        small.resize((small.width * 3, small.height * 3), Image.NEAREST)
    )
    assert np.array_equal(side_by_side(panels, gap=2 * 3, scale=3), enlarged)


@pytest.mark.parametrize("channels", [None, 1])
def test_grey_panels_become_rgb_next_to_rgb_panels(channels):
    grey = panel(7, channels=channels)
    got = side_by_side([[grey, panel(100)]], gap=0)
    assert got.dtype == np.uint8 and got.shape == (2, 6, 3)
    assert (got[:, :3] == 7).all()
    assert np.array_equal(got[:, 3:], panel(100))


def test_columns_are_transposed_into_rows():
    sar, gen = [panel(1), panel(2)], [panel(3), panel(4)]
    assert np.array_equal(
        columns_side_by_side([sar, gen], gap=1),
        side_by_side([[panel(1), panel(3)], [panel(2), panel(4)]], gap=1),
    )


def test_a_short_row_leaves_background():
    got = side_by_side([[panel(1), panel(2)], [panel(3)]], gap=0)
    assert got.shape == (4, 6, 3)
    assert (got[2:, 3:] == W).all()


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "at least one panel"),
        ([[panel(1, h=2), panel(1, h=3)]], "one size"),
        ([[panel(1).astype(np.float32)]], "uint8"),
        ([[np.zeros((2, 2, 2), np.uint8)]], r"\(H, W, 3\)"),
    ],
)
def test_what_cannot_be_laid_out_is_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        side_by_side(rows)


def test_scale_must_be_a_whole_number():
    with pytest.raises(ValueError, match="scale"):
        side_by_side([[panel(1)]], scale=1.5)


def test_write_png_round_trips_and_is_atomic(tmp_path, monkeypatch):
    picture = side_by_side([[panel(9), panel(50, channels=None)]], gap=2)
    path = tmp_path / "grid.png"
    assert write_png(str(path), picture) == str(path)
    assert np.array_equal(np.asarray(Image.open(path)), picture)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    # written through the one atomic helper (fsync, rename, a full disk as DiskFull)
    calls = []
    real = atomic.write_atomic

    def spy(path, write, suffix=""):
        calls.append(path)
        return real(path, write, suffix)

    monkeypatch.setattr("guided_diffusion.io.pictures.write_atomic", spy)
    write_png(str(path), Image.fromarray(picture[:, :3]))
    assert calls == [str(path)]
    assert np.array_equal(np.asarray(Image.open(path)), picture[:, :3])
