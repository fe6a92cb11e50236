"""
Checkpoint naming, finding and pruning (guided_diffusion/io/checkpoints.py), on folders
of empty files named by hand, so every expected answer is read off the file names.
"""

import json
import os

import pytest
import torch as th

from guided_diffusion import train_util
from guided_diffusion.io import checkpoints


def touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def complete(folder, step, rates=(0.9999,)):
    """The four kinds of files of a checkpoint at ``step``, as the loop names them."""
    touch(folder, f"model{step:06d}.pt", f"opt{step:06d}.pt", f"state{step:06d}.pt")
    touch(folder, *(f"ema_{rate}_{step:06d}.pt" for rate in rates))


def test_names_of_a_step_read_back_as_that_step(tmp_path):
    paths = checkpoints.checkpoint_paths(str(tmp_path), 1234, [0.9999, 0.5])
    assert [os.path.basename(p) for p in [paths["model"], *paths["ema"]]] == [
        "model001234.pt",
        "ema_0.9999_001234.pt",
        "ema_0.5_001234.pt",
    ]
    assert os.path.basename(paths["opt"]) == "opt001234.pt"
    assert os.path.basename(paths["state"]) == "state001234.pt"
    complete(tmp_path, 1234, rates=(0.9999, 0.5))
    assert checkpoints.list_checkpoints(str(tmp_path)) == {
        1234: {"model", "opt", "state", "ema"}
    }
    # From either an EMA or the model file back to the same checkpoint's files.
    for path in [paths["ema"][1], paths["model"]]:
        assert checkpoints.sibling_checkpoint_paths(path, [0.9999, 0.5]) == paths


def test_a_step_past_six_digits_keeps_its_digits(tmp_path):
    complete(tmp_path, 1_234_567)
    assert checkpoints.list_checkpoints(str(tmp_path)) == {
        1_234_567: {"model", "opt", "state", "ema"}
    }


@pytest.mark.parametrize("name", ["opt000010.pt", "state000010.pt", "model10.pt"])
def test_sibling_paths_refuse_what_is_no_model_file(tmp_path, name):
    touch(tmp_path, name)
    with pytest.raises(ValueError, match="--resume_checkpoint"):
        checkpoints.sibling_checkpoint_paths(str(tmp_path / name), [0.9999])


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    complete(tmp_path, 100)
    complete(tmp_path, 200)
    # Step 300 was killed before its state file: not complete.
    touch(tmp_path, "model000300.pt", "ema_0.9999_000300.pt", "opt000300.pt")
    touch(tmp_path, "model000300.pt.tmp-77", "notes.txt")
    assert checkpoints.find_resume_checkpoint(str(tmp_path)) == str(
        tmp_path / "model000200.pt"
    )
    # guided-diffusion's code imports it from train_util.
    assert train_util.find_resume_checkpoint is checkpoints.find_resume_checkpoint


def test_resume_of_an_original_run_takes_its_newest_model(tmp_path):
    touch(tmp_path, "model000100.pt", "model000050.pt", "opt000100.pt")
    assert checkpoints.find_resume_checkpoint(str(tmp_path)) == str(
        tmp_path / "model000100.pt"
    )
    assert checkpoints.find_resume_checkpoint(str(tmp_path / "none")) is None


def test_sampling_takes_the_slowest_ema_of_the_newest_step(tmp_path):
    complete(tmp_path, 100, rates=(0.9999,))
    complete(tmp_path, 200, rates=(0.999, 0.9999))
    assert checkpoints.newest_sampling_checkpoint(str(tmp_path)) == str(
        tmp_path / "ema_0.9999_000200.pt"
    )
    models_only = tmp_path / "original"
    models_only.mkdir()
    touch(models_only, "model000007.pt", "model000011.pt")
    assert checkpoints.newest_sampling_checkpoint(str(models_only)) == str(
        models_only / "model000011.pt"
    )


def test_latest_run_dir_skips_folders_without_checkpoints(tmp_path):
    older, newer, empty = (tmp_path / n for n in ("older", "newer", "empty"))
    for folder in (older, newer, empty):
        folder.mkdir()
    complete(older, 10)
    complete(newer, 10)
    os.utime(older, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    os.utime(empty, (3_000, 3_000))
    assert checkpoints.latest_run_dir(str(tmp_path)) == str(newer)
    assert checkpoints.latest_run_dir(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path, keep):
    for step in (10, 20, 30, 40):
        complete(tmp_path, step, rates=(0.9999, 0.5))
    # An incomplete newer save is neither counted nor removed.
    touch(tmp_path, "model000050.pt")
    checkpoints.prune_checkpoints(str(tmp_path), keep)
    kept = [10, 20, 30, 40][-keep:]
    expected = {s: {"model", "opt", "state", "ema"} for s in kept} | {50: {"model"}}
    assert checkpoints.list_checkpoints(str(tmp_path)) == expected
    assert len(os.listdir(tmp_path)) == 5 * len(kept) + 1


def test_stale_temporaries_are_removed_and_checkpoints_kept(tmp_path):
    complete(tmp_path, 10)
    touch(tmp_path, "model000020.pt.tmp-4242", "state000020.pt.tmp-1")
    checkpoints.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["model000010.pt", "opt000010.pt", "state000010.pt", "ema_0.9999_000010.pt"]
    )


def test_config_and_state_dict_read_back(tmp_path):
    checkpoints.write_config({"num_channels": 32, "diffusion_steps": 7}, tmp_path)
    model = tmp_path / "model000010.pt"
    checkpoints.save_atomic({"w": th.arange(3.0)}, str(model))
    config = checkpoints.read_run_config(str(model))
    assert (config["num_channels"], config["diffusion_steps"]) == (32, 7)
    assert th.equal(checkpoints.load_state_dict(str(model))["w"], th.arange(3.0))
    assert checkpoints.read_run_config(str(tmp_path / "x" / "model000010.pt")) is None


def test_unreadable_config_and_non_state_dict_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    model = tmp_path / "model000010.pt"
    with pytest.raises(ValueError, match="not a JSON object") as err:
        checkpoints.read_run_config(str(model))
    assert "\n" not in str(err.value)
    th.save(th.zeros(2), model)
    with pytest.raises(ValueError, match="holds a Tensor") as err:
        checkpoints.load_state_dict(str(model))
    assert "\n" not in str(err.value)
