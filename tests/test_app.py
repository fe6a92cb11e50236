"""
The web page (guided_diffusion/page/app.py, scripts/app.py) through gradio_client, with
the bundled model: an example and an upload at the model's size get the pixels
scripts/image_sample_realtime.py writes for a file of the same name, a larger
upload the pixels scripts/translate_scene.py writes, a bad upload a message and
the page keeps working; several samples give the scripts' mean and spread; and the
models offered and kept loaded.

The page runs in this process; the scripts run as subprocesses, as a user runs them.
"""

import os
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch as th
from conftest import free_port
from PIL import Image

pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
pytest.importorskip("gradio_client", reason="pip install -e '.[app]'")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from guided_diffusion.io.checkpoints import read_run_config  # noqa: E402
from guided_diffusion.page import app  # noqa: E402
from guided_diffusion.translation.scene_translation import (  # noqa: E402
    BUNDLED_MODEL,
    BUNDLED_STUDENT,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "fields_32.tif"
SCENE_EXAMPLE = ROOT / "assets" / "examples" / "scene_64x96.tif"
MODEL = "scene_model (bundled demo)"
STUDENT = "scene_student (bundled demo, distilled student)"
# few steps: the facts do not depend on how many
FAST = ("DPM-Solver++", 4, 3)
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Gradio's queue calls pandas in ways pandas 3 deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing"),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page with the bundled model and examples, served on a free port."""
    translator = app.Translator(app.find_models(), work_dir=str(tmp_path_factory.mktemp("page")))
    examples = app.find_examples([app.EXAMPLES_DIR])
    blocks = app.build_page(translator, examples)
    url = app.launch(blocks, translator, examples, port=free_port())
    yield url, translator, examples
    blocks.close()


@pytest.fixture(scope="module")
def client(page):
    return Client(page[0], verbose=False)


def ask(client, path, sampler="DPM-Solver++", steps=4, seed=3, model=MODEL):
    """One request, as the Translate button sends it: (SAR, result, text, files)."""
    sar, result, _, _, text, files = ask_samples(client, path, sampler, steps, seed, 1, model)
    return sar, result, text, files


def ask_samples(client, path, sampler="DPM-Solver++", steps=4, seed=3, samples=2,
                model=MODEL):  # fmt: skip
    """A request for several samples: (SAR, result, mean, spread, text, files)."""
    return client.predict(handle_file(str(path)), model, sampler, steps, seed, samples,
                          api_name="/translate")  # fmt: skip


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def run_script(script, *args, logdir=None):
    env = {**ENV, **({"OPENAI_LOGDIR": str(logdir)} if logdir else {})}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_an_example_and_an_upload_get_the_sampling_scripts_pixels(client, page, tmp_path):
    _, _, examples = page
    assert str(EXAMPLE) in examples and str(SCENE_EXAMPLE) in examples
    upload = tmp_path / "upload" / "my_patch.tif"  # a user's file: another name
    upload.parent.mkdir()
    shutil.copy(ROOT / "assets" / "examples" / "river_32.tif", upload)
    got = {}
    for path in (EXAMPLE, upload):
        sar, result, text, files = ask(client, path)
        assert "image_sample_realtime.py" in text and "--seed 3" in text
        assert np.asarray(Image.open(sar)).shape == (32, 32, 3)
        assert [Path(f).suffix for f in files] == [".png", ".tif"]
        assert np.array_equal(pixels(result), pixels(files[0]))
        with rasterio.open(files[1]) as src:  # the input's place kept
            assert src.crs.to_epsg() == 32632 and src.transform.e == -10
            assert np.array_equal(src.read().transpose(1, 2, 0), pixels(files[0]))
        got[path.name] = pixels(files[0])
    # two samples of the example: sample 0 is the result of one
    _, result, mean, spread, text, files = ask_samples(client, EXAMPLE, samples=2)
    assert "--samples_per_input 2" in text and "2 samples" in text
    assert np.array_equal(pixels(result), got[EXAMPLE.name])
    assert [Path(f).name for f in files] == [
        "fields_32_optical.png", "fields_32_optical.tif", "fields_32_optical_mean.png",
        "fields_32_optical_spread.png", "fields_32_optical_spread.npz",
    ]  # fmt: skip
    assert np.array_equal(pixels(mean), pixels(files[2]))
    assert np.array_equal(pixels(spread), pixels(files[3]))
    # the sampling script on a folder holding files of the same names
    data = tmp_path / "data"
    (data / "sar").mkdir(parents=True)
    for path in (EXAMPLE, upload):
        shutil.copy(path, data / "sar" / path.name)
    run_script("image_sample_realtime.py", "--data_dir", data, "--model_path", BUNDLED_MODEL,
               "--sampler", "dpm++2m", "--timestep_respacing", 4, "--seed", 3,
               "--batch_size", 1, "--samples_per_input", 2,
               logdir=tmp_path / "log")  # fmt: skip
    out = tmp_path / "log" / "sample_results" / "dpm++2m4"
    for name, image in got.items():
        expected = pixels(out / "gen_opt" / (Path(name).stem + ".png"))
        assert image.shape == (32, 32, 3) and image.std() > 0
        assert np.array_equal(image, expected), name
    # the page's mean, spread picture and arrays are the script's
    assert np.array_equal(pixels(mean), pixels(out / "gen_mean" / "fields_32.png"))
    assert np.array_equal(pixels(spread), pixels(out / "gen_spread" / "fields_32.png"))
    with np.load(files[4]) as ours, np.load(out / "spread_arrays" / "fields_32.npz") as theirs:
        assert sorted(ours.files) == sorted(theirs.files)
        for key in ours.files:
            assert np.array_equal(ours[key], theirs[key]), key


def script_job(script, command, **paths):
    """The job a script builds from the page's command, its placeholders (DATA,
    OUT.tif, the upload's name) replaced by ``paths``."""
    parse = runpy.run_path(str(ROOT / "scripts" / script), run_name="x")["parse_args"]
    argv = shlex.split(command, comments=True)[2:]
    job = parse([paths.get(a, a) for a in argv])
    return replace(job, model_path=os.path.abspath(job.model_path))


@pytest.mark.parametrize("route", ["patch", "scene"])
def test_the_command_the_page_shows_runs_the_pages_job(route, tmp_path, monkeypatch):
    """The page builds its job from its controls and shows the command rendered
    from it: the script given that command builds the same job (the page's own
    choice of files aside)."""
    monkeypatch.chdir(ROOT)
    translator = app.Translator(app.find_models(), work_dir=str(tmp_path / "page"))
    upload = EXAMPLE if route == "patch" else SCENE_EXAMPLE
    folder = str(tmp_path / "request")
    job = translator.job(route, str(upload), BUNDLED_MODEL, "ddim", 7, 11, 3, folder)
    command = translator.command(job, str(upload))
    if route == "patch":
        assert command.startswith("python scripts/image_sample_realtime.py ")
        theirs = script_job("image_sample_realtime.py", command, DATA=str(upload.parent))
        assert replace(theirs, out_dir=folder) == job
    else:
        assert command.startswith("python scripts/translate_scene.py ")
        shown = os.path.relpath(upload)
        theirs = script_job("translate_scene.py", command, **{"OUT.tif": job.output,
                                                               shown: str(upload)})  # fmt: skip
        page_only = dict(quicklook=False, geotiff=job.geotiff, png=True, keep_samples=False)
        assert replace(theirs, **page_only) == job
    assert job.samples_per_input == 3 and job.seed == 11 and job.timestep_respacing == "7"


def test_the_page_translates_both_routes_without_parsing_a_command_line(
    tmp_path, monkeypatch
):
    """The page calls the library with jobs: with every argparse parser made to
    fail, both routes still translate."""
    import argparse

    def refuse(*args, **kwargs):
        raise AssertionError("the page parsed a command line")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", refuse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", refuse)
    translator = app.Translator(app.find_models(), work_dir=str(tmp_path))
    for upload, route in ((EXAMPLE, "patch"), (SCENE_EXAMPLE, "scene")):
        result = translator.translate(str(upload), MODEL, "dpm++2m", 2, 0)
        assert result.route == route
        with rasterio.open(upload) as src:
            assert result.image.shape == (*src.shape, 3)


