"""
A whole scene sampled as one: the state, the SAR and the fusion buffers are the
only scene-sized arrays, kept in memory or in memory-mapped files, and a long job
is saved every few steps and continued after a kill with the same result.

Every step has two passes.

1. Fusion (:class:`TileFuser`): the network sees overlapping tiles of the state,
   a batch at a time, and their x_0 predictions (and learned log-variances) are
   summed into scene-sized buffers with the tiles' windows (guided_diffusion/
   tiling.py). The windows' sum is separable, (sum over tile rows) x (sum over
   tile columns), so it needs no buffer of its own.
2. Update (:class:`SceneSampler`): the registered sampler takes its step, one band
   of :data:`BAND_ROWS` rows at a time, on that band's state and fused prediction.
   Each band continues the sampler from where it stopped (``history`` in
   guided_diffusion/base/samplers.py) with its own noise generator, so DDPM, DDIM and
   DPM-Solver++ run unchanged, a band's arithmetic is the same whether the arrays
   live in memory or on disk, and a saved job is just the state, the last
   prediction and the generators' states.

With ``shift_tiles`` the inner tiles move by a few pixels at every step (by
:func:`step_shift`, from the seed and the step), so that no line of the scene is
a border between tiles at every step: a border's small mismatch, drawn at the same
place step after step, would add up to a faint seam.

The bands are fixed (they depend on the scene's height only), and so is each
band's seed (the run's seed and the band's number): the result depends on the
seed alone, never on the tile batch, the number of processes or where the arrays
live. Noise is drawn once per scene pixel, never averaged across tiles.
"""

import json
import os
import shutil

import numpy as np
import torch as th

from ..base import samplers
from ..base.atomic import write_atomic, write_json
from ..base.seeds import hashed_seed, hashed_words
from .tiling import axis_window, max_shift, tile_grid

# Rows per band of the sampler's update (and of reading and writing the scene).
BAND_ROWS = 64
# The arrays a saved job holds: the state and the last x_0 prediction.
STATE_ARRAYS = ("x", "history")


def bands(height, rows=BAND_ROWS):
    """The fixed bands of a scene: [(top, bottom)], top to bottom."""
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def band_seed(seed, band):
    """The seed of one band's noise generator: 63 bits of SHA-256 of (seed, band),
    the same in every process and on every machine."""
    return hashed_seed(int(seed), f"scene band {band}")


def scene_sample_seed(seed, k):
    """
    The seed of translation k of a scene (translate_scene.py --samples_per_input).

    :param seed: the run's seed (--seed).
    :param k: the sample's index, 0 <= k < K.
    :return: for k = 0 ``seed`` itself, so sample 0 is the translation of a run
        with one sample, to the bit; otherwise 63 bits of SHA-256 of (seed, k), the
        same in every process and on every machine. Every band's noise and every
        step's tile shift of sample k come from it.
    """
    if int(k) == 0:
        return int(seed)
    return hashed_seed(int(seed), f"scene sample {int(k)}")


def step_shift(seed, step, limit):
    """
    How far the inner tiles move at one step: (rows, columns), each uniform in
    -limit..limit, from SHA-256 of (seed, step), the same in every process.
    """
    span = 2 * limit + 1
    words = hashed_words(int(seed), f"tile shift {int(step)}", count=2)
    return tuple(word % span - limit for word in words)


