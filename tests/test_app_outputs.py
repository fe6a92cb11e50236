"""
The page's outputs against their source (guided_diffusion/page/app.py's Translator,
without a browser or a server):

* the GeoTIFF of each route lies where the input lies: its transform and CRS are
  the input's, read with rasterio from the input file;
* the command the page shows, run as printed (split as a shell splits it, with only
  the placeholders DATA and OUT filled in), writes the page's pixels;
* the SAR the page shows is the file's bands scaled by the formula written here.
"""

import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from guided_diffusion.page import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
MODEL = "scene_model (bundled demo)"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    return app.Translator(
        app.find_models(), work_dir=str(tmp_path_factory.mktemp("page"))
    )


def moved_copy(source, path, transform, height=None, width=None):
    """The file's VV and VH (the top-left crop when a size is given) at another place."""
    with rasterio.open(source) as src:
        profile, data = src.profile, src.read()
    height, width = height or data.shape[1], width or data.shape[2]
    profile.update(transform=transform, height=height, width=width)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data[:, :height, :width])
        dst.descriptions = ("VV", "VH")
    return path


def shown_argv(command, **placeholders):
    """The page's command as a shell would split it, with the placeholders filled in."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "python"
    return [placeholders.get(a, a) for a in argv[1:]]


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_patch_route_keeps_the_place_and_its_command_gives_its_pixels(
    translator, tmp_path, run_in_process, monkeypatch
):
    monkeypatch.chdir(ROOT)  # the page shows paths relative to where it runs
    place = Affine(10, 0, 612340, 0, -10, 4987650)  # not the examples' place
    upload = moved_copy(EXAMPLES / "fields_32.tif", tmp_path / "my field.tif", place)
    result = translator.translate(str(upload), MODEL, "ddim", 3, 7)
    assert result.route == "patch"
    with rasterio.open(upload) as src:
        crs, transform = src.crs, src.transform
    with rasterio.open(result.geotiff) as out:
        assert out.transform == transform and out.crs == crs
        assert np.array_equal(out.read().transpose(1, 2, 0), result.image)

    data = tmp_path / "data"
    (data / "sar").mkdir(parents=True)
    shutil.copy(upload, data / "sar" / upload.name)
    script, *args = shown_argv(result.command, DATA=str(data))
    proc = run_in_process(ROOT / script, args, env={"OPENAI_LOGDIR": tmp_path / "log"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = tmp_path / "log" / "sample_results" / "ddim3" / "gen_opt" / "my field.png"
    assert np.array_equal(png(written), result.image)


def test_the_scene_route_keeps_the_place_and_its_command_gives_its_pixels(
    translator, tmp_path, run_in_process, monkeypatch
):
    monkeypatch.chdir(ROOT)
    place = Affine(10, 0, 431270, 0, -10, 5012390)
    upload = moved_copy(
        EXAMPLES / "scene_64x96.tif", tmp_path / "my scene.tif", place, 40, 48
    )
    result = translator.translate(str(upload), MODEL, "ddim", 2, 5)
    assert result.route == "scene" and result.image.shape == (40, 48, 3)
    with rasterio.open(result.geotiff) as out:
        assert out.transform == place and out.crs.to_epsg() == 32632
        assert np.array_equal(out.read().transpose(1, 2, 0), result.image)

    output = tmp_path / "by_hand.tif"
    script, *args = shown_argv(result.command, **{"OUT.tif": str(output)})
    # the upload is shown by its name: the user runs it where the file is
    args = [str(upload) if a == upload.name else a for a in args]
    proc = run_in_process(ROOT / script, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(output) as src:
        assert src.transform == place
        assert np.array_equal(src.read().transpose(1, 2, 0), result.image)


def test_the_sar_preview_is_the_scaled_composite(translator):
    path = EXAMPLES / "scene_64x96.tif"
    shown, _ = translator.describe(str(path), MODEL)
    with rasterio.open(path) as src:
        vv, vh = src.read().astype(np.float64)
    grey = []
    for band, lo in ((vv, -25.0), (vh, -32.5)):
        scaled = (np.clip(band, lo, 0.0) - lo) / -lo * 2 - 1
        grey.append(np.clip(np.rint((scaled + 1) * 127.5), 0, 255))
    expected = np.stack(
        [grey[0], grey[1], grey[0]], axis=-1
    )  # red VV, green VH, blue VV
    assert shown.shape == expected.shape
    assert np.abs(shown.astype(float) - expected).max() <= 1
