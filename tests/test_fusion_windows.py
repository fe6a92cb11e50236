"""
The windows the scene fuser actually uses (guided_diffusion/translation/scene.py's TileFuser),
against the fused prediction computed in this file.

The independent answer: each tile's prediction is recorded as the network gave it,
the windows are written here from their definition (a Hann window sin^2(pi (i +
1/2) / tile), held at 1 from the middle out on a side that lies on the scene's
border), and the fused prediction is sum_i w_i p_i / sum_i w_i over the tiles that
cover a pixel. A tapered scene border, a tile put at the wrong place or a window
applied transposed moves the fused prediction, whatever tiling.py says.
"""

import numpy as np
import pytest
import torch as th

from guided_diffusion.translation.scene import SceneArrays, TileFuser
from guided_diffusion.translation.tiling import tile_grid, tile_weights

TILE, OVERLAP = 16, 8


def hann_by_hand(tile, start, size):
    """The window of a tile at ``start`` on an axis of ``size`` pixels."""
    w = np.array([np.sin(np.pi * (i + 0.5) / tile) ** 2 for i in range(tile)])
    if start == 0:  # on the scene's first border: no taper on that side
        w[: tile // 2] = 1.0
    if start + tile == size:  # on the last border
        w[tile - tile // 2 :] = 1.0
    return w


class RecordingDenoiser:
    """
    Knows each tile's place from the state it is given (channel 0 holds the row,
    channel 1 the column of every pixel) and returns a prediction of its own per
    tile (a random field plus the tile's number), recorded by place.
    """

    def __init__(self, learned_variance=False):
        self.seen = {}
        self.learned_variance = learned_variance
        self.gen = th.Generator().manual_seed(0)

    def __call__(self, xs, sar, t):
        out = {"pred_xstart": [], "log_variance": []}
        for x, s in zip(xs, sar):
            top, left = int(x[0, 0, 0]), int(x[1, 0, 0])
            pred = th.randn(3, TILE, TILE, generator=self.gen) + len(self.seen)
            logvar = th.randn(3, TILE, TILE, generator=self.gen)
            self.seen[(top, left)] = dict(
                x=x.clone(), sar=s.clone(), pred=pred, logvar=logvar
            )
            out["pred_xstart"].append(pred)
            out["log_variance"].append(logvar)
        out = {k: th.stack(v) for k, v in out.items()}
        return out if self.learned_variance else {"pred_xstart": out["pred_xstart"]}


def scene_arrays(height, width):
    arrays = SceneArrays()
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x = np.stack([rows, cols, np.random.default_rng(1).normal(size=(height, width))])
    sar = np.random.default_rng(2).uniform(-1, 1, (2, height, width))
    arrays.create("x", 3, height, width)
    arrays.create("sar", 2, height, width)
    arrays.write("x", 0, x.astype(np.float32))
    arrays.write("sar", 0, sar.astype(np.float32))
    return arrays, x, sar


@pytest.mark.parametrize("shift", [(0, 0), (3, -4)])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_the_fused_prediction_is_the_window_weighted_mean_of_the_tiles(
    shift, learned_variance
):
    height, width = 40, 56  # not a multiple of the stride either way
    arrays, x, sar = scene_arrays(height, width)
    denoise = RecordingDenoiser(learned_variance)
    fuser = TileFuser(arrays, denoise, TILE, OVERLAP, batch_size=5,
                      learned_variance=learned_variance)  # fmt: skip
    fuser(7, shift)
    expected_tiles = tile_grid(height, width, TILE, OVERLAP, shift)
    assert sorted(denoise.seen) == sorted(expected_tiles)

    sums = {k: np.zeros((3, height, width)) for k in ("pred", "logvar")}
    weight = np.zeros((height, width))
    for (top, left), tile in denoise.seen.items():
        rows, cols = slice(top, top + TILE), slice(left, left + TILE)
        # the network saw this tile's state and SAR
        np.testing.assert_allclose(
            tile["x"].numpy(), x[:, rows, cols], rtol=0, atol=1e-5
        )
        np.testing.assert_allclose(
            tile["sar"].numpy(), sar[:, rows, cols], rtol=0, atol=1e-6
        )
        w = np.outer(hann_by_hand(TILE, top, height), hann_by_hand(TILE, left, width))
        sums["pred"][:, rows, cols] += w * tile["pred"].double().numpy()
        sums["logvar"][:, rows, cols] += w * tile["logvar"].double().numpy()
        weight[rows, cols] += w
    assert weight.min() > 0

    total = fuser.total((0, height)).double().numpy()
    np.testing.assert_allclose(total, weight, rtol=1e-6)
    keys = ("pred", "logvar") if learned_variance else ("pred",)
    assert fuser.keys == keys
    for key in keys:
        got = arrays.read(key, (0, height)).double().numpy() / total
        np.testing.assert_allclose(got, sums[key] / weight, rtol=1e-5, atol=1e-5)


def test_the_library_weights_are_the_windows_by_hand():
    # tiling.tile_weights (what the benchmarks and docs draw) and the fuser share
    # tiling.axis_window: both against the definition
    height, width = 40, 56
    for top, left in tile_grid(height, width, TILE, OVERLAP, (2, -3)):
        by_hand = np.outer(
            hann_by_hand(TILE, top, height), hann_by_hand(TILE, left, width)
        )
        np.testing.assert_allclose(
            tile_weights(height, width, TILE, top, left), by_hand
        )