class SceneArrays:
    """
    Named float32 arrays of shape (C, H, W), in memory or in memory-mapped files.

    Every access copies: :meth:`read` returns a tensor of its own and
    :meth:`write` / :meth:`add` copy into the array. A file is mapped only for
    the duration of one access, so pages a job has finished with are not held in
    the process's memory and its resident size stays that of a band or a tile
    row, whatever the scene's size.

    :param folder: where the files live; None keeps the arrays in memory.
    """

    def __init__(self, folder=None):
        self.folder = folder
        self.shapes = {}
        self._memory = {}
        if folder is not None:
            os.makedirs(folder, exist_ok=True)

    def path(self, name):
        return os.path.join(self.folder, f"{name}.f32")

    def create(self, name, channels, height, width):
        """A new array of zeros."""
        shape = (channels, height, width)
        self.shapes[name] = shape
        if self.folder is None:
            self._memory[name] = np.zeros(shape, np.float32)
        else:
            with open(self.path(name), "wb") as f:
                # the disk space is taken now: a full disk fails here with
                # ENOSPC, not later as a SIGBUS in a write through the mapping
                size = 4 * channels * height * width
                if size and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)
                else:
                    f.truncate(size)

    def _array(self, name):
        if self.folder is None:
            return self._memory[name]
        return np.memmap(self.path(name), np.float32, "r+", shape=self.shapes[name])

    def read(self, name, rows) -> th.Tensor:
        """A copy of the rows [rows[0], rows[1]), all columns, (C, h, W)."""
        arr = self._array(name)
        out = th.from_numpy(np.array(arr[:, rows[0] : rows[1]]))
        del arr
        return out

    def write(self, name, top, values):
        """Set the rows from ``top`` (all columns) to ``values`` (C, h, W)."""
        arr = self._array(name)
        arr[:, top : top + values.shape[1]] = _numpy(values)
        del arr

    def add(self, name, top, values):
        """Add ``values`` (C, h, W) to the rows from ``top``."""
        arr = self._array(name)
        arr[:, top : top + values.shape[1]] += _numpy(values)
        del arr

    def zero(self, name):
        for top, bottom in bands(self.shapes[name][1]):
            c, _, w = self.shapes[name]
            self.write(name, top, np.zeros((c, bottom - top, w), np.float32))

    def save(self, name, path):
        """Copy an array into a file of raw float32, band by band (each band
        (C, h, W) in turn), durably."""

        def write(f):
            for rows in bands(self.shapes[name][1]):
                f.write(self.read(name, rows).numpy().tobytes())

        write_atomic(path, write)

    def load(self, name, path):
        """Fill an array from a file :meth:`save` wrote."""
        c, h, w = self.shapes[name]
        if os.path.getsize(path) != 4 * c * h * w:
            raise ValueError(f"{path} does not hold a ({c}, {h}, {w}) array")
        with open(path, "rb") as f:
            for top, bottom in bands(h):
                part = np.fromfile(f, np.float32, count=c * (bottom - top) * w)
                self.write(name, top, part.reshape(c, bottom - top, w))

    def remove(self):
        """Delete the files (the arrays in memory are dropped)."""
        self._memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _numpy(values):
    return values.numpy() if th.is_tensor(values) else values


def scene_bytes(height, width, sar_channels, learned_variance):
    """Bytes of a job's scene-sized arrays (state, history, fused x_0 and
    log-variance, SAR, valid mask), float32 each."""
    channels = 3 + 3 + 3 + (3 if learned_variance else 0) + sar_channels + 1
    return 4 * channels * height * width


# -- the two passes -------------------------------------------------------------------


