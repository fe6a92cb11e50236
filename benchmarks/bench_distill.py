"""
The distilled few-step student against its teacher (issue 24): the bundled scene
model (assets/scene_model) distilled with scripts/image_distill.py on the generated
SEN12MS-like patches (data/sen12ms32, `DATA_FORMAT=sen12ms bash demo.sh` writes them),
in three parts, each resumable:

- distill: seeds 0 and 1 without the adversarial term and with --adv_weight, each
  for the same wall-clock budget (--budget_minutes, default twice --teacher_minutes)
  or --max_steps; a table of the steps and minutes each took, beside the teacher's
  training time;
- eval: on the test patches, each student at 1, 2, 4 and 8 steps (consistency
  sampler, trailingN) and the teacher with DPM-Solver++(2M) and DDIM at 1, 2, 4, 8
  and at its best (dpm++2m 20, ddim 50): SSIM, PSNR, class accuracy, sharpness, tint
  and seconds per image; the mean of the seeds and their range; whether each student
  clears the issue's bar at 4 steps;
- figure: the same test inputs translated by the teacher (dpm++2m 20) and by the
  student at 1, 2 and 4 steps, side by side.

    # the data, and the teacher's training time: a fresh run of the bundled model's recipe
    time RUN_DIR=logs/teacher_timing DATA_FORMAT=sen12ms bash demo.sh
    python benchmarks/bench_distill.py --part distill --teacher_minutes M   # 4 runs of 2 M min
    # or the budget in steps (2 M min at the step rate measured alone), which does
    # not depend on what else runs: --max_steps N; RESULTS.md used 1400
    python benchmarks/bench_distill.py --part eval
    python benchmarks/bench_distill.py --part figure
    python benchmarks/bench_distill.py --quick   # every part, tiny: seconds

Each variant distils in --work_dir/<variant>_seed<seed>/ (a run folder that
--resume_checkpoint auto continues); its wall time so far is in bench_state.json
there, so a stopped run (Ctrl-C, a killed session) continues with the budget it
has left, and a finished one is skipped. Each eval row is kept in
--work_dir/eval/<row>.json and not measured again.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common
import numpy as np
import torch as th
from bench_targets import score_images
from PIL import Image, ImageDraw, ImageFont

from guided_diffusion import dist_util
from guided_diffusion.demo import report
from guided_diffusion.evaluation import metrics
from guided_diffusion.image_datasets import (
    DataError,
    find_test_pairs,
    load_opt,
    load_sar,
)
from guided_diffusion.io import pictures
from guided_diffusion.io.checkpoints import read_run_config
from guided_diffusion.io.rasters import resolve
from guided_diffusion.script_util import create_gaussian_diffusion, diffusion_defaults
from guided_diffusion.translation.sampling import (
    input_scaling,
    load_model,
    make_generators,
    resolve_model_flags,
    sar_for_display,
    to_uint8,
    translate,
)

REPO = os.path.dirname(common.BENCH_DIR)
TEACHER = os.path.join(REPO, "assets", "scene_model", "model.pt")
DATA = os.path.join(REPO, "data", "sen12ms32")
STUDENT_STEPS = (1, 2, 4, 8)
# (sampler, network calls) of the teacher: the students' counts, then its best
TEACHER_ROWS = [(s, n) for s in ("dpm++2m", "ddim") for n in STUDENT_STEPS] + [
    ("dpm++2m", 20),
    ("ddim", 50),
]
FIGURE_STEPS = (1, 2, 4)
# the bar at 4 steps, against the teacher at 4: SSIM and class accuracy
# may fall by at most these; the aim is 95 % of the teacher-20's sharpness
SSIM_MARGIN, CLASS_MARGIN, AIM_SHARPNESS = 0.01, 0.02, 0.95


def shown(path):
    """A path as the table shows it: relative inside the repository, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


# -- distill --------------------------------------------------------------------------


def seeds_of(args, variant):
    """The distillation seeds of a variant (--adv_seeds for the adversarial one)."""
    return args.adv_seeds if variant == "adv" else args.seeds


