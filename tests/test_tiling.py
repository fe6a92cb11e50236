"""
Joint denoising of overlapping tiles (guided_diffusion/translation/tiling.py and scene.py).

The independent facts: tiles cover the scene and stay inside it; the fused
weights are positive everywhere; for a network that looks at one pixel at a time
(a 1x1 convolution) tiling cannot change anything, so the fused prediction and
every deterministic sampler on the scene must give what the whole-scene denoiser
gives; a job saved and continued, or kept on disk, gives what one run in memory
gives, to the bit.
"""

import numpy as np
import pytest
import torch as th
from conftest import linear_diffusion

from guided_diffusion.base import samplers
from guided_diffusion.translation.scene import (
    SceneArrays,
    SceneSampler,
    bands,
    step_shift,
)
from guided_diffusion.translation.tiling import (
    max_shift,
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


@pytest.mark.parametrize(
    "size, tile, overlap", [(65, 64, 32), (300, 64, 32), (257, 32, 16), (1000, 64, 16)]
)
def test_moved_tiles_still_cover_every_pixel_with_half_the_overlap(size, tile, overlap):
    limit = max_shift(tile, overlap)
    assert limit == min(overlap // 2, (tile - overlap) // 2) and limit > 0
    for shift in range(-limit, limit + 1):
        starts = tile_starts(size, tile, overlap, shift)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b > a for a, b in zip(starts, starts[1:]))
        # neighbours share at least half the overlap: every pixel is covered
        assert all(a + tile - b >= overlap - overlap // 2 for a, b in zip(starts, starts[1:]))
        # the inner tiles lie on the grid moved by the shift
        stride = tile - overlap
        assert all((s - shift) % stride == 0 for s in starts[1:-1])
        if shift == 0:  # the fixed grid: ceil((size - tile) / stride) + 1 tiles
            assert len(starts) == -(-(size - tile) // stride) + 1
    with pytest.raises(ValueError, match="shift"):
        tile_starts(size, tile, overlap, limit + 1)


def test_the_shift_of_a_step_comes_from_the_seed_and_the_step():
    shifts = [step_shift(0, step, 8) for step in range(400)]
    assert shifts == [step_shift(0, step, 8) for step in range(400)]
    assert shifts != [step_shift(1, step, 8) for step in range(400)]
    values = np.array(shifts)
    assert values.min() == -8 and values.max() == 8  # all of -8..8, both ways
    assert len(set(values[:, 0])) == 17 and len(set(values[:, 1])) == 17
    assert abs(values.mean()) < 1.0
    assert max_shift(32, 0) == 0 and step_shift(0, 3, 0) == (0, 0)


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


def make_scene_job(diffusion, model, sar, *, folder=None, sampler="ddim", options=None,
             seed=0, rank=0, world=1, batch_size=4, learn_sigma=False,
             shift_tiles=False):  # fmt: skip
    """A SceneSampler on ``sar`` (1, C, H, W) with 32-pixel tiles."""
    arrays = SceneArrays(folder)
    _, channels, height, width = sar.shape
    arrays.create("sar", channels, height, width)
    arrays.write("sar", 0, sar[0])

    def denoise(xs, conds, t):
        out = samplers.Denoiser(diffusion, model, conds)(xs, t)
        return {k: out[k] for k in ("pred_xstart", "log_variance")}

    fuser_args = dict(denoise=denoise, tile=32, overlap=16, batch_size=batch_size,
                      rank=rank, world=world, learned_variance=learn_sigma)  # fmt: skip
    return SceneSampler(arrays, fuser_args, diffusion, sampler, options or {}, seed,
                        shift_tiles=shift_tiles)  # fmt: skip


make_job = make_scene_job


def whole(job, name):
    _, height, _ = job.arrays.shapes[name]
    return job.arrays.read(name, (0, height))[None]


def fused(job, t, shift=(0, 0)):
    job.fuser(t, shift)
    rows = (0, job.arrays.shapes["x"][1])
    return {
        key: (job.arrays.read(key, rows) / job.fuser.total(rows))[None]
        for key in job.fuser.keys
    }


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_a_pixelwise_network_gives_the_whole_scene_prediction(learn_sigma):
    from guided_diffusion import gaussian_diffusion as gd

    kind = gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE
    diffusion = linear_diffusion(num_steps=50, model_var_type=kind)
    model = PixelModel(5, 6 if learn_sigma else 3)
    sar, _ = scene(72, 100)
    job = make_job(diffusion, model, sar, learn_sigma=learn_sigma, batch_size=3)
    job.start()
    x = whole(job, "x")
    direct = samplers.Denoiser(diffusion, model, sar)
    for t, shift in ((49, (0, 0)), (20, (8, -3)), (0, (-8, 8))):
        a, b = direct(x, t), fused(job, t, shift)
        th.testing.assert_close(b["pred"], a["pred_xstart"], rtol=1e-5, atol=1e-5)
        if learn_sigma:
            th.testing.assert_close(b["logvar"], a["log_variance"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler, shift_tiles", [("ddim", True), ("dpm++2m", False)])
def test_a_deterministic_sampler_on_the_scene_is_the_whole_scene_sampler(
    sampler, shift_tiles
):
    # band by band, the sampler's update is the one it makes on the whole scene,
    # wherever the tiles lie at each step
    diffusion = linear_diffusion(num_steps=50)
    model = PixelModel(5, 3)
    sar, _ = scene(150, 56)  # three bands of rows, the last one short
    job = make_job(diffusion, model, sar, sampler=sampler, shift_tiles=shift_tiles)
    assert len(job.bands) == 3
    job.start()
    x_T = whole(job, "x")
    job.run()
    direct = samplers.run(sampler, samplers.Denoiser(diffusion, model, sar), x_T)
    th.testing.assert_close(whole(job, "x"), direct, rtol=1e-4, atol=1e-4)


def test_the_noise_is_one_draw_per_pixel_from_the_seed():
    diffusion = linear_diffusion(num_steps=50)
    sar, _ = scene(150, 40)
    a, b, c = (make_job(diffusion, PixelModel(5, 3), sar, seed=s) for s in (0, 0, 1))
    for job in (a, b, c):
        job.start()
    x_a = whole(a, "x")
    th.testing.assert_close(whole(b, "x"), x_a, rtol=0, atol=0)
    assert not th.equal(whole(c, "x"), x_a)
    # standard normal, and no two bands alike
    assert abs(x_a.mean()) < 0.05 and abs(x_a.std() - 1) < 0.05
    rows = [x_a[..., top:bottom, :] for top, bottom in bands(150)]
    assert not th.equal(rows[0][..., :22, :], rows[1][..., :22, :])


@pytest.mark.parametrize("shift", [(0, 0), (-7, 5)])
def test_the_result_does_not_depend_on_the_tile_batch_or_the_share(shift):
    diffusion = linear_diffusion(num_steps=50)
    model = NeighbourModel(5, 3)
    sar, _ = scene(64, 88)
    one = make_job(diffusion, model, sar, batch_size=1)
    many = make_job(diffusion, model, sar, batch_size=7)
    for job in (one, many):
        job.start()
    a = fused(one, 30, shift)["pred"]
    th.testing.assert_close(fused(many, 30, shift)["pred"], a, rtol=1e-5, atol=1e-5)
    # two "ranks" each sum their own tiles; adding their sums gives the whole
    halves = []
    for rank in (0, 1):
        job = make_job(diffusion, model, sar, rank=rank, world=2)
        job.start()
        job.fuser(30, shift)
        halves.append(whole(job, "pred"))
        assert len(job.fuser.mine) < len(job.fuser.grid)
    total = one.fuser.total((0, 64))
    th.testing.assert_close((halves[0] + halves[1]) / total, a, rtol=1e-5, atol=1e-5)


def test_a_scene_of_one_tile_is_the_plain_denoiser():
    diffusion = linear_diffusion(num_steps=50)
    model = NeighbourModel(5, 3)
    sar, _ = scene(32, 32)
    job = make_job(diffusion, model, sar)
    assert job.fuser.grid == [(0, 0)]
    job.start()
    x = whole(job, "x")
    th.testing.assert_close(
        fused(job, 10)["pred"],
        samplers.Denoiser(diffusion, model, sar)(x, 10)["pred_xstart"],
    )


@pytest.mark.parametrize("sampler, shift_tiles", [("ddpm", True), ("dpm++2m", False)])
def test_a_saved_job_continues_to_the_same_bits_on_disk_or_in_memory(
    sampler, shift_tiles, tmp_path
):
    diffusion = linear_diffusion(num_steps=25)
    model = NeighbourModel(5, 3)
    sar, _ = scene(100, 72)

    def make_job(*args, **kwargs):
        return make_scene_job(*args, shift_tiles=shift_tiles, **kwargs)

    straight = make_job(diffusion, model, sar, sampler=sampler)
    straight.start()
    straight.run()
    expected = whole(straight, "x")
    # on disk, saved every 5 steps, "killed" in step 8: continues from step 5
    first = make_job(diffusion, model, sar, sampler=sampler, folder=tmp_path / "a")
    first.start()
    real_step = first.step_once

    def dies_in_step_8():
        if first.step == 7:
            raise KeyboardInterrupt
        real_step()

    first.step_once = dies_in_step_8
    with pytest.raises(KeyboardInterrupt):
        first.run(save_every=5, folder=tmp_path / "job")
    second = make_job(diffusion, model, sar, sampler=sampler, folder=tmp_path / "b")
    assert second.saved_step(tmp_path / "job") == 5
    second.resume(tmp_path / "job")
    assert second.run(save_every=5, folder=tmp_path / "job")
    assert th.equal(whole(second, "x"), expected)
    # a job asked to stop saves where it is and says so
    third = make_job(diffusion, model, sar, sampler=sampler)
    third.start()
    assert not third.run(folder=tmp_path / "stop", should_stop=lambda: third.step == 3)
    assert make_job(diffusion, model, sar, sampler=sampler).saved_step(tmp_path / "stop") == 3


def test_a_job_saved_with_other_settings_is_not_continued(tmp_path):
    from guided_diffusion.translation.scene import JobMismatch

    diffusion = linear_diffusion(num_steps=25)
    sar, _ = scene(40, 40)
    job = make_job(diffusion, PixelModel(5, 3), sar)
    job.key = {"seed": 0}
    job.start()
    job.run(folder=tmp_path)
    other = make_job(diffusion, PixelModel(5, 3), sar)
    other.key = {"seed": 1}
    with pytest.raises(JobMismatch, match="seed 0, not 1"):
        other.saved_step(tmp_path)