class TileFuser:
    """
    Fuse the network's predictions on overlapping tiles into scene-sized sums.

    :param arrays: a :class:`SceneArrays` with "x" (3, H, W) and "sar"; receives
        "pred" (and "logvar") sums.
    :param denoise: (x tiles, SAR tiles, t) -> a dict with "pred_xstart" (and
        "log_variance" when learned), CPU tensors (N, 3, tile, tile).
    :param tile: the tile side. :param overlap: pixels shared by neighbours.
    :param batch_size: tiles per network call.
    :param rank, world: this process's share of the tiles: rank, rank + world, ...
    :param learned_variance: fuse the log-variance too.
    :param progress: called with the number of tiles done after each batch.
    """

    def __init__(self, arrays, denoise, tile, overlap, *, batch_size=8, rank=0,
                 world=1, learned_variance=False, progress=None):  # fmt: skip
        _, self.height, self.width = arrays.shapes["x"]
        self.arrays, self.denoise, self.tile, self.overlap = arrays, denoise, tile, overlap
        self.batch_size, self.progress = batch_size, progress
        self.rank, self.world = rank, world
        self.max_shift = max_shift(tile, overlap)
        self.keys = ("pred", "logvar") if learned_variance else ("pred",)
        self.layout((0, 0))
        for key in self.keys:
            arrays.create(key, 3, self.height, self.width)

    def tiles(self, shift=(0, 0)):
        """The tiles of the grid moved by ``shift``, row by row: [(top, left)]."""
        return tile_grid(self.height, self.width, self.tile, self.overlap, shift)

    def layout(self, shift):
        """Place the tiles for a step: this process's share and the windows' sums."""
        tile, height, width = self.tile, self.height, self.width
        self.shift = tuple(shift)
        self.grid = self.tiles(shift)
        self.mine = self.grid[self.rank :: self.world]
        tops = sorted({top for top, _ in self.grid})
        lefts = sorted({left for _, left in self.grid})
        self._wy = {top: axis_window(height, tile, top) for top in tops}
        self._wx = {left: axis_window(width, tile, left) for left in lefts}
        self.row_total = np.zeros(height)
        for top in tops:
            self.row_total[top : top + tile] += self._wy[top]
        self.col_total = np.zeros(width)
        for left in lefts:
            self.col_total[left : left + tile] += self._wx[left]

    def total(self, rows):
        """The windows' sum over rows [top, bottom), (h, W) float32."""
        return th.from_numpy(
            np.outer(self.row_total[rows[0] : rows[1]], self.col_total).astype(np.float32)
        )

    def __call__(self, t, shift=(0, 0)):
        """
        Fill the sums with step ``t``'s predictions on this process's tiles, the
        grid's inner tiles moved by ``shift``.
        """
        if tuple(shift) != self.shift:
            self.layout(shift)
        for key in self.keys:
            self.arrays.zero(key)
        size, width = self.tile, self.arrays.shapes["x"][2]
        pending = {}
        for top, _ in self.mine:
            pending[top] = pending.get(top, 0) + 1
        strips, sums = {}, {}
        for start in range(0, len(self.mine), self.batch_size):
            places = self.mine[start : start + self.batch_size]
            for top, _ in places:
                if top not in strips:  # one tile row of the state and SAR, read once
                    rows = (top, top + size)
                    strips[top] = (self.arrays.read("x", rows), self.arrays.read("sar", rows))
                    sums[top] = {k: th.zeros(3, size, width) for k in self.keys}
            xs = th.stack([strips[r][0][:, :, c : c + size] for r, c in places])
            sar = th.stack([strips[r][1][:, :, c : c + size] for r, c in places])
            out = self.denoise(xs, sar, t)
            for i, (top, left) in enumerate(places):
                w = th.from_numpy(np.outer(self._wy[top], self._wx[left]).astype(np.float32))
                sums[top]["pred"][:, :, left : left + size] += w * out["pred_xstart"][i]
                if "logvar" in sums[top]:
                    sums[top]["logvar"][:, :, left : left + size] += (
                        w * out["log_variance"][i]
                    )
                pending[top] -= 1
                if not pending[top]:  # the tile row is done: into the scene's sums
                    for key, acc in sums.pop(top).items():
                        self.arrays.add(key, top, acc)
                    del strips[top]
            if self.progress is not None:
                self.progress(len(places))


class _BandPrediction:
    """
    One band's fused prediction in the shape of ``samplers.Denoiser``: the
    sampler calls it once, with the band's state.
    """

    def __init__(self, diffusion, pred_xstart, log_variance):
        self.diffusion = diffusion
        self.alphas_cumprod = diffusion.alphas_cumprod
        self.pred_xstart, self.log_variance = pred_xstart, log_variance

    def __call__(self, x, t):
        d = self.diffusion
        ts = th.full((1,), int(t), dtype=th.long)
        pred = self.pred_xstart
        if self.log_variance is None:
            variance, log_variance = d.fixed_variance(ts, x.shape)
        else:
            log_variance = self.log_variance
            variance = th.exp(log_variance)
        mean, _, _ = d.q_posterior_mean_variance(x_start=pred, x_t=x, t=ts)
        return {
            "pred_xstart": pred, "mean": mean, "variance": variance,
            "log_variance": log_variance, "eps": d._predict_eps_from_xstart(x, ts, pred),
        }  # fmt: skip


