"""
The results folder (guided_diffusion/io/results.py): what its writers write, its readers
read back, on arrays made here.
"""

import json

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.evaluation import metrics
from guided_diffusion.io import results


def random_images(rng, count, size=8):
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture
def spread_run(tmp_path):
    """A results folder of two inputs, K = 3 samples each, one pixel nodata."""
    rng = np.random.default_rng(0)
    pairs = [(None, None, "b.tif"), (None, None, "a.tif")]
    outputs = results.output_names([name for _, _, name in pairs], str(tmp_path))
    written = {}
    for _, _, name in pairs:
        samples = random_images(rng, 3)
        stack = np.stack(samples).astype(np.float64)
        valid = np.ones((8, 8), bool)
        valid[0, 0] = False
        mean, spread = stack.mean(0), stack.std(0)
        results.write_spread_result(
            str(tmp_path), outputs[name], samples, mean, spread, valid
        )
        sar = random_images(rng, 1)[0]
        results.write_result(str(tmp_path), outputs[name], sar, samples[0], samples[1])
        written[name] = (mean, spread, valid, sar)
    npz = results.write_npz(str(tmp_path), pairs, outputs, samples_per_input=3)
    return tmp_path, npz, written


def test_spread_npz_reads_back_what_was_written(spread_run):
    out_dir, npz, written = spread_run
    assert results.npz_files(str(out_dir)) == [npz]
    assert results.has_spread(npz)
    run = results.read_spread_npz(npz)
    assert run["names"] == ["b.tif", "a.tif"]
    assert run["samples_per_input"] == 3
    for i, name in enumerate(run["names"]):
        mean, spread, valid, _ = written[name]
        np.testing.assert_array_equal(run["mean"][i], mean.astype(np.float32))
        np.testing.assert_array_equal(run["spread"][i], spread.astype(np.float32))
        np.testing.assert_array_equal(run["valid"][i], valid)


def test_sar_picture_and_results_dir_find_the_written_files(spread_run):
    out_dir, _, written = spread_run
    gen_dir = out_dir / results.GEN_DIR
    assert results.results_dir(str(gen_dir) + "/") == str(out_dir)
    for name, (*_, sar) in written.items():
        key = name.rsplit(".", 1)[0]
        with Image.open(results.sar_picture(str(out_dir), key)) as img:
            np.testing.assert_array_equal(np.asarray(img), sar)


def test_evaluation_finds_and_loads_the_run_through_the_readers(spread_run):
    out_dir, npz, written = spread_run
    gen_dir, gt_dir = (str(out_dir / k) for k in (results.GEN_DIR, results.GT_DIR))
    assert metrics.find_spread_npz("auto", gen_dir) == npz
    mean, _, truth, sar, count, valid, note = metrics.load_spread_inputs(npz, gt_dir)
    assert (count, note) == (3, None)
    np.testing.assert_array_equal(sar[0], written["b.tif"][3])
    assert truth.shape == mean.shape == (2, 8, 8, 3)
    assert not valid[:, 0, 0].any() and valid[:, 1:, 1:].all()


def test_a_run_without_spread_has_no_spread_npz(tmp_path):
    rng = np.random.default_rng(1)
    pairs = [(None, None, "x.png")]
    outputs = results.output_names(["x.png"], str(tmp_path))
    image = random_images(rng, 1)[0]
    results.write_result(str(tmp_path), "x.png", image, image)
    npz = results.write_npz(str(tmp_path), pairs, outputs)
    assert results.npz_files(str(tmp_path)) == [npz]
    assert not results.has_spread(npz)
    assert metrics.find_spread_npz("auto", str(tmp_path / results.GEN_DIR)) is None
    assert results.npz_files(str(tmp_path / "absent")) == []


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_run_json_is_one_line_naming_it(tmp_path, text):
    (tmp_path / results.RUN_FILE).write_text(text)
    with pytest.raises(ValueError) as err:
        results.read_run(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / results.RUN_FILE} cannot be read")
    assert "\n" not in message
    problem, todo = results.claim_folder(str(tmp_path), {"seed": 0}, [], {})
    assert todo is None and problem.startswith(message)
    assert problem.endswith(f"delete {tmp_path}")


def test_run_json_reads_back_as_claimed(tmp_path):
    run = {"seed": 3, "sampler": "ddim"}
    problem, todo = results.claim_folder(str(tmp_path / "out"), run, [], {})
    assert (problem, todo) == (None, [])
    assert results.read_run(str(tmp_path / "out")) == run
    assert json.loads((tmp_path / "out" / results.RUN_FILE).read_text()) == run
