"""
Pictures of images side by side: the validation grid, a scene's quick-look and the
demo's comparison all lay out their panels here.

A picture is a grid of panels of one size on a white background: grey panels are
shown as RGB, every panel can be enlarged by an integer factor with nearest-neighbour
sampling (a 32-pixel tile shows its pixels, not a blur), and panels sit ``gap``
pixels apart, with an optional ``margin`` around the whole. :func:`write_png` writes
one through :func:`~guided_diffusion.base.atomic.write_atomic`, so a reader never sees
half a picture.

The spread of several samples is drawn here too (:func:`spread_picture`): a colour
scale (viridis, from anchor colours defined here) with a colour bar and its values,
on a fixed scale (:data:`SPREAD_MAX`) so that two pictures compare by eye.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..base.atomic import write_atomic


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


# -- the spread of several samples as a colour scale ------------------------------

# The top of the spread pictures' fixed colour scale, in grey levels: one scale for
# every image of a run, so that two pictures can be compared by eye. Larger spreads
# take the top colour (the legend says "64+"). The standard deviation of values in
# [0, 255] is at most 127.5; a model that knows the colour of a field within a
# quarter of the range is already unsure.
SPREAD_MAX = 64.0

# Viridis (van der Walt and Smith, matplotlib's default colour map) at 0, 1/8, ...,
# 1: a perceptually ordered scale, dark to light, that reads in grey and for the
# colour blind. Between anchors the colours are interpolated linearly in sRGB.
VIRIDIS_ANCHORS = (
    (0x44, 0x01, 0x54),
    (0x47, 0x2D, 0x7B),
    (0x3B, 0x52, 0x8B),
    (0x2C, 0x72, 0x8E),
    (0x21, 0x90, 0x8C),
    (0x27, 0xAD, 0x81),
    (0x5D, 0xC8, 0x63),
    (0xAA, 0xDC, 0x32),
    (0xFD, 0xE7, 0x25),
)

def colour_map(values):
    """
    The viridis colour of values in [0, 1] (clipped), from a 256-entry table.

    :param values: an array of any shape.
    :return: uint8 array of shape ``values.shape + (3,)``.
    """
    index = np.rint(np.clip(np.asarray(values, dtype=np.float64), 0, 1) * 255)
    return _colour_table()[index.astype(np.intp)]


def _colour_table():
    anchors = np.asarray(VIRIDIS_ANCHORS, dtype=np.float64)
    position = np.linspace(0, len(anchors) - 1, 256)
    below = np.minimum(np.floor(position).astype(int), len(anchors) - 2)
    weight = (position - below)[:, None]
    table = anchors[below] * (1 - weight) + anchors[below + 1] * weight
    return np.rint(table).astype(np.uint8)


@dataclass(frozen=True)
class Legend:
    """
    Where a spread picture's colour bar is and what its ticks say.

    :param bar: (left, top, right, bottom) of the colour bar, pixel rows and
        columns, bottom and right exclusive; the top row is ``vmax``, the bottom 0.
    :param ticks: (value, row, label) per tick, from 0 up.
    :param vmax: the value of the top colour.
    """

    bar: tuple
    ticks: tuple
    vmax: float


def tick_values(vmax, count=5):
    """:return: ``count`` evenly spaced values from 0 to ``vmax``."""
    return tuple(float(v) for v in np.linspace(0, vmax, count))


def _label(value, vmax):
    text = f"{value:g}" if value == int(value) else f"{value:.1f}"
    return text + "+" if value == vmax else text


def spread_picture(spread, *, vmax=SPREAD_MAX, valid=None, title=None, min_side=256):
    """
    The spread of one image as a colour-scale picture with its legend.

    The map (the spread averaged over the channels when it has three) is enlarged by
    a whole factor until its shorter side reaches ``min_side`` pixels (nearest
    neighbour, so every model pixel stays one block), and a colour bar with tick
    values stands to its right, under a title line.

    :param spread: (H, W) or (H, W, C) spread in grey levels.
    :param vmax: the value of the top colour; larger spreads take it too.
    :param valid: (H, W) bool, False where the input has no data (drawn black), or
        None.
    :param title: the line above the map (default: what the colours measure).
    :param min_side: the shorter side of the map as drawn, at least.
    :return: (PIL RGB image, :class:`Legend`).
    """
    spread = np.asarray(spread, dtype=np.float64)
    if spread.ndim == 3:
        spread = spread.mean(axis=2)
    if spread.ndim != 2:
        raise ValueError(
            f"expected a spread of shape (H, W) or (H, W, C), got {spread.shape}"
        )
    height, width = spread.shape
    scale = max(1, math.ceil(min_side / min(height, width)))
    colours = colour_map(spread / vmax)
    if valid is not None:
        colours[~np.asarray(valid, dtype=bool)] = 0
    big = np.repeat(np.repeat(colours, scale, axis=0), scale, axis=1)

    font = ImageFont.load_default()
    title = title or "spread: standard deviation of the samples, grey levels"
    ticks = tick_values(vmax)
    labels = [_label(v, vmax) for v in ticks]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(_text_size(draw_probe, t, font)[1] for t in [title, *labels])
    label_w = max(_text_size(draw_probe, t, font)[0] for t in labels)
    pad, gap, bar_w, tick_w = 8, 12, 16, 5
    top = pad + text_h + 6
    map_h, map_w = big.shape[:2]
    bar_left = pad + map_w + gap
    canvas_w = max(
        bar_left + bar_w + tick_w + 3 + label_w + pad,
        pad + _text_size(draw_probe, title, font)[0] + pad,
    )
    canvas_h = top + map_h + pad + text_h // 2
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (pad, top))

    # The bar: row top holds vmax, row top + map_h - 1 holds 0, linearly between.
    rows = np.linspace(1, 0, map_h)
    bar = np.repeat(colour_map(rows)[:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray(bar), (bar_left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    placed = []
    for value, label in zip(ticks, labels):
        row = top + int(round((1 - value / vmax) * (map_h - 1)))
        x0 = bar_left + bar_w
        draw.line([(x0, row), (x0 + tick_w - 1, row)], fill=(0, 0, 0))
        w, h = _text_size(draw, label, font)
        draw.text((x0 + tick_w + 3, row - h // 2 - 1), label, fill=(0, 0, 0), font=font)
        placed.append((value, row, label))
    legend = Legend((bar_left, top, bar_left + bar_w, top + map_h), tuple(placed), vmax)
    return canvas, legend


def _text_size(draw, text, font):
    left, top_, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top_
