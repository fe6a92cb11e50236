"""
Translating SAR patches at the model's size: the one way through for a folder
(scripts/image_sample_realtime.py, :func:`translate_folder`), the web page's upload
at the model's size and the validation during training.

* :func:`load_batch` reads SAR files as the training run read its data;
* :func:`translate_batch` samples a loaded batch K times (sample 0 is the single
  sample of a run without more, to the bit), blacks out nodata (no SAR, so no
  translation) and accumulates the samples' mean and spread;
* :func:`translate_items` runs both over a list of files, a batch at a time, and
  yields one :class:`Translated` per input, for the caller to write;
* :func:`translate_folder` is the folder job: claim the results folder (or continue
  it), translate this process's share, write the results folder (results.py).

Each image's noise depends only on the seed and its name (sample k: and k), so the
images do not depend on the batch, the number of processes or the order.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch as th
from tqdm.auto import tqdm

from .. import dist_util, logger
from ..image_datasets import find_test_pairs, load_opt
from ..io.rasters import SarStats, load_sar_patch
from ..io.results import (
    claim_folder,
    output_names,
    write_npz,
    write_result,
    write_spread_result,
)
from .samples import SpreadAccumulator, grey_levels, translate_samples
from .sampling import (
    BatchedModel,
    load_prepared_model,
    runs_in_fp16,
    sar_for_display,
    tf32_in_effect,
    to_uint8,
    write_log,
)


class UsageError(ValueError):
    """A flag or file the user has to fix; its message is one line."""


@dataclass
class Translated:
    """
    One input, translated.

    :param name: its relative path (it seeds the noise).
    :param sar: the SAR as shown, (H, W, 1 or 3) uint8.
    :param samples: the K samples, (H, W, 3) uint8 each, black where the SAR has no
        data; the first is the single sample of K = 1.
    :param mean, spread: with K > 1, (H, W, 3) float64 in grey levels (black where
        the SAR has no data); None for K = 1.
    :param valid: (H, W) bool, False where the SAR has no data.
    :param stats: what reading the SAR found (rasters.SarStats).
    :param truth: the ground truth, (H, W, 3) uint8, or None.
    """

    name: str
    sar: np.ndarray
    samples: list
    mean: np.ndarray | None
    spread: np.ndarray | None
    valid: np.ndarray
    stats: SarStats
    truth: np.ndarray | None = None


def load_batch(paths, image_size, scaling, device="cpu"):
    """
    SAR files at the model's size, as the training run read its data.

    :param paths: the files.
    :param scaling: how to read them (rasters.Scaling).
    :return: (sar, valid, stats): (N, C, H, W) float32 in [-1, 1] on ``device``,
        (N, H, W) bool (False where the SAR has no data) and a SarStats per file.
    """
    loaded = [load_sar_patch(path, image_size, scaling) for path in paths]
    sar = th.from_numpy(np.stack([arr for arr, _, _ in loaded])).to(device)
    valid = np.stack([mask for _, mask, _ in loaded])
    return sar, valid, [stats for _, _, stats in loaded]


def translate_batch(model, diffusion, sar, valid, names, job, *, progress=False):
    """
    Sample a loaded batch ``job.samples_per_input`` times.

    :param model: the U-Net (any callable of guided-diffusion's signature).
    :param diffusion: the respaced diffusion.
    :param sar, valid: of :func:`load_batch`.
    :param names: the inputs' relative paths (with the seed, they seed the noise).
    :param job: a jobs.Sampling: sampler, options, seed, clip_denoised,
        samples_per_input, use_bf16.
    :param progress: a progress bar over each sample's steps.
    :return: (samples, stats): samples[k] is sample k of the batch, (N, H, W, 3)
        uint8, black where the SAR has no data; stats[i] is input i's (mean,
        spread) in grey levels with K > 1 (black at nodata), else None.
    """
    count = job.samples_per_input
    valid = np.asarray(valid)[..., None]
    samples, spread = [], [SpreadAccumulator() for _ in names]
    for _, generated in translate_samples(
        model, diffusion, sar, list(names), seed=job.seed, samples_per_input=count,
        sampler=job.sampler, clip_denoised=job.clip_denoised, progress=progress,
        use_bf16=job.use_bf16, **job.options,
    ):  # fmt: skip
        samples.append(np.where(valid, to_uint8(generated), 0).astype(np.uint8))
        if count > 1:
            for acc, image in zip(spread, np.where(valid, grey_levels(generated), 0)):
                acc.add(image)
    stats = [acc.result() if count > 1 else None for acc in spread]
    return samples, stats


def translate_items(model, diffusion, items, job, image_size, scaling, *,
                    progress=False, device="cpu"):  # fmt: skip
    """
    Translate files a batch of ``job.batch_size`` at a time.

    :param items: (SAR path, ground-truth path or None, name) per input.
    :param job: as :func:`translate_batch`.
    :param progress: progress bars over the steps.
    :return: an iterator of :class:`Translated`, in the order of ``items``.
    """
    for start in range(0, len(items), job.batch_size):
        batch = items[start : start + job.batch_size]
        names = [name for _, _, name in batch]
        sar, valid, stats = load_batch([p for p, _, _ in batch], image_size, scaling, device)
        samples, spread = translate_batch(
            model, diffusion, sar, valid, names, job, progress=progress
        )
        shown = sar_for_display(to_uint8(sar))
        for i, (_, opt_path, name) in enumerate(batch):
            truth = None
            if opt_path is not None:
                truth = to_uint8(load_opt(opt_path, image_size, scaling=scaling)[None])[0]
            mean, deviation = spread[i] if spread[i] is not None else (None, None)
            yield Translated(
                name, shown[i], [s[i] for s in samples], mean, deviation, valid[i],
                stats[i], truth,
            )  # fmt: skip


def folder_model(job, flags, device):
    """The model of a folder job, loaded, prepared and called on at most
    ``job.batch_size`` images at a time (padded to that many under --compile: one
    input shape, compiled once)."""
    model = load_prepared_model(job, flags, device)
    return BatchedModel(model, job.batch_size, pad=job.compile)


def results_folder(job, diffusion):
    """Where a folder job writes: ``job.out_dir``, else
    ``sample_results/<sampler><steps>`` in the log folder."""
    return job.out_dir or os.path.join(
        logger.get_dir(), "sample_results", f"{job.sampler}{diffusion.num_timesteps}"
    )


def translate_folder(job, checkpoint, *, model=None):
    """
    Translate ``job.data_dir`` into the results folder (results.py's layout), or
    continue a run of the same settings there. Every process of the group calls it
    (set up by the caller, with the log), each translating its own share.

    :param job: a jobs.FolderJob.
    :param checkpoint: its jobs.CheckpointSettings (jobs.resolve).
    :param model: the model, loaded (:func:`folder_model`); None loads it.
    :return: the results folder.
    :raises UsageError: the folder holds a run of other settings.
    """
    flags, scaling, diffusion, notes = checkpoint
    rank, world, device = dist_util.get_rank(), dist_util.get_world_size(), dist_util.dev()
    write_log(notes)
    pairs = find_test_pairs(job.data_dir)
    pairs = pairs if job.num_samples < 0 else pairs[: job.num_samples]
    outputs = output_names([name for _, _, name in pairs], job.data_dir)
    if model is None:
        model = folder_model(job, flags, device)
    out_dir = results_folder(job, diffusion)
    claim = claim_folder(out_dir, run_record(job, flags, scaling, device), pairs,
                         outputs) if rank == 0 else None  # fmt: skip
    problem, todo = dist_util.broadcast_object(claim)
    if problem:
        raise UsageError(problem)
    count = job.samples_per_input
    each = f"{count} samples each, " if count > 1 else ""
    logger.log(
        f"{len(pairs) - len(todo)} of {len(pairs)} images already in {out_dir}; "
        f"translating {len(todo)} with {job.sampler}, {diffusion.num_timesteps} steps, "
        f"{each}on {world} process(es)"
    )
    mine = [pairs[i] for i in todo[rank::world]]
    bar = tqdm(total=len(mine), unit="image", desc="images", disable=rank != 0)
    warned, nodata_images = False, 0
    for done in translate_items(
        model, diffusion, mine, job, flags["image_size"], scaling,
        progress=rank == 0, device=device,
    ):  # fmt: skip
        warning = None if warned else done.stats.clipping_warning()
        if warning:
            warned = True
            logger.warn(warning)
        if not done.valid.all():
            nodata_images += 1
            if done.stats.all_nodata:
                logger.log(f"{done.name}: every SAR pixel is nodata; its output is too")
        out_name = outputs[done.name]
        if count > 1:
            write_spread_result(
                out_dir, out_name, done.samples, done.mean, done.spread, valid=done.valid
            )
        write_result(out_dir, out_name, done.sar, done.samples[0], done.truth)
        bar.update(1)
    bar.close()

    counts = dist_util.all_gather_object(len(mine))  # also waits for every rank
    nodata_counts = dist_util.all_gather_object(nodata_images)
    if rank == 0:
        logger.log(f"translated {' + '.join(map(str, counts))} images (per process)")
        if sum(nodata_counts):
            logger.log(
                f"{sum(nodata_counts)} image(s) had nodata SAR pixels, black (0) in "
                "gen_opt/"
            )
        logger.log(
            f"results in {out_dir}; arrays in "
            f"{write_npz(out_dir, pairs, outputs, count)}"
        )
    return out_dir


def run_record(job, flags, scaling, device):
    """
    The settings that made a results folder's images (its run.json): a rerun
    continues the folder only under the same ones (results.claim_folder).

    The precisions the model runs in are recorded as run: a CPU runs a float16
    model in float32 and has no TF32.
    """
    return {
        "model_path": os.path.abspath(job.model_path),
        "data_dir": os.path.abspath(job.data_dir),
        "seed": job.seed,
        "sampler": job.sampler,
        "clip_denoised": job.clip_denoised,
        "samples_per_input": job.samples_per_input,
        **job.options,
        "use_bf16": job.use_bf16,
        "channels_last": job.channels_last,
        "compile": job.compile,
        "use_tf32": tf32_in_effect(job.use_tf32, device),
        **flags,
        "use_fp16": runs_in_fp16(flags["use_fp16"], device, job.use_bf16),
        "inputs": scaling.record(),
    }
