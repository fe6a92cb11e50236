"""
Several samples per input (guided_diffusion/translation/samples.py), the spread's picture
(pictures.py) and the evaluation of the spread (calibration.py).

The reference facts: for a toy model whose sampler output is a known Gaussian, the
mean and spread of K samples are its mean and standard deviation within the
sampling error of K samples; sample 0 is the single sample of a run with K = 1, to
the bit, and no sample depends on the batch or on K; the truth drawn from
N(mean, spread^2) lies within mean +- 2 spread 95.4% of the time; the colour scale
gets lighter as the value grows, and its legend's ticks sit where their colours
are; the sampling script writes the documented files and refuses to mix K's.
"""

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import (
    REAL_PAIRS,
    GaussianEpsModel,
    randomize_,
    tiny_model_and_diffusion,
)
from PIL import Image

from guided_diffusion.evaluation import calibration, metrics
from guided_diffusion.io import pictures
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
)
from guided_diffusion.translation import samples as k_samples
from guided_diffusion.translation import sampling

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "scripts" / "image_sample_realtime.py"
EVALUATE = REPO / "scripts" / "image_evaluate.py"
pytestmark = pytest.mark.usefixtures("one_thread")


# -- a toy whose K samples have a known distribution ------------------------------

MU, S = 0.3, 0.5  # the toy data: x_0 ~ N(MU, S^2) in every pixel


class OpticalOnly(th.nn.Module):
    """The exact noise predictor of the toy data, given cat([x_t, sar])."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, **kwargs):
        return self.inner(x[:, :3], t)


def assert_tables_close(got, expected):
    """
    Two calibration tables (lists of rows, each a dict of numbers) hold the same
    rows, key by key (pytest.approx refuses nested structures since pytest 9.2).
    """
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        assert sorted(row) == sorted(want)
        for key, value in want.items():
            assert row[key] == pytest.approx(value), (key, row, want)


@pytest.fixture(scope="module")
def toy():
    """The toy's exact eps model and 8 respaced steps of a 1000-step schedule."""
    base = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="8")
    return OpticalOnly(GaussianEpsModel(base.alphas_cumprod, MU, S)), diffusion


def ddim_closed_form(diffusion):
    """
    The distribution of DDIM's (eta 0, no clipping) output for the toy, by hand.

    For x_t with abar = a, the exact predictions are x0 = MU + sqrt(a) S^2 d / v and
    eps = sqrt(1 - a) d / v, d = x_t - sqrt(a) MU, v = a S^2 + 1 - a. DDIM's step to
    abar = b, sqrt(b) x0 + sqrt(1 - b) eps, is then
    x' - sqrt(b) MU = (sqrt(a b) S^2 + sqrt((1 - a)(1 - b))) / v * d: linear, so a
    normal x_T ~ N(0, 1) stays normal, and its mean and deviation follow the steps.

    :return: (mean, standard deviation) of the output.
    """
    mean, std = 0.0, 1.0
    for a, b in zip(
        diffusion.alphas_cumprod[::-1], diffusion.alphas_cumprod_prev[::-1]
    ):
        gain = (math.sqrt(a * b) * S**2 + math.sqrt((1 - a) * (1 - b))) / (
            a * S**2 + 1 - a
        )
        mean = math.sqrt(b) * MU + gain * (mean - math.sqrt(a) * MU)
        std *= gain
    return mean, std


def toy_samples(toy, names, count, seed=5):
    """(K, N, 3, 8, 8) float64 samples of the toy, DDIM without clipping."""
    model, diffusion = toy
    sar = th.zeros(len(names), 2, 8, 8)
    return th.stack(
        [
            x.double()
            for _, x in k_samples.translate_samples(
                model,
                diffusion,
                sar,
                names,
                seed=seed,
                samples_per_input=count,
                sampler="ddim",
                clip_denoised=False,
            )  # fmt: skip
        ]
    )