def run_dir(args, variant, seed):
    return os.path.join(args.work_dir, f"{variant}_seed{seed}")


def read_state(folder):
    path = os.path.join(folder, "bench_state.json")
    if not os.path.isfile(path):
        return {"seconds": 0.0, "done": False}
    with open(path) as f:
        return json.load(f)


def write_state(folder, state):
    path = os.path.join(folder, "bench_state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)


def newest_checkpoint(folder, prefix):
    """(step, path) of the newest ``prefix``NNNNNN.pt in ``folder``, or (0, None)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), prefix + "*.pt")):
        match = re.fullmatch(
            re.escape(prefix) + r"(\d{6,})\.pt", os.path.basename(path)
        )
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else (0, None)


def student_checkpoint(args, variant, seed):
    """The target network's newest EMA file (what the run validates and ships)."""
    return newest_checkpoint(run_dir(args, variant, seed), f"ema_{args.target_ema}_")


def distill(args, variant, seed):
    """
    Distil one variant until its budget is spent or --max_steps reached; the time
    counts across reruns (bench_state.json), the run resumes from its checkpoint.
    """
    folder = run_dir(args, variant, seed)
    os.makedirs(folder, exist_ok=True)
    state = read_state(folder)
    left = args.budget_minutes * 60 - state["seconds"]
    if state["done"] or left <= 0:
        print(
            f"{variant} seed {seed}: finished ({state['seconds'] / 60:.1f} min)",
            flush=True,
        )
        return
    train = os.path.join(args.data_dir, "train")
    command = [
        sys.executable, "scripts/image_distill.py", "--teacher_path", args.teacher_path,
        "--data_dir_sar", train, "--data_dir_opt", train, "--batch_size", str(args.batch_size),
        "--lr", str(args.lr), "--target_ema", str(args.target_ema), "--seed", str(seed),
        "--max_steps", str(args.max_steps), "--save_interval", str(args.save_interval),
        "--log_interval", str(args.save_interval), "--keep_checkpoints", "1",
        "--resume_checkpoint", "auto", "--progress", "False",
        *(["--adv_weight", str(args.adv_weight)] if variant == "adv" else []),
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_LOGDIR": folder}
    log_path = os.path.join(folder, "distill.log")
    print(
        f"$ {' '.join(command)}  > {shown(log_path)} ({left / 60:.1f} min left)",
        flush=True,
    )
    begin = time.monotonic()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        timed_out = False
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            # the budget is spent: SIGINT makes the loop save its step and stop
            # (a run still starting up stops without saving: its steps are 0)
            proc.send_signal(signal.SIGINT)
            code, timed_out = proc.wait(), True
        except KeyboardInterrupt:  # the user's Ctrl-C reached the child too
            proc.wait()
            state["seconds"] += time.monotonic() - begin
            write_state(folder, state)
            raise
    state["seconds"] += time.monotonic() - begin
    if code and not timed_out:
        write_state(folder, state)
        raise RuntimeError(
            f"image_distill.py failed (status {code}); see {shown(log_path)}"
        )
    step = student_checkpoint(args, variant, seed)[0]
    state["done"] = (
        timed_out
        or state["seconds"] >= args.budget_minutes * 60
        or (args.max_steps > 0 and step >= args.max_steps)
    )
    state["step"] = step
    write_state(folder, state)


def part_distill(args):
    # seed 0 of every variant first: a shortened run compares them
    for seed in dict.fromkeys(args.seeds + args.adv_seeds):
        for variant in args.variants:
            if seed in seeds_of(args, variant):
                distill(args, variant, seed)
    rows = []
    for variant in args.variants:
        for seed in seeds_of(args, variant):
            state = read_state(run_dir(args, variant, seed))
            step, _ = student_checkpoint(args, variant, seed)
            rows.append([label(variant), seed, step, f"{state['seconds'] / 60:.1f}"])
    teacher = f"{args.teacher_minutes:g}" if args.teacher_minutes else "not recorded"
    rows.append(["teacher's training", "", teacher_steps(args), teacher])
    common.report(
        "Distilling the bundled scene model: cost",
        common.markdown_table(["run", "seed", "steps", "minutes"], rows),
        [
            f"teacher: {shown(args.teacher_path)}; data: {shown(args.data_dir)}/train",
            f"budget: {args.budget_minutes:g} min per run"
            + (f", at most {args.max_steps} steps" if args.max_steps else "")
            + f"; batch {args.batch_size}, lr {args.lr}, target EMA {args.target_ema}, "
            f"adversarial weight {args.adv_weight} (adv runs), image_distill.py's other defaults",
            "minutes: wall time of image_distill.py, start-up, checkpoints and "
            f"validation included, at {th.get_num_threads()} torch threads per run "
            "(OMP_NUM_THREADS); with --max_steps the steps are the budget",
        ],
        args.results,
    )


def teacher_steps(args):
    config = read_run_config(args.teacher_path) or {}
    return config.get("max_steps", "?")


def label(variant):
    return "student" if variant == "plain" else "student + adversarial term"


# -- eval -----------------------------------------------------------------------------


class TestSet:
    """The test patches, loaded once: SAR and truth tensors, class maps, names."""

    def __init__(self, args, flags, run_config):
        test = os.path.join(args.data_dir, "test")
        pairs = find_test_pairs(test)
        pairs = pairs if args.num < 0 else pairs[: args.num]
        if any(opt is None for _, opt, _ in pairs):
            raise DataError(f"--data_dir {args.data_dir}: the scores need test/opt")
        scaling, _ = input_scaling(run_config, {}, flags["sar_channels"])
        scaling, _ = resolve(scaling, pairs[0][0], pairs[0][1])
        size = flags["image_size"]
        self.names = [name for _, _, name in pairs]
        self.sar = th.from_numpy(
            np.stack([load_sar(s, size, flags["sar_channels"], scaling=scaling)
                      for s, _, _ in pairs])
        ).to(dist_util.dev())  # fmt: skip
        self.truth = to_uint8(th.from_numpy(
            np.stack([load_opt(o, size, scaling=scaling) for _, o, _ in pairs])
        ))  # fmt: skip
        self.cls = np.stack([
            metrics.load_image(os.path.join(test, "cls", os.path.splitext(n)[0] + ".png"))[..., 0]
            for n in self.names
        ])  # fmt: skip
        self.colours = report.load_class_colours(
            os.path.join(args.data_dir, "dataset.json")
        )


def diffusion_of(flags, respacing):
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        **{k: flags[k] for k in diffusion_defaults()
           if k not in ("diffusion_steps", "timestep_respacing")},
        timestep_respacing=respacing,
    )  # fmt: skip


def teacher_respacing(args, sampler, steps):
    """The teacher's usual respacing (dpm++: N, ddim: ddimN where an even stride
    gives N), or trailingN with --teacher_respacing trailing."""
    if args.teacher_respacing == "trailing":
        return f"trailing{steps}"
    if sampler == "ddim" and steps > 1:
        return f"ddim{steps}"
    return str(steps)


def sample(model, diffusion, sampler, images, args, indices=None):
    """Translate the test set (or ``indices`` of it); (uint8 images, s per image)."""
    indices = range(len(images.names)) if indices is None else indices
    out, elapsed = [], 0.0
    for start in range(0, len(indices), args.eval_batch):
        piece = list(indices[start : start + args.eval_batch])
        gens = make_generators(args.sample_seed, [images.names[i] for i in piece])
        common.synchronize(images.sar.device)
        begin = time.perf_counter()
        x = translate(
            model, diffusion, images.sar[piece], sampler=sampler, generators=gens
        )
        common.synchronize(images.sar.device)
        elapsed += time.perf_counter() - begin
        out.append(to_uint8(x))
    return np.concatenate(out), elapsed / len(indices)


def load(path, device):
    config = read_run_config(path)
    if config is None:
        raise ValueError(f"{path}: no config.json beside it")
    flags, _ = resolve_model_flags({}, config)
    return load_model(path, flags, device), flags, config


def eval_jobs(args):
    """(key, title, variant or None, seed, sampler, steps) of every row, in table order."""
    jobs = [
        (f"teacher_{s}{n}", f"teacher {s}", None, None, s, n) for s, n in TEACHER_ROWS
    ]
    for variant in args.variants:
        for n in STUDENT_STEPS:
            for seed in seeds_of(args, variant):
                jobs.append((f"{variant}_seed{seed}_{n}", label(variant), variant, seed,
                             "consistency", n))  # fmt: skip
    return jobs


def part_eval(args):
    device = dist_util.dev()
    teacher, flags, config = load(args.teacher_path, device)
    images = TestSet(args, flags, config)
    # the teacher's rows differ with its respacing: each kind of table its own folder
    out_dir = os.path.join(
        args.work_dir, "eval" if args.teacher_respacing == "usual" else "eval_trailing"
    )
    os.makedirs(out_dir, exist_ok=True)
    # warm-up: a process's first calls set up kernels and would count against the first row
    translate(teacher, diffusion_of(flags, "2"), images.sar[:1], sampler="dpm++2m")
    scores, models = {}, {}
    for key, _, variant, seed, sampler, steps in eval_jobs(args):
        path = os.path.join(out_dir, key + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                scores[key] = json.load(f)
            continue
        if variant is None:
            model, respacing = teacher, teacher_respacing(args, sampler, steps)
        else:
            step, ckpt = student_checkpoint(args, variant, seed)
            if ckpt is None:
                print(f"{key}: no student in {shown(run_dir(args, variant, seed))}; "
                      "run --part distill first", flush=True)  # fmt: skip
                continue
            if (variant, seed) not in models:
                models[(variant, seed)] = load(ckpt, device)[0]
            model, respacing = models[(variant, seed)], f"trailing{steps}"
        print(f"{key} ...", flush=True)
        generated, seconds = sample(
            model, diffusion_of(flags, respacing), sampler, images, args
        )
        result = score_images(generated, images.truth, images.cls, images.colours)
        result.update(seconds=seconds, respacing=respacing)
        if variant is not None:
            result["student_step"] = step
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        scores[key] = result
    write_eval_report(args, scores, len(images.names))


def cells(s):
    return [f"{s['ssim']:.4f}", f"{s['psnr']:.2f}", f"{s['class_acc']:.4f}",
            f"{s['sharpness']:.3f}", f"{s['tint']:.1f}", f"{s['seconds']:.4f}"]  # fmt: skip


def spread_cells(runs):
    """mean (range) of each figure over the seeds' runs."""
    out = []
    for key, digits in (("ssim", 4), ("psnr", 2), ("class_acc", 4), ("sharpness", 3),
                        ("tint", 1), ("seconds", 4)):  # fmt: skip
        values = [r[key] for r in runs]
        text = f"{np.mean(values):.{digits}f}"
        if len(values) > 1:
            text += f" ({np.ptp(values):.{digits}f})"
        out.append(text)
    return out


def write_eval_report(args, scores, num_images):
    header = ["model", "sampler", "calls", "seed", "SSIM", "PSNR dB", "class accuracy",
              "sharpness", "tint", "s per image"]  # fmt: skip
    rows, checks = [], []
    for key, title, variant, seed, sampler, steps in eval_jobs(args):
        if key not in scores:
            continue
        rows.append(
            [title, sampler, steps, "" if seed is None else seed, *cells(scores[key])]
        )
        if variant is not None and seed == seeds_of(args, variant)[-1]:
            runs = [scores[f"{variant}_seed{s}_{steps}"] for s in seeds_of(args, variant)
                    if f"{variant}_seed{s}_{steps}" in scores]  # fmt: skip
            if len(runs) > 1:
                rows.append(
                    [
                        f"**{title} (mean, range)**",
                        sampler,
                        steps,
                        "",
                        *spread_cells(runs),
                    ]
                )
    for variant in args.variants:
        for seed in seeds_of(args, variant):
            student = scores.get(f"{variant}_seed{seed}_4")
            if student is None:
                continue
            for sampler, steps, what in (("dpm++2m", 4, "bar"), ("ddim", 4, "bar"),
                                         ("dpm++2m", 20, "aim")):  # fmt: skip
                teacher = scores.get(f"teacher_{sampler}{steps}")
                if teacher is not None:
                    checks.append(judge(student, teacher, what, f"{label(variant)} seed {seed}",
                                        f"teacher {sampler} {steps}"))  # fmt: skip
    with open(os.path.join(args.data_dir, "dataset.json")) as f:
        info = json.load(f)
    notes = [
        f"teacher: {shown(args.teacher_path)}; students: {shown(args.work_dir)}/<variant>_seed<s>/"
        f"ema_{args.target_ema}_*.pt (the target network); data: {num_images} test patches of "
        f"{shown(args.data_dir)}/test ({info.get('image_size')} px)",
        "calls: network evaluations per image; students: consistency sampler at trailingN; "
        f"teacher: --timestep_respacing {'trailingN' if args.teacher_respacing == 'trailing' else 'N (dpm++2m, and ddim at 1) or ddimN (ddim)'}"
        f"; noise seed {args.sample_seed} per image name, batch {args.eval_batch}, float32",
        "class accuracy: share of pixels whose colour is nearest the training mean colour of "
        "their class; sharpness: mean gradient of the images over the truth's (1: as much "
        "detail as the truth; seams.py); tint: the largest |mean signed difference| of a "
        "channel (grey levels); (range): max - min over the seeds",
        *checks,
    ]
    common.report(
        "Distilled student against its teacher on the generated SEN12MS-like test patches",
        common.markdown_table(header, rows),
        notes,
        args.results,
    )


def judge(student, teacher, what, who, against):
    """One line: does the student at 4 clear the bar (or the aim) against a teacher row."""
    needed = teacher["sharpness"] * (AIM_SHARPNESS if what == "aim" else 1.0)
    sharp = (
        student["sharpness"] > needed
        if what == "bar"
        else student["sharpness"] >= needed
    )
    ssim = student["ssim"] >= teacher["ssim"] - SSIM_MARGIN
    acc = student["class_acc"] >= teacher["class_acc"] - CLASS_MARGIN
    failed = [name for name, ok in (("sharpness", sharp), ("SSIM", ssim),
                                    ("class accuracy", acc)) if not ok]  # fmt: skip
    verdict = "clears it" if not failed else "misses it on " + ", ".join(failed)
    return (f"{what} at 4 calls, {who} against {against}: {verdict} (sharpness "
            f"{student['sharpness']:.3f} vs {needed:.3f} needed, SSIM {student['ssim']:.4f} vs "
            f"{teacher['ssim']:.4f}, class accuracy {student['class_acc']:.4f} vs "
            f"{teacher['class_acc']:.4f})")  # fmt: skip


# -- figure ---------------------------------------------------------------------------


def part_figure(args):
    device = dist_util.dev()
    teacher, flags, config = load(args.teacher_path, device)
    images = TestSet(args, flags, config)
    variant, seed = args.variants[0], args.seeds[0]
    step, ckpt = student_checkpoint(args, variant, seed)
    if ckpt is None:
        sys.exit(f"bench_distill: no student in {shown(run_dir(args, variant, seed))}; "
                 "run --part distill first")  # fmt: skip
    student = load(ckpt, device)[0]
    chosen = list(range(min(args.figure_inputs, len(images.names))))
    sar = sar_for_display(to_uint8(images.sar[chosen]))
    columns = [sar, images.truth[chosen]]
    columns.append(
        sample(teacher, diffusion_of(flags, "20"), "dpm++2m", images, args, chosen)[0]
    )
    for n in FIGURE_STEPS:
        columns.append(sample(student, diffusion_of(flags, f"trailing{n}"), "consistency",
                              images, args, chosen)[0])  # fmt: skip
    scale, gap = 4, 2
    picture = Image.fromarray(pictures.side_by_side(
        [[column[i] for column in columns] for i in range(len(chosen))], gap=gap, scale=scale
    ))  # fmt: skip
    # a white strip above with each column's title
    titled = Image.new("RGB", (picture.width, picture.height + 16), "white")
    titled.paste(picture, (0, 16))
    draw = ImageDraw.Draw(titled)
    titles = ["SAR", "truth", "teacher 20", *(f"student {n}" for n in FIGURE_STEPS)]
    width = images.truth.shape[2] * scale + gap
    for c, title in enumerate(titles):
        draw.text(
            (c * width + 2, 2), title, fill="black", font=ImageFont.load_default()
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    tmp = args.figure + ".tmp.png"
    titled.save(tmp)
    os.replace(tmp, args.figure)
    print(f"wrote {args.figure}: columns SAR (VV, VH, VV), truth, teacher dpm++2m 20, "
          f"{label(variant)} seed {seed} (step {step}) at "
          f"{', '.join(map(str, FIGURE_STEPS))} calls", flush=True)  # fmt: skip


# -- bundle ---------------------------------------------------------------------------


def part_bundle(args):
    """
    Copy the student chosen with --bundle VARIANT:SEED (its target network's newest
    EMA file and its config.json) into --bundle_dir, the paths it records made
    relative to the repository, as the page and translate_scene.py find it.
    """
    variant, _, seed = args.bundle.partition(":")
    step, ckpt = student_checkpoint(args, variant, int(seed))
    if ckpt is None:
        sys.exit(
            f"bench_distill: no student in {shown(run_dir(args, variant, int(seed)))}"
        )
    config = read_run_config(ckpt)

    def relative(path):
        return shown(path) if isinstance(path, str) and path else path

    for key in ("data_dir_sar", "data_dir_opt", "data_dir", "val_data_dir"):
        if key in config:
            config[key] = relative(config[key])
    config["distillation"]["teacher"] = relative(config["distillation"]["teacher"])
    config["bundled_from"] = {"run": shown(run_dir(args, variant, int(seed))),
                              "checkpoint": os.path.basename(ckpt), "step": step}  # fmt: skip
    os.makedirs(args.bundle_dir, exist_ok=True)
    model = os.path.join(args.bundle_dir, "model.pt")
    shutil.copyfile(ckpt, model + ".tmp")
    os.replace(model + ".tmp", model)
    path = os.path.join(args.bundle_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    print(f"bundled {shown(ckpt)} (step {step}) as {shown(args.bundle_dir)}/model.pt")


# -- the command line -----------------------------------------------------------------


def make_quick_data(folder):
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        subprocess.run([sys.executable, "scripts/make_synthetic_dataset.py", "--out", folder,
                        "--overwrite", "--image_size", "32", "--format", "sen12ms",
                        "--num_train", "8", "--num_test", "2"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", default="all", choices=["distill", "eval", "figure", "all", "bundle"]
    )
    parser.add_argument(
        "--bundle",
        default="plain:0",
        help="--part bundle: the student VARIANT:SEED to copy",
    )
    parser.add_argument("--bundle_dir", default=os.path.join(REPO, "assets", "scene_student"),
                        help="--part bundle: where (default assets/scene_student)")  # fmt: skip
    parser.add_argument("--teacher_path", default=TEACHER)
    parser.add_argument(
        "--data_dir",
        default=DATA,
        help="a generated SEN12MS-like dataset (train/, test/, dataset.json)",
    )
    parser.add_argument("--work_dir", default="",
                        help="the students' run folders and the eval rows (default "
                             "logs/bench_distill; with --quick a new temporary folder)")  # fmt: skip
    parser.add_argument(
        "--variants",
        default="plain,adv",
        help="comma-separated: plain (no adversarial term), adv (--adv_weight)",
    )
    parser.add_argument(
        "--seeds", default="0,1", help="comma-separated distillation seeds"
    )
    parser.add_argument(
        "--adv_seeds", default=None, help="the adv variant's seeds (default: --seeds)"
    )
    parser.add_argument(
        "--adv_weight",
        type=float,
        default=0.1,
        help="image_distill.py's --adv_weight for the adv variant",
    )
    parser.add_argument("--teacher_minutes", type=float, default=0.0,
                        help="the teacher's training time on this machine (not recorded in "
                             "assets/); the default budget is twice it")  # fmt: skip
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=0.0,
        help="wall-clock minutes of distillation per run (default: 2 x --teacher_minutes)",
    )
    parser.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="also stop a run at this step (0: the budget alone)",
    )
    parser.add_argument("--save_interval", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--target_ema", type=float, default=0.95)
    parser.add_argument("--teacher_respacing", default="usual", choices=["usual", "trailing"],
                        help="the teacher's timesteps at N calls: its usual N / ddimN "
                             "(at 1 call: t = 0 alone) or trailingN, the student's")  # fmt: skip
    parser.add_argument(
        "--num", type=int, default=-1, help="the first N test patches (-1: all)"
    )
    parser.add_argument("--eval_batch", type=int, default=64)
    parser.add_argument("--sample_seed", type=int, default=0)
    parser.add_argument(
        "--figure",
        default=os.path.join(REPO, "assets", "distilled_student.png"),
    )
    parser.add_argument("--figure_inputs", type=int, default=4)
    parser.add_argument("--results", default=None,
                        help="append the tables here ('' for nowhere; default RESULTS.md, "
                             "'' with --quick)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="every part, tiny: 2 distillation steps per run, 2 test patches, "
                             "a temporary folder")  # fmt: skip
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.adv_seeds = (
        args.seeds
        if args.adv_seeds is None
        else [int(s) for s in args.adv_seeds.split(",")]
    )
    args.variants = args.variants.split(",")
    if set(args.variants) - {"plain", "adv"}:
        parser.error(f"--variants {','.join(args.variants)}: choose of plain, adv")
    if args.quick:
        args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_distill_")
        args.data_dir = os.path.join(args.work_dir, "data")
        make_quick_data(args.data_dir)
        args.max_steps, args.save_interval, args.batch_size = 2, 2, 2
        args.budget_minutes = args.budget_minutes or 5
        args.num, args.figure_inputs = 2, 2
        args.figure = os.path.join(args.work_dir, "figure.png")
        args.results = "" if args.results is None else args.results
    else:
        args.work_dir = args.work_dir or os.path.join(REPO, "logs", "bench_distill")
        if args.results is None:
            args.results = common.DEFAULT_RESULTS
    if not args.budget_minutes:
        args.budget_minutes = 2 * args.teacher_minutes
    if args.part in ("distill", "all") and args.budget_minutes <= 0:
        parser.error(
            "--budget_minutes or --teacher_minutes is required: the budget is "
            "fixed before measuring (at most twice the teacher's training time)"
        )
    if not os.path.isfile(args.teacher_path):
        parser.error(f"--teacher_path {args.teacher_path}: no such file")
    if not os.path.isfile(os.path.join(args.data_dir, "dataset.json")):
        parser.error(f"--data_dir {args.data_dir}: no generated dataset; run "
                     "`DATA_FORMAT=sen12ms bash demo.sh` (or scripts/make_synthetic_dataset.py "
                     "--format sen12ms --out data/sen12ms32)")  # fmt: skip
    args.teacher_path = os.path.abspath(args.teacher_path)
    return args


def main():
    args = parse_args()
    if args.part in ("distill", "all"):
        part_distill(args)
    if args.part in ("eval", "all"):
        part_eval(args)
    if args.part in ("figure", "all"):
        part_figure(args)
    if args.part == "bundle":
        part_bundle(args)
    if args.quick:
        print(f"quick run's files: {args.work_dir}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"bench_distill: {err}")