def test_the_noise_follows_the_files_name_and_the_seed(client, tmp_path):
    renamed = tmp_path / "renamed.tif"
    shutil.copy(EXAMPLE, renamed)
    first = pixels(ask(client, EXAMPLE)[1])
    assert np.array_equal(first, pixels(ask(client, EXAMPLE)[1]))  # the same request again
    assert not np.array_equal(first, pixels(ask(client, renamed)[1]))
    assert not np.array_equal(first, pixels(ask(client, EXAMPLE, seed=4)[1]))


def write_crop(path, source, height, width):
    """The top-left height x width pixels of a GeoTIFF, with its place."""
    with rasterio.open(source) as src:
        profile, data = src.profile, src.read()[:, :height, :width]
        names = src.descriptions
    profile.update(height=height, width=width)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for band, name in enumerate(names, start=1):
            dst.set_band_description(band, name)
    return path


def test_a_larger_upload_gets_the_scene_translators_pixels(client, tmp_path):
    scene = write_crop(tmp_path / "small_scene.tif", SCENE_EXAMPLE, 40, 48)  # 2 x 2 tiles
    sar, result, text, files = ask(client, scene, "DDIM", 3, 5)
    assert "translate_scene.py" in text and "--input small_scene.tif" in text
    assert "--samples_per_input" not in text
    image = pixels(result)
    assert image.shape == (40, 48, 3) and np.array_equal(image, pixels(files[0]))
    # two samples: sample 0 is the result of one, and their mean and spread files
    _, twice, mean, spread, text, more = ask_samples(client, scene, "DDIM", 3, 5, 2)
    assert "--samples_per_input 2" in text and np.array_equal(pixels(twice), image)
    assert [Path(f).name for f in more] == [
        "small_scene_optical.png", "small_scene_optical.tif",
        "small_scene_optical_mean.png", "small_scene_optical_mean.tif",
        "small_scene_optical_spread.png", "small_scene_optical_spread.tif",
    ]  # fmt: skip
    assert np.array_equal(pixels(mean), pixels(more[2]))
    assert np.array_equal(pixels(spread), pixels(more[4]))
    run_script("translate_scene.py", "--input", scene, "--output", tmp_path / "out.tif",
               "--sampler", "ddim", "--timestep_respacing", 3, "--seed", 5,
               "--samples_per_input", 2)  # fmt: skip
    with rasterio.open(tmp_path / "out.tif") as src:
        expected, transform = src.read().transpose(1, 2, 0), src.transform
    assert np.array_equal(image, expected)
    with rasterio.open(files[1]) as src:
        assert np.array_equal(src.read().transpose(1, 2, 0), expected)
        assert src.transform == transform and src.crs.to_epsg() == 32632
    for ours, theirs in ((more[3], "out_mean.tif"), (more[5], "out_spread.tif")):
        with rasterio.open(ours) as a, rasterio.open(tmp_path / theirs) as b:
            assert np.array_equal(a.read(), b.read(), equal_nan=True), theirs
            assert a.transform == transform and a.crs.to_epsg() == 32632
    with rasterio.open(tmp_path / "out_mean.tif") as src:
        assert np.array_equal(pixels(mean), src.read().transpose(1, 2, 0))
    assert np.array_equal(pixels(spread), pixels(tmp_path / "out_spread.png"))


