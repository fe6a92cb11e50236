"""
The one sampler interface (guided_diffusion.base.samplers): samplers that should agree
do, options are checked, a sampler registered anywhere is offered everywhere, and
code written against guided-diffusion's calls runs unchanged.
"""

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
from conftest import (
    TINY_FLAGS,
    GaussianEpsModel,
    randomize_,
    tiny_model_and_diffusion,
)
from PIL import Image

from guided_diffusion.base import samplers, settings
from guided_diffusion.image_datasets import load_sar
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import train_defaults
from guided_diffusion.translation.sampling import make_generators, to_uint8, translate

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    """A tiny x_start U-Net with random weights, 8 respaced steps, and a SAR batch."""
    model, diffusion = tiny_model_and_diffusion(
        predict_xstart=True, timestep_respacing="8"
    )
    randomize_(model, seed=3)
    sar = th.rand(2, 3, 32, 32, generator=th.Generator().manual_seed(4)) * 2 - 1
    return model.eval(), diffusion, sar


@pytest.fixture(scope="module")
def gaussian():
    """
    The exact noise predictor of data x_0 ~ N(0.3, 0.5^2), on 8 respaced steps of
    the 1000-step linear schedule: its predictions change along the path, so
    solvers of different order land apart.
    """
    base = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="8")
    return GaussianEpsModel(base.alphas_cumprod, 0.3, 0.5), diffusion, None


def _run(name, problem, **options):
    model, diffusion, sar = problem
    denoiser = samplers.Denoiser(diffusion, model, sar)
    x_T = samplers.noise_of_shape((2, 3, 32, 32), th.Generator().manual_seed(9), "cpu")
    return samplers.run(name, denoiser, x_T, **options)


@pytest.mark.parametrize("problem", ["tiny", "gaussian"])
def test_dpm_solver_at_order_1_is_ddim_without_noise(problem, request):
    """DPM-Solver++(1) is DDIM with eta 0 (Lu et al. 2022, section 4.1)."""
    problem = request.getfixturevalue(problem)
    first_order = _run("dpm++2m", problem, solver_order=1)
    ddim = _run("ddim", problem, eta=0.0)
    assert _rel_err(first_order, ddim) < 1e-5


