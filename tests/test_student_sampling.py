"""
Sampling a distilled student (issue 24): a run folder whose config.json has a
"distillation" record loads as the teacher's network wrapped in a ConsistencyModel and
samples with the "consistency" sampler through the folder script, the scene script and
the page, with the pixels computed here directly; the wrong sampler for either kind of
model stops with one line; the page offers only the samplers that fit; a student's
checkpoints are found as any run's.

The "student" is a tiny random network with a distillation record added to its
config.json: the plumbing does not depend on what the weights learned.
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch as th
from conftest import TINY_FLAGS, randomize_, tiny_model_and_diffusion
from PIL import Image
from rasterio.transform import Affine

from guided_diffusion.base import samplers
from guided_diffusion.base.consistency import ConsistencyModel
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
from guided_diffusion.io.checkpoints import (
    find_resume_checkpoint,
    newest_sampling_checkpoint,
)
from guided_diffusion.script_util import (
    create_gaussian_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import train_defaults
from guided_diffusion.translation import sampling
from guided_diffusion.translation.jobs import FolderJob
from guided_diffusion.translation.samples import sample_generators
from guided_diffusion.translation.scene import band_seed

ROOT = Path(__file__).resolve().parents[1]
FOLDER_SCRIPT = ROOT / "scripts" / "image_sample_realtime.py"
NLL_SCRIPT = ROOT / "scripts" / "image_nll.py"
SCENE_SCRIPT = ROOT / "scripts" / "translate_scene.py"
# x_0-predicting: a random network's x_0 stays inside [-1, 1], so clipping hides nothing
FLAGS = {**TINY_FLAGS, "predict_xstart": True}
DISTILLATION = {"method": "consistency", "teacher": "/teacher/ema_0.9999_000010.pt",
                "skip": 5, "distance": "huber", "huber_c": 0.001, "target_ema": 0.95,
                "adv_weight": 0.0, "solver": "ddim", "seed": 0}  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")


def save_run(folder, net, flags, *, student, name="ema_0.9999_000010.pt"):
    """A run folder as training writes one: the weights, state and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    th.save(net.state_dict(), folder / name)
    config = {
        **train_defaults(),
        **model_and_diffusion_defaults(),
        **flags,
        "world_size": 1,
    }
    if student:
        config["distillation"] = DISTILLATION
    (folder / "config.json").write_text(json.dumps(config))
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the student's checkpoint, a diffusion model's checkpoint, the network)."""
    root = tmp_path_factory.mktemp("runs")
    net, _ = tiny_model_and_diffusion(**FLAGS)
    randomize_(net, seed=4)
    net.eval()
    student = save_run(root / "student", net, FLAGS, student=True)
    teacher = save_run(root / "teacher", net, FLAGS, student=False)
    return student, teacher, net


def direct(net, sar, steps, x_T, generator):
    """The student's sample computed here: the network in a ConsistencyModel with the
    teacher's 50-step schedule, the diffusion respaced at trailing steps."""
    abar = np.cumprod(1.0 - get_named_beta_schedule("linear", FLAGS["diffusion_steps"]))
    student = ConsistencyModel(net, abar, "x_start", 3)
    diffusion = create_gaussian_diffusion(
        steps=FLAGS["diffusion_steps"], predict_xstart=True,
        timestep_respacing=f"trailing{steps}",
    )  # fmt: skip
    with th.no_grad():
        denoiser = samplers.Denoiser(diffusion, student, sar, clip_denoised=True)
        out = samplers.run("consistency", denoiser, x_T, generator=generator)
    return sampling.to_uint8(out)


