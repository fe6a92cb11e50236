"""
The results folder of a sampling run: its format, its writers and its readers.

The writers choose which file each input becomes, claim the folder (or continue a
run of the same settings), write the images atomically (atomic.py) and the npz of
all generated images. The readers, at the end, are what evaluation (metrics.py,
scripts/image_evaluate.py) and the demo report (scripts/demo_report.py) read back.

Layout: ``gen_opt/``, ``cond_sar/`` and ``gt_opt/`` with one PNG per input under the
input's name, ``run.json`` (the settings that made the images) and
``samples_NxHxWx3.npz``. With K > 1 samples per input (``samples_per_input``,
guided_diffusion/translation/samples.py) ``gen_opt/`` holds sample 0, and beside it:

* ``gen_samples/<k>/`` samples k = 1..K-1, one PNG per input, as ``gen_opt/``;
* ``gen_mean/`` the mean of the K samples, rounded to 8 bits;
* ``gen_spread/`` the spread (standard deviation of the K samples, the channels
  averaged) as a colour-scale picture with its legend;
* ``spread_arrays/<name>.npz`` the mean and spread of one input, float32
  (H, W, 3) in grey levels, for the npz of the run;

and the npz also holds ``mean`` and ``spread`` (N, H, W, 3) and
``samples_per_input``. An image is finished when its ``gen_opt`` file exists,
written after all of its other files, so a rerun after a kill translates only what
is missing.
"""

import glob
import json
import os

import numpy as np
from PIL import Image

from ..base import settings
from ..base.atomic import write_atomic
from ..base.settings import NON_OUTPUT_FLAGS
from ..image_datasets import DataError
from . import pictures
from .rasters import Scaling

# The folders of every run: the generated images, the SAR as the model saw it and
# the ground truth; and the file of the settings that made them.
GEN_DIR, SAR_DIR, GT_DIR, RUN_FILE = "gen_opt", "cond_sar", "gt_opt", "run.json"

# The folders of a run with several samples per input (see the layout above).
SAMPLES_DIR, MEAN_DIR, SPREAD_DIR, ARRAYS_DIR = (
    "gen_samples",
    "gen_mean",
    "gen_spread",
    "spread_arrays",
)

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
        **settings.defaults(
            "model", "diffusion", "sampling", "samples", "run", "speed"
        ),
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
    run_path = os.path.join(out_dir, RUN_FILE)
    if os.path.isfile(run_path):
        try:
            previous = read_run(out_dir)
        except ValueError as err:
            return f"{err}: use another $OPENAI_LOGDIR or delete {out_dir}", None
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
    gen_dir = os.path.join(out_dir, GEN_DIR)
    return None, [
        i
        for i, (_, _, name) in enumerate(pairs)
        if not os.path.isfile(os.path.join(gen_dir, outputs[name]))
    ]


def write_png(out_dir, kind, out_name, image):
    """:param image: (H, W, 3) uint8."""
    path = os.path.join(out_dir, kind, out_name)
    write_atomic(
        path,
        lambda f: Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG"),
    )


def write_npz(out_dir, pairs, outputs, samples_per_input=1):
    """
    Rank 0, after every rank is done: all generated images in name order.

    :param samples_per_input: K; above 1 the file also holds ``mean`` and ``spread``
        (N, H, W, 3) float32 in grey levels, read from ``spread_arrays/``, ``valid``
        (N, H, W) bool (False where the SAR has no data) and ``samples_per_input``.
    :return: the file's path.
    """
    names = [name for _, _, name in pairs]
    images = np.stack(
        [
            np.asarray(
                Image.open(os.path.join(out_dir, GEN_DIR, outputs[n])).convert("RGB")
            )
            for n in names
        ]
    )
    arrays = dict(arr_0=images, names=np.array(names))
    if samples_per_input > 1:
        stats = [read_spread_arrays(out_dir, outputs[n]) for n in names]
        arrays["mean"] = np.stack([mean for mean, _, _ in stats])
        arrays["spread"] = np.stack([spread for _, spread, _ in stats])
        arrays["valid"] = np.stack([valid for _, _, valid in stats])
        arrays["samples_per_input"] = np.array(samples_per_input)
    path = os.path.join(out_dir, f"samples_{'x'.join(map(str, images.shape))}.npz")
    for old in npz_files(out_dir):
        if old != path:
            os.remove(old)  # one file, for the latest selection of inputs
    write_atomic(path, lambda f: np.savez(f, **arrays))
    return path


def arrays_name(out_name):
    """The file of ``spread_arrays/`` that holds an output's mean and spread."""
    return os.path.splitext(out_name)[0] + ".npz"


