"""
Pictures of images side by side: the validation grid, a scene's quick-look and the
demo's comparison all lay out their panels here.

A picture is a grid of panels of one size on a white background: grey panels are
shown as RGB, every panel can be enlarged by an integer factor with nearest-neighbour
sampling (a 32-pixel tile shows its pixels, not a blur), and panels sit ``gap``
pixels apart, with an optional ``margin`` around the whole. :func:`write_png` writes
one through :func:`~guided_diffusion.atomic.write_atomic`, so a reader never sees
half a picture.
"""

import numpy as np
from PIL import Image

from .atomic import write_atomic


def side_by_side(rows, *, gap=2, margin=0, scale=1, background=255):
    """
    Lay out panels in a grid.

    :param rows: a sequence of rows, each a sequence of panels; a panel is a uint8
        array (H, W) or (H, W, 1) for grey, or (H, W, 3) for RGB, all of one H and W.
        Rows may differ in length; a short row leaves background on its right.
    :param gap: background pixels between neighbouring panels, in the picture's
        pixels (not enlarged by ``scale``).
    :param margin: background pixels around the whole grid.
    :param scale: integer enlargement of every panel, nearest-neighbour.
    :param background: the grey level of the gaps and the margin.
    :return: the picture, uint8 (height, width, 3).
    """
    grid = [[_rgb(panel) for panel in row] for row in rows]
    panels = [panel for row in grid for panel in row]
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    sizes = {panel.shape[:2] for panel in panels}
    if len(sizes) != 1:
        raise ValueError(f"panels must be of one size, got {sorted(sizes)}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1, got {scale}")
    scale = int(scale)
    h, w = (side * scale for side in panels[0].shape[:2])
    n_rows, n_cols = len(grid), max(len(row) for row in grid)
    picture = np.full(
        (
            2 * margin + n_rows * h + (n_rows - 1) * gap,
            2 * margin + n_cols * w + (n_cols - 1) * gap,
            3,
        ),
        background,
        dtype=np.uint8,
    )
    for i, row in enumerate(grid):
        top = margin + i * (h + gap)
        for j, panel in enumerate(row):
            left = margin + j * (w + gap)
            picture[top : top + h, left : left + w] = panel.repeat(
                scale, axis=0
            ).repeat(scale, axis=1)
    return picture


def columns_side_by_side(columns, **layout):
    """
    :func:`side_by_side` for panels given by column: ``columns[j][i]`` is the panel
    of row i, column j (e.g. SAR images, generated images, ground truths).

    :param layout: the keyword arguments of :func:`side_by_side`.
    """
    return side_by_side(list(zip(*columns)), **layout)


def write_png(path, image):
    """
    Write a picture as a PNG, atomically.

    :param image: a uint8 array (H, W), (H, W, 3) or a PIL image.
    :return: the path.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return write_atomic(path, lambda f: image.save(f, format="PNG"))


def _rgb(panel):
    panel = np.asarray(panel)
    if panel.dtype != np.uint8:
        raise ValueError(f"panels must be uint8 images, got {panel.dtype}")
    if panel.ndim == 2:
        panel = panel[..., None]
    if panel.ndim != 3 or panel.shape[-1] not in (1, 3):
        raise ValueError(
            f"a panel is (H, W), (H, W, 1) or (H, W, 3), got {panel.shape}"
        )
    return np.repeat(panel, 3, axis=-1) if panel.shape[-1] == 1 else panel
