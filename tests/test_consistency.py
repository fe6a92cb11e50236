"""
base/consistency.py: the student's boundary scalings and its reading through the
teacher's parametrisation, checked against the closed forms; the consistency
sampler on a toy whose answer is known.
"""

import math

import numpy as np
import pytest
import torch as th

from guided_diffusion.base import samplers
from guided_diffusion.base.consistency import (
    SIGMA_DATA,
    TIMESTEP_SCALING,
    ConsistencyModel,
    boundary_scalings,
    trailing_timesteps,
)
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import create_gaussian_diffusion


def test_boundary_scalings_by_hand():
    c_skip, c_out = boundary_scalings(th.tensor([0, 1, 100]))
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary: f(x, 0) = x
    for i, t in ((1, 1), (2, 100)):
        u = TIMESTEP_SCALING * t
        assert math.isclose(c_skip[i], SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2))
        assert math.isclose(c_out[i], u / math.sqrt(u**2 + SIGMA_DATA**2))


def test_trailing_timesteps():
    assert sorted(trailing_timesteps(1000, 4)) == [249, 499, 749, 999]
    assert trailing_timesteps(1000, 1) == {999}
    assert space_timesteps(1000, "trailing2") == {499, 999}
    with pytest.raises(ValueError, match="1 to 10 steps"):
        trailing_timesteps(10, 11)


class Toy(th.nn.Module):
    """A 'network' whose output is a fixed function of its input and t."""

    def forward(self, x, t):
        return th.sin(x[:, :3] * 3) + 0.01 * t.double().view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("mean_type", ["eps", "x_start", "v"])
def test_the_diffusion_reads_the_consistency_function_as_x0(mean_type):
    diffusion = create_gaussian_diffusion(steps=50, predict=mean_type)
    abar = th.from_numpy(diffusion.alphas_cumprod)
    model = ConsistencyModel(Toy(), diffusion.alphas_cumprod, mean_type, 3).double()
    th.manual_seed(0)
    x_t, sar = th.randn(4, 3, 8, 8, dtype=th.float64), th.randn(4, 2, 8, 8, dtype=th.float64)
    t = th.tensor([0, 1, 17, 49])
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False, condition=sar)
    # f by hand: the toy's output read as the teacher's x_0, through the scalings
    raw = Toy()(th.cat([x_t, sar], 1), t)
    a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    x0 = {"x_start": raw, "eps": (x_t - s * raw) / a, "v": a * x_t - s * raw}[mean_type]
    u = TIMESTEP_SCALING * t.double().view(-1, 1, 1, 1)
    f = SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2) * x_t + u / (u**2 + SIGMA_DATA**2).sqrt() * x0
    # (through the noise or v and back: the diffusion reads its schedule in float32)
    assert th.allclose(out["pred_xstart"], f, rtol=1e-5, atol=1e-5)
    # t = 0 returns the input (exactly when the network predicts x_0)
    if mean_type == "x_start":
        assert th.equal(out["pred_xstart"][0], x_t[0])
    assert th.allclose(out["pred_xstart"][0], x_t[0], rtol=0, atol=1e-6)


def test_the_sampler_noises_x0_again_between_steps():
    """A 'student' that always answers c: each step's x_0 is c, the state between
    steps is sqrt(abar) c + sqrt(1 - abar) z with the generator's z, the sample c."""
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="trailing3")
    c = th.full((2, 3, 4, 4), 0.25)

    def denoiser(x, t):
        return {"pred_xstart": c.clone()}

    denoiser.alphas_cumprod = diffusion.alphas_cumprod
    g = th.Generator().manual_seed(5)
    steps = list(samplers.SAMPLERS["consistency"](
        denoiser, th.randn(2, 3, 4, 4), [2, 1, 0], generator=g
    ))  # fmt: skip
    z = th.Generator().manual_seed(5)
    for i, t_next in enumerate((1, 0)):
        noise = th.randn(2, 3, 4, 4, generator=z)
        abar = diffusion.alphas_cumprod[t_next]
        want = np.sqrt(abar) * c + np.sqrt(1 - abar) * noise
        assert th.allclose(steps[i]["sample"], want.float(), atol=1e-6)
    assert th.equal(steps[-1]["sample"], c)


def test_the_registry_tells_a_students_samplers_from_a_diffusion_models():
    assert samplers.samplers_for(student=True) == ["consistency"]
    diffusion = samplers.samplers_for(student=False)
    assert "consistency" not in diffusion and {"ddpm", "ddim", "dpm++2m"} <= set(diffusion)
    assert sorted(diffusion + ["consistency"]) == sorted(samplers.SAMPLERS)