def read_spread_arrays(out_dir, out_name):
    """
    :return: (mean, spread, valid) of one output: float32 (H, W, 3) in grey levels,
        and (H, W) bool, False where the SAR has no data (all True in files written
        before the mask was kept).
    """
    with np.load(os.path.join(out_dir, ARRAYS_DIR, arrays_name(out_name))) as data:
        mean = data["mean"]
        valid = data["valid"] if "valid" in data.files else np.ones(mean.shape[:2], bool)
        return mean, data["spread"], valid


def write_spread_result(out_dir, out_name, samples, mean, spread, valid=None):
    """
    Write the files of one input's K samples but sample 0 (which
    :func:`write_result` writes, last): samples 1..K-1, the mean, the spread
    picture and the arrays.

    :param samples: the K samples, (H, W, 3) uint8 each; the first is not written.
    :param mean: (H, W, 3) mean of the samples in grey levels.
    :param spread: (H, W, 3) their spread in grey levels.
    :param valid: (H, W) bool, False where the SAR has no data, or None.
    """
    for k, sample in enumerate(samples[1:], 1):
        write_png(out_dir, os.path.join(SAMPLES_DIR, str(k)), out_name, sample)
    write_spread_files(
        os.path.join(out_dir, MEAN_DIR, out_name),
        os.path.join(out_dir, SPREAD_DIR, out_name),
        os.path.join(out_dir, ARRAYS_DIR, arrays_name(out_name)),
        len(samples), mean, spread, valid=valid,
    )  # fmt: skip


def write_spread_files(mean_path, picture_path, arrays_path, count, mean, spread,
                       valid=None):  # fmt: skip
    """
    The files of one input's K samples' statistics, at the paths given (the results
    folder's, or the web page's): the mean rounded to 8 bits (PNG), the spread as a
    colour-scale picture with its legend (PNG) and both as float32 arrays (npz:
    ``mean``, ``spread`` and ``valid``).

    :param count: K. :param mean, spread, valid: as :func:`write_spread_result`.
    """
    rounded = np.rint(mean).clip(0, 255).astype(np.uint8)
    write_atomic(mean_path, lambda f: Image.fromarray(rounded).save(f, format="PNG"))
    title = f"spread of {count} samples (standard deviation), grey levels"
    picture, _ = pictures.spread_picture(spread, valid=valid, title=title)
    write_atomic(picture_path, lambda f: picture.save(f, format="PNG"))
    arrays = dict(mean=mean.astype(np.float32), spread=spread.astype(np.float32))
    if valid is not None:
        arrays["valid"] = np.asarray(valid, bool)
    write_atomic(arrays_path, lambda f: np.savez(f, **arrays))


def write_result(out_dir, out_name, sar, generated, ground_truth=None):
    """
    Write one input's images; the generated one last, since it marks the input done.

    :param sar: (H, W, C) uint8 with 1 or 3 channels (shown as grey or RGB).
    :param generated: (H, W, 3) uint8.
    :param ground_truth: (H, W, 3) uint8, or None when the input has none.
    """
    height, width = generated.shape[:2]
    write_png(out_dir, SAR_DIR, out_name, np.broadcast_to(sar, (height, width, 3)))
    if ground_truth is not None:
        write_png(out_dir, GT_DIR, out_name, ground_truth)
    write_png(out_dir, GEN_DIR, out_name, generated)


# Reading a results folder back


def results_dir(gen_dir):
    """The results folder that holds ``gen_dir`` (its gen_opt/ folder)."""
    return os.path.dirname(os.path.normpath(gen_dir))


def read_run(out_dir):
    """
    The settings that made a results folder's images (its run.json).

    :raises ValueError: a one-line message naming the file when it cannot be read
        or holds no JSON object.
    """
    path = os.path.join(out_dir, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err})") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} cannot be read (not a JSON object of settings)")
    return run


def sar_picture(out_dir, key):
    """The SAR picture (cond_sar/) of the input whose output is ``key`` + ".png"."""
    return os.path.join(out_dir, SAR_DIR, key + ".png")


def npz_files(folder):
    """The ``samples_*.npz`` files in ``folder``, sorted; none when it is no folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(glob.glob(os.path.join(glob.escape(folder), "samples_*.npz")))


def has_spread(npz_path):
    """Whether an npz of :func:`write_npz` holds the mean and spread (K > 1)."""
    with np.load(npz_path) as data:
        return "spread" in data.files


def read_spread_npz(npz_path):
    """
    The statistics of the K samples per input in an npz of :func:`write_npz`.

    :return: a dict with names (list of the inputs' names), mean and spread
        (N, H, W, 3) float32 in grey levels, valid ((N, H, W) bool, False where the
        SAR had no data; None in files written before it was kept) and
        samples_per_input (K; None in files written before it was kept).
    """
    with np.load(npz_path) as data:
        return dict(
            names=[str(n) for n in data["names"]],
            mean=data["mean"],
            spread=data["spread"],
            valid=data["valid"] if "valid" in data.files else None,
            samples_per_input=(
                int(data["samples_per_input"])
                if "samples_per_input" in data.files
                else None
            ),
        )