def test_order_and_final_rule_change_the_solver(gaussian):
    ddim = _run("ddim", gaussian)
    assert _rel_err(_run("dpm++2m", gaussian), ddim) > 1e-3
    steps = gaussian[1].num_timesteps
    all_first = _run("dpm++2m", gaussian, lower_order_final=steps)
    assert _rel_err(all_first, ddim) < 1e-5
    only_last = _run("dpm++2m", gaussian, lower_order_final=1)
    assert _rel_err(only_last, _run("dpm++2m", gaussian)) > 1e-3  # the default is 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"solver_order": 3}, "solver_order 3"),
        ({"lower_order_final": 0}, "lower_order_final 0"),
    ],
)
def test_dpm_solver_refuses_options_it_cannot_honour(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        _run("dpm++2m", tiny, **options)


def test_an_option_a_sampler_lacks_is_refused_with_its_options(tiny):
    with pytest.raises(ValueError, match="ddpm sampler has no option eta"):
        _run("ddpm", tiny, eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm, ddim, dpm"):
        _run("euler", tiny)
    # A shared option left at its default is no error for a sampler without it.
    assert samplers.check_options("ddpm", {"eta": 0.0}) == {}


def test_code_written_for_guided_diffusion_runs_unchanged():
    """p_sample_loop and ddim_sample_loop with condition=, by keyword and by position."""
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="5")
    randomize_(model, seed=6)
    sar = th.rand(1, 3, 32, 32, generator=th.Generator().manual_seed(2))
    noise = th.randn(1, 3, 32, 32, generator=th.Generator().manual_seed(8))
    shape = (1, 3, 32, 32)

    th.manual_seed(0)
    by_keyword = diffusion.p_sample_loop(
        model, shape, noise=noise, clip_denoised=True, progress=False, condition=sar
    )
    th.manual_seed(0)
    by_position = diffusion.p_sample_loop(
        model, shape, noise, True, None, None, None, None, False, sar
    )
    th.manual_seed(0)
    steps = list(
        diffusion.p_sample_loop_progressive(model, shape, noise=noise, condition=sar)
    )
    assert th.equal(by_keyword, by_position)
    assert len(steps) == 5 and th.equal(steps[-1]["sample"], by_keyword)

    ddim_keyword = diffusion.ddim_sample_loop(
        model, shape, noise=noise, eta=0.0, condition=sar
    )
    ddim_position = diffusion.ddim_sample_loop(
        model, shape, noise, True, None, None, None, None, False, 0.0, sar
    )
    assert th.equal(ddim_keyword, ddim_position)
    # The same algorithms as the registry's, with the condition bound in the denoiser.
    th.manual_seed(0)
    denoiser = samplers.Denoiser(diffusion, model, sar)
    assert th.equal(samplers.run("ddpm", denoiser, noise), by_keyword)
    assert th.equal(samplers.run("ddim", denoiser, noise), ddim_keyword)


def _toy_sampler(denoiser, x, timesteps, *, generator=None, toy_shrink=0.5):
    """Each step keeps a share of the state and moves the rest to the x_0 prediction."""
    for t in timesteps:
        x0 = denoiser(x, t)["pred_xstart"]
        x = toy_shrink * x + (1 - toy_shrink) * x0 if t > 0 else x0
        yield {"sample": x, "pred_xstart": x0}


def _toy_loop(denoiser, x, steps, shrink):
    for t in range(steps - 1, -1, -1):
        x0 = denoiser(x, t)["pred_xstart"]
        x = shrink * x + (1 - shrink) * x0 if t > 0 else x0
    return x


@pytest.fixture
def toy(monkeypatch):
    """A toy sampler and its option, a toy setting, registered for one test."""
    monkeypatch.setitem(samplers.SAMPLERS, "toy", _toy_sampler)
    monkeypatch.setitem(
        settings.SETTINGS,
        "toy_shrink",
        settings.Setting("toy_shrink", 0.5, "the toy's share kept", "sampling"),
    )


def test_a_declared_setting_reaches_the_flags_and_the_record(toy, tmp_path):
    parser = argparse.ArgumentParser()
    settings.add_to_parser(parser, "sampling")
    assert parser.parse_args(["--toy_shrink", "0.25"]).toy_shrink == 0.25
    assert parser.parse_args([]).toy_shrink == 0.5
    # A record written before the setting existed reads back with its default ...
    older = settings.defaults("model", "diffusion")
    assert "toy_shrink" not in older
    assert settings.read_record(older)["toy_shrink"] == 0.5
    # ... and one written with it keeps its value through a file.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**older, "toy_shrink": 0.125}))
    assert settings.read_record(str(path))["toy_shrink"] == 0.125


def test_a_registered_sampler_and_its_setting_reach_translate_and_the_script(
    tiny, toy, tmp_path, monkeypatch
):
    model, diffusion, sar = tiny
    names = ["a.png", "b.png"]

    # Through the library call: the toy's own loop, written out here.
    out = translate(
        model, diffusion, sar, sampler="toy", generators=make_generators(0, names)
    )
    x = samplers.noise_of_shape(out.shape, make_generators(0, names), "cpu")
    expected = _toy_loop(
        samplers.Denoiser(diffusion, model, sar), x, diffusion.num_timesteps, 0.5
    )
    assert _rel_err(out, expected) < 1e-6
    with pytest.raises(ValueError, match="toy sampler has no option eta"):
        translate(model, diffusion, sar, sampler="toy", eta=0.3)

    # Through the sampling script, run in this process so that it sees the toy,
    # with the toy's option given as the flag its setting declares.
    run = tmp_path / "run"
    run.mkdir()
    th.save(model.state_dict(), run / "model000001.pt")
    config = {
        **train_defaults(),
        **model_and_diffusion_defaults(),
        **TINY_FLAGS,
        "predict_xstart": True,
    }
    (run / "config.json").write_text(json.dumps(config))
    data = tmp_path / "data" / "sar"
    data.mkdir(parents=True)
    for name, image in zip(names, sar):
        grey = ((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(grey).save(data / name)
    spec = importlib.util.spec_from_file_location(
        "image_sample_realtime", REPO / "scripts" / "image_sample_realtime.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "out"))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "image_sample_realtime.py",
            "--model_path", str(run / "model000001.pt"),
            "--data_dir", str(tmp_path / "data"),
            "--sampler", "toy",
            "--toy_shrink", "0.25",
            "--timestep_respacing", "8",
        ],
    )  # fmt: skip
    script.main()
    folder = tmp_path / "out" / "sample_results" / "toy8"
    assert sorted(os.listdir(folder / "gen_opt")) == names
    record = json.loads((folder / "run.json").read_text())
    assert record["sampler"] == "toy" and record["toy_shrink"] == 0.25
    loaded = th.from_numpy(np.stack([load_sar(data / n, 32, 3) for n in names]))
    want = translate(
        model,
        diffusion,
        loaded,
        sampler="toy",
        generators=make_generators(0, names),
        toy_shrink=0.25,
    )
    for name, image in zip(names, to_uint8(want)):
        assert np.array_equal(np.asarray(Image.open(folder / "gen_opt" / name)), image)


# Options that make a sampler draw noise at every step, so that continuing needs the
# generator's state as well; a sampler not named here runs at its defaults.
NOISY_OPTIONS = {"ddim": {"eta": 1.0}}


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("stop", [1, 3, 7])
def test_a_run_continued_from_any_step_is_the_same_run(tiny, name, stop):
    # the state, the generator and the last prediction after a step are all a
    # sampler needs to go on (what a saved scene job keeps); the contract
    # (test_sampler_contract.py) checks it on an exact denoiser with per-image
    # generators, this through the U-Net, the SAR and respacing, one generator
    model, diffusion, sar = tiny
    denoiser = samplers.Denoiser(diffusion, model, sar)
    x_T = samplers.noise_of_shape((2, 3, 32, 32), th.Generator().manual_seed(9), "cpu")
    timesteps = list(samplers.descending(diffusion))
    options = NOISY_OPTIONS.get(name, {})
    whole = samplers.run(
        name, denoiser, x_T, generator=th.Generator().manual_seed(1), **options
    )
    g = th.Generator().manual_seed(1)
    seen = []
    steps = samplers.SAMPLERS[name](denoiser, x_T, timesteps, generator=g, **options)
    for _ in range(stop):
        seen.append(next(steps))
    steps.close()
    state = g.get_state()
    g = th.Generator()
    g.set_state(state)
    history = {"t": timesteps[stop - 1], "pred_xstart": seen[-1]["pred_xstart"]}
    rest = samplers.run(name, denoiser, seen[-1]["sample"], timesteps[stop:], generator=g,
                        history=history, **options)  # fmt: skip
    assert th.equal(rest, whole)
