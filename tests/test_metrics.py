"""
Tests for guided_diffusion/evaluation/metrics.py and scripts/image_evaluate.py.

The per-image figures are checked against direct scikit-image calls, the
Frechet distance against closed forms, and FID end to end with a small
TorchScript stand-in for NVlabs' Inception network (the real file is not
available here).
"""

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion.evaluation import metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "image_evaluate.py"
TIMEOUT = 120

# NVlabs ships the Inception network as TorchScript; torch 2.13 flags the
# format as deprecated, which the stand-in has to use all the same.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


class InceptionStandIn(th.nn.Module):
    """
    The call signature of NVlabs' inception-2015-12-05.pt with a fixed random
    projection of 4x4-pooled pixels as its 2048-d "features".
    """

    def __init__(self):
        super().__init__()
        gen = th.Generator().manual_seed(0)
        self.register_buffer("proj", th.randn(3 * 4 * 4, 2048, generator=gen))

    def forward(self, x: th.Tensor, return_features: bool = False) -> th.Tensor:
        if x.dtype != th.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError("expected uint8 images of shape (N, 3, H, W)")
        if not return_features:
            raise ValueError("the stand-in only computes features")
        pooled = th.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4)
        return th.tanh(pooled.flatten(1) @ self.proj)


@pytest.fixture
def inception_file(tmp_path):
    path = tmp_path / "inception_stand_in.pt"
    th.jit.save(th.jit.script(InceptionStandIn()), str(path))
    return path


def noisy_pairs(rng, n, shape=(40, 48, 3)):
    """Ground truths and generated images that resemble them (SSIM well inside (0, 1))."""
    gts = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    gens = []
    for gt in gts:
        noise = rng.normal(0, 25, shape) + rng.normal(0, 10, 3)  # noise plus a tint
        gens.append(np.clip(gt + noise, 0, 255).round().astype(np.uint8))
    return gens, gts


