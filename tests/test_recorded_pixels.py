"""
Decoded pixels recorded before the GPU work, so that moving noise draws, host reads
and device handling can be shown to change no image.

Each case translates two SAR patches named ``a.png`` and ``b.png`` with seed 3 (the
per-image generators of ``sampling.make_generators``, the scripts' noise) through a
tiny U-Net with fixed random weights, decodes the result to 8 bits as the scripts
write it (``sampling.to_uint8``) and compares it with ``tests/data/
recorded_pixels.npz``: at most one grey level apart anywhere (none is expected on
the same CPU; one level allows a convolution's last bits to differ between CPUs).
The scene cases run a whole :class:`~guided_diffusion.translation.scene.SceneSampler` job (the
fusion over tiles and the band-by-band update) on a 48 x 80 scene, and also check a
job saved after two steps and continued. To record anew, after a change meant to
change the images: ``SAR2OPT_RECORD=1 python -m pytest tests/test_recorded_pixels.py``.
"""

import os

import numpy as np
import pytest
import torch as th
from conftest import DATA_DIR, randomize_, tiny_model_and_diffusion

from guided_diffusion.base import samplers
from guided_diffusion.translation.sampling import make_generators, to_uint8, translate
from guided_diffusion.translation.scene import SceneArrays, SceneSampler

RECORD = DATA_DIR / "recorded_pixels.npz"
NAMES = ["a.png", "b.png"]
SEED = 3


class NearInput(th.nn.Module):
    """
    x_t (or a fraction of it) plus a random U-Net's output, for either target. A random U-Net alone
    predicts values near 0: as eps its x_0 lies far outside [-1, 1], so nearly every
    pixel would clip to 0 or 255, and as x_0 every pixel would be grey 127 or 128;
    either would hide a change.
    """

    def __init__(self, unet, scale=1.0):
        super().__init__()
        self.unet, self.scale = unet, scale

    def forward(self, x, t, **kwargs):
        out = self.unet(x, t, **kwargs)
        return th.cat([out[:, :3] + self.scale * x[:, :3], out[:, 3:]], dim=1)


def _model(predict_xstart, respacing, learn_sigma=False):
    model, diffusion = tiny_model_and_diffusion(
        timestep_respacing=respacing,
        predict_xstart=predict_xstart,
        learn_sigma=learn_sigma,
    )
    randomize_(model, seed=23)
    # as x_0, x_t / 2 keeps most pixels off the clip
    return NearInput(model, 0.5 if predict_xstart else 1.0).eval(), diffusion


def _sar(height=32, width=32, count=2):  # one per name of NAMES
    gen = th.Generator().manual_seed(9)
    return th.rand(count, 3, height, width, generator=gen) * 2 - 1


def _patches(sampler, respacing, predict_xstart=False, learn_sigma=False, **options):
    model, diffusion = _model(predict_xstart, respacing, learn_sigma)
    out = translate(
        model,
        diffusion,
        _sar(),
        sampler=sampler,
        generators=make_generators(SEED, NAMES),
        **options,
    )
    return to_uint8(out)


def _scene_job(sampler, respacing, folder=None, learn_sigma=False):
    model, diffusion = _model(False, respacing, learn_sigma)
    sar = _sar(48, 80, count=1)
    arrays = SceneArrays(folder)
    arrays.create("sar", 3, 48, 80)
    arrays.write("sar", 0, sar[0])
    keep = ("pred_xstart", "log_variance") if learn_sigma else ("pred_xstart",)

    def denoise(xs, conds, t):
        out = samplers.Denoiser(diffusion, model, conds)(xs, t)
        return {k: out[k] for k in keep}

    fuser_args = dict(denoise=denoise, tile=32, overlap=16, batch_size=3,
                      learned_variance=learn_sigma)  # fmt: skip
    return SceneSampler(arrays, fuser_args, diffusion, sampler, {}, SEED,
                        shift_tiles=True)  # fmt: skip


def _scene_result(job):
    return to_uint8(job.arrays.read("x", (0, 48))[None])


def _scene(sampler, respacing, learn_sigma=False):
    job = _scene_job(sampler, respacing, learn_sigma=learn_sigma)
    job.start()
    job.run()
    return _scene_result(job)


def _scene_resumed(sampler, respacing, tmp):
    first = _scene_job(sampler, respacing)
    first.start()
    first.run(folder=tmp, should_stop=lambda: first.step == 2)
    second = _scene_job(sampler, respacing)
    assert second.saved_step(tmp) == 2
    second.resume(tmp)
    second.run()
    return _scene_result(second)


CASES = {
    "ddpm_eps": lambda tmp: _patches("ddpm", "8"),
    "ddpm_xstart": lambda tmp: _patches("ddpm", "8", predict_xstart=True),
    "ddpm_sigma": lambda tmp: _patches("ddpm", "8", learn_sigma=True),
    "ddim_eps": lambda tmp: _patches("ddim", "ddim8"),
    "ddim_eta_eps": lambda tmp: _patches("ddim", "ddim8", eta=0.5),
    "dpmpp2m_eps": lambda tmp: _patches("dpm++2m", "8"),
    "dpmpp2m_xstart": lambda tmp: _patches("dpm++2m", "8", predict_xstart=True),
    "scene_ddpm": lambda tmp: _scene("ddpm", "5"),
    "scene_ddpm_sigma": lambda tmp: _scene("ddpm", "5", learn_sigma=True),
    "scene_ddim": lambda tmp: _scene("ddim", "ddim5"),
    "scene_dpmpp2m": lambda tmp: _scene("dpm++2m", "5"),
    "scene_ddpm_resumed": lambda tmp: _scene_resumed("ddpm", "5", tmp),
    "scene_dpmpp2m_resumed": lambda tmp: _scene_resumed("dpm++2m", "5", tmp),
}


def _run(name, tmp_path):
    with th.no_grad():
        return CASES[name](tmp_path / name)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    if os.environ.get("SAR2OPT_RECORD"):
        tmp = tmp_path_factory.mktemp("record")
        np.savez_compressed(RECORD, **{name: _run(name, tmp) for name in CASES})
    with np.load(RECORD) as data:
        return {name: data[name] for name in data.files}


def test_every_case_is_recorded(recorded):
    assert sorted(recorded) == sorted(CASES)


def test_the_records_are_images_worth_comparing(recorded):
    # a record that is all one value, or mostly clipped, would hide a change
    for name, pixels in recorded.items():
        assert pixels.dtype == np.uint8, name
        clipped = np.mean((pixels == 0) | (pixels == 255))
        assert clipped < 0.5 and len(np.unique(pixels)) > 64, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_decoded_pixels_match_the_record(name, recorded, tmp_path):
    out = _run(name, tmp_path)
    ref = recorded[name]
    assert out.shape == ref.shape
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1, (
        f"{name}: {np.count_nonzero(diff)} pixels differ from the record, "
        f"by up to {diff.max()} grey levels"
    )