def test_mean_and_spread_of_k_samples_match_the_closed_form(toy):
    count, names = 16, ["a.png", "b.png"]
    samples = toy_samples(toy, names, count).numpy()
    mean, spread = k_samples.mean_and_spread(samples)
    expected_mean, expected_std = ddim_closed_form(toy[1])
    assert 0.25 < expected_std < 0.6  # DDIM with 8 steps is not the data's S exactly

    # Every pixel and channel is its own draw: P independent sets of K samples.
    pixels = mean.size
    # The mean of K samples has deviation std / sqrt(K); averaged over P pixels.
    assert abs(mean.mean() - expected_mean) < 4 * expected_std / math.sqrt(
        count * pixels
    )
    # ... and across pixels the means scatter with variance std^2 / K.
    scatter = mean.var(ddof=1) * count / expected_std**2
    assert abs(scatter - 1) < 4 * math.sqrt(2 / (pixels - 1))
    # The squared spread is unbiased: variance 2 std^4 / (K - 1) per pixel.
    ratio = (spread**2).mean() / expected_std**2
    assert abs(ratio - 1) < 4 * math.sqrt(2 / ((count - 1) * pixels))

    # The streaming accumulator gives the same numbers as the stack.
    acc = k_samples.SpreadAccumulator()
    for sample in samples:
        acc.add(sample)
    streamed_mean, streamed_spread = acc.result()
    np.testing.assert_allclose(streamed_mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(streamed_spread, spread, rtol=0, atol=1e-12)


def test_one_sample_has_no_spread():
    acc = k_samples.SpreadAccumulator()
    acc.add(np.full((2, 2), 7.0))
    mean, spread = acc.result()
    assert (mean == 7).all() and (spread == 0).all()
    assert (k_samples.mean_and_spread(np.ones((1, 3)))[1] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        acc.add(np.zeros(3))


def test_samples_depend_on_seed_name_and_k_only(toy):
    names = ["a.png", "b.png", "c.png"]
    together = toy_samples(toy, names, 3)
    # alone in its batch, and in a run with another K: the same numbers
    for i, name in enumerate(names):
        alone = toy_samples(toy, [name], 2)
        assert th.equal(alone[:, 0], together[:2, i])
    assert not th.equal(together[0], together[1])
    assert not th.equal(together[1], together[2])
    # the seeds: sample 0's is the single sample's, the others new and stable
    assert k_samples.seed_of_sample(4, "a.png", 0) == sampling.sample_seed(4, "a.png")
    seeds = {k_samples.seed_of_sample(4, n, k) for n in names for k in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def test_sample_zero_is_the_single_sample_to_the_bit():
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="4")
    randomize_(model, seed=2)
    sar = th.rand(2, 3, 32, 32, generator=th.Generator().manual_seed(0)) * 2 - 1
    names = ["x.png", "y.png"]
    single = sampling.translate(
        model, diffusion, sar, sampler="ddpm",
        generators=sampling.make_generators(7, names),
    )  # fmt: skip
    samples = [
        x
        for _, x in k_samples.translate_samples(
            model, diffusion, sar, names, seed=7, samples_per_input=2, sampler="ddpm"
        )
    ]
    assert th.equal(samples[0], single)
    assert (samples[0] - samples[1]).abs().max() > 0.1


# -- coverage and calibration ---------------------------------------------------


def test_a_calibrated_spread_covers_95_percent_and_its_error_grows():
    rng = np.random.default_rng(0)
    shape = (8, 64, 64, 3)
    mean = rng.uniform(40, 200, shape)
    spread = rng.uniform(1, 30, shape)
    truth = mean + spread * rng.standard_normal(shape)
    n = truth.size
    expected = math.erf(2 / math.sqrt(2))  # P(|z| <= 2) = 0.9545
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(calibration.coverage(mean, spread, truth) - expected) < 4 * se
    assert abs(calibration.coverage(mean, 2 * spread, truth) - 0.99994) < 1e-3

    # Per pixel, the channels averaged: the error of a calibrated Gaussian spread
    # is sqrt(2 / pi) s per channel, so the table's error follows its spread.
    report = calibration.calibration_report(mean, spread, truth, bins=5)
    table = report["spread"]["table"]
    assert len(table) == 5 and sum(r["pixels"] for r in table) == 8 * 64 * 64
    errors = [r["mean_abs_error"] for r in table]
    assert errors == sorted(errors) and errors[-1] > 1.5 * errors[0]
    for row in table:
        assert row["mean_abs_error"] == pytest.approx(
            math.sqrt(2 / math.pi) * row["mean_uncertainty"], rel=0.05
        )
    assert report["spread"]["spearman"] > 0.2
    assert report["sar_edges"] is None and report["coverage_2sd_calibrated"] is None


def test_nodata_pixels_are_left_out_of_the_calibration():
    # Three images; the third is nodata throughout (black mean, no spread, a
    # truth that is not black). Masked out, the report is the first two images'
    # report; counted, it would put a whole image of large errors in the
    # lowest-spread bin and pull the coverage down.
    rng = np.random.default_rng(3)
    mean = rng.uniform(40, 200, (3, 16, 16, 3))
    spread = rng.uniform(1, 30, mean.shape)
    truth = np.clip(mean + spread * rng.standard_normal(mean.shape), 0, 255)
    sar = rng.uniform(0, 255, (3, 16, 16, 3))
    mean[2], spread[2] = 0, 0
    valid = np.ones((3, 16, 16), bool)
    valid[2] = False
    masked = calibration.calibration_report(mean, spread, truth, sar, bins=4, valid=valid)
    alone = calibration.calibration_report(mean[:2], spread[:2], truth[:2], sar[:2], bins=4)
    assert masked["num_pixels"] == alone["num_pixels"] == 2 * 16 * 16
    assert masked["nodata_pixels"] == 16 * 16 and alone["nodata_pixels"] == 0
    for key in ("coverage_2sd", "mean_spread", "mean_abs_error"):
        assert masked[key] == pytest.approx(alone[key])
    for method in ("spread", "sar_edges"):
        assert_tables_close(masked[method]["table"], alone[method]["table"])
    counted = calibration.calibration_report(mean, spread, truth, sar, bins=4)
    assert counted["coverage_2sd"] < masked["coverage_2sd"] - 0.2
    assert "256 nodata pixels left out" in calibration.format_calibration(masked)
    with pytest.raises(ValueError, match="every pixel is nodata"):
        calibration.calibration_report(mean, spread, truth, valid=np.zeros((3, 16, 16), bool))


def test_expected_coverage_with_k_samples_matches_a_simulation():
    rng = np.random.default_rng(1)
    count, pixels = 4, 40_000
    draws = rng.standard_normal((count + 1, pixels))  # the truth and K samples
    mean, spread = k_samples.mean_and_spread(draws[1:])
    observed = calibration.coverage(mean, spread, draws[0])
    expected = calibration.expected_coverage(count)
    assert 0.8 < expected < 0.86  # a perfect model's, with only 4 samples
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / pixels)
    assert calibration.expected_coverage(10**7) == pytest.approx(0.9545, abs=1e-4)
    assert calibration.expected_coverage(1) is None


def test_calibration_bins_are_quantiles_that_keep_ties_together():
    u = np.arange(1000.0)
    table = calibration.calibration_table(u, u * 2, bins=4)
    assert [r["pixels"] for r in table] == [250] * 4
    assert [r["lo"] for r in table] == [0, 250, 500, 750]
    assert table[1]["mean_abs_error"] == pytest.approx(2 * 374.5)
    ties = np.concatenate([np.zeros(600), np.arange(1.0, 401.0)])
    table = calibration.calibration_table(ties, ties, bins=4)
    assert table[0]["pixels"] == 600 and table[0]["hi"] == 0
    assert sum(r["pixels"] for r in table) == 1000
    one = calibration.method_summary(np.ones(10), np.arange(10.0), bins=4)
    assert len(one["table"]) == 1 and one["spearman"] is None
    assert one["top_bottom_error_ratio"] is None


def test_box_blur_and_sobel_against_direct_sums():
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (9, 11))
    padded = np.pad(image, 2, mode="edge")
    direct = np.array(
        [[padded[i : i + 5, j : j + 5].mean() for j in range(11)] for i in range(9)]
    )
    np.testing.assert_allclose(calibration.box_blur(image, 2), direct, atol=1e-9)
    step = np.zeros((6, 8))
    step[:, 4:] = 10.0  # a step of 10 between columns 3 and 4
    sobel = calibration.sobel_magnitude(step)
    assert (sobel[:, 3:5] == 40).all()
    assert (sobel[:, :3] == 0).all() and (sobel[:, 5:] == 0).all()