def write_images(folder, named_images):
    for name, image in named_images.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def read_rgb(path):
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def direct_record(gen, gt):
    """Every per-image figure computed straight from scikit-image and numpy."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    grey = [np.asarray(Image.fromarray(x).convert("L")) for x in (gen, gt)]
    diff = gen.astype(np.float64) - gt
    with np.errstate(divide="ignore"):
        psnr = peak_signal_noise_ratio(gt, gen, data_range=255)
    return dict(
        ssim_rgb=structural_similarity(gen, gt, channel_axis=-1, data_range=255),
        ssim_grey=structural_similarity(*grey, data_range=255),
        psnr=psnr,
        **{
            f"colour_err_{c}": v
            for c, v in zip("rgb", diff.mean(axis=(0, 1)), strict=True)
        },
        **{
            f"abs_err_{c}": v
            for c, v in zip("rgb", np.abs(diff).mean(axis=(0, 1)), strict=True)
        },
    )


def run_script(*args, env_inception=None):
    env = {k: v for k, v in os.environ.items() if k != metrics.INCEPTION_ENV}
    if env_inception is not None:
        env[metrics.INCEPTION_ENV] = str(env_inception)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )


@pytest.fixture
def run_in_this_process(run_in_process):
    """
    run_script's twin that runs the script in this process (conftest.run_in_process):
    test_script_writes_figures_and_fid is the real launch, the other cases of the
    script take milliseconds where a process that imports torch takes seconds.
    """

    def run(*args, env_inception=None):
        env = {metrics.INCEPTION_ENV: env_inception}  # None: not set
        return run_in_process(SCRIPT, args, env=env)

    return run


# ---------------------------------------------------------------------------
# Per-image figures and folders


def test_grey_is_itu601_luma():
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    assert metrics.to_grey(primaries).tolist() == [[76, 150, 29]]
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert metrics.to_grey(ramp)[0].tolist() == list(range(256))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    luma = image @ np.array([0.299, 0.587, 0.114])
    # Pillow works in 16-bit fixed point, so exact halves may round either way
    assert np.abs(metrics.to_grey(image) - np.round(luma)).max() <= 1


def test_identical_images_score_perfectly(tmp_path):
    rng = np.random.default_rng(1)
    images = {
        f"{i}.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)
    }
    write_images(tmp_path / "gen", images)
    write_images(tmp_path / "gt", images)
    records = metrics.compare_folders(tmp_path / "gen", tmp_path / "gt")
    for record in records:
        assert record["ssim_rgb"] == pytest.approx(1.0, abs=1e-12)
        assert record["ssim_grey"] == pytest.approx(1.0, abs=1e-12)
        assert record["psnr"] == math.inf
        assert all(
            record[f"{kind}_{c}"] == 0
            for kind in ("colour_err", "abs_err")
            for c in "rgb"
        )
    summary = metrics.summarize(records)
    assert summary["psnr"] == math.inf
    assert summary["psnr_inf_count"] == 3
    assert summary["num_images"] == 3


def test_psnr_of_identical_images_does_not_warn():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.psnr(image, image) == math.inf


def test_records_match_scikit_image(tmp_path):
    rng = np.random.default_rng(2)
    gens, gts = noisy_pairs(rng, 4)
    names = ["10", "2", "sub/a", "sub/b"]
    write_images(
        tmp_path / "gen", {f"{n}.png": g for n, g in zip(names, gens, strict=True)}
    )
    # ground truth in another format: only the extension may differ
    write_images(
        tmp_path / "gt", {f"{n}.bmp": g for n, g in zip(names, gts, strict=True)}
    )
    records = metrics.compare_folders(tmp_path / "gen", tmp_path / "gt")
    assert [r["name"] for r in records] == ["2.png", "10.png", "sub/a.png", "sub/b.png"]
    for record in records:
        stem = record["name"][: -len(".png")]
        gen, gt = gens[names.index(stem)], gts[names.index(stem)]
        expected = direct_record(gen, gt)
        assert 0.05 < expected["ssim_rgb"] < 0.95
        for field, value in expected.items():
            assert record[field] == pytest.approx(value, rel=1e-12), field


def test_unpaired_names_are_reported(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    write_images(tmp_path / "gen", {f"{i}.png": image for i in range(8)})
    write_images(tmp_path / "gt", {f"{i}.jpg": image for i in range(1)})
    write_images(tmp_path / "gt", {"extra.png": image})
    with pytest.raises(ValueError) as info:
        metrics.compare_folders(tmp_path / "gen", tmp_path / "gt")
    message = str(info.value)
    assert "7 generated image(s) have no ground truth" in message
    assert "1.png" in message and "(and 2 more)" in message
    assert "extra.png" in message


def test_different_sizes_are_reported(tmp_path):
    write_images(tmp_path / "gen", {"x.png": np.zeros((16, 16, 3), dtype=np.uint8)})
    write_images(tmp_path / "gt", {"x.png": np.zeros((16, 20, 3), dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"x\.png is 16x16 .*x\.png is 20x16"):
        metrics.compare_folders(tmp_path / "gen", tmp_path / "gt")


def test_unreadable_and_16_bit_images_are_reported(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read"):
        metrics.load_image(broken)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(wide)
    with pytest.raises(ValueError, match="wide.png: image mode I;16 is not 8-bit"):
        metrics.load_image(wide)


# ---------------------------------------------------------------------------
# Frechet distance


def random_orthogonal(rng, d):
    return np.linalg.qr(rng.normal(size=(d, d)))[0]


def test_frechet_distance_closed_form_shared_eigenbasis():
    # Covariances with one eigenbasis commute, and the square root of their
    # product has the eigenvalues sqrt(a_i b_i).
    rng = np.random.default_rng(3)
    d = 16
    q = random_orthogonal(rng, d)
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_symmetric_form():
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), computed with eigh.
    rng = np.random.default_rng(4)
    d = 12
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T, y @ y.T
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * cross
    got = metrics.frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(20, 64))  # rank-deficient covariance
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_singular_product():
    # Rank-1 covariances u u^T and S2: the product has the single eigenvalue
    # u^T S2 u, so tr (S1 S2)^(1/2) = sqrt(u^T S2 u). scipy's sqrtm returns
    # non-finite values for this product, so the eps fallback must handle it.
    u = np.array([2.0, 0.0, -1.0])
    s1 = np.outer(u, u)
    s2 = np.array([[8.0, -6.0, 4.0], [-6.0, 5.0, -2.0], [4.0, -2.0, 4.0]])
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(u @ s2 @ u)
    got = metrics.frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert got == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_rejects_indefinite_covariance():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        metrics.frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("n1, n2, d", [(10, 13, 96), (60, 50, 8)])
def test_fid_from_features_equals_frechet_distance_of_moments(n1, n2, d):
    rng = np.random.default_rng(6)
    f1 = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d))
    f2 = rng.normal(size=(n2, d)) + 0.5
    expected = metrics.frechet_distance(
        f1.mean(axis=0),
        np.cov(f1, rowvar=False),
        f2.mean(axis=0),
        np.cov(f2, rowvar=False),
    )
    with pytest.warns(UserWarning, match="fewer than 2048"):
        got = metrics.fid_from_features(f1, f2)
    assert got == pytest.approx(expected, rel=1e-6)


def test_compute_features_batches_like_single_images(inception_file):
    net = metrics.load_inception(str(inception_file))
    rng = np.random.default_rng(7)
    shapes = [(16, 16, 3)] * 3 + [(20, 24, 3)] * 2
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    batched = metrics.compute_features(net, iter(images), batch_size=2)
    one_by_one = np.concatenate([metrics.compute_features(net, [x], 1) for x in images])
    assert batched.shape == (5, 2048) and batched.dtype == np.float64
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The script


def stand_in_features(inception_file, folder):
    net = th.jit.load(str(inception_file))
    paths = metrics.list_images(folder).values()
    with th.no_grad():
        rows = [
            net(th.from_numpy(read_rgb(p)).permute(2, 0, 1)[None], return_features=True)
            for p in paths
        ]
    return th.cat(rows).double().numpy()


def check_fid(tmp_path, inception_file, result):
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "metrics.json").read_text())
    expected = metrics.fid_from_features(
        stand_in_features(inception_file, tmp_path / "gen"),
        stand_in_features(inception_file, tmp_path / "gt"),
    )
    assert math.isfinite(report["fid"]) and report["fid"] > 0
    assert report["fid"] == pytest.approx(expected, rel=1e-5)
    assert (
        "fewer than 2048" in result.stderr and "fewer than 2048" in report["fid_note"]
    )
    return report


@pytest.mark.filterwarnings("ignore:FID from")
def test_script_writes_figures_and_fid(tmp_path, inception_file):
    rng = np.random.default_rng(8)
    gens, gts = noisy_pairs(rng, 5)
    gens[3] = gts[3]  # one identical pair: inf PSNR, left out of the mean
    names = [f"{i}.png" for i in range(5)]
    write_images(tmp_path / "gen", dict(zip(names, gens, strict=True)))
    write_images(tmp_path / "gt", dict(zip(names, gts, strict=True)))
    result = run_script(
        "--gen_dir", tmp_path / "gen", "--gt_dir", tmp_path / "gt",
        "--inception", inception_file, "--batch_size", 2, "--device", "cpu",
    )  # fmt: skip
    report = check_fid(tmp_path, inception_file, result)

    direct = [direct_record(g, t) for g, t in zip(gens, gts, strict=True)]
    assert report["num_images"] == 5
    assert report["psnr_inf_count"] == 1
    finite_psnr = [d["psnr"] for d in direct if math.isfinite(d["psnr"])]
    assert report["psnr"] == pytest.approx(np.mean(finite_psnr), rel=1e-12)
    for field in ("ssim_rgb", "ssim_grey", "colour_err_g", "abs_err_b"):
        assert report[field] == pytest.approx(
            np.mean([d[field] for d in direct]), rel=1e-12
        )
    assert report["gen_dir"] == str(tmp_path / "gen")

    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == names
    assert rows[3]["psnr"] == "inf"
    for row, expected in zip(rows, direct, strict=True):
        for field, value in expected.items():
            assert float(row[field]) == pytest.approx(value, rel=1e-12), field
    psnr_line = next(line for line in result.stdout.splitlines() if "PSNR" in line)
    assert f"{report['psnr']:.2f}" in psnr_line and "1 identical, PSNR inf" in psnr_line


@pytest.mark.filterwarnings("ignore:FID from")
def test_script_takes_inception_from_environment(
    tmp_path, inception_file, run_in_this_process
):
    gens, gts = noisy_pairs(np.random.default_rng(9), 3, shape=(24, 24, 3))
    write_images(tmp_path / "gen", {f"{i}.png": x for i, x in enumerate(gens)})
    write_images(tmp_path / "gt", {f"{i}.png": x for i, x in enumerate(gts)})
    result = run_in_this_process(
        "--gen_dir", tmp_path / "gen", "--gt_dir", tmp_path / "gt",
        env_inception=inception_file,
    )  # fmt: skip
    check_fid(tmp_path, inception_file, result)


def test_script_skips_fid_without_inception_and_reports_inf(
    tmp_path, run_in_this_process
):
    images = {"a.png": np.full((16, 16, 3), 7, dtype=np.uint8)}
    write_images(tmp_path / "gen", images)
    write_images(tmp_path / "gt", images)
    out = tmp_path / "report"
    result = run_in_this_process(
        "--gen_dir", tmp_path / "gen", "--gt_dir", tmp_path / "gt", "--out", out
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["fid"] is None
    for text in (report["fid_note"], result.stderr):
        assert metrics.INCEPTION_FILE in text
        assert "--inception" in text and metrics.INCEPTION_ENV in text
    assert report["psnr"] is None and report["psnr_inf_count"] == 1
    assert report["ssim_rgb"] == pytest.approx(1.0)
    psnr_line = next(line for line in result.stdout.splitlines() if "PSNR" in line)
    assert "inf" in psnr_line


def test_script_skips_fid_when_inception_file_is_missing(tmp_path, run_in_this_process):
    images = {"a.png": np.zeros((16, 16, 3), dtype=np.uint8)}
    write_images(tmp_path / "gen", images)
    write_images(tmp_path / "gt", images)
    missing = tmp_path / "nowhere" / metrics.INCEPTION_FILE
    result = run_in_this_process(
        "--gen_dir", tmp_path / "gen", "--gt_dir", tmp_path / "gt",
        env_inception=missing,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["fid"] is None
    assert (
        str(missing) in report["fid_note"]
        and metrics.INCEPTION_ENV in report["fid_note"]
    )


@pytest.mark.parametrize("problem", ["missing", "empty", "unpaired"])
def test_script_user_errors_exit_2_with_one_line(
    tmp_path, problem, run_in_this_process
):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    write_images(tmp_path / "gt", {"a.png": image})
    if problem == "empty":
        (tmp_path / "gen").mkdir()
    elif problem == "unpaired":
        write_images(tmp_path / "gen", {"b.png": image})
    result = run_in_this_process(
        "--gen_dir", tmp_path / "gen", "--gt_dir", tmp_path / "gt"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    expected = "b.png" if problem == "unpaired" else f"--gen_dir {tmp_path / 'gen'}"
    assert expected in lines[0]
