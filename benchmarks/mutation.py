"""
The mutation check: do the tests catch the bugs a user would meet?

Plants realistic bugs one at a time in a temporary copy of the repository (the
committed tree, ``git archive HEAD``; --worktree copies the files as they are in
the checkout instead), runs only the test files that cover each with the copy first
on PYTHONPATH, and prints a table: the bug, the first test that failed (or "NOT
CAUGHT"), and the time. Every planted bug must be caught; a new test earns trust by
failing on the bug it is written for (docs/contributing.md).

    nice -n 10 python benchmarks/mutation.py                 # all, about 20 minutes on 2 cores
    nice -n 10 python benchmarks/mutation.py --only clip     # the bugs whose name holds "clip"
    nice -n 10 python benchmarks/mutation.py --list          # the bugs and their tests

Each bug is an exact text replacement that must apply once: when the source has
moved, the check stops and names the bug, so that it is updated rather than
silently skipped. Run by hand, not in CI. Exit status 1 when a bug is not caught.
"""

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Bug:
    """
    :param name: a short name (the table's first column).
    :param path: the file, relative to the repository's root.
    :param old: the text replaced, exactly once in the file.
    :param new: what it becomes.
    :param tests: the test files (or node ids) that should catch it, cheapest first.
    """

    name: str
    path: str
    old: str
    new: str
    tests: tuple


R, SC, SCENE, TILING = (
    "guided_diffusion/io/rasters.py",
    "guided_diffusion/translation/scene_translation.py",
    "guided_diffusion/translation/scene.py",
    "guided_diffusion/translation/tiling.py",
)
UNC, GD, TRAIN, APP = (
    "guided_diffusion/translation/samples.py",
    "guided_diffusion/gaussian_diffusion.py",
    "guided_diffusion/train_util.py",
    "guided_diffusion/page/app.py",
)
SAMPLE_SCRIPT, EVALUATE = (
    "scripts/image_sample_realtime.py",
    "scripts/image_evaluate.py",
)
JOBS, FOLDER = (
    "guided_diffusion/translation/jobs.py",
    "guided_diffusion/translation/folder.py",
)
GEOTIFF, SCENE_OUT, S1, ARCHIVE = (
    "guided_diffusion/io/geotiff.py",
    "guided_diffusion/translation/scene_outputs.py",
    "guided_diffusion/io/sentinel1.py",
    "guided_diffusion/translation/archive.py",
)
CONSISTENCY, DISTILL = (
    "guided_diffusion/base/consistency.py",
    "guided_diffusion/distillation.py",
)
T = "tests/"
SCALING_TESTS = (T + "test_scene_scaling.py", T + "test_rasters.py")
FUSION_TESTS = (T + "test_fusion_windows.py", T + "test_tiling.py")
NODATA_TESTS = (T + "test_nodata_scripts.py", T + "test_uncertainty.py")
PAGE_TESTS = (T + "test_app_outputs.py",)