def test_a_bad_upload_shows_a_message_and_the_next_request_works(client, page, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "four.tif", "w", driver="GTiff", width=32, height=32,
                           count=4, dtype="float32") as dst:  # fmt: skip
            dst.write(np.full((4, 32, 32), -12.0, np.float32))
    expected = {  # shown where the result's text goes, the outputs left empty
        "empty.png": "empty.png is empty (0 bytes)",
        "text.png": "cannot read image text.png",
        "four.tif": "four.tif has 4 bands, but the model scene_model (bundled demo) "
        "reads VV and VH in dB (2 bands): upload a file with just those bands (of "
        "this file's bands, 1 and 2 would be read as VV and VH)",
    }
    for name, message in expected.items():
        sar, result, text, files = ask(client, tmp_path / name)
        assert (sar, result, files) == (None, None, None)
        assert text.startswith("**Not translated.** ") and message in text, (name, text)
    with pytest.raises(AppError, match="Invalid file type"):  # refused by the upload box
        ask(client, tmp_path / "notes.txt")
    with pytest.raises(AppError, match="greater than maximum value 8"):  # Gradio's slider
        ask_samples(client, EXAMPLE, samples=9)
    with pytest.raises(app.PageError, match="samples 9: give a whole number from 1 to 8"):
        page[1].translate(str(EXAMPLE), MODEL, "ddim", 2, 0, samples=9)
    _, result, _, _ = ask(client, EXAMPLE)
    assert pixels(result).std() > 0