def test_the_sar_edge_baseline_finds_known_edges():
    # SAR: a bright field right of column 16; the error of the mean is large near
    # that border, small elsewhere. A spread that does not know where the border is
    # must lose to the baseline there.
    rng = np.random.default_rng(3)
    sar = np.full((4, 32, 32, 3), 50, np.uint8)
    sar[:, :, 16:] = 200
    distance = np.abs(np.arange(32) - 15.5)
    error = np.where(distance < 3, 30.0, 2.0)[None, None, :, None]
    truth = np.full((4, 32, 32, 3), 100.0)
    mean = truth + error * rng.choice([-1, 1], (4, 32, 32, 3))
    spread = rng.uniform(5, 10, mean.shape)

    edges = calibration.sar_edge_magnitude(sar[0])
    assert edges[:, 15].max() == pytest.approx(edges.max())
    assert (edges[:, :10] == 0).all() and (edges[:, 22:] == 0).all()
    report = calibration.calibration_report(mean, spread, truth, sar, bins=8)
    baseline, model = report["sar_edges"], report["spread"]
    assert baseline["spearman"] > 0.6 and baseline["top_bottom_error_ratio"] == 15
    assert abs(model["spearman"]) < 0.15
    # the 22 columns without an edge in reach tie at 0: one bin, error 2; the top
    # eighth (columns 14 to 17) is all border, error 30
    assert baseline["table"][0]["pixels"] == 22 * 32 * 4
    assert baseline["table"][0]["mean_abs_error"] == pytest.approx(2)
    assert baseline["table"][-1]["mean_abs_error"] == pytest.approx(30)
    text = calibration.format_calibration(report)
    assert "SAR edges" in text and "Spearman" in text


