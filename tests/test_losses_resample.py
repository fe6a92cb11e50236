"""Tests of guided_diffusion.losses and guided_diffusion.resample."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import linear_diffusion

from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from guided_diffusion.resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    create_named_schedule_sampler,
)

REPO_ROOT = Path(__file__).parents[1]


def _exact_cdf(x):
    return 0.5 * (1 + th.erf(x / math.sqrt(2)))


# ---------------------------------------------------------------- losses


def test_normal_kl_matches_torch_distributions():
    gen = th.Generator().manual_seed(0)
    mean1, mean2 = th.randn(2, 50, generator=gen, dtype=th.float64)
    logvar1, logvar2 = th.randn(2, 50, generator=gen, dtype=th.float64)
    expected = th.distributions.kl_divergence(
        th.distributions.Normal(mean1, (0.5 * logvar1).exp()),
        th.distributions.Normal(mean2, (0.5 * logvar2).exp()),
    )
    th.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected)
    th.testing.assert_close(
        normal_kl(mean1, logvar1, mean1, logvar1), th.zeros(50, dtype=th.float64)
    )
    # Plain numbers broadcast against tensors (the prior term compares with N(0, 1)).
    th.testing.assert_close(
        normal_kl(mean1, logvar1, 0.0, 0.0),
        th.distributions.kl_divergence(
            th.distributions.Normal(mean1, (0.5 * logvar1).exp()),
            th.distributions.Normal(0.0, 1.0),
        ),
    )


def test_approx_standard_normal_cdf():
    x = th.linspace(-6, 6, 2001, dtype=th.float64)
    # The tanh approximation is within 2e-4 of the exact CDF everywhere.
    th.testing.assert_close(
        approx_standard_normal_cdf(x), _exact_cdf(x), rtol=0, atol=3e-4
    )


def _grid():
    """All 256 levels of an 8-bit image scaled to [-1, 1]."""
    return th.linspace(-1, 1, 256, dtype=th.float64)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -4.0), (-1.0, -2.0)])
def test_discretized_likelihood_is_the_probability_of_the_pixel_bin(mean, log_scale):
    x = _grid().view(1, 1, 16, 16)
    means = th.full_like(x, mean)
    log_scales = th.full_like(x, log_scale)
    log_probs = discretized_gaussian_log_likelihood(
        x, means=means, log_scales=log_scales
    )
    assert log_probs.shape == x.shape
    probs = log_probs.exp().flatten()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)

    # Bins of width 2/255; the outermost bins extend to -inf and +inf.
    scale = math.exp(log_scale)
    upper = _exact_cdf((_grid() + 1 / 255 - mean) / scale)
    lower = _exact_cdf((_grid() - 1 / 255 - mean) / scale)
    upper[-1] = 1.0
    lower[0] = 0.0
    expected = upper - lower
    th.testing.assert_close(probs, expected, rtol=0, atol=2e-3)


def test_discretized_likelihood_rejects_mismatched_shapes():
    x = th.zeros(1, 3, 4, 4)
    with pytest.raises((AssertionError, ValueError)):
        discretized_gaussian_log_likelihood(
            x, means=th.zeros(1, 3, 4, 4), log_scales=th.zeros(1, 3, 2, 2)
        )


# ---------------------------------------------------------------- uniform sampler


def test_uniform_sampler():
    diffusion = linear_diffusion(50)
    sampler = create_named_schedule_sampler("uniform", diffusion)
    np.random.seed(0)
    t, weights = sampler.sample(20000, th.device("cpu"))
    assert t.shape == weights.shape == (20000,)
    assert t.dtype == th.long and t.min() >= 0 and t.max() < 50
    assert th.all(weights == 1)
    counts = th.bincount(t, minlength=50).double()
    # 400 expected per step, standard deviation about 20.
    assert counts.min() > 400 - 100 and counts.max() < 400 + 100


def test_unknown_sampler_name_is_rejected():
    with pytest.raises((ValueError, NotImplementedError), match="nonexistent"):
        create_named_schedule_sampler("nonexistent", linear_diffusion(50))


# ---------------------------------------------------------------- loss-second-moment


def _fill(sampler, num_steps, loss_of_t, repeats):
    for _ in range(repeats):
        ts = list(range(num_steps))
        sampler.update_with_all_losses(ts, [loss_of_t(t) for t in ts])


def test_second_moment_sampler_is_uniform_until_warmed_up():
    num_steps = 40
    sampler = create_named_schedule_sampler(
        "loss-second-moment", linear_diffusion(num_steps)
    )
    assert isinstance(sampler, LossSecondMomentResampler)
    assert isinstance(sampler, LossAwareSampler)

    def uniform(w):
        return np.allclose(w / w.sum(), np.full(num_steps, 1 / num_steps))

    assert uniform(sampler.weights())
    _fill(sampler, num_steps, lambda t: t + 1.0, repeats=9)
    sampler.update_with_all_losses(list(range(num_steps - 1)), [5.0] * (num_steps - 1))
    assert uniform(sampler.weights()), "one step still lacks a full history"
    sampler.update_with_all_losses([num_steps - 1], [5.0])
    assert not uniform(sampler.weights())


def test_second_moment_weights_closed_form():
    num_steps = 40
    diffusion = linear_diffusion(num_steps)
    sampler = LossSecondMomentResampler(
        diffusion, history_per_term=4, uniform_prob=0.01
    )
    # Old losses of 100 are pushed out by the last four rounds.
    _fill(sampler, num_steps, lambda t: 100.0, repeats=3)
    _fill(sampler, num_steps, lambda t: (-1) ** t * (t + 1.0), repeats=4)
    rms = np.arange(1, num_steps + 1, dtype=np.float64)
    expected = rms / rms.sum() * 0.99 + 0.01 / num_steps
    weights = sampler.weights()
    np.testing.assert_allclose(weights / weights.sum(), expected, rtol=1e-10)

    np.random.seed(1)
    t, importance = sampler.sample(5000, th.device("cpu"))
    p = expected / expected.sum()
    # Importance weights 1 / (T p_t) keep the loss an unbiased estimate of the uniform mean.
    np.testing.assert_allclose(
        importance.numpy(), 1 / (num_steps * p[t.numpy()]), rtol=1e-6
    )
    counts = np.bincount(t.numpy(), minlength=num_steps)
    assert counts[-1] > 5 * counts[0]


def test_local_update_without_process_group_updates_directly():
    a = LossSecondMomentResampler(linear_diffusion(50), history_per_term=2)
    b = LossSecondMomentResampler(linear_diffusion(50), history_per_term=2)
    ts = th.tensor([0, 3, 3, 7, 49])
    losses = th.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    a.update_with_local_losses(ts, losses)
    b.update_with_all_losses(ts.tolist(), losses.tolist())
    for _ in range(3):
        a.update_with_local_losses(th.arange(50), th.arange(50).double())
        b.update_with_all_losses(list(range(50)), [float(x) for x in range(50)])
    np.testing.assert_array_equal(a.weights(), b.weights())


_TWO_RANK_SCRIPT = """
import sys

