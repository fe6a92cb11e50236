"""
The geometry of joint denoising of a scene larger than the model: where the
overlapping tiles lie and how much each one's prediction weighs in the fused,
scene-sized prediction (the job itself is in guided_diffusion/translation/scene.py).

Fusion weights are a Hann window per tile, falling towards the tile's edges, except
on sides that lie on the scene's border, where the weight stays 1: every pixel has
weight from some tile, and a tile's own border pixels (where the network sees the
least context) count the least.
"""

import numpy as np


def tile_starts(size, tile, overlap, shift=0):
    """
    Where the tiles along one axis start.

    Tiles advance by ``tile - overlap``; the first starts at 0 and the last is moved
    inwards to end at the scene's edge, so every pixel is covered and no tile hangs
    over the edge. ``shift`` moves the tiles in between (not the first and last) by
    that many pixels, so that the borders between tiles fall elsewhere.

    :param size: the scene's length along the axis, at least ``tile``.
    :param tile: the tile's length.
    :param overlap: how many pixels neighbouring tiles share, 0 <= overlap < tile.
    :param shift: at most ``max_shift(tile, overlap)`` pixels either way.
    :return: a list of start offsets, ascending, first 0 and last size - tile.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must lie in 0..{tile - 1}")
    if size < tile:
        raise ValueError(f"a scene of {size} pixels is shorter than a tile ({tile})")
    limit = max_shift(tile, overlap)
    if abs(shift) > limit:
        raise ValueError(f"the shift ({shift}) must lie in -{limit}..{limit}")
    stride = tile - overlap
    # the inner tiles: the first one starts a stride plus the shift from 0, and the
    # last one ends less than a stride from the scene's edge, so neighbours share
    # at least overlap - |shift| pixels
    starts = [0]
    k = 1
    while k * stride + shift < size - tile:
        starts.append(k * stride + shift)
        k += 1
    starts.append(size - tile)
    return sorted(set(starts))


def max_shift(tile, overlap):
    """
    How far the inner tiles may move (tile_starts' shift): half the overlap, so
    that neighbours still share at least half of it, and at most half a stride,
    so that they keep their order. A quarter tile when the overlap is half a tile.
    """
    return min(overlap // 2, (tile - overlap) // 2)


def window_1d(tile, taper_start=True, taper_end=True):
    """
    A Hann window of ``tile`` samples, sin^2(pi (i + 1/2) / tile): near zero at the
    ends, 1 in the middle, never exactly zero. A side that is not tapered holds 1
    from the middle out (a tile on the scene's border).

    :return: float64 array (tile,).
    """
    i = np.arange(tile, dtype=np.float64)
    w = np.sin(np.pi * (i + 0.5) / tile) ** 2
    half = tile // 2
    if not taper_start:
        w[:half] = 1.0
    if not taper_end:
        w[tile - half :] = 1.0
    return w


def axis_window(size, tile, start):
    """
    The window along one axis of the tile that starts at ``start`` on an axis of
    ``size`` pixels: tapered at an end inside the scene, held at 1 at an end on the
    scene's border (:func:`window_1d`). The scene fuser and :func:`tile_weights`
    both take their windows from here.

    :return: float64 array (tile,).
    """
    return window_1d(tile, start > 0, start + tile < size)


def tile_grid(height, width, tile, overlap, shift=(0, 0)):
    """
    The tiles of a scene, row by row.

    :param shift: (rows, columns) the inner tiles move by (see tile_starts).
    :return: a list of (top, left); each covers [top, top + tile) x [left, left + tile).
    """
    return [
        (top, left)
        for top in tile_starts(height, tile, overlap, shift[0])
        for left in tile_starts(width, tile, overlap, shift[1])
    ]


def tile_weights(height, width, tile, top, left):
    """The fusion weight of one tile, (tile, tile) float64."""
    return np.outer(axis_window(height, tile, top), axis_window(width, tile, left))
