"""
An archive in one run of scripts/translate_scene.py (issue 23, item 5): --input a
folder, a glob or a list file, --output a folder; complete scenes are skipped, a
corrupt one gets one line and the run goes on; on one rank, and under mpiexec on two
(whole scenes shared, or the tiles of each). Scenes of 40 x 40 on the bundled model.
"""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from guided_diffusion.io.rasters import DataError, RasterRows
from guided_diffusion.translation import archive

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "translate_scene.py")
FLAGS = ("--timestep_respacing", "2", "--seed", "3")
GOOD = ("a", "b", "c", "d")
TRANSFORM = Affine(10, 0, 600000, 0, -10, 5100000)
needs_mpiexec = pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)


def write_scene(path, seed, x=600000):
    """A 40 x 40 VV, VH scene in dB, written in one go (its header before its data)."""
    rng = np.random.default_rng(seed)
    vv = rng.uniform(-22, -4, (40, 40)).astype(np.float32)
    with rasterio.open(path, "w", driver="GTiff", width=40, height=40, count=2,
                       dtype="float32", crs="EPSG:32632",
                       transform=Affine(10, 0, x, 0, -10, 5100000)) as dst:  # fmt: skip
        dst.write(np.stack([vv, vv - 7]))
    return str(path)


def write_truncated(path):
    """A scene whose header reads but whose last rows are cut off: it opens, and
    fails while its rows are read."""
    write_scene(path, 99)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 3000])
    RasterRows(str(path))  # it opens
    with pytest.raises(DataError, match="cannot read"):
        RasterRows(str(path)).read(0, 40)
    return str(path)


