"""
How the whole-scene path scales SAR (guided_diffusion/translation/scene_translation.py's
load_scene), checked on that path itself.

The patch path resizes and clips a second time (rasters.float_array), so a missing
clip or a nodata test on one band only goes unseen there. Here the scaled scene the
network sees is compared with the formula applied in the test to the file's values
read with rasterio: (clip(v, lo, hi) - lo) / (hi - lo) * 2 - 1 per band, -1 where
any band has no data.
"""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from guided_diffusion.io.rasters import RasterRows, Scaling
from guided_diffusion.translation.scene import SceneArrays
from guided_diffusion.translation.scene_translation import load_scene

ROOT = Path(__file__).resolve().parents[1]
SCENE_EXAMPLE = ROOT / "assets" / "examples" / "scene_64x96.tif"
VV_VH_DB = Scaling(sar_channels=2, sar_input="db", sar_db_range=((-25.0, 0.0), (-32.5, 0.0)),
                   sar_band_names=("VV", "VH"))  # fmt: skip


def by_hand(values, lo, hi):
    """The dB -> [-1, 1] map, written out."""
    v = np.minimum(np.maximum(values.astype(np.float64), lo), hi)
    return (v - lo) / (hi - lo) * 2 - 1


def scaled_scene(path, scaling, padded=None):
    reader = RasterRows(path)
    padded = padded or (reader.height, reader.width)
    arrays = SceneArrays()
    stats = load_scene(reader, scaling, arrays, padded, scaling.sar_channels)
    sar = arrays.read("sar", (0, padded[0])).double().numpy()
    valid = arrays.read("valid", (0, padded[0]))[0].numpy() > 0.5
    return sar, valid, stats


def write_tif(path, bands, names, nodata=None):
    count, height, width = bands.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                       dtype=bands.dtype, nodata=nodata, crs="EPSG:32632",
                       transform=Affine(10, 0, 500000, 0, -10, 5400000)) as dst:  # fmt: skip
        dst.write(bands)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path


def test_the_bundled_scene_is_clipped_to_its_db_ranges_on_the_scene_path():
    with rasterio.open(SCENE_EXAMPLE) as src:
        vv, vh = src.read().astype(np.float64)
        assert src.descriptions == ("VV", "VH")
    above = vv > 0
    assert above.sum() > 10  # the example has VV pixels above 0 dB: they must clip to 1
    sar, valid, stats = scaled_scene(SCENE_EXAMPLE, VV_VH_DB)
    assert sar.shape == (2, 64, 96) and valid.all()
    assert sar.min() >= -1 and sar.max() <= 1
    np.testing.assert_allclose(sar[0], by_hand(vv, -25, 0), atol=1e-6)
    np.testing.assert_allclose(sar[1], by_hand(vh, -32.5, 0), atol=1e-6)
    np.testing.assert_array_equal(sar[0][above], 1.0)
    # the shares clipped at each end, counted by hand
    assert stats.clipped[0] == pytest.approx(((vv < -25).mean(), above.mean()))
    assert stats.clipped[1] == pytest.approx(((vh < -32.5).mean(), (vh > 0).mean()))


@pytest.mark.parametrize("how", ["tag", "nan"])
def test_nodata_in_one_band_of_three_masks_the_pixel_in_every_band(tmp_path, how):
    # SNAP's order (VH first) and a third band the model does not read; nodata in
    # the VH band only, on a few scattered pixels and a whole row
    rng = np.random.default_rng(0)
    vh = rng.uniform(-40, 5, (70, 40))
    vv = rng.uniform(-30, 8, (70, 40))
    angle = rng.uniform(30, 45, (70, 40))
    holes = np.zeros((70, 40), bool)
    holes[rng.integers(0, 70, 25), rng.integers(0, 40, 25)] = True
    holes[65] = True  # in the second band of rows
    fill = -9999.0 if how == "tag" else np.nan
    vh = np.where(holes, fill, vh)
    path = write_tif(tmp_path / "s1.tif", np.stack([vh, vv, angle]).astype(np.float32),
                     ("Sigma0_VH_db", "Sigma0_VV_db", "incidence_angle"),
                     nodata=-9999.0 if how == "tag" else None)  # fmt: skip
    scaling = Scaling(sar_channels=2, sar_input="db", sar_bands=("VV", "VH"))
    sar, valid, stats = scaled_scene(path, scaling, padded=(70, 45))
    np.testing.assert_array_equal(valid[:, :40], ~holes)
    assert not valid[:, 40:].any()  # the padding is no data either
    assert stats.nodata == holes.sum()
    expected = np.stack([by_hand(vv, -25, 0), by_hand(vh, -32.5, 0)])
    expected[:, holes] = -1.0
    np.testing.assert_allclose(sar[:, :, :40], expected, atol=1e-6)
    # the padding repeats the last column
    np.testing.assert_array_equal(
        sar[:, :, 40:], np.repeat(sar[:, :, 39:40], 5, axis=2)
    )


@pytest.mark.parametrize("kind, factor", [("power", 10), ("amplitude", 20)])
def test_linear_values_become_db_on_the_scene_path(tmp_path, kind, factor):
    rng = np.random.default_rng(1)
    db = rng.uniform(-35, 6, (2, 20, 24))
    linear = (10 ** (db / factor)).astype(np.float32)
    linear[0, 3, 4] = 0.0  # no return: nodata in power and amplitude
    path = write_tif(tmp_path / "lin.tif", linear, ("VV", "VH"))
    scaling = Scaling(sar_channels=2, sar_input=kind)
    sar, valid, _ = scaled_scene(path, scaling)
    expected = np.stack([by_hand(db[0], -25, 0), by_hand(db[1], -32.5, 0)])
    expected[:, 3, 4] = -1.0
    np.testing.assert_allclose(sar, expected, atol=1e-5)
    assert not valid[3, 4] and valid.sum() == 20 * 24 - 1
