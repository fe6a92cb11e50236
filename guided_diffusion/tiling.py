"""
The geometry of joint denoising of a scene larger than the model: where the
overlapping tiles lie and how much each one's prediction weighs in the fused,
scene-sized prediction (the job itself is in guided_diffusion/scene.py).

Fusion weights are a Hann window per tile, falling towards the tile's edges, except
on sides that lie on the scene's border, where the weight stays 1: every pixel has
weight from some tile, and a tile's own border pixels (where the network sees the
least context) count the least.
"""

import math

import numpy as np


def tile_starts(size, tile, overlap):
    """
    Where the tiles along one axis start.

    Tiles advance by ``tile - overlap``; the last one is moved inwards to end at
    the scene's edge, so every pixel is covered and no tile hangs over the edge.

    :param size: the scene's length along the axis, at least ``tile``.
    :param tile: the tile's length.
    :param overlap: how many pixels neighbouring tiles share, 0 <= overlap < tile.
    :return: a list of start offsets, ascending, first 0 and last size - tile.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must lie in 0..{tile - 1}")
    if size < tile:
        raise ValueError(f"a scene of {size} pixels is shorter than a tile ({tile})")
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(count)]
    return sorted(set(starts))


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


def tile_grid(height, width, tile, overlap):
    """
    The tiles of a scene, row by row.

    :return: a list of (top, left); each covers [top, top + tile) x [left, left + tile).
    """
    return [
        (top, left)
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def tile_weights(height, width, tile, top, left):
    """The fusion weight of one tile, (tile, tile) float64."""
    wy = window_1d(tile, top > 0, top + tile < height)
    wx = window_1d(tile, left > 0, left + tile < width)
    return np.outer(wy, wx)