def run_here(monkeypatch, *args):
    """The script in this process; its exit status (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args, *FLAGS])
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    except SystemExit as end:
        return end.code
    return 0


def run_two_ranks(*args):
    return subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, SCRIPT, *args, *FLAGS],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """The four good scenes, each translated by a single-scene run."""
    folder = tmp_path_factory.mktemp("singles")
    scenes = {}
    with pytest.MonkeyPatch.context() as mp:
        for i, name in enumerate(GOOD):
            scene = write_scene(folder / f"{name}.tif", i, x=600000 + 1000 * i)
            assert run_here(mp, "--input", scene, "--output", str(folder / f"out_{name}.tif")) == 0
            scenes[name] = (scene, folder / f"out_{name}.tif")
    return scenes


def make_archive(folder, singles, names=GOOD, corrupt="bad"):
    folder.mkdir()
    for name in names:
        shutil.copy(singles[name][0], folder / f"{name}.tif")
    write_truncated(folder / f"{corrupt}.tif")
    return folder


def assert_same_as_single(output, single, tolerance):
    with rasterio.open(output) as got, rasterio.open(single) as want:
        assert got.crs == want.crs and got.transform == want.transform
        assert got.shape == want.shape == (40, 40)
        difference = np.abs(got.read().astype(int) - want.read().astype(int))
        assert difference.max() <= tolerance, output


def failed_lines(text, name):
    return [line for line in text.splitlines() if line.startswith("failed:") and name in line]


# -- which scenes ---------------------------------------------------------------------


def test_a_folder_a_glob_and_a_list_give_the_same_scenes(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.tif", "a.TIFF", "c.jp2", "notes.txt", "d.png"):
        (folder / name).write_bytes(b"x")
    product = folder / "S1A_IW_GRDH_1SDV_X.SAFE"
    (product / "measurement").mkdir(parents=True)
    (product / "measurement" / "s1a-vv.tiff").write_bytes(b"x")  # never looked into
    (folder / "S1B_IW_GRDH_1SDV_Y.zip").write_bytes(b"x")
    (folder / "other.zip").write_bytes(b"x")
    want = [str(folder / n) for n in ("S1A_IW_GRDH_1SDV_X.SAFE", "S1B_IW_GRDH_1SDV_Y.zip",
                                      "a.TIFF", "b.tif", "c.jp2")]  # fmt: skip
    assert archive.archive_scenes(str(folder)) == want
    monkeypatch.chdir(tmp_path)
    listed = tmp_path / "scenes.txt"
    listed.write_text("# the scenes\nin/b.tif\n\nin/c.jp2  # a comment\n")
    assert archive.archive_scenes(str(listed)) == ["in/b.tif", "in/c.jp2"]
    assert archive.archive_scenes("in/[bc].*") == ["in/b.tif", "in/c.jp2"]
    assert [archive.is_archive(s) for s in ("in", str(listed), "in/*.tif", "in/b.tif",
                                            str(product))] == [True, True, True, False, False]  # fmt: skip
    assert archive.scene_stem(str(product)) == "S1A_IW_GRDH_1SDV_X"
    assert archive.scene_stem("x/S1B_IW_GRDH_1SDV_Y.zip") == "S1B_IW_GRDH_1SDV_Y"
    with pytest.raises(ValueError, match="--input in/none.*matches nothing"):
        archive.archive_scenes("in/none*.tif")
    with pytest.raises(ValueError, match=r"in/a.tif and in/a.jp2 .*out/a.tif"):
        archive.archive_outputs(["in/a.tif", "in/b.tif", "in/a.jp2"], "out")
    assert [archive.scenes_of_rank(5, r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert archive.shares_scenes(3, 2) and not archive.shares_scenes(2, 2)


def test_two_scenes_of_one_name_stop_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        write_scene(tmp_path / sub / "same.tif", 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--input", "*/same.tif", "--output", "out",
                                      *FLAGS])  # fmt: skip
    with pytest.raises(SystemExit) as end:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert "x/same.tif and y/same.tif" in err and "out/same.tif" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# -- one rank ---------------------------------------------------------------------------


def test_a_folder_with_a_corrupt_scene_on_one_rank(tmp_path, monkeypatch, capfd, singles):
    """4 outputs equal to the single-scene runs, one line naming the corrupt scene, the
    summary and exit status 1; a rerun skips the 4 (and a file that does not open
    fails in one line too); a glob and a list give the same run."""
    folder = make_archive(tmp_path / "in", singles)
    out = tmp_path / "out"
    assert run_here(monkeypatch, "--input", str(folder), "--output", str(out)) == 1
    text = capfd.readouterr()
    assert len(failed_lines(text.err, "bad.tif")) == 1
    assert "4 scene(s) translated, 0 skipped (already complete), 1 failed: " in text.out
    for name in GOOD:
        assert_same_as_single(out / f"{name}.tif", singles[name][1], 0)
        assert (out / f"{name}_quicklook.png").is_file()
        assert not (out / f"{name}.tif.work").exists()
    assert not (out / "bad.tif").exists()
    written = {name: os.stat(out / f"{name}.tif").st_mtime_ns for name in GOOD}

    (folder / "garbage.tif").write_bytes(b"not a raster at all")
    assert run_here(monkeypatch, "--input", str(folder), "--output", str(out)) == 1
    text = capfd.readouterr()
    assert len(failed_lines(text.err, "garbage.tif")) == 1
    assert "0 scene(s) translated, 4 skipped (already complete), 2 failed" in text.out
    assert written == {name: os.stat(out / f"{name}.tif").st_mtime_ns for name in GOOD}

    # a scene whose work folder remains was stopped: it runs again (and resumes)
    (out / "b.tif.work").mkdir()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{folder / 'a.tif'}\n# b is next\n{folder / 'b.tif'}\n")
    runs = ((str(listed), "1 scene(s) translated, 1 skipped"),
            (str(folder / "[ab].tif"), "0 scene(s) translated, 2 skipped"))  # fmt: skip
    for spec, summary in runs:
        assert run_here(monkeypatch, "--input", spec, "--output", str(out)) == 0
        text = capfd.readouterr()
        assert summary + " (already complete), 0 failed" in text.out
        assert "failed:" not in text.err
    assert_same_as_single(out / "b.tif", singles["b"][1], 0)


# -- two ranks ------------------------------------------------------------------------


@needs_mpiexec
@pytest.mark.slow
def test_two_ranks_share_the_scenes_of_a_folder_with_a_corrupt_one(tmp_path, singles):
    folder = make_archive(tmp_path / "in", singles)
    out = tmp_path / "out"
    proc = run_two_ranks("--input", str(folder), "--output", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(failed_lines(proc.stderr, "bad.tif")) == 1
    assert proc.stdout.count("4 scene(s) translated, 0 skipped (already complete), 1 failed") == 1
    for name in GOOD:  # one thread per rank here: a last bit may round the other way
        assert_same_as_single(out / f"{name}.tif", singles[name][1], 1)
    proc = run_two_ranks("--input", str(folder), "--output", str(out))
    assert proc.returncode == 1
    assert proc.stdout.count("0 scene(s) translated, 4 skipped (already complete), 1 failed") == 1


@needs_mpiexec
def test_two_ranks_sharing_the_tiles_skip_a_corrupt_scene_together(tmp_path, singles):
    """Two scenes on two ranks: the tiles of each are shared; the corrupt one fails
    while its rows are read, and both ranks leave it (no rank waits for the other)."""
    folder = make_archive(tmp_path / "in", singles, names=("a",))
    out = tmp_path / "out"
    proc = run_two_ranks("--input", str(folder), "--output", str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the tiles of each shared by 2 rank(s)" in proc.stdout
    assert len(failed_lines(proc.stderr, "bad.tif")) == 1
    assert proc.stdout.count("1 scene(s) translated, 0 skipped (already complete), 1 failed") == 1
    assert_same_as_single(out / "a.tif", singles["a"][1], 1)


# -- one model, and a stop between scenes ------------------------------------------------


def three_scenes(folder):
    folder.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        write_scene(folder / f"{name}.tif", 10 + i, x=600000 + 1000 * i)
    return folder


def test_the_model_is_loaded_once_for_all_scenes(tmp_path, monkeypatch, capfd):
    from guided_diffusion.translation import sampling, scene_translation

    loads = []
    original = scene_translation.load_prepared_model

    def counted(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    # scene_translation holds the name it imported from sampling: both are counted
    monkeypatch.setattr(sampling, "load_prepared_model", counted)
    monkeypatch.setattr(scene_translation, "load_prepared_model", counted)
    folder, out = three_scenes(tmp_path / "in"), tmp_path / "out"
    assert run_here(monkeypatch, "--input", str(folder), "--output", str(out)) == 0
    assert "3 scene(s) translated, 0 skipped (already complete), 0 failed" in capfd.readouterr().out
    assert all((out / f"{name}.tif").is_file() for name in "abc")
    assert len(loads) == 1


# Runs the script on an archive with translate_scene wrapped: once the first scene is
# done, the process sends itself SIGTERM, as a user's kill between two scenes would.
STOPPER = r"""
import os, runpy, signal, sys
from guided_diffusion.translation import scene_translation

