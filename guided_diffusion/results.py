"""
The results folder of a sampling run: which file each input becomes, claiming the
folder (or continuing a run of the same settings), writing images atomically, and
the npz of all generated images.

Layout: ``gen_opt/``, ``cond_sar/`` and ``gt_opt/`` with one PNG per input under the
input's name, ``run.json`` (the settings that made the images) and
``samples_NxHxWx3.npz``. An image is finished when its ``gen_opt`` file exists, so
a rerun after a kill translates only what is missing.
"""

import glob
import json
import os

import numpy as np
from PIL import Image

from . import settings
from .image_datasets import DataError
from .rasters import Scaling
from .sampling import NON_OUTPUT_FLAGS

# Settings in run.json that do not change the images, so a results folder continues
# whatever they are. use_bf16 is not one: bfloat16 keeps 8 bits of every
# activation's mantissa, which moved pixels of the tiny test model by a grey level
# in 10 steps and is unmeasured on the paper model over 250; a folder is scored as
# one configuration, so it holds images of one precision.
SAME_OUTPUT_SETTINGS = (*NON_OUTPUT_FLAGS, "channels_last", "compile")


def output_names(names, data_dir):
    """Input name -> output file name (.png); two inputs may not share one."""
    outputs, owner = {}, {}
    for name in names:
        out = os.path.splitext(name)[0] + ".png"
        if out in owner:
            raise DataError(
                f"{os.path.join(data_dir, 'sar', owner[out])} and {name} would both be "
                f"written as {out}; rename one of them"
            )
        owner[out] = name
        outputs[name] = out
    return outputs


def run_defaults():
    """The value of every setting of run.json that an older run.json may lack."""
    return {
        **settings.defaults("model", "diffusion", "sampling", "run", "speed"),
        "sampler": "ddpm",
        # a run.json from before rasters read 8-bit files, as Scaling() does
        "inputs": Scaling().record(),
    }


def claim_folder(out_dir, run, pairs, outputs):
    """
    Check that ``out_dir`` is new or holds images this run would make, then list
    what is left.

    Only the settings that decide the images are compared (not
    :data:`SAME_OUTPUT_SETTINGS`). A setting an older run.json lacks had its
    default (a new flag's default keeps the old behaviour); one this version does
    not know, written by a newer one, cannot be judged here and is passed over.

    :param run: this run's settings, as written to run.json.
    :return: (problem message or None, indices of the pairs still to translate).
    """
    run = json.loads(json.dumps(run))
    run_path = os.path.join(out_dir, "run.json")
    if os.path.isfile(run_path):
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        defaults = json.loads(json.dumps(run_defaults()))
        differs = sorted(
            k
            for k in run
            if k not in SAME_OUTPUT_SETTINGS
            and run[k] != previous.get(k, defaults.get(k))
        )
        if differs:
            return (
                f"{out_dir} holds the results of another run (different "
                f"{', '.join(differs)}; see its run.json): use another $OPENAI_LOGDIR "
                f"or delete {out_dir}"
            ), None
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        return (
            f"{out_dir} holds files but no run.json: use another $OPENAI_LOGDIR or delete {out_dir}",
            None,
        )
    else:
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(
            run_path,
            lambda f: f.write(json.dumps(run, indent=2, sort_keys=True).encode()),
        )
    for stale in glob.glob(
        os.path.join(glob.escape(out_dir), "**", "*.tmp-*"), recursive=True
    ):
        os.remove(stale)  # left by a run that was killed mid-write
    gen_dir = os.path.join(out_dir, "gen_opt")
    return None, [
        i
        for i, (_, _, name) in enumerate(pairs)
        if not os.path.isfile(os.path.join(gen_dir, outputs[name]))
    ]


def write_atomic(path, write):
    """Call ``write(file)`` on a temporary file, then rename it to ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_png(out_dir, kind, out_name, image):
    """:param image: (H, W, 3) uint8."""
    path = os.path.join(out_dir, kind, out_name)
    write_atomic(
        path,
        lambda f: Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG"),
    )


def write_npz(out_dir, pairs, outputs):
    """Rank 0, after every rank is done: all generated images in name order."""
    names = [name for _, _, name in pairs]
    images = np.stack(
        [
            np.asarray(
                Image.open(os.path.join(out_dir, "gen_opt", outputs[n])).convert("RGB")
            )
            for n in names
        ]
    )
    path = os.path.join(out_dir, f"samples_{'x'.join(map(str, images.shape))}.npz")
    for old in glob.glob(os.path.join(glob.escape(out_dir), "samples_*.npz")):
        if old != path:
            os.remove(old)  # one file, for the latest selection of inputs
    write_atomic(path, lambda f: np.savez(f, arr_0=images, names=np.array(names)))
    return path


def write_result(out_dir, out_name, sar, generated, ground_truth=None):
    """
    Write one input's images; the generated one last, since it marks the input done.

    :param sar: (H, W, C) uint8 with 1 or 3 channels (shown as grey or RGB).
    :param generated: (H, W, 3) uint8.
    :param ground_truth: (H, W, 3) uint8, or None when the input has none.
    """
    height, width = generated.shape[:2]
    write_png(out_dir, "cond_sar", out_name, np.broadcast_to(sar, (height, width, 3)))
    if ground_truth is not None:
        write_png(out_dir, "gt_opt", out_name, ground_truth)
    write_png(out_dir, "gen_opt", out_name, generated)
