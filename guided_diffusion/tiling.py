"""
Joint denoising of a scene larger than the model: the network sees overlapping
tiles of one scene-sized state, and at every step their predictions are fused
into one scene-sized prediction.

:class:`TiledDenoiser` has the call and the ``alphas_cumprod`` of
``samplers.Denoiser``, so every registered sampler runs on a scene unchanged; the
samplers draw their noise for the whole scene at once (one value per pixel, never
averaged across tiles), so the result depends on the seed alone, not on how the
tiles are batched or shared between ranks.

Fusion weights are a Hann window per tile, falling towards the tile's edges, except
on sides that lie on the scene's border, where the weight stays 1: every pixel has
weight from some tile, and a tile's own border pixels (where the network sees the
least context) count the least.
"""

import math

import numpy as np
import torch as th


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


class TiledDenoiser:
    """
    A scene-sized denoiser built from a tile-sized one.

    :param make_denoiser: condition -> a ``samplers.Denoiser`` (or anything with its
        call) for a batch of tiles with that SAR condition.
    :param alphas_cumprod: the (respaced) schedule the samplers read.
    :param diffusion: the (respaced) GaussianDiffusion, to turn the fused x_0 into
        the step's mean and noise.
    :param condition: the scene's SAR, (1, C_sar, H, W), H and W at least ``tile``.
    :param tile: the tile side (the model's training size).
    :param overlap: pixels shared by neighbouring tiles (default half a tile).
    :param batch_size: tiles per network call.
    :param rank: this process's share: tiles rank, rank + world, ...
    :param world: the number of processes sharing the tiles.
    :param all_reduce: sums a tensor in place across the processes (None for one).
    :param progress: called with the number of tiles done after each batch.
    """

    def __init__(
        self,
        make_denoiser,
        diffusion,
        condition,
        tile,
        *,
        overlap=None,
        batch_size=8,
        rank=0,
        world=1,
        all_reduce=None,
        progress=None,
    ):
        _, _, height, width = condition.shape
        self.make_denoiser = make_denoiser
        self.diffusion = diffusion
        self.alphas_cumprod = diffusion.alphas_cumprod
        self.condition = condition
        self.tile = tile
        self.overlap = tile // 2 if overlap is None else overlap
        self.batch_size = batch_size
        self.grid = tile_grid(height, width, tile, self.overlap)
        self.mine = self.grid[rank::world]
        self.all_reduce = all_reduce
        self.progress = progress
        self.size = (height, width)
        # a window depends only on which of its sides lie on the scene's border, so
        # there are at most nine, however many tiles
        self._windows = {}
        total = th.zeros(
            (height, width), dtype=condition.dtype, device=condition.device
        )
        for top, left in self.grid:  # every rank knows every tile's window
            total[top : top + tile, left : left + tile] += self.window(top, left)
        self.total = total

    def window(self, top, left):
        """The fusion weights of the tile at (top, left), (tile, tile)."""
        height, width = self.size
        key = (top > 0, top + self.tile < height, left > 0, left + self.tile < width)
        if key not in self._windows:
            w = tile_weights(height, width, self.tile, top, left)
            self._windows[key] = th.from_numpy(w).to(self.condition)
        return self._windows[key]

    @th.no_grad()
    def __call__(self, x, t):
        """
        :param x: the scene's x_t, (1, C, H, W).
        :param t: a timestep index.
        :return: the dict of ``samplers.Denoiser`` for the whole scene: the fused
            "pred_xstart" (and "log_variance" when the model learns it), with the
            "mean" and "eps" they imply.
        """
        if th.is_tensor(t):
            t = int(t.reshape(-1)[0])
        sums = {"pred_xstart": th.zeros_like(x), "log_variance": th.zeros_like(x)}
        size = self.tile
        for start in range(0, len(self.mine), self.batch_size):
            places = self.mine[start : start + self.batch_size]
            xs = th.cat([x[..., r : r + size, c : c + size] for r, c in places])
            cond = th.cat(
                [self.condition[..., r : r + size, c : c + size] for r, c in places]
            )
            out = self.make_denoiser(cond)(xs, t)
            for i, (r, c) in enumerate(places):
                w = self.window(r, c)
                for key, acc in sums.items():
                    acc[0, :, r : r + size, c : c + size] += w * out[key][i]
            if self.progress is not None:
                self.progress(len(places))
        for acc in sums.values():
            if self.all_reduce is not None:
                self.all_reduce(acc)
            acc /= self.total
        d = self.diffusion
        ts = th.full((1,), t, device=x.device, dtype=th.long)
        pred_xstart = sums["pred_xstart"]
        mean, _, _ = d.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=ts)
        return {
            "pred_xstart": pred_xstart,
            "log_variance": sums["log_variance"],
            "variance": th.exp(sums["log_variance"]),
            "mean": mean,
            "eps": d._predict_eps_from_xstart(x, ts, pred_xstart),
        }