import numpy as np
import torch as th
import torch.distributed as dist

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.resample import LossSecondMomentResampler

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
diffusion = gd.GaussianDiffusion(
    betas=gd.get_named_beta_schedule("linear", 50),
    model_mean_type=gd.ModelMeanType.EPSILON,
    model_var_type=gd.ModelVarType.FIXED_LARGE,
    loss_type=gd.LossType.MSE,
)
sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
# Rank 0 sees the even steps, rank 1 the odd ones (and one more, so sizes differ).
for _ in range(2):
    ts = th.arange(rank, 50, 2)
    if rank == 1:
        ts = th.cat([ts, th.tensor([0])])
    sampler.update_with_local_losses(ts, (ts.double() + 1) * (rank + 1))
np.save(out, sampler.weights())
dist.destroy_process_group()
"""


def test_local_update_syncs_two_ranks(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(_TWO_RANK_SCRIPT))
    store = tmp_path / "store"
    outputs = [tmp_path / f"weights{rank}.npy" for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(store), str(outputs[rank])],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
    weights = [np.load(path) for path in outputs]
    np.testing.assert_array_equal(weights[0], weights[1])
    # Both ranks hold every step's history, so the sampler has warmed up:
    # even t -> loss t + 1 (rank 0), odd t -> 2 (t + 1) (rank 1).
    rms = np.array([(t + 1.0) * (1 if t % 2 == 0 else 2) for t in range(50)])
    # Step 0 also got rank 1's loss 2 * 1 in each round.
    expected = rms.copy()
    expected[0] = math.sqrt(np.mean(np.square([1.0, 2.0])))
    expected = expected / expected.sum() * 0.999 + 0.001 / 50
    np.testing.assert_allclose(weights[0], expected, rtol=1e-10)