class JobMismatch(ValueError):
    """A work folder holds a job saved with other settings."""


# What a saved job's settings mean. Raised when a change of the project makes the
# same settings give another result; a job saved under an earlier meaning is
# refused (:func:`saved_under_older_rules`), not continued under the new one.
KEY_VERSION = 2
KEY_CHANGES = {
    2: "a nodata value an 8-bit SAR file declares is nodata now; it was read as data",
}


def saved_under_older_rules(saved, key, where):
    """
    The one line refusing a job saved under an earlier :data:`KEY_VERSION`, or None.

    :param saved: the settings a job was saved with (no "version": version 1).
    :param key: this run's settings.
    :param where: what holds the saved job (its folder), for the message.
    """
    then, now = saved.get("version", 1), key.get("version", 1)
    if then == now:
        return None
    why = "; ".join(KEY_CHANGES[v] for v in range(then + 1, now + 1) if v in KEY_CHANGES)
    return (
        f"{where} holds a job saved by an earlier version of this project, whose "
        f"results these settings no longer give ({why or f'version {then}, now {now}'}): "
        "finish it with that version, or delete the folder to start over"
    )


def key_differences(saved, key):
    """
    How a job's settings differ from those it was saved with.

    :param saved: the settings as read back from a saved JSON file.
    :param key: the settings of this run (compared as JSON would save them).
    :return: "name saved, not this, ..." for each setting that differs, sorted by
        name; "" when none does.
    """
    mine = json.loads(json.dumps(key))
    differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    return ", ".join(f"{k} {saved.get(k)!r}, not {mine.get(k)!r}" for k in differ)


