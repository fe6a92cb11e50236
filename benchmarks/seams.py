"""
The seam ratio of bench_scene.py: how much stronger an image's gradient is on the
lines where tiles meet than elsewhere.

For a tile grid (the tiles' top and left corners, ``tile`` pixels square), the
vertical border lines are the columns c with 0 < c < W where a tile starts
(left = c) or ends (left + tile = c); the horizontal ones are the rows likewise.
On an image I (H, W, 3) in 0..255:

* the horizontal difference at (y, c), 1 <= c < W, is
  mean over the three channels of |I[y, c] - I[y, c - 1]|: the step from the
  pixel left of the line to the pixel right of it;
* the vertical difference at (r, x), 1 <= r < H, is
  mean over the channels of |I[r, x] - I[r - 1, x]|.

The border set is every horizontal difference on a vertical border line (all
rows) and every vertical difference on a horizontal border line (all columns);
the other set is every other horizontal and vertical difference. The seam
ratio is mean(border set) / mean(other set). Tiles pasted side by side with a
jump in colour at their edges give a ratio above the image's own; an image
whose statistics do not depend on the position (a smooth ramp, say) gives 1.
"""

import numpy as np


def border_lines(starts, tile, size):
    """
    The border lines along one axis.

    :param starts: where the tiles start along the axis.
    :param tile: the tile's length.
    :param size: the image's length along the axis.
    :return: sorted list of the positions c, 0 < c < size, where a tile starts
        or ends (c is the first pixel after the line).
    """
    lines = set(starts) | {s + tile for s in starts}
    return sorted(c for c in lines if 0 < c < size)


def grid_lines(grid, tile, height, width):
    """(rows, columns) of the border lines of a grid of (top, left) corners."""
    rows = border_lines({top for top, _ in grid}, tile, height)
    cols = border_lines({left for _, left in grid}, tile, width)
    return rows, cols


def shifted_lines(lines, shift, size):
    """
    Lines moved by ``shift`` pixels, those that leave (0, size) dropped: a
    control off the tile borders (half a grid step away, the lines keep their
    parity, so a texture of period 2 weighs alike on both).
    """
    return sorted(c + shift for c in lines if 0 < c + shift < size)


def seam_ratio(image, rows, cols):
    """
    Mean absolute difference across the border lines over that elsewhere.

    :param image: (H, W, 3) or (H, W) array, values in 0..255 (any dtype).
    :param rows: the horizontal border lines (r: between rows r - 1 and r).
    :param cols: the vertical border lines (c: between columns c - 1 and c).
    :return: (ratio, mean on the lines, mean elsewhere) as floats; the ratio is
        inf (nan) when the image is flat off the lines and not (and) on them.
    :raises ValueError: no line, or no difference off the lines.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    height, width = image.shape[:2]
    rows, cols = np.asarray(sorted(rows), int), np.asarray(sorted(cols), int)
    if not len(rows) and not len(cols):
        raise ValueError("seam_ratio needs at least one border line")
    if np.any((rows < 1) | (rows >= height)) or np.any((cols < 1) | (cols >= width)):
        raise ValueError("border lines must lie strictly inside the image")
    # across[:, j] is the step between columns j and j + 1, i.e. at line c = j + 1
    across = np.abs(np.diff(image, axis=1)).mean(axis=2)
    down = np.abs(np.diff(image, axis=0)).mean(axis=2)
    on_col = np.zeros(width - 1, bool)
    on_col[cols - 1] = True
    on_row = np.zeros(height - 1, bool)
    on_row[rows - 1] = True
    border_sum = across[:, on_col].sum() + down[on_row].sum()
    border_count = across[:, on_col].size + down[on_row].size
    other_sum = across[:, ~on_col].sum() + down[~on_row].sum()
    other_count = across[:, ~on_col].size + down[~on_row].size
    if not other_count:
        raise ValueError("every difference lies on a border line: nothing to compare")
    on, off = border_sum / border_count, other_sum / other_count
    if not off:  # a flat image off the lines
        return (float("inf") if on else float("nan")), float(on), 0.0
    return float(on / off), float(on), float(off)


def mean_gradient(image):
    """
    The mean absolute neighbour difference of an image: every horizontal and
    vertical difference, averaged over the channels (as in :func:`seam_ratio`),
    then over all of them.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    across = np.abs(np.diff(image, axis=1)).mean(axis=2)
    down = np.abs(np.diff(image, axis=0)).mean(axis=2)
    return float((across.sum() + down.sum()) / (across.size + down.size))


def sharpness(image, truth):
    """
    How much detail an image has against its truth: :func:`mean_gradient` of the
    image over the truth's. An average of independent samples loses detail
    (below the truth's 1); noise adds some.
    """
    return mean_gradient(image) / mean_gradient(truth)
