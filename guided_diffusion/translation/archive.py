"""
An archive of scenes in one run of scripts/translate_scene.py: which scenes an
``--input`` names (a folder, a glob or a list file), the output each gets in the
``--output`` folder, whether it is already done, how the ranks share the scenes and
the run's summary, and the run itself (:func:`translate_archive`). Each scene is
translated by scene_translation.translate_scene, as a single scene is.
"""

import glob
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

from .. import dist_util, logger
from ..io.rasters import DataError
from .scene import JobMismatch

# The files of a folder that are scenes: GDAL rasters by their usual extension
# (GeoTIFF, JPEG 2000, ERDAS Imagine), and Sentinel-1 products as delivered.
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img")
# A text file of scene paths, one a line (# starts a comment).
LIST_SUFFIXES = (".txt", ".lst")


def is_product(path):
    """A Sentinel-1 product as delivered: a ``*.SAFE`` folder or an ``S1*_*.zip``."""
    name = os.path.basename(os.path.normpath(path))
    if name.upper().endswith(".SAFE"):
        return True
    return name.upper().startswith("S1") and "_" in name and name.lower().endswith(".zip")


def _is_scene_entry(path):
    if is_product(path):
        return True
    return os.path.isfile(path) and path.lower().endswith(RASTER_SUFFIXES)


def is_archive(spec):
    """
    Whether ``--input`` names several scenes: a folder (not a ``.SAFE`` product),
    a list file (.txt, .lst) or a glob pattern that is not itself a file.
    """
    if is_product(spec):
        return False
    if os.path.isdir(spec):
        return True
    if os.path.isfile(spec):
        return spec.lower().endswith(LIST_SUFFIXES)
    return glob.has_magic(spec)


def archive_scenes(spec):
    """
    The scenes ``--input`` names, in a stable order.

    :param spec: a folder (its raster files, :data:`RASTER_SUFFIXES`, and its
        Sentinel-1 products, never looked into), a glob pattern (its matches, sorted)
        or a list file (its lines; a relative path is from the current folder,
        as ``ls > list.txt`` writes them).
    :return: a list of paths.
    :raises ValueError: nothing found, one line naming ``--input``.
    """
    if os.path.isdir(spec):
        found = [os.path.join(spec, name) for name in sorted(os.listdir(spec))]
        scenes = [path for path in found if _is_scene_entry(path)]
        what = "no scene in the folder (" + ", ".join(RASTER_SUFFIXES) + ", *.SAFE, S1*_*.zip)"
    elif os.path.isfile(spec):
        scenes = []
        with open(spec) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    scenes.append(os.path.expanduser(line))
        what = "no path listed in the file"
    else:
        scenes = sorted(glob.glob(os.path.expanduser(spec)))
        what = "the pattern matches nothing (quote it, so that the shell leaves it to the script)"
    if not scenes:
        raise ValueError(f"--input {spec}: {what}")
    return [os.path.normpath(path) for path in scenes]


def scene_stem(path):
    """The name of a scene's output: its file name without the extension (a product's
    without .SAFE or .zip)."""
    name = os.path.basename(os.path.normpath(path))
    return os.path.splitext(name)[0]


def archive_outputs(scenes, folder):
    """
    The output of each scene in the ``--output`` folder: FOLDER/<scene stem>.tif.

    :return: a list of (scene, output) pairs.
    :raises ValueError: two scenes of the same stem (one line naming them), whose
        outputs would overwrite each other.
    """
    seen = {}
    for scene in scenes:
        stem = scene_stem(scene)
        if stem in seen:
            raise ValueError(
                f"--input: {seen[stem]} and {scene} would both be written to "
                f"{os.path.join(folder, stem + '.tif')}; rename one or translate them "
                "in two runs"
            )
        seen[stem] = scene
    return [(scene, os.path.join(folder, scene_stem(scene) + ".tif")) for scene in scenes]


def output_complete(job):
    """
    Whether a placed scene job's outputs are all written: its last file exists (the
    output, or with K samples the picture of their spread, written last) and its
    work folder is gone (a scene stopped or crashed keeps it, and resumes).
    """
    from .scene_outputs import spread_paths

    last = job.output if job.samples_per_input <= 1 else spread_paths(job.output)["picture"]
    return os.path.exists(last) and not os.path.exists(job.work_dir)


def scenes_of_rank(count, rank, world):
    """
    The scenes rank ``rank`` of ``world`` translates by itself, when whole scenes are
    shared (:func:`shares_scenes`): scene i goes to rank i % world.
    """
    return list(range(rank, count, world))


def shares_scenes(count, world):
    """Whether the ranks share whole scenes (more scenes than ranks) rather than the
    tiles of each scene."""
    return count > world


@dataclass
class Summary:
    """What became of an archive's scenes: the names done, skipped (complete) and
    failed (with why)."""

    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (name, why)

    @classmethod
    def merged(cls, parts):
        """One summary of several ranks' (each scene counted where it ran)."""
        out = cls()
        for part in parts:
            out.done += part.done
            out.skipped += part.skipped
            out.failed += part.failed
        return out

    def line(self):
        """The run's last line."""
        text = (
            f"{len(self.done)} scene(s) translated, {len(self.skipped)} skipped "
            f"(already complete), {len(self.failed)} failed"
        )
        if self.failed:
            text += ": " + ", ".join(name for name, _ in self.failed)
        return text