BUGS = [
    # -- how SAR is scaled -------------------------------------------------------
    Bug("power read as amplitude (20 log10)", R,
        'factor = 10.0 if scaling.sar_input == "power" else 20.0',
        'factor = 20.0 if scaling.sar_input == "power" else 10.0', SCALING_TESTS),
    Bug("VV dB range -25..5 instead of -25..0", R,
        "CO_POL_DB = (-25.0, 0.0)", "CO_POL_DB = (-25.0, 5.0)", SCALING_TESTS),
    Bug("VH dB range -30..0 instead of -32.5..0", R,
        "CROSS_POL_DB = (-32.5, 0.0)", "CROSS_POL_DB = (-30.0, 0.0)", SCALING_TESTS),
    Bug("no clip to the dB range", R,
        "out[i] = (np.clip(band, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0",
        "out[i] = (band - lo) / (hi - lo) * 2.0 - 1.0", SCALING_TESTS),
    Bug("nodata value tested on the first band only", R,
        "return (bands == value).any(axis=0)", "return bands[0] == value",
        SCALING_TESTS),
    Bug("NaN tested on the first band only", R,
        "valid = np.isfinite(data).all(axis=0)", "valid = np.isfinite(data[0])",
        SCALING_TESTS),
    Bug("nodata filled in the first band only", R,
        "    out[:, ~valid] = NODATA_FILL\n    return out, valid, stats",
        "    out[0, ~valid] = NODATA_FILL\n    return out, valid, stats", SCALING_TESTS),
    Bug("8-bit SAR's declared nodata ignored", R,
        "        valid = ~_nodata_pixels(raster, raw, scaling)\n",
        "        valid = np.ones(raw.shape[1:], bool)\n", (T + "test_uint8_nodata.py",)),
    Bug("optical bands sorted (2,3,4: BGR)", R,
        "data = data[[b - 1 for b in bands]]", "data = data[[b - 1 for b in sorted(bands)]]",
        (T + "test_nodata_scripts.py", T + "test_rasters.py")),
    # -- fusing the tiles of a scene ---------------------------------------------
    Bug("tapered scene border", TILING,
        "return window_1d(tile, start > 0, start + tile < size)",
        "return window_1d(tile)", FUSION_TESTS),
    Bug("first scene border tapered (>= 0)", TILING,
        "return window_1d(tile, start > 0, start + tile < size)",
        "return window_1d(tile, start >= 0, start + tile < size)", FUSION_TESTS),
    Bug("tile weight transposed", SCENE,
        "w = th.from_numpy(np.outer(self._wy[top], self._wx[left]).astype(np.float32))",
        "w = th.from_numpy(np.outer(self._wx[left], self._wy[top]).astype(np.float32))",
        FUSION_TESTS),
    Bug("SAR tile taken at the strip's start", SCENE,
        "sar = th.stack([strips[r][1][:, :, c : c + size] for r, c in places])",
        "sar = th.stack([strips[r][1][:, :, :size] for r, c in places])", FUSION_TESTS),
    Bug("window total overwritten, not summed", SCENE,
        "self.col_total[left : left + tile] += self._wx[left]",
        "self.col_total[left : left + tile] = self._wx[left]", FUSION_TESTS),
    Bug("every band of a scene draws the same noise", SCENE,
        'return hashed_seed(int(seed), f"scene band {band}")',
        'return hashed_seed(int(seed), "scene band 0")',
        (T + "test_tiling.py",)),
    Bug("scene resume reseeds the generators", SCENE,
        "g.set_state(state)", "g.manual_seed(0)", (T + "test_tiling.py",)),
    # -- where the outputs lie ---------------------------------------------------
    Bug("georeference off by a pixel", GEOTIFF,
        'return {"crs": src.crs, "transform": src.transform}',
        'return {"crs": src.crs, "transform": src.transform * src.transform.translation(1, 0)}',
        PAGE_TESTS + (T + "test_translate_scene.py",)),
    Bug("page GeoTIFF a row off", APP,
        "    georef = georeference(source)\n",
        "    georef = georeference(source)\n"
        '    if "transform" in georef:\n'
        '        georef["transform"] = georef["transform"] * georef["transform"].translation(0, 1)\n',
        PAGE_TESTS),
    Bug("scene nodata not blacked out", SCENE_OUT,
        "                image[:, ~valid] = 0\n", "", (T + "test_translate_scene.py",)),
    Bug("8-bit scene output without its mask", SCENE_OUT,
        "mask=nodata is None, cog=job.cog and kept", "mask=False, cog=job.cog and kept",
        (T + "test_gis_outputs.py",)),
    Bug("--cog ignored: plain GeoTIFFs", SCENE_OUT,
        "mask=nodata is None, cog=job.cog and kept", "mask=nodata is None, cog=False",
        (T + "test_gis_outputs.py",)),
    Bug("sigma0 as DN / A^2", S1, "out = dn**2 / a**2", "out = dn / a**2",
        (T + "test_sentinel1.py",)),
    Bug("calibration table's lines not interpolated", S1,
        "return (1 - w)[:, None] * along[below] + w[:, None] * along[below + 1]",
        "return along[below]", (T + "test_sentinel1.py",)),
    Bug("archive: a scene with a work folder left counts as complete", ARCHIVE,
        "return os.path.exists(last) and not os.path.exists(job.work_dir)",
        "return os.path.exists(last)", (T + "test_archive.py",)),
    # -- the page's command ------------------------------------------------------
    Bug("page command unquoted", APP,
        'a if a.startswith("  #") else shlex.quote(a) for a in argv',
        'a if a.startswith("  #") else a for a in argv', PAGE_TESTS),
    Bug("page command without --timestep_respacing", JOBS,
        '            **{k: v for k, v in self.model_flags.items() if k == "timestep_respacing"},\n',
        "", PAGE_TESTS),
    Bug("page command names the sar/ folder as DATA", APP,
        'shown[job.data_dir] = "DATA"', 'shown[job.data_dir] = "DATA/sar"',
        PAGE_TESTS),
    # -- nodata through the folder job and the calibration -----------------------
    Bug("folder job: nodata not black", FOLDER,
        "samples.append(np.where(valid, to_uint8(generated), 0).astype(np.uint8))",
        "samples.append(to_uint8(generated))", NODATA_TESTS),
    Bug("folder job: mask not passed to the spread arrays", FOLDER,
        "out_dir, out_name, done.samples, done.mean, done.spread, valid=done.valid",
        "out_dir, out_name, done.samples, done.mean, done.spread, valid=None",
        NODATA_TESTS),
    Bug("npz keeps no nodata mask", "guided_diffusion/io/results.py",
        'arrays["valid"] = np.stack([valid for _, _, valid in stats])',
        'arrays["valid"] = np.stack([valid | True for _, _, valid in stats])', NODATA_TESTS),
    Bug("image_evaluate.py drops the mask", EVALUATE,
        "        valid=valid,\n    )", "        valid=None,\n    )", NODATA_TESTS),
    Bug("calibration counts nodata", "guided_diffusion/evaluation/calibration.py",
        "    mean, spread, truth = mean[valid], spread[valid], truth[valid]",
        "    valid = np.ones_like(valid)\n"
        "    mean, spread, truth = mean[valid], spread[valid], truth[valid]",
        (T + "test_independent_values.py",) + NODATA_TESTS),
    # -- the spread --------------------------------------------------------------
    Bug("spread divides by K (ddof=0)", UNC,
        "return mean, x.std(axis=axis, ddof=1)", "return mean, x.std(axis=axis, ddof=0)",
        (T + "test_uncertainty.py",)),
    Bug("streamed spread divides by K", UNC,
        "np.sqrt(np.maximum(self._m2, 0) / (self.count - 1))",
        "np.sqrt(np.maximum(self._m2, 0) / self.count)",
        (T + "test_uncertainty.py", T + "test_nodata_scripts.py")),
    Bug("spread picture shows the largest channel", "guided_diffusion/io/pictures.py",
        "spread = spread.mean(axis=2)", "spread = spread.max(axis=2)",
        (T + "test_independent_values.py", T + "test_uncertainty.py")),
    # -- the diffusion and training ----------------------------------------------
    Bug("v-prediction: sign of v in x_0", GD,
        '- self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * v',
        '+ self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.shape) * v',
        (T + "test_vprediction.py",)),
    Bug("Min-SNR: v weight over SNR, not SNR + 1", GD,
        "ModelMeanType.VELOCITY: lambda snr: snr + 1.0,",
        "ModelMeanType.VELOCITY: lambda snr: snr,",
        (T + "test_independent_values.py", T + "test_vprediction.py")),
    Bug("Min-SNR: max instead of min", GD,
        "clipped = np.minimum(snr, snr_gamma)", "clipped = np.maximum(snr, snr_gamma)",
        (T + "test_independent_values.py", T + "test_vprediction.py")),
    Bug("EMA moves by the rate, not 1 - rate", "guided_diffusion/nn.py",
        "th._foreach_add_(targets, sources, alpha=1 - rate)",
        "th._foreach_add_(targets, sources, alpha=rate)",
        (T + "test_independent_values.py", T + "test_train.py")),
    Bug("learning rate not annealed", TRAIN,
        'group["lr"] = self.cfg.lr * (1 - frac_done)', 'group["lr"] = self.cfg.lr',
        (T + "test_train.py",)),
    Bug("resume restarts the step count", TRAIN,
        'self.step = paths["step"]', "self.step = 0", (T + "test_train.py",)),
    Bug("resume restarts the EMA from the model", TRAIN,
        "values = self.mp_trainer.state_dict_to_master_params(ema_state)",
        "values = self.mp_trainer.master_params", (T + "test_train.py",)),
    # -- the distilled student (issue 24) --------------------------------------------
    Bug("consistency c_out without its square root", CONSISTENCY,
        "c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()",
        "c_out = scaled / (scaled**2 + SIGMA_DATA**2)",
        (T + "test_consistency.py",)),
    Bug("consistency sampler re-noises to the timestep it left", "guided_diffusion/base/samplers.py",
        "x = math.sqrt(abar[t_next]) * x0 + math.sqrt(1.0 - abar[t_next]) * z",
        "x = math.sqrt(abar[t]) * x0 + math.sqrt(1.0 - abar[t]) * z",
        (T + "test_sampler_contract.py", T + "test_consistency.py", T + "test_samplers.py")),
    Bug("distillation pairs without a skip (the teacher steps from t to t)", DISTILL,
        "s = (t - self.skip).clamp(min=0)", "s = t.clamp(min=0)",
        (T + "test_distill.py",)),
    # -- the page on a shared machine (issue 25) --------------------------------------
    Bug("page Cancel ignored", APP,
        "        if self.cancelled:\n            raise Stopped(\n",
        "        if False:\n            raise Stopped(\n",
        (T + "test_app_shared.py",)),
    Bug("page keeps a stopped request's files", APP,
        "                if folder is not None:\n                    shutil.rmtree(folder, ignore_errors=True)\n",
        "                pass\n",
        (T + "test_app_shared.py",)),
    Bug("page time limit read as minutes", APP,
        "if elapsed > self.seconds:", "if elapsed > self.seconds * 60:",
        (T + "test_app_shared.py",)),
    Bug("page work folder drops its newest request first", APP,
        "gone.append(kept.pop(0)[0])", "gone.append(kept.pop()[0])",
        (T + "test_app_shared.py",)),
    # -- sampling ------------------------------------------------------------------
    Bug("image noise ignores the file's name", "guided_diffusion/translation/sampling.py",
        "return hashed_seed(int(seed), name)",
        "return hashed_seed(int(seed))",
        (T + "test_sampling.py",)),
]  # fmt: skip


