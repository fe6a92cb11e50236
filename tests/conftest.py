"""Helpers shared by the test suite.

Only torch, numpy and pytest are imported at module level: every test file in the
suite loads this module, and the data, metrics or distributed tests must not
fail to collect because a library module they do not use is broken.
"""

import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch as th

# Reference data that ships with the tests (see tests/data/README.md): the
# U-Net state-dict listings of the original code and 15 real SEN1-2 pairs.
DATA_DIR = Path(__file__).resolve().parent / "data"
FIXTURES_DIR = DATA_DIR / "fixtures"
REAL_PAIRS = DATA_DIR / "real_pairs" / "sen12_accioy"

# A U-Net small enough that a forward and backward pass takes milliseconds on
# one CPU core, but with every kind of block (residual, attention at 16x16,
# down- and upsampling).
TINY_FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    diffusion_steps=50,
)


def randomize_(model, seed=0, std=0.05):
    """
    Overwrite every parameter of a module with small Gaussian values.

    The U-Net's output layers start at zero, so a fresh model returns exactly
    zero and any comparison of two computations through it passes trivially.

    :param model: the th.nn.Module to modify in place.
    :param seed: seed of the private generator, so the global RNG is untouched.
    :param std: standard deviation of the new values.
    :return: the same module.
    """
    gen = th.Generator().manual_seed(seed)
    with th.no_grad():
        for param in model.parameters():
            values = th.randn(param.shape, generator=gen, dtype=th.float64) * std
            param.copy_(values.to(param.dtype))
    return model


def tiny_model_and_diffusion(**overrides):
    """
    Build a tiny U-Net and its diffusion through the public factory.

    :param overrides: flags that replace or extend TINY_FLAGS.
    :return: (model, diffusion) as create_model_and_diffusion returns them.
    """
    from guided_diffusion.script_util import create_model_and_diffusion

    return create_model_and_diffusion(**{**TINY_FLAGS, **overrides})


def linear_diffusion(num_steps=50, **kwargs):
    """
    A GaussianDiffusion on the linear schedule with eps / fixed-large / MSE
    unless other types are given.

    :param num_steps: number of diffusion steps.
    :param kwargs: replacements for model_mean_type, model_var_type,
        loss_type or rescale_timesteps.
    """
    from guided_diffusion import gaussian_diffusion as gd

    options = dict(
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    options.update(kwargs)
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", num_steps), **options
    )


class RecordingModel(th.nn.Module):
    """
    A stand-in for the U-Net that records what it is called with.

    Every call appends a dict with the input tensor ``x``, the timesteps ``t``
    and the keyword arguments to ``self.calls``, and returns ``fill`` in the
    shape the diffusion expects.

    :param out_channels: channels of the returned tensor (C, or 2C when the
        variance is learned).
    :param fill: value of every returned element.
    """

    def __init__(self, out_channels, fill=0.0):
        super().__init__()
        self.out_channels = out_channels
        self.fill = fill
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append(
            dict(x=x.detach().clone(), t=t.detach().clone(), kwargs=kwargs)
        )
        return th.full(
            (x.shape[0], self.out_channels, *x.shape[2:]),
            self.fill,
            dtype=x.dtype,
            device=x.device,
        )


class FixedOutputModel(th.nn.Module):
    """
    A model that ignores its input and returns a given tensor, for example the
    true noise of a q_sample call (an ideal eps predictor for that one draw).

    :param output: the tensor to return, shape (N, C', H, W).
    """

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t, **kwargs):
        return self.output


class GaussianEpsModel(th.nn.Module):
    """
    The exact noise predictor for data x_0 ~ N(mu, s^2) in every dimension.

    Then x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
    The model receives ORIGINAL timestep indices (SpacedDiffusion maps them
    back), so it looks abar up in the base schedule's table.

    :param alphas_cumprod: abar of the base (unspaced) schedule, numpy array.
    :param mu: data mean.
    :param s: data standard deviation.
    """

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.alphas_cumprod = th.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        self.mu = mu
        self.s = s
        self.seen_t = []

    def forward(self, x, t, **kwargs):
        self.seen_t.append(t.detach().clone())
        abar = self.alphas_cumprod[t.long()].view(-1, *([1] * (x.dim() - 1)))
        x64 = x.double()
        eps = (
            (1 - abar).sqrt()
            * (x64 - abar.sqrt() * self.mu)
            / (abar * self.s**2 + 1 - abar)
        )
        return eps.to(x.dtype)