def scene_job(template, scene, output):
    """
    The checked job of one scene of an archive: ``template`` (the command's job)
    with the scene's input, output and work folder (OUTPUT.work, or a folder of
    that name in --work_dir).

    :raises ValueError: the scene cannot run (no such file ...).
    """
    work_dir = ""
    if template.work_dir != template.output + ".work":  # --work_dir given
        work_dir = os.path.join(template.work_dir, os.path.basename(output) + ".work")
    job = replace(template, input=scene, output=output, work_dir=work_dir)
    return job.placed().check()


def translate_archive(template, scenes, checkpoint, rank, world):
    """
    Translate the scenes of an archive, each into its output, and say what became of
    them. With more scenes than ranks each rank translates whole scenes by itself
    (scene i on rank i % world, :func:`scenes_of_rank`); otherwise the ranks share
    the tiles of each scene, and agree to skip one that fails on any of them. A
    scene whose outputs are complete is skipped; one that fails gets one line on
    stderr and the run goes on. The model is loaded once. SIGINT or SIGTERM stops
    the run at the end of the step in progress (saved, as a single scene is).

    :param template: the command's job (:func:`scene_job` gives each scene's).
    :param scenes: (scene, output) pairs (:func:`archive_outputs`).
    :param checkpoint: the jobs' scene_translation.scene_settings.
    :return: the exit status, the same on every rank: 0, 1 when a scene failed,
        128 + the signal that stopped the run.
    """
    import rasterio.errors

    from .scene_translation import (
        STOP,
        SceneError,
        _ask_to_stop,
        load_scene_model,
        translate_scene,
    )

    faults = (
        DataError, ValueError, OSError, JobMismatch, SceneError,
        dist_util.FailedElsewhere, rasterio.errors.RasterioError,
    )  # fmt: skip
    shared = shares_scenes(len(scenes), world)
    neighbours = dist_util.processes_on_this_machine()  # a collective: before alone()
    # ranks translating scenes alone meet at the end after unequal work
    meeting = dist_util.patient_group() if shared else None
    if shared:  # every rank logs the scenes it translates
        with dist_util.alone():
            logger.configure(dir=template.output, format_strs=["stdout"])
        mine = scenes_of_rank(len(scenes), rank, world)
    else:
        mine = range(len(scenes))
    logger.log(
        f"{len(scenes)} scenes into {template.output}: "
        + (f"{world} ranks, each translating whole scenes" if shared and world > 1
           else f"the tiles of each shared by {world} rank(s)" if world > 1 else "one process")
    )  # fmt: skip
    summary, model = Summary(), None
    STOP["signal"] = None
    handlers = {s: signal.signal(s, _ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in mine:
            # a signal between two scenes stops the run before the next (every rank
            # sharing the tiles stops with the one that got it)
            stops = [STOP["signal"]] if shared else dist_util.all_gather_object(STOP["signal"])
            if any(stops):
                STOP["signal"] = max(s or 0 for s in stops)
                break
            scene, output = scenes[i]
            problem = None
            try:
                job = scene_job(template, scene, output)
            except faults as err:
                problem = str(err)
            if not shared:  # the ranks skip a scene together
                found = dist_util.problem_anywhere(problem)
                if found is not None and found[1] != problem:
                    problem = f"on rank {found[0]}: {found[1]}"
            if problem is None:
                complete = output_complete(job)
                if not shared:  # rank 0 writes the outputs: its view decides
                    complete = dist_util.broadcast_object(complete)
                if complete:
                    logger.log(f"{scene}: {output} is complete, skipped")
                    summary.skipped.append(scene)
                    continue
                logger.log(f"scene {i + 1} of {len(scenes)}: {scene} -> {output}")
                try:
                    with dist_util.alone(neighbours) if shared else nullcontext():
                        if model is None:
                            model = load_scene_model(template, checkpoint.flags)
                        finished = translate_scene(
                            job, checkpoint, rank=0 if shared else rank,
                            world=1 if shared else world, model=model, catch_signals=True,
                        )  # fmt: skip
                except faults as err:
                    problem = str(err)
                else:
                    if not finished:
                        break
                    summary.done.append(scene)
            if problem is not None:
                summary.failed.append((scene, problem))
                if shared or dist_util.is_main_process():
                    print(f"failed: {scene}: {problem}", file=sys.stderr, flush=True)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    parts = dist_util.all_gather_object((summary, STOP["signal"]), group=meeting)
    # with the tiles shared every rank saw every scene: rank 0's summary is the run's
    summary = Summary.merged(part for part, _ in (parts if shared else parts[:1]))
    stopped = max((s for _, s in parts if s), default=None)
    if dist_util.is_main_process():
        print(summary.line() + (" (stopped)" if stopped else ""), flush=True)
    if stopped:
        return 128 + stopped
    return 1 if summary.failed else 0