# -- the colour scale and its legend -----------------------------------------------


def cie_lightness(rgb):
    """CIE L* of sRGB colours (D65), from their definitions."""
    c = np.asarray(rgb, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, y * (29 / 3) ** 3)


def test_the_colour_scale_gets_lighter_with_the_value():
    colours = pictures.colour_map(np.linspace(0, 1, 256))
    lightness = cie_lightness(colours)
    # rising everywhere but for the 8-bit rounding of the colours (< 0.05 L*)
    assert np.diff(lightness).min() > -0.05
    assert (np.diff(lightness[::8]) > 0).all()
    assert lightness[0] < 20 and lightness[-1] > 85
    for i, anchor in enumerate(pictures.VIRIDIS_ANCHORS):
        assert tuple(pictures.colour_map(i / 8)) == anchor
    assert tuple(pictures.colour_map(7.0)) == pictures.VIRIDIS_ANCHORS[-1]


def inverse_colour(rgb):
    """The value in [0, 1] whose colour is nearest to ``rgb``."""
    table = pictures.colour_map(np.linspace(0, 1, 256)).astype(int)
    return np.argmin(((table - np.asarray(rgb, int)) ** 2).sum(axis=1)) / 255


def test_the_legend_reads_back_its_values():
    spread = np.tile(
        np.linspace(0, 80, 32), (32, 1)
    )  # 0..80 grey levels, left to right
    valid = np.ones((32, 32), bool)
    valid[0, 0] = False
    picture, legend = pictures.spread_picture(spread, vmax=64, valid=valid)
    image = np.asarray(picture)
    left, top, right, bottom = legend.bar
    assert bottom - top >= 256  # the map is enlarged to be read
    assert [label for _, _, label in legend.ticks] == ["0", "16", "32", "48", "64+"]
    for value, row, _ in legend.ticks:
        colour = image[row, (left + right) // 2]
        assert inverse_colour(colour) * 64 == pytest.approx(value, abs=64 / 255)
        assert (image[row, right : right + 4] == 0).all()  # the tick mark
        label_area = image[row - 6 : row + 7, right + 6 : right + 40]
        assert (label_area < 128).any()  # its value is written there
    assert legend.ticks[0][1] == bottom - 1 and legend.ticks[-1][1] == top
    # The map: each model pixel a block of its colour, beyond vmax the top colour.
    scale = (bottom - top) // 32
    map_left = left - 12 - 32 * scale
    block = image[
        top : top + 32 * scale : scale, map_left : map_left + 32 * scale : scale
    ]
    assert (block[0, 0] == 0).all()  # no data: black
    for j in (5, 16, 24):
        assert inverse_colour(block[3, j]) * 64 == pytest.approx(
            min(spread[3, j], 64), abs=64 / 255
        )
    assert tuple(block[3, -1]) == pictures.VIRIDIS_ANCHORS[-1]


# -- the sampling script and the evaluation -----------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """A tiny model with every weight random, saved as a training run saves it."""
    return tiny_checkpoint


def files_under(folder):
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
    )