def copy_tree(dest, worktree):
    """The repository's tracked files into ``dest``: HEAD, or the checkout's files."""
    if not worktree:
        archive = subprocess.run(["git", "-C", ROOT, "archive", "HEAD"], check=True,
                                 capture_output=True).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    for rel in filter(None, listed.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def environment(copy):
    env = dict(
        os.environ, PYTHONPATH=copy, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"
    )
    env.pop("OPENAI_LOGDIR", None)
    return env


def check_import(copy):
    """The copy's package is the one imported, not the editable install's."""
    out = subprocess.run(
        [sys.executable, "-c", "import guided_diffusion; print(guided_diffusion.__file__)"],
        cwd=copy, env=environment(copy), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not os.path.realpath(out).startswith(os.path.realpath(copy) + os.sep):
        sys.exit(f"the copy imports guided_diffusion from {out}, not from {copy}")
    return out


def run_tests(copy, tests, timeout):
    """
    :return: (pytest's status, the first failed test's id or None, seconds).
    """
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
             "-m", "not slow", *tests],
            cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", None, time.perf_counter() - began
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return (
        proc.returncode,
        failed.group(1) if failed else None,
        time.perf_counter() - began,
    )


def check_applies(copy, bug):
    """:return: the file's text. Stops when the bug's text is not in it exactly once."""
    with open(os.path.join(copy, bug.path), encoding="utf-8") as f:
        text = f.read()
    count = text.count(bug.old)
    if count != 1:
        sys.exit(
            f"bug {bug.name!r}: its text occurs {count} times in {bug.path} (once "
            "expected); the source moved: update the bug in benchmarks/mutation.py"
        )
    return text


def plant(copy, bug):
    """Apply one bug; :return: the original text."""
    path = os.path.join(copy, bug.path)
    text = check_applies(copy, bug)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(bug.old, bug.new))
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument(
        "--only", default="", help="plant only bugs whose name holds this"
    )
    parser.add_argument("--list", action="store_true", help="list the bugs and stop")
    parser.add_argument(
        "--worktree",
        action="store_true",
        help="copy the checkout's files, uncommitted changes too (default: HEAD)",
    )
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds per bug's tests"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table in Markdown"
    )
    args = parser.parse_args()  # fmt: skip
    bugs = [b for b in BUGS if args.only.lower() in b.name.lower()]
    if args.list:
        for b in bugs:
            print(f"{b.name}  [{b.path}]  -> {', '.join(b.tests)}")
        return 0

    copy = tempfile.mkdtemp(prefix="sar2opt-mutation-")
    try:
        copy_tree(copy, args.worktree)
        for bug in bugs:  # every bug applies before any test runs
            check_applies(copy, bug)
        print(f"copy: {copy} (guided_diffusion from {check_import(copy)})", flush=True)
        # each file alone, as the bugs run them (files run together can interact)
        for test in sorted({t for b in bugs for t in b.tests}):
            status, failed, seconds = run_tests(copy, [test], args.timeout)
            if status != 0:
                sys.exit(f"the unchanged copy fails {test} ({failed}, status {status})")
            print(f"unchanged copy: {test} passes in {seconds:.0f} s", flush=True)
        rows = []
        for i, bug in enumerate(bugs, 1):
            original = plant(copy, bug)
            try:  # file by file, as the baseline ran them, until one fails
                seconds = 0.0
                for test in bug.tests:
                    status, failed, took = run_tests(copy, [test], args.timeout)
                    seconds += took
                    if status != 0:
                        break
            finally:
                with open(os.path.join(copy, bug.path), "w", encoding="utf-8") as f:
                    f.write(original)
            if status == 1 and failed:
                caught = failed
            elif status == 0:
                caught = "NOT CAUGHT"
            else:  # a crash at collection is not a test catching a bug
                caught = f"NOT CAUGHT (pytest status {status})"
            rows.append((bug.name, caught, seconds))
            print(
                f"[{i}/{len(bugs)}] {bug.name}: {caught} ({seconds:.0f} s)", flush=True
            )
    finally:
        shutil.rmtree(copy, ignore_errors=True)

    missed = [r for r in rows if r[1].startswith("NOT CAUGHT")]
    total = sum(r[2] for r in rows)
    print()
    if args.markdown:
        print("| bug | caught by | s |\n|---|---|---:|")
        for name, caught, seconds in rows:
            print(f"| {name} | `{caught}` | {seconds:.0f} |")
    else:
        width = max(len(r[0]) for r in rows)
        for name, caught, seconds in rows:
            print(f"{name:<{width}}  {seconds:5.0f} s  {caught}")
    print(
        f"\n{len(rows) - len(missed)} of {len(rows)} planted bugs caught, {total:.0f} s of tests"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
