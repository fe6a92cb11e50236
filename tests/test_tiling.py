"""
Joint denoising of overlapping tiles (guided_diffusion/tiling.py).

The independent facts: tiles cover the scene and stay inside it; the fused
weights are positive everywhere; for a network that looks at one pixel at a time
(a 1x1 convolution) tiling cannot change anything, so the tiled denoiser and every
sampler on it must give what the whole-scene denoiser gives.
"""

import numpy as np
import pytest
import torch as th
from conftest import linear_diffusion

from guided_diffusion import samplers
from guided_diffusion.tiling import (
    TiledDenoiser,
    tile_grid,
    tile_starts,
    tile_weights,
    window_1d,
)


@pytest.mark.parametrize(
    "size, tile, overlap",
    [
        (64, 64, 32),
        (65, 64, 32),
        (300, 64, 32),
        (257, 32, 16),
        (100, 48, 0),
        (97, 16, 15),
    ],
)
def test_tiles_cover_every_pixel_and_stay_inside(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert all(0 <= s <= size - tile for s in starts)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    # neighbours overlap by at least the overlap asked for, and advance
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert all(b > a for a, b in zip(starts, starts[1:]))


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)
    with pytest.raises(ValueError, match="shorter than a tile"):
        tile_starts(20, 32, 16)


def test_window_is_hann_inside_and_one_on_the_scene_border():
    w = window_1d(8)
    np.testing.assert_allclose(w, np.sin(np.pi * (np.arange(8) + 0.5) / 8) ** 2)
    assert w.min() > 0 and w[0] < 0.04
    np.testing.assert_array_equal(window_1d(8, taper_start=False)[:4], 1.0)
    np.testing.assert_array_equal(window_1d(8, taper_end=False)[4:], 1.0)
    # a corner tile holds 1 on the scene's corner pixel
    assert tile_weights(100, 100, 32, 0, 0)[0, 0] == 1.0
    total = np.zeros((70, 90))
    for top, left in tile_grid(70, 90, 32, 16):
        total[top : top + 32, left : left + 32] += tile_weights(70, 90, 32, top, left)
    assert total.min() > 0.4  # every pixel is well covered


class PixelModel(th.nn.Module):
    """A 1x1 convolution: each output pixel depends on its own input pixel only."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        th.manual_seed(0)
        self.conv = th.nn.Conv2d(in_channels, out_channels, 1)
        self.dtype = th.float32

    def forward(self, x, t, **kwargs):
        return th.tanh(self.conv(x)) + 1e-3 * t.float().view(-1, 1, 1, 1)


class NeighbourModel(PixelModel):
    """A 3x3 convolution: tiles see different context near their edges."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels)
        self.conv = th.nn.Conv2d(in_channels, out_channels, 3, padding=1)


def scene(height, width, sar_channels=2, seed=0):
    g = th.Generator().manual_seed(seed)
    return (
        th.rand(1, sar_channels, height, width, generator=g) * 2 - 1,
        th.randn(1, 3, height, width, generator=g),
    )


def make(diffusion, model):
    return lambda cond: samplers.Denoiser(diffusion, model, cond)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_a_pixelwise_network_gives_the_whole_scene_result(learn_sigma):
    from guided_diffusion import gaussian_diffusion as gd

    kind = gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE
    diffusion = linear_diffusion(num_steps=50, model_var_type=kind)
    model = PixelModel(5, 6 if learn_sigma else 3)
    sar, x = scene(72, 100)
    whole = samplers.Denoiser(diffusion, model, sar)
    tiled = TiledDenoiser(make(diffusion, model), diffusion, sar, 32, batch_size=3)
    for t in (49, 20, 0):
        a, b = whole(x, t), tiled(x, t)
        for key in ("pred_xstart", "mean", "eps", "log_variance"):
            th.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_every_sampler_runs_on_the_tiled_scene(sampler):
    diffusion = linear_diffusion(num_steps=50)
    model = PixelModel(5, 3)
    sar, x = scene(40, 56)
    steps = list(range(49, -1, -1)) if sampler == "ddpm" else list(range(49, -1, -7))
    outs = []
    for denoiser in (
        samplers.Denoiser(diffusion, model, sar),
        TiledDenoiser(make(diffusion, model), diffusion, sar, 32),
    ):
        g = th.Generator().manual_seed(3)
        outs.append(samplers.run(sampler, denoiser, x.clone(), steps, generator=g))
    th.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_the_result_does_not_depend_on_the_tile_batch_or_the_share():
    diffusion = linear_diffusion(num_steps=50)
    model = NeighbourModel(5, 3)
    sar, x = scene(64, 88)
    one = TiledDenoiser(make(diffusion, model), diffusion, sar, 32, batch_size=1)(x, 30)
    many = TiledDenoiser(make(diffusion, model), diffusion, sar, 32, batch_size=7)(
        x, 30
    )
    th.testing.assert_close(
        many["pred_xstart"], one["pred_xstart"], rtol=1e-5, atol=1e-5
    )
    # two "ranks" each fuse their own tiles; summing their partial sums is the whole
    partial = {}

    def keep(rank):
        def reduce(acc):
            partial.setdefault(rank, []).append(acc.clone())

        return reduce

    for rank in (0, 1):
        TiledDenoiser(make(diffusion, model), diffusion, sar, 32, rank=rank, world=2,
                      all_reduce=keep(rank))(x, 30)  # fmt: skip
    summed = partial[0][0] + partial[1][0]  # pred_xstart's weighted sums
    total = TiledDenoiser(make(diffusion, model), diffusion, sar, 32).total
    th.testing.assert_close(summed / total, one["pred_xstart"], rtol=1e-5, atol=1e-5)


def test_a_scene_of_one_tile_is_the_plain_denoiser():
    diffusion = linear_diffusion(num_steps=50)
    model = NeighbourModel(5, 3)
    sar, x = scene(32, 32)
    tiled = TiledDenoiser(make(diffusion, model), diffusion, sar, 32)
    assert tiled.grid == [(0, 0)]
    th.testing.assert_close(
        tiled(x, 10)["pred_xstart"],
        samplers.Denoiser(diffusion, model, sar)(x, 10)["pred_xstart"],
    )