def test_a_file_of_other_bands_gets_one_message_in_the_pages_words(client, tmp_path):
    # a one-band 8-bit PNG, as SEN1-2 gives them, to the dual-polarisation model
    png = tmp_path / "ROIs1868_summer_s1_59_p2.png"
    grey = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey, "L").save(png)
    sar, result, mean, spread, text, files = ask_samples(client, png, samples=1)
    assert (sar, result, mean, spread, files) == (None,) * 5  # no output in error
    assert text.count("Not translated") == 1
    assert "VV and VH in dB (2 bands)" in text and "has 1 band" in text
    assert "choose a model" in text and "upload a file" in text
    assert "--" not in text  # no script flag: the page has none to give
    _, result, _, _ = ask(client, EXAMPLE)  # the page goes on
    assert pixels(result).std() > 0


def test_the_models_offered_and_the_two_kept_loaded(tmp_path):
    runs = tmp_path / "logs"
    for run, files in {"run_a": ["model000100.pt", "ema_0.9999_000200.pt", "model000200.pt"],
                       "run_b": ["model000050.pt"], "empty": []}.items():  # fmt: skip
        (runs / run).mkdir(parents=True)
        for name in files:
            shutil.copy(BUNDLED_MODEL, runs / run / name)
        shutil.copy(Path(BUNDLED_MODEL).parent / "config.json", runs / run)
    models = app.find_models(runs_dir=str(runs))
    assert models == {
        "run_a": str(runs / "run_a" / "ema_0.9999_000200.pt"),
        "run_b": str(runs / "run_b" / "model000050.pt"),
        MODEL: BUNDLED_MODEL,
        STUDENT: BUNDLED_STUDENT,  # the bundled student, beside its teacher
    }
    with pytest.raises(app.PageError, match="--model_path nowhere.pt: no such file"):
        app.find_models(["nowhere.pt"])
    with pytest.raises(app.PageError, match="no run folder in it holds a checkpoint"):
        app.find_models(runs_dir=str(runs / "empty"))
    translator = app.Translator(models, work_dir=str(tmp_path / "work"))
    for name in ("run_a", "run_b", MODEL, "run_b"):
        translator.translate(str(EXAMPLE), name, "ddim", 2, 0)
    # the last two used, the least recent first
    assert translator.cache.loaded() == [BUNDLED_MODEL, models["run_b"]]


def test_a_port_in_use_is_refused_naming_the_flag(page):
    url, translator, _ = page
    port = int(url.rstrip("/").rsplit(":", 1)[1])  # the page's own
    with pytest.raises(app.PageError, match=f"--port {port}: cannot serve there"):
        app.launch(app.build_page(translator), translator, port=port)


class OnTheGpu(th.nn.Module):
    """
    The network on a GPU with room for ``room["images"]`` images per call: a larger
    call raises CUDA's out-of-memory error, as PyTorch does; ``calls`` records the
    batch sizes tried.
    """

    def __init__(self, model, room, calls):
        super().__init__()
        self.model, self.room, self.calls = model, room, calls

    def forward(self, x, t, **kwargs):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.room["images"]:
            raise th.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x, t, **kwargs)


class GpuOfLimitedRoom:
    """Stands in for load_prepared_model: the prepared model, :class:`OnTheGpu`."""

    def __init__(self, prepare):
        self.prepare, self.room, self.calls = prepare, {"images": 64}, []

    def __call__(self, *args, **options):
        return OnTheGpu(self.prepare(*args, **options), self.room, self.calls)


