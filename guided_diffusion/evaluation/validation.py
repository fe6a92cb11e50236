"""
Validation during training: translate a few fixed SAR/optical pairs with a fast
sampler and the EMA weights, score them and save a picture, so a run shows
whether it learns long before it ends.
"""

import os

import numpy as np
import torch as th

from .. import dist_util
from ..image_datasets import DataError, find_test_pairs, load_opt
from ..io.pictures import columns_side_by_side, write_png
from ..io.rasters import Scaling
from ..translation.folder import load_batch, translate_batch
from ..translation.jobs import Sampling
from ..translation.sampling import sar_for_display, to_uint8
from . import metrics


def built_on_main_process(build):
    """
    ``build()`` (a validator) on the main process, which alone validates; None on
    the others. A validation folder the main process cannot use (DataError,
    ValueError, FileNotFoundError) stops every process with its message, instead of
    leaving the others waiting for it.
    """
    validator, error = None, None
    if dist_util.is_main_process():
        try:
            validator = build()
        except (DataError, ValueError, FileNotFoundError) as err:
            error = str(err)
    error = dist_util.broadcast_object(error)
    if error is not None:
        raise DataError(error)
    return validator


class Validator:
    """
    :param model: a model of the trained architecture, used only for validation
        (float32; the EMA weights are loaded into it each time).
    :param diffusion: a respaced diffusion for the fast sampler.
    :param data_dir: a folder with sar/ and opt/ (ground truth is required).
    :param scaling: how the files are read (rasters.Scaling), as for training.
    :param num: how many pairs to translate (the first ones by name).
    :param sampler: a sampler name of guided_diffusion.translation.sampling.
    :param seed: the noise seed; each pair's noise depends on (seed, name) only.
    :param label: added to the picture's name and the scores' keys (a distilled
        student's validation at several step counts: "_4step").
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data_dir,
        image_size,
        scaling=None,
        sar_channels=3,
        num,
        sampler,
        seed=0,
        label="",
    ):
        pairs = find_test_pairs(data_dir)
        missing_gt = [name for _, opt, name in pairs if opt is None]
        if missing_gt:
            raise DataError(
                f"--val_data_dir {data_dir}: validation needs ground truth in {data_dir}/opt "
                f"(missing for {missing_gt[0]} and {len(missing_gt) - 1} more)"
            )
        pairs = pairs[:num]
        self.names = [name for _, _, name in pairs]
        scaling = scaling or Scaling(sar_channels=sar_channels)
        # nodata stays nodata: black in the generated image, as sampling writes it
        # (the ground truth is kept, so nodata counts against the scores)
        self.sar, self.valid, _ = load_batch([p for p, _, _ in pairs], image_size, scaling)
        self.gt = to_uint8(
            th.from_numpy(
                np.stack(
                    [load_opt(opt, image_size, scaling=scaling) for _, opt, _ in pairs]
                )
            )
        )
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.diffusion = diffusion
        self.label = label
        # the sampler's defaults, one sample, each pair's noise from (seed, name)
        self.job = Sampling(sampler=sampler, seed=seed, batch_size=len(pairs))

    def __call__(self, state_dict, step, folder):
        """
        Translate the pairs with the weights in ``state_dict``.

        :return: a dict of "val_ssim" and "val_psnr" (means over the pairs; with the
            label after them); the picture is written to
            ``folder/val_{step:06d}{label}.png``.
        """
        self.model.load_state_dict(state_dict)
        device = next(self.model.parameters()).device
        (generated,), _ = translate_batch(
            self.model, self.diffusion, self.sar.to(device), self.valid, self.names,
            self.job,
        )  # fmt: skip
        ssim = [metrics.ssim_rgb(g, t) for g, t in zip(generated, self.gt)]
        psnr = [metrics.psnr(g, t) for g, t in zip(generated, self.gt)]
        finite = [p for p in psnr if np.isfinite(p)]
        save_grid(
            [sar_for_display(to_uint8(self.sar)), generated, self.gt],
            os.path.join(folder, f"val_{step:06d}{self.label}.png"),
        )
        return {
            f"val_ssim{self.label}": float(np.mean(ssim)),
            f"val_psnr{self.label}": float(np.mean(finite)) if finite else float("inf"),
        }


def save_grid(columns, path, scale=1, gap=2):
    """
    Save images side by side: one row per example, one column per list.

    :param columns: lists (or arrays) of (H, W, C) uint8 images of one size; C is 1 or 3.
    :param scale: nearest-neighbour upscaling, so small images stay visible.
    :param gap: white pixels between images.
    """
    # the gaps are enlarged with the images, as the whole grid was before
    return write_png(path, columns_side_by_side(columns, gap=gap * scale, scale=scale))