def save_dual_pol_run(folder, model, flags, name):
    """
    Save ``model`` as checkpoint ``name`` of a training run in ``folder``, with the
    config.json of a run trained on VV and VH in dB (SEN12MS's ranges), Sentinel-2's
    bands 4,3,2 over 0..3000, 10 m pixels in EPSG:32632, and the model ``flags``.

    :return: the checkpoint's path.
    """
    import json

    from guided_diffusion.base import settings
    from guided_diffusion.io.rasters import Scaling

    th.save(model.state_dict(), folder / name)
    inputs = Scaling(sar_channels=2, sar_input="db", sar_db_range=((-25.0, 0.0), (-32.5, 0.0)),
                     sar_band_names=("VV", "VH"), opt_bands=(4, 3, 2),
                     opt_range=(0.0, 3000.0)).record()  # fmt: skip
    config = {**settings.defaults(*{s.group for s in settings.SETTINGS.values()}), **flags,
              "inputs": {**inputs, "crs": "EPSG:32632", "pixel_size": [10.0, 10.0]}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder / name

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model with every weight random, saved as a training run saves it
    (model000010.pt and the run's config.json)."""
    import json

    from guided_diffusion.script_util import model_and_diffusion_defaults
    from guided_diffusion.train_util import train_defaults

    run = tmp_path_factory.mktemp("train_run")
    model, _ = tiny_model_and_diffusion()
    randomize_(model, seed=1)
    th.save(model.state_dict(), run / "model000010.pt")
    config = {**train_defaults(), **model_and_diffusion_defaults(), **TINY_FLAGS}
    (run / "config.json").write_text(json.dumps({**config, "world_size": 1}))
    return run / "model000010.pt"


@pytest.fixture(autouse=True)
def default_logger():
    """
    Every test starts with the logger a fresh process has (it prints to stdout): a
    test that configured it to write files only (a training run, a script run in
    this process) would otherwise hide from later tests what they read on stdout.
    """
    yield
    logger = sys.modules.get("guided_diffusion.logger")
    if logger is not None and logger._current is not None:
        logger._current.close()
        logger._current = None


@pytest.fixture
def one_thread():
    """
    One torch thread for a test: on two cores shared with other work, OpenMP threads
    that wait for a busy core make small models many times slower.
    """
    previous = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(previous)


# Warnings that a Python process does not print by default (see the warnings module).
_SILENT_WARNINGS = (
    DeprecationWarning,
    PendingDeprecationWarning,
    ImportWarning,
    ResourceWarning,
)


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """
    Run a script of scripts/ in this process, as ``python SCRIPT ARGS`` would.

    For the cases of a script whose real launch another test already covers (an
    error found while parsing, a refused folder): the torch import and start-up of a
    subprocess take seconds, the case itself milliseconds. The script runs as
    ``__main__`` with its own top-level error handling; a ``sys.exit(message)``
    becomes status 1 with the message on stderr, as the interpreter does, and
    every warning a process would print counts as stderr output. An exception the
    script lets through is not caught: the test fails with its traceback. A process
    group the script leaves open is destroyed, as at the end of a process.

    :return: a function ``run(script, args, env=None)`` that returns a
        subprocess.CompletedProcess with returncode, stdout and stderr; ``env``
        holds variables to set for the run, or to remove where the value is None.
    """
    from guided_diffusion import dist_util

    def run(script, args, env=None):
        capsys.readouterr()  # only this run's output
        was_initialized = th.distributed.is_initialized()
        with (
            monkeypatch.context() as patch,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            for key, value in (env or {}).items():
                if value is None:
                    patch.delenv(key, raising=False)
                else:
                    patch.setenv(key, str(value))
            patch.setattr(sys, "argv", [str(script), *map(str, args)])
            patch.setattr(sys, "path", list(sys.path))  # the script prepends the repo
            try:
                runpy.run_path(str(script), run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code
            finally:
                if not was_initialized and th.distributed.is_initialized():
                    dist_util.cleanup()
        out, err = capsys.readouterr()
        if code is None:
            code = 0
        elif isinstance(code, str):
            err, code = err + code + "\n", 1
        for w in caught:
            if not issubclass(w.category, _SILENT_WARNINGS):
                err += warnings.formatwarning(
                    w.message, w.category, w.filename, w.lineno
                )
        return subprocess.CompletedProcess(
            [str(script), *map(str, args)], code, out, err
        )

    return run
