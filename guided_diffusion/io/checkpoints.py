"""
Checkpoints of a training run: their names, finding them, pruning them, reading them.

A checkpoint at step S is the files ``model{S:06d}.pt``, ``ema_{rate}_{S:06d}.pt``
and ``opt{S:06d}.pt`` (plain state dicts, loadable by the original code) and
``state{S:06d}.pt`` (everything else resume needs), written in that order, each
atomically (:func:`save_atomic`). A checkpoint is complete when its state file
exists. The run folder also holds ``config.json``, every flag of the run
(:func:`write_config`, :func:`read_run_config`).

The training loop (train_util), sampling and the page all go through this module,
so none of them needs another's code to find or read a checkpoint. What the weights
themselves tell of the architecture is read beside the model's factory
(:func:`script_util.read_unet_flags`, :func:`script_util.check_state_dict_fits`).
"""

import json
import os
import re

import torch as th

from .. import dist_util
from ..base import settings
from ..base.atomic import write_atomic, write_json

_CHECKPOINT_RE = re.compile(
    r"^(?P<kind>model|opt|state|ema_(?P<rate>[0-9.eE+-]+)_)(?P<step>\d{6,})\.pt$"
)

# What remains of a save that was killed half way (atomic.write_atomic's temporary).
_TEMP_MARK = ".pt.tmp-"


# Naming


def checkpoint_paths(folder, step, ema_rates):
    """
    The files of the checkpoint at ``step``.

    :param folder: the run folder.
    :param step: the training step.
    :param ema_rates: the EMA rates (floats), one EMA file each.
    :return: a dict with step, model, ema (a list, per rate), opt and state.
    """
    return {
        "step": step,
        "model": os.path.join(folder, f"model{step:06d}.pt"),
        "ema": [
            os.path.join(folder, f"ema_{rate}_{step:06d}.pt") for rate in ema_rates
        ],
        "opt": os.path.join(folder, f"opt{step:06d}.pt"),
        "state": os.path.join(folder, f"state{step:06d}.pt"),
    }


def sibling_checkpoint_paths(path, ema_rates):
    """
    The files of the checkpoint that a model or EMA file belongs to
    (:func:`checkpoint_paths`).

    :raises ValueError: ``path`` is named like no model or EMA file.
    :raises FileNotFoundError: there is no such file.
    """
    match = _CHECKPOINT_RE.match(os.path.basename(path))
    if match is None or match.group("kind") in ("opt", "state"):
        raise ValueError(
            f"--resume_checkpoint {path}: expected a model file (model000100.pt) or an EMA file "
            "(ema_0.9999_000100.pt) of a training run, or 'auto'"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume_checkpoint {path}: no such file")
    return checkpoint_paths(
        os.path.dirname(os.path.abspath(path)), int(match.group("step")), ema_rates
    )


# Finding


def list_checkpoints(folder):
    """A dict step -> set of file kinds ("model", "opt", "state", "ema") present in ``folder``."""
    found = {}
    if not folder or not os.path.isdir(folder):
        return found
    for name in os.listdir(folder):
        match = _CHECKPOINT_RE.match(name)
        if match:
            kind = "ema" if match.group("rate") else match.group("kind")
            found.setdefault(int(match.group("step")), set()).add(kind)
    return found


def find_resume_checkpoint(folder):
    """
    The model file of the newest complete checkpoint in ``folder`` (its state file
    exists); for a run of the original code, which writes no state files, its newest
    model file. None when there is none.
    """
    found = list_checkpoints(folder)
    complete = [s for s, kinds in found.items() if {"model", "state"} <= kinds]
    if complete:
        return checkpoint_paths(folder, max(complete), [])["model"]
    if not any("state" in kinds for kinds in found.values()):
        legacy = [s for s, kinds in found.items() if "model" in kinds]
        if legacy:
            return checkpoint_paths(folder, max(legacy), [])["model"]
    return None


def newest_sampling_checkpoint(folder):
    """
    The checkpoint to sample in a run folder: the EMA file of its newest step (the
    slowest rate when there are several), else its newest model file; None when
    the folder holds neither (or is no folder).
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    emas, models = [], []
    for name in names:
        match = _CHECKPOINT_RE.match(name)
        if match and match.group("rate"):
            emas.append((int(match.group("step")), float(match.group("rate")), name))
        elif match and match.group("kind") == "model":
            models.append((int(match.group("step")), name))
    if emas:
        return os.path.join(folder, max(emas)[2])
    if models:
        return os.path.join(folder, max(models)[1])
    return None


def latest_run_dir(root="logs"):
    """The newest run folder under ``root`` that holds a checkpoint, or None."""
    if not os.path.isdir(root):
        return None
    runs = [
        os.path.join(root, d)
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d))
    ]
    runs = [r for r in runs if find_resume_checkpoint(r)]
    return os.path.abspath(max(runs, key=os.path.getmtime)) if runs else None


# Writing and pruning


def save_atomic(obj, path):
    """torch.save ``obj`` to ``path`` atomically (:func:`atomic.write_atomic`)."""
    write_atomic(path, lambda f: th.save(obj, f))


def write_config(config, folder):
    """Write the resolved configuration of a run to ``folder/config.json``."""
    return write_json(
        os.path.join(folder, "config.json"), config, indent=2, sort_keys=True
    )


def prune_checkpoints(folder, keep):
    """Delete all but the newest ``keep`` complete checkpoints (state file first)."""
    found = list_checkpoints(folder)
    complete = sorted(s for s, kinds in found.items() if "state" in kinds)
    for step in complete[:-keep]:
        files = [f"state{step:06d}.pt", f"model{step:06d}.pt", f"opt{step:06d}.pt"]
        emas = [
            n
            for n in os.listdir(folder)
            if n.startswith("ema_") and n.endswith(f"_{step:06d}.pt")
        ]
        for name in files + emas:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                os.remove(path)


def remove_stale_temp_files(folder):
    """Remove temporary files left by a save that was killed half way."""
    for name in os.listdir(folder):
        if _TEMP_MARK in name:
            os.remove(os.path.join(folder, name))


# Reading


def read_run_config(model_path) -> dict | None:
    """
    The training flags saved with a checkpoint's run, every declared setting included:
    one an older ``config.json`` lacks takes its default (settings.read_record).

    :param model_path: a model or EMA file.
    :return: the record in ``config.json`` beside it, or None when there is none.
    :raises ValueError: the file exists but is not a JSON object.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} cannot be read as JSON ({err}); fix or remove it and pass the "
            "model flags on the command line"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} is not a JSON object of flags; fix or remove it and pass the "
            "model flags on the command line"
        )
    return settings.read_record(config)


def load_state_dict(model_path):
    """
    A checkpoint's state dict, on the CPU.

    :raises ValueError: a one-line error when the file holds something else.
    """
    state_dict = dist_util.load_state_dict(model_path, map_location="cpu")
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{model_path} holds a {type(state_dict).__name__}, not a model state dict; "
            "pass a model or EMA file (model010000.pt, ema_0.9999_010000.pt)"
        )
    return state_dict