def test_out_of_gpu_memory_retries_at_a_smaller_batch_and_the_page_keeps_working(
    tmp_path, monkeypatch, capsys
):
    scene = write_crop(tmp_path / "small_scene.tif", SCENE_EXAMPLE, 40, 48)
    expected = app.Translator(app.find_models(), work_dir=str(tmp_path / "plain"))
    expected = expected.translate(str(scene), MODEL, "ddim", 3, 5).image
    gpu = GpuOfLimitedRoom(app.load_prepared_model)
    monkeypatch.setattr(app, "load_prepared_model", gpu)
    runs = tmp_path / "logs"
    (runs / "run_a").mkdir(parents=True)
    shutil.copy(BUNDLED_MODEL, runs / "run_a" / "model000100.pt")
    shutil.copy(Path(BUNDLED_MODEL).parent / "config.json", runs / "run_a")
    translator = app.Translator(app.find_models(runs_dir=str(runs)), work_dir=str(tmp_path / "w"))
    # room for one tile per call: the first step's n tiles fail, n // 2 fail, ...,
    # 1 fits, and the steps after it go one tile at a time
    gpu.room["images"] = 1
    capsys.readouterr()
    result = translator.translate(str(scene), MODEL, "ddim", 3, 5)
    assert np.array_equal(result.image, expected)  # the same pixels
    n = gpu.calls[0]
    halved = [n >> k for k in range(n.bit_length())]  # n, n // 2, ..., 1
    assert n == 6 and gpu.calls[: len(halved)] == halved
    assert set(gpu.calls[len(halved) :]) == {1}
    assert f"Out of GPU memory at {n} tiles per network call" in result.summary()
    assert "1 tile per call" in result.summary()
    logged = capsys.readouterr().out
    for a, b in zip(halved, halved[1:]):
        assert f"out of memory at {a} images per network call: {b} from now on" in logged
    # no room at all, with another model loaded: it is released and the request tried
    # again; then the page says so, and keeps working
    gpu.room["images"] = 64
    translator.translate(str(EXAMPLE), "run_a", "ddim", 2, 0)
    assert len(translator.cache.loaded()) == 2
    gpu.room["images"] = 0
    with pytest.raises(app.PageError, match="Out of GPU memory") as err:
        translator.translate(str(scene), MODEL, "ddim", 3, 5)
    assert "one tile per network call" in str(err.value) and "\n" not in str(err.value)
    assert translator.cache.loaded() == [BUNDLED_MODEL]
    assert "released run_a" in capsys.readouterr().out
    gpu.room["images"] = 64
    assert np.array_equal(translator.translate(str(scene), MODEL, "ddim", 3, 5).image, expected)


def test_a_registered_sampler_is_offered_and_runs(page, client, monkeypatch):
    # The page offers what samplers.SAMPLERS holds when it is built: a sampler
    # registered now (DDIM under another name, recording its calls) is a choice
    # under its registered name, after the four the page names, fits a diffusion
    # model, and translates.
    from guided_diffusion.base import samplers

    calls = []

    def toy(denoiser, x, timesteps, *, generator=None, history=None):
        calls.append(len(timesteps))
        yield from samplers.ddim(denoiser, x, timesteps, generator=generator)

    monkeypatch.setitem(samplers.SAMPLERS, "toy", toy)
    _, translator, examples = page
    blocks = app.build_page(translator, examples)
    radio = next(b for b in blocks.blocks.values() if getattr(b, "label", None) == "Sampler")
    assert [value for _, value in radio.choices] == [
        "DPM-Solver++", "DDIM", "DDPM", "Consistency (distilled student)", "toy"]  # fmt: skip
    assert list(translator.sampler_choices(MODEL)) == ["DPM-Solver++", "DDIM", "DDPM", "toy"]
    url = app.launch(blocks, translator, examples, port=free_port())
    try:
        _, result, _, _ = ask(Client(url, verbose=False), EXAMPLE, "toy", 3, 5)
    finally:
        blocks.close()
    assert calls == [3]
    _, expected, _, _ = ask(client, EXAMPLE, "DDIM", 3, 5)
    assert np.array_equal(pixels(result), pixels(expected))


def test_the_bundled_student_is_offered_beside_its_teacher(client):
    # the bundled student's config.json names its teacher, by a path in the repository
    config = read_run_config(BUNDLED_STUDENT)
    assert config["distillation"]["teacher"] == "assets/scene_model/model.pt"
    sar, result, text, _ = ask(client, EXAMPLE, "Consistency (distilled student)", 2, 3, STUDENT)
    assert pixels(result).std() > 5
    assert "--sampler consistency --timestep_respacing 2" in text
    # the teacher's sampler refused for it, in one message naming the right one
    _, result, text, _ = ask(client, EXAMPLE, "DPM-Solver++", 2, 3, STUDENT)
    assert result is None and "consistency" in text