class SceneSampler:
    """
    The reverse process on a scene: fusion over tiles, then the sampler's update
    band by band; saved every few steps and continued after a kill.

    :param arrays: a :class:`SceneArrays` holding "sar" (C_sar, H, W); "x" and
        "history" are made here.
    :param fuser_args: the keyword arguments of :class:`TileFuser` but ``arrays``.
    :param diffusion: the (respaced) diffusion.
    :param sampler: a name in ``samplers.SAMPLERS``. :param options: its options.
    :param seed: the noise seed.
    :param all_reduce: sums a CPU tensor in place across processes (None for one).
    :param shift_tiles: move the inner tiles by :func:`step_shift` at every step.
    :param key: the settings that decide the result (saved with the job and
        checked when it is continued).
    """

    def __init__(self, arrays, fuser_args, diffusion, sampler, options, seed, *,
                 all_reduce=None, shift_tiles=False, key=None):  # fmt: skip
        _, height, width = arrays.shapes["sar"]
        for name in STATE_ARRAYS:
            arrays.create(name, 3, height, width)
        self.arrays = arrays
        self.fuser = TileFuser(arrays, **fuser_args)
        self.diffusion = diffusion
        self.sampler, self.options = sampler, samplers.check_options(sampler, options)
        self.timesteps = list(samplers.descending(diffusion))
        self.bands = bands(height)
        self.seed = seed
        self.all_reduce = all_reduce
        self.shift_tiles = shift_tiles
        self.key = dict(key or {})
        self.generators = []
        self.step = 0

    # -- start, continue ----------------------------------------------------------

    def start(self):
        """x_T: noise from each band's generator."""
        self.generators = [
            th.Generator().manual_seed(band_seed(self.seed, b)) for b in range(len(self.bands))
        ]
        width = self.arrays.shapes["x"][2]
        for (top, bottom), g in zip(self.bands, self.generators):
            noise = samplers.noise_of_shape((3, bottom - top, width), g, "cpu")
            self.arrays.write("x", top, noise)
        self.step = 0

    def saved_step(self, folder):
        """
        The step a job saved in ``folder`` reached, or None when there is none.

        :raises JobMismatch: it was saved with other settings, naming them.
        """
        path = os.path.join(folder, "job.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            job = json.load(f)
        older = saved_under_older_rules(job["key"], self.key, folder)
        if older:
            raise JobMismatch(older)
        shown = key_differences(job["key"], self.key)
        if shown:
            raise JobMismatch(
                f"{folder} holds a job saved at step {job['step']} of "
                f"{len(self.timesteps)} with other settings ({shown}); "
                "rerun with those to continue it, or delete the folder to start over"
            )
        return job["step"]

    def resume(self, folder):
        """Continue from the job saved in ``folder`` (see :meth:`saved_step`)."""
        with open(os.path.join(folder, "job.json")) as f:
            job = json.load(f)
        for name in STATE_ARRAYS:
            self.arrays.load(name, os.path.join(folder, job["files"][name]))
        states = th.load(os.path.join(folder, job["files"]["generators"]))
        self.generators = []
        for state in states:
            g = th.Generator()
            g.set_state(state)
            self.generators.append(g)
        self.step = job["step"]

    def save(self, folder):
        """
        Save the job durably: the arrays and the generators under names of this
        step, then job.json (renamed into place last, so it always names complete
        files), then the older files are removed.
        """
        os.makedirs(folder, exist_ok=True)
        files = {name: f"{name}-{self.step:06d}.f32" for name in STATE_ARRAYS}
        files["generators"] = f"generators-{self.step:06d}.pt"
        for name in STATE_ARRAYS:
            self.arrays.save(name, os.path.join(folder, files[name]))
        states = [g.get_state() for g in self.generators]
        write_atomic(
            os.path.join(folder, files["generators"]), lambda f: th.save(states, f)
        )
        job = {"step": self.step, "key": self.key, "files": files}
        write_json(os.path.join(folder, "job.json"), job, indent=1)
        for name in os.listdir(folder):
            if name.endswith((".f32", ".pt")) and name not in files.values():
                os.remove(os.path.join(folder, name))

    # -- run ------------------------------------------------------------------------

    def shift(self, step):
        """Where the inner tiles lie at ``step``: (rows, columns) moved."""
        if not self.shift_tiles:
            return (0, 0)
        return step_shift(self.seed, step, self.fuser.max_shift)

    def tiles_left(self):
        """How many tiles this process has yet to put through the network."""
        fuser = self.fuser
        return sum(
            len(fuser.tiles(self.shift(step))[fuser.rank :: fuser.world])
            for step in range(self.step, len(self.timesteps))
        )

    def step_once(self):
        """One step of the reverse process over the whole scene."""
        t = self.timesteps[self.step]
        self.fuser(t, self.shift(self.step))
        later = self.timesteps[self.step :]
        previous = self.timesteps[self.step - 1] if self.step else None
        for b, rows in enumerate(self.bands):
            total = self.fuser.total(rows)
            fused = {}
            for key in self.fuser.keys:
                part = self.arrays.read(key, rows)
                if self.all_reduce is not None:
                    self.all_reduce(part)
                fused[key] = (part / total)[None]
            x = self.arrays.read("x", rows)[None]
            history = None
            if previous is not None:
                history = {"t": previous, "pred_xstart": self.arrays.read("history", rows)[None]}
            denoiser = _BandPrediction(self.diffusion, fused["pred"], fused.get("logvar"))
            steps = samplers.SAMPLERS[self.sampler](
                denoiser, x, later, generator=self.generators[b], history=history,
                **self.options,
            )  # fmt: skip
            out = next(steps)
            self.arrays.write("x", rows[0], out["sample"][0])
            self.arrays.write("history", rows[0], out["pred_xstart"][0])
        self.step += 1

    def run(self, *, save_every=0, folder=None, should_stop=None, on_step=None):
        """
        Step to the end, saving into ``folder`` every ``save_every`` steps and
        after the last one.

        :param should_stop: called after each step; True saves and returns early.
        :param on_step: called after each step with the steps done.
        :return: True when the job reached its last step.
        """
        while self.step < len(self.timesteps):
            self.step_once()
            last = self.step == len(self.timesteps)
            stop = bool(should_stop and should_stop())
            if folder is not None and (last or stop or (save_every and self.step % save_every == 0)):
                self.save(folder)
            if on_step is not None:
                on_step(self.step)
            if stop and not last:
                return False
        return True