def sar_image(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def as_input(image):
    """An 8-bit SAR image as the model reads it (the runs' default scaling)."""
    return th.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def write_geotiff(path, image):
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[1],
                       height=image.shape[0], count=3, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(10, 0, 600000, 0, -10, 5100000)) as dst:  # fmt: skip
        dst.write(image.transpose(2, 0, 1))
    return path


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_folder_script_samples_a_student_as_computed_directly(
    runs, steps, tmp_path, run_in_process
):
    student, _, net = runs
    (tmp_path / "data" / "sar").mkdir(parents=True)
    image = sar_image(steps)
    Image.fromarray(image).save(tmp_path / "data" / "sar" / "a.png")
    # no --sampler: a student's default is the consistency sampler
    proc = run_in_process(FOLDER_SCRIPT, [
        "--data_dir", tmp_path / "data", "--model_path", student,
        "--timestep_respacing", steps, "--seed", 3,
    ], env={"OPENAI_LOGDIR": tmp_path / "log"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"samples at trailing{steps} of its teacher's 50 steps" in proc.stdout
    written = png(
        tmp_path
        / "log"
        / "sample_results"
        / f"consistency{steps}"
        / "gen_opt"
        / "a.png"
    )
    generators = sampling.make_generators(3, ["a.png"])
    x_T = samplers.noise_of_shape((1, 3, 32, 32), generators, "cpu")
    expected = direct(net, as_input(image), steps, x_T, generators)[0]
    assert np.array_equal(written, expected)
    assert written.std() > 0


@pytest.mark.parametrize("steps", [2, 4])
def test_the_scene_script_samples_a_student_as_computed_directly(
    runs, steps, tmp_path, run_in_process
):
    """A scene of one tile: the fused prediction is the tile's, x_T its band's noise."""
    student, _, net = runs
    image = sar_image(10 + steps)
    scene = write_geotiff(tmp_path / "scene.tif", image)
    proc = run_in_process(SCENE_SCRIPT, [
        "--input", scene, "--output", tmp_path / "out.tif", "--model_path", student,
        "--sampler", "consistency", "--timestep_respacing", steps, "--seed", 5,
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(tmp_path / "out.tif") as src:
        written = src.read().transpose(1, 2, 0)
    generator = th.Generator().manual_seed(band_seed(5, 0))
    x_T = samplers.noise_of_shape((1, 3, 32, 32), [generator], "cpu")
    expected = direct(net, as_input(image), steps, x_T, [generator])[0]
    assert np.array_equal(written, expected)


def test_the_page_samples_a_student_on_both_routes(runs, tmp_path, run_in_process):
    pytest.importorskip("gradio", reason="the page needs the app extra")
    from guided_diffusion.page import app

    student, teacher, net = runs
    translator = app.Translator(
        {"student": str(student), "teacher": str(teacher)},
        work_dir=str(tmp_path / "page"),
    )
    image = sar_image(20)
    upload = write_geotiff(tmp_path / "b.tif", image)
    for steps in (2, 3):
        result = translator.translate(str(upload), "student", "consistency", steps, 7)
        assert result.route == "patch"
        generators = sampling.make_generators(7, ["b.tif"])
        x_T = samplers.noise_of_shape((1, 3, 32, 32), generators, "cpu")
        assert np.array_equal(
            result.image, direct(net, as_input(image), steps, x_T, generators)[0]
        )
    # a scene: 32 x 48, two tiles; the page's pixels are the scene script's
    scene = write_geotiff(tmp_path / "wide.tif", sar_image(21, 48)[:32])
    result = translator.translate(str(scene), "student", "consistency", 2, 7)
    assert result.route == "scene" and result.image.shape == (32, 48, 3)
    argv = shlex.split(result.command, comments=True)
    assert (
        argv[:2] == ["python", "scripts/translate_scene.py"] and "consistency" in argv
    )
    shown = {"OUT.tif": str(tmp_path / "by_hand.tif"), "wide.tif": str(scene)}
    argv = [shown.get(a, a) for a in argv[2:]]
    argv[argv.index("--model_path") + 1] = str(student)
    proc = run_in_process(SCENE_SCRIPT, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(tmp_path / "by_hand.tif") as src:
        assert np.array_equal(src.read().transpose(1, 2, 0), result.image)
    with pytest.raises(app.PageError, match="sample it with --sampler consistency"):
        translator.translate(str(upload), "student", "ddim", 2, 7)
    with pytest.raises(app.PageError, match="choose one of ddpm, ddim, dpm\\+\\+2m"):
        translator.translate(str(upload), "teacher", "consistency", 2, 7)


def test_the_page_offers_the_samplers_that_fit_the_model(runs, tmp_path):
    pytest.importorskip("gradio", reason="the page needs the app extra")
    from guided_diffusion.page import app

    student, teacher, _ = runs
    translator = app.Translator(
        {"student": str(student), "teacher": str(teacher)}, work_dir=str(tmp_path)
    )
    assert list(translator.sampler_choices("student").values()) == ["consistency"]
    assert list(translator.sampler_choices("teacher").values()) == [
        "dpm++2m",
        "ddim",
        "ddpm",
    ]
    # choosing the student switches the sampler and its steps; back, the teacher's
    fits, shown, steps = app.sampler_update(translator, "student", app.DEFAULT_SAMPLER)
    assert (
        fits == [app.SAMPLER_LABELS["consistency"]] and shown == fits[0] and steps == sampling.STUDENT_STEPS
    )
    fits, shown, steps = app.sampler_update(translator, "teacher", shown)
    assert shown == app.DEFAULT_SAMPLER and steps == app.DEFAULT_STEPS
    # a sampler that fits is kept, and so are the steps
    assert app.sampler_update(translator, "teacher", "DDIM") == (fits, "DDIM", None)


def test_the_loaded_student_returns_its_input_at_the_smallest_timestep(runs):
    student, _, _ = runs
    # an eps-predicting student: x_0 goes through the wrapper's eps and back
    flags, _, _, _ = sampling.checkpoint_settings(
        str(student), {"predict_xstart": False}, {}
    )
    model = sampling.load_model(str(student), flags, "cpu")
    assert isinstance(model, ConsistencyModel) and model.mean_type == "eps"
    # what the folder and scene jobs and the page load: wrapped too
    job = FolderJob(model_path=str(student), sampler="consistency", channels_last=True)
    assert isinstance(sampling.load_prepared_model(job, flags, "cpu"), ConsistencyModel)
    plain = create_gaussian_diffusion(steps=FLAGS["diffusion_steps"])
    gen = th.Generator().manual_seed(0)
    x = th.randn(2, 3, 32, 32, generator=gen) * 0.5
    sar = th.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with th.no_grad():
        out = samplers.Denoiser(plain, model, sar, clip_denoised=False)
        x0 = out(x, 0)["pred_xstart"]
        later = out(x, 10)["pred_xstart"]
    assert th.allclose(x0, x, atol=1e-5)  # float32 through eps and back
    assert not th.allclose(later, x, atol=1e-2)  # the network matters above t = 0


def test_a_sampler_that_does_not_fit_stops_with_one_line(
    runs, tmp_path, run_in_process
):
    student, teacher, _ = runs
    (tmp_path / "sar").mkdir()
    Image.fromarray(sar_image(0)).save(tmp_path / "sar" / "a.png")
    cases = [
        (student, ["--sampler", "ddim"], "--sampler ddim: .* is a distilled student \\(its "
         "config.json has a distillation record\\); sample it with --sampler consistency"),
        (student, ["--use_ddim", "True"], "sample it with --sampler consistency"),
        (teacher, ["--sampler", "consistency"], "--sampler consistency samples distilled "
         "students only; .* is a diffusion model: choose one of ddpm, ddim, dpm\\+\\+2m"),
        (student, ["--timestep_respacing", "ddim2"], "--timestep_respacing ddim2: a "
         "distilled student takes a number of steps from 1 to 50"),
    ]  # fmt: skip
    for model, extra, message in cases:
        proc = run_in_process(FOLDER_SCRIPT, [
            "--data_dir", tmp_path, "--model_path", model, *extra,
        ], env={"OPENAI_LOGDIR": tmp_path / "log"})  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert re.search(message, lines[0]), lines[0]


def test_the_likelihood_script_refuses_a_student_in_one_line(runs, tmp_path, run_in_process):
    student, _, _ = runs
    proc = run_in_process(NLL_SCRIPT, [
        "--data_dir", tmp_path, "--model_path", student,
    ], env={"OPENAI_LOGDIR": tmp_path / "log"})  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr  # sys.exit(message)
    assert "a distilled student" in lines[0] and "give its teacher" in lines[0]


def test_the_default_sampler_follows_the_model(runs, tmp_path):
    student, teacher, _ = runs
    values = {"data_dir": str(tmp_path), "sampler": ""}
    assert (
        FolderJob.from_flags({**values, "model_path": str(student)}).sampler
        == "consistency"
    )
    assert (
        FolderJob.from_flags({**values, "model_path": str(teacher)}).sampler == "ddpm"
    )
    assert sampling.student_respacing("", 1000) == "trailing2"
    assert sampling.student_respacing("8", 1000) == "trailing8"
    assert sampling.student_respacing("trailing2", 1000) == "trailing2"


def test_a_students_checkpoints_are_found_as_any_runs(runs, tmp_path):
    pytest.importorskip("gradio", reason="the page needs the app extra")
    from guided_diffusion.page import app

    student, _, net = runs
    run = tmp_path / "runs" / "student"
    for name in ("model000010.pt", "opt000010.pt", "ema_0.95_000010.pt", "model000020.pt",
                 "ema_0.95_000020.pt"):  # fmt: skip
        save_run(run, net, FLAGS, student=True, name=name)
    (run / "state000010.pt").write_bytes(b"")  # step 10 complete, 20 not
    assert find_resume_checkpoint(str(run)) == str(run / "model000010.pt")
    assert newest_sampling_checkpoint(str(run)) == str(run / "ema_0.95_000020.pt")
    models = app.find_models(runs_dir=str(tmp_path / "runs"), bundled=False)
    assert models == {"student": str(run / "ema_0.95_000020.pt")}
    assert sampling.checkpoint_is_student(models["student"])


def test_samples_per_input_draws_each_sample_its_own_noise(
    runs, tmp_path, run_in_process
):
    student, _, net = runs
    (tmp_path / "data" / "sar").mkdir(parents=True)
    image = sar_image(30)
    Image.fromarray(image).save(tmp_path / "data" / "sar" / "a.png")
    proc = run_in_process(FOLDER_SCRIPT, [
        "--data_dir", tmp_path / "data", "--model_path", student, "--timestep_respacing", 2,
        "--samples_per_input", 2, "--seed", 9,
    ], env={"OPENAI_LOGDIR": tmp_path / "log"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = tmp_path / "log" / "sample_results" / "consistency2"
    written = [
        png(results / "gen_opt" / "a.png"),
        png(results / "gen_samples" / "1" / "a.png"),
    ]
    for k, sample in enumerate(written):
        generators = sample_generators(9, ["a.png"], k)
        x_T = samplers.noise_of_shape((1, 3, 32, 32), generators, "cpu")
        assert np.array_equal(
            sample, direct(net, as_input(image), 2, x_T, generators)[0]
        )
    assert not np.array_equal(*written)
