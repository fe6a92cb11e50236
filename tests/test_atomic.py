"""
Atomic writes: the destination is the old file or the new one, never half of either;
a full disk is one clear error naming the file and the disk.

The reference facts: what was written reads back; a write that fails leaves the
destination's old bytes and no temporary file; the errno a full disk gives (ENOSPC)
and the RuntimeError torch's zip writer raises after it.
"""

import builtins
import errno
import io
import os

import pytest
import torch as th

from guided_diffusion.base import atomic
from guided_diffusion.base.atomic import DiskFull


def full_disk_file(monkeypatch, after=0):
    """Make every file opened for writing fail with ENOSPC after ``after`` bytes."""
    real_open = builtins.open

    class Full(io.FileIO):
        written = 0

        def write(self, data):
            if self.written + len(data) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode:
            return Full(path, "w")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def test_round_trip(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json(str(path), {"x": [1, 2]})
    assert path.read_text() == '{"x": [1, 2]}'
    atomic.write_text(str(path), "é")
    assert path.read_text(encoding="utf-8") == "é"
    weights = {"w": th.arange(5.0)}
    atomic.write_atomic(str(tmp_path / "m.pt"), lambda f: th.save(weights, f))
    assert th.equal(th.load(tmp_path / "m.pt")["w"], weights["w"])
    assert sorted(os.listdir(tmp_path)) == ["a.json", "m.pt"]


def test_failure_mid_write_keeps_destination_and_no_temp_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def half(f):
        f.write(b"new, half")
        raise KeyError("stopped")

    with pytest.raises(KeyError):
        atomic.write_atomic(str(path), half)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_enospc_is_one_error_naming_the_file_and_the_disk(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    full_disk_file(monkeypatch, after=2)
    with pytest.raises(DiskFull) as caught:
        atomic.write_bytes(str(path), b"longer than two bytes")
    message = str(caught.value)
    assert str(path) in message and "disk full" in message
    assert f"disk at {atomic.disk_of(str(path))}" in message and "bytes free" in message
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_torch_zip_writer_after_enospc_is_the_same_error(tmp_path, monkeypatch):
    """th.save's writes fail with ENOSPC, then its zip writer raises RuntimeError."""
    full_disk_file(monkeypatch, after=100)
    path = tmp_path / "m.pt"
    with pytest.raises(RuntimeError) as raw:  # what the plain recipe let through
        with atomic.open(str(tmp_path / "raw.pt"), "wb") as f:
            th.save({"w": th.zeros(1000)}, f)
    assert atomic.is_disk_full(raw.value)
    with pytest.raises(DiskFull) as caught:
        atomic.write_atomic(str(path), lambda f: th.save({"w": th.zeros(1000)}, f))
    assert str(path) in str(caught.value)
    assert not path.exists() and not list(tmp_path.glob("m.pt.tmp-*"))


def test_disk_full_from_text_only(tmp_path):
    err = RuntimeError(f"file write failed: {os.strerror(errno.ENOSPC)}")
    assert atomic.is_disk_full(err)
    assert not atomic.is_disk_full(RuntimeError("file write failed"))


def test_temporary_path_renames_on_success_and_removes_on_failure(tmp_path):
    path = tmp_path / "sub" / "a.txt"  # its folder is made
    with atomic.temporary_path(str(path), ".txt") as tmp:
        assert tmp.endswith(".txt") and os.path.dirname(tmp) == str(path.parent)
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["a.txt"]
    with pytest.raises(KeyError):  # not a full disk: the error itself
        with atomic.temporary_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyError("stop")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["a.txt"]


# -- a GeoTIFF that meets a full disk -----------------------------------------------


def no_free_space(monkeypatch):
    """The disk as GDAL leaves it when it fails for lack of space: no bytes free."""
    real = atomic.shutil.disk_usage

    def usage(path):
        return real(path)._replace(free=0)

    monkeypatch.setattr(atomic.shutil, "disk_usage", usage)


@pytest.mark.parametrize("where", ["rows", "overviews"])
def test_full_disk_in_a_geotiff_is_disk_full_and_leaves_no_temporary(
    tmp_path, monkeypatch, where
):
    """
    GDAL's error for a full disk names no errno ("Write failed. See previous
    exception", after libtiff printed "No space left on device"): on a disk with no
    space left it is DiskFull, the old file stays and no temporary file remains.
    """
    import numpy as np
    from rasterio.errors import RasterioIOError

    from guided_diffusion.io.geotiff import GeoTiffWriter

    gdal_error = RasterioIOError("Write failed. See previous exception for details.")
    path = tmp_path / "scene.tif"
    path.write_bytes(b"old")
    image = np.zeros((1, 64, 64), np.uint8)
    no_free_space(monkeypatch)
    if where == "overviews":
        monkeypatch.setattr(
            GeoTiffWriter, "_finish", lambda self: (_ for _ in ()).throw(gdal_error)
        )
    with pytest.raises(DiskFull) as caught:
        with GeoTiffWriter(str(path), 1, 64, 64, np.uint8, {}, block=16) as out:
            out.write(0, image)
            if where == "rows":
                raise gdal_error
    assert str(path) in str(caught.value) and caught.value.__cause__ is gdal_error
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["scene.tif"]


def test_geotiff_error_with_space_left_is_itself_and_leaves_no_temporary(tmp_path):
    import numpy as np
    from rasterio.errors import RasterioIOError

    from guided_diffusion.io.geotiff import GeoTiffWriter

    with pytest.raises(RasterioIOError, match="other"):
        with GeoTiffWriter(str(tmp_path / "a.tif"), 1, 8, 8, np.uint8, {}) as out:
            out.write(0, np.zeros((1, 8, 8), np.uint8))
            raise RasterioIOError("other")
    assert os.listdir(tmp_path) == []
    with GeoTiffWriter(str(tmp_path / "a.tif"), 1, 8, 8, np.uint8, {}) as out:
        out.write(0, np.full((1, 8, 8), 7, np.uint8))
    assert os.listdir(tmp_path) == ["a.tif"]


# -- a training run that meets a full disk ------------------------------------------


def test_full_disk_at_checkpoint_ends_in_one_line_and_resume_works(
    tmp_path, monkeypatch, run_in_process
):
    """The second checkpoint's save hits a full disk: one line, then --resume_checkpoint auto."""
    from PIL import Image

    for sub in ("sar", "opt"):
        (tmp_path / sub).mkdir()
    for i in range(8):
        opt = th.randint(0, 256, (20, 20, 3), dtype=th.uint8).numpy()
        Image.fromarray(opt).save(tmp_path / "opt" / f"{i}.png")
        Image.fromarray(opt[..., 0]).save(tmp_path / "sar" / f"{i}.png")
    run = tmp_path / "run"
    flags = [f"--data_dir_sar={tmp_path / 'sar'}", f"--data_dir_opt={tmp_path / 'opt'}",
             "--image_size=16", "--num_channels=32", "--num_res_blocks=1", "--channel_mult=1,2",
             "--attention_resolutions=8", "--diffusion_steps=50", "--batch_size=2",
             "--num_workers=0", "--save_interval=2", "--max_steps=4"]  # fmt: skip
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "image_train.py")

    real_save = th.save

    def save_on_full_disk(obj, f, *args, **kwargs):
        # As on a full disk: the file's write fails with ENOSPC, then torch's zip
        # writer fails to finish the archive.
        if "000004" in getattr(f, "name", str(f)):
            failed = RuntimeError(
                "[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"
            )
            failed.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise failed
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(th, "save", save_on_full_disk)
        proc = run_in_process(script, flags, env={"OPENAI_LOGDIR": str(run)})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(run / "model000004.pt") in lines[0]
    assert f"disk at {atomic.disk_of(str(run))}" in lines[0]
    assert str(run / "model000002.pt") in lines[0]
    assert "--resume_checkpoint auto" in lines[0]
    assert not list(run.glob("*.tmp-*"))

    proc = run_in_process(
        script, [*flags, "--resume_checkpoint=auto"], env={"OPENAI_LOGDIR": str(run)}
    )
    assert proc.returncode == 0, proc.stderr
    state = th.load(run / "state000004.pt", weights_only=False)
    assert state["step"] == 4


def test_full_disk_while_translating_a_folder_ends_in_one_line(
    tmp_path, monkeypatch, run_in_process
):
    """The second image's write hits a full disk: one line; the rerun finishes the folder."""
    import shutil

    repo = os.path.join(os.path.dirname(__file__), "..")
    examples = os.path.join(repo, "assets", "examples")
    (tmp_path / "data" / "sar").mkdir(parents=True)
    for name in ("fields", "river"):
        shutil.copy(
            os.path.join(examples, f"{name}_32.tif"),
            tmp_path / "data" / "sar" / f"{name}.tif",
        )
    script = os.path.join(repo, "scripts", "image_sample_realtime.py")
    args = ["--data_dir", tmp_path / "data", "--model_path",
            os.path.join(repo, "assets", "scene_model", "model.pt"), "--sampler", "ddim",
            "--timestep_respacing", 2, "--batch_size", 1]  # fmt: skip
    log = tmp_path / "log"
    real_open = builtins.open

    def full_for_river(path, mode="r", *rest, **kwargs):
        if "river.png.tmp-" in str(path) and "gen_opt" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *rest, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(atomic, "open", full_for_river, raising=False)
        proc = run_in_process(script, args, env={"OPENAI_LOGDIR": log})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr  # after the progress bars
    written = log / "sample_results" / "ddim2" / "gen_opt"
    assert "error: disk full: could not write" in lines[0]
    assert str(written / "river.png") in lines[0] and "disk at" in lines[0]
    assert "rerun the same command" in lines[0]
    assert os.listdir(written) == ["fields.png"]

    proc = run_in_process(script, args, env={"OPENAI_LOGDIR": log})
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(written)) == ["fields.png", "river.png"]


def test_full_disk_on_the_page_is_one_message(tmp_path, monkeypatch):
    """The page's patch route out of space: one message naming the file, no traceback."""
    pytest.importorskip("gradio")
    from guided_diffusion.page import app

    translator = app.Translator(app.find_models(), work_dir=str(tmp_path / "work"))
    example = os.path.join(
        os.path.dirname(__file__), "..", "assets", "examples", "fields_32.tif"
    )
    real_open = builtins.open

    def full(path, mode="r", *rest, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *rest, **kwargs)

    monkeypatch.setattr(atomic, "open", full, raising=False)
    with pytest.raises(app.PageError, match="disk full: could not write") as err:
        translator.translate(example, "scene_model (bundled demo)", "ddim", 2, 0)
    assert str(tmp_path / "work") in str(err.value)
    assert "free space on the server" in str(err.value)