def read_png(path):
    return np.asarray(Image.open(path))


@pytest.fixture
def sample(run_in_process):
    """Run the sampling script in this process; return (returncode, stdout, stderr)."""

    def run(logdir, *flags):
        args = ["--data_dir", REAL_PAIRS, "--num_samples", 2, "--batch_size", 2]
        args += ["--timestep_respacing", 4, *flags]
        return run_in_process(SAMPLE, args, env={"OPENAI_LOGDIR": logdir})

    return run


def test_the_script_writes_k_samples_their_mean_and_spread(
    tmp_path, checkpoint, sample, run_in_process
):
    model = ["--model_path", checkpoint]
    one = sample(tmp_path / "one", *model)
    three = sample(tmp_path / "three", *model, "--samples_per_input", 3)
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr
    one_dir = tmp_path / "one" / "sample_results" / "ddpm4"
    three_dir = tmp_path / "three" / "sample_results" / "ddpm4"
    names = [p.name for p in sorted((one_dir / "gen_opt").iterdir())]
    # K = 1: today's files and no others
    assert files_under(one_dir) == sorted(
        [f"{kind}/{n}" for kind in ("cond_sar", "gen_opt", "gt_opt") for n in names]
        + ["run.json", "samples_2x32x32x3.npz"]
    )
    assert json.loads((one_dir / "run.json").read_text())["samples_per_input"] == 1
    # K = 3: sample 0 is K = 1's image to the byte, and the documented files
    for n in names:
        assert (three_dir / "gen_opt" / n).read_bytes() == (
            one_dir / "gen_opt" / n
        ).read_bytes()
    stems = [n[: -len(".png")] for n in names]
    assert files_under(three_dir) == sorted(
        files_under(one_dir)
        + [f"gen_samples/{k}/{n}" for k in (1, 2) for n in names]
        + [f"{kind}/{n}" for kind in ("gen_mean", "gen_spread") for n in names]
        + [f"spread_arrays/{s}.npz" for s in stems]
    )
    npz = np.load(three_dir / "samples_2x32x32x3.npz")
    assert sorted(npz["names"]) == names
    names = [str(n) for n in npz["names"]]  # the npz's order
    assert int(npz["samples_per_input"]) == 3
    assert npz["mean"].shape == npz["spread"].shape == (2, 32, 32, 3)
    assert npz["valid"].shape == (2, 32, 32) and npz["valid"].all()  # PNGs: no nodata
    for i, n in enumerate(names):
        stack = np.stack(
            [read_png(three_dir / "gen_opt" / n)]
            + [read_png(three_dir / f"gen_samples/{k}" / n) for k in (1, 2)]
        ).astype(float)
        # the arrays are of the unrounded samples: within rounding of the PNGs'
        assert np.abs(npz["mean"][i] - stack.mean(axis=0)).max() <= 0.5 + 1e-4
        assert np.abs(npz["spread"][i] - stack.std(axis=0, ddof=1)).max() <= 0.71
        assert npz["spread"][i].max() > 5  # the samples do differ
        mean_png = read_png(three_dir / "gen_mean" / n)
        assert np.abs(mean_png - npz["mean"][i]).max() <= 0.5 + 1e-4
        spread_png = Image.open(three_dir / "gen_spread" / n)
        assert spread_png.mode == "RGB" and spread_png.width > 256
    assert np.array_equal(
        npz["arr_0"], np.load(one_dir / "samples_2x32x32x3.npz")["arr_0"]
    )

    # The evaluation finds the spread beside --gen_dir, and reports it.
    proc = run_in_process(
        EVALUATE,
        ["--gen_dir", three_dir / "gen_opt", "--gt_dir", three_dir / "gt_opt",
         "--spread_bins", 4],
        env={metrics.INCEPTION_ENV: None},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "calibration.txt" in proc.stdout
        and "truth within mean +- 2 spread" in proc.stdout
    )
    report = json.loads((three_dir / "metrics.json").read_text())["spread"]
    truth = np.stack([read_png(three_dir / "gt_opt" / n) for n in names])
    sar = np.stack([read_png(three_dir / "cond_sar" / n) for n in names])
    direct = calibration.calibration_report(
        npz["mean"], npz["spread"], truth, sar, samples_per_input=3, bins=4
    )
    assert report["coverage_2sd"] == pytest.approx(direct["coverage_2sd"])
    assert report["coverage_2sd_calibrated"] == pytest.approx(
        calibration.expected_coverage(3)
    )
    for method in ("spread", "sar_edges"):
        assert_tables_close(report[method]["table"], direct[method]["table"])
    assert report["samples_per_input"] == 3 and report["num_pixels"] == 2 * 32 * 32
    text = (three_dir / "calibration.txt").read_text()
    assert "SAR edges" in text and text in proc.stdout
    # The run with one sample has no spread: nothing of it in its report.
    proc = run_in_process(
        EVALUATE, ["--gen_dir", one_dir / "gen_opt", "--gt_dir", one_dir / "gt_opt"],
        env={metrics.INCEPTION_ENV: None},
    )  # fmt: skip
    assert proc.returncode == 0 and "spread" not in proc.stdout
    assert "spread" not in json.loads((one_dir / "metrics.json").read_text())
    assert not (one_dir / "calibration.txt").exists()
    proc = run_in_process(
        EVALUATE,
        ["--gen_dir", one_dir / "gen_opt", "--gt_dir", one_dir / "gt_opt",
         "--spread", one_dir],
        env={metrics.INCEPTION_ENV: None},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"--spread {one_dir}" in lines[0] and "--samples_per_input" in lines[0]


def test_another_k_in_a_results_folder_is_refused(tmp_path, checkpoint, sample):
    model = ["--model_path", checkpoint]
    assert sample(tmp_path, *model, "--samples_per_input", 2).returncode == 0
    results = tmp_path / "sample_results" / "ddpm4"
    before = {f: (results / f).read_bytes() for f in files_under(results)}
    for k in (1, 3):
        proc = sample(tmp_path, *model, "--samples_per_input", k)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "samples_per_input" in lines[0] and str(results) in lines[0]
    assert {f: (results / f).read_bytes() for f in files_under(results)} == before
    # the same K continues: one removed input is made again, the same to the byte
    removed = files_under(results / "gen_spread")[0]
    for kind in ("gen_opt", "gen_spread", "gen_mean"):
        (results / kind / removed).unlink()
    proc = sample(tmp_path, *model, "--samples_per_input", 2)
    assert proc.returncode == 0 and "1 of 2 images already in" in proc.stdout
    after = {f: (results / f).read_bytes() for f in files_under(results)}
    assert after.keys() == before.keys()
    for name in after:
        if name.endswith(".npz"):  # a zip: its entries carry the time they were made
            new, old = np.load(results / name), np.load(io.BytesIO(before[name]))
            assert new.files == old.files
            for key in new.files:  # now alone in its batch: to rounding
                if new[key].dtype.kind == "U":
                    assert (new[key] == old[key]).all()
                else:
                    np.testing.assert_allclose(new[key], old[key], rtol=0, atol=1e-3)
        else:
            assert after[name] == before[name], name

    # a run.json from before the flag was K = 1's: K = 1 continues, K = 2 does not
    record = json.loads((results / "run.json").read_text())
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "sample_results", old / "sample_results")
    del record["samples_per_input"]
    (old / "sample_results" / "ddpm4" / "run.json").write_text(json.dumps(record))
    proc = sample(old, *model, "--samples_per_input", 2)
    assert proc.returncode == 2 and "samples_per_input" in proc.stderr
    proc = sample(old, *model)
    assert proc.returncode == 0 and "2 of 2 images already in" in proc.stdout

    bad = sample(tmp_path / "bad", *model, "--samples_per_input", 0)
    line = bad.stderr.strip()
    assert bad.returncode == 2 and "--samples_per_input 0" in line and "\n" not in line