original = scene_translation.translate_scene
started = []

def translate_then_stop(job, *args, **kwargs):
    started.append(job.input)
    finished = original(job, *args, **kwargs)
    if len(started) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return finished

scene_translation.translate_scene = translate_then_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_between_scenes_stops_the_run_cleanly(tmp_path, monkeypatch, capfd):
    """SIGTERM after the first of three scenes: exit status 128 + 15 without a
    traceback, the first scene complete, the others not started, "(stopped)" in the
    summary; the rerun skips the first and translates the others."""
    folder, out = three_scenes(tmp_path / "in"), tmp_path / "out"
    stopper = tmp_path / "stopper.py"
    stopper.write_text(STOPPER)
    proc = subprocess.run(
        [sys.executable, str(stopper), SCRIPT, "--input", str(folder), "--output", str(out),
         *FLAGS],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 128 + 15, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "1 scene(s) translated, 0 skipped (already complete), 0 failed (stopped)" in proc.stdout
    assert (out / "a.tif").is_file() and (out / "a_quicklook.png").is_file()
    assert not (out / "a.tif.work").exists()
    for name in "bc":
        assert not (out / f"{name}.tif").exists() and not (out / f"{name}.tif.work").exists()
    written = os.stat(out / "a.tif").st_mtime_ns

    assert run_here(monkeypatch, "--input", str(folder), "--output", str(out)) == 0
    assert "2 scene(s) translated, 1 skipped (already complete), 0 failed" in capfd.readouterr().out
    assert os.stat(out / "a.tif").st_mtime_ns == written
    assert all((out / f"{name}.tif").is_file() for name in "abc")
