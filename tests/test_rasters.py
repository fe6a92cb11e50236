"""
Reading SAR and optical rasters and scaling them (guided_diffusion/io/rasters.py).

Every expected value is computed by hand from the definitions: dB = 10 log10(power)
= 20 log10(amplitude), a dB range [lo, hi] maps linearly onto [-1, 1] after
clipping, an optical range [lo, hi] likewise.
"""

import argparse
import json
import math
import os
import warnings

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from guided_diffusion import logger
from guided_diffusion.base import settings
from guided_diffusion.image_datasets import (
    DataError,
    PairedDataset,
    _Samples,
    find_pairs,
    load_data,
    load_opt,
    load_sar,
)
from guided_diffusion.io.rasters import (
    CLIP_WARN_SHARE,
    Scaling,
    load_sar_patch,
    parse_db_range,
    polarisation,
    read_raster,
    resolve,
)
from guided_diffusion.translation.sampling import input_scaling


def write_tif(path, bands, *, names=None, nodata=None, georef=True):
    """Write (B, H, W) as a GeoTIFF (UTM 32N, 10 m pixels unless georef is False)."""
    bands = np.asarray(bands)
    if bands.ndim == 2:
        bands = bands[None]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    geo = (
        dict(crs="EPSG:32632", transform=Affine(10, 0, 500000, 0, -10, 5000000))
        if georef
        else {}
    )
    profile = dict(
        driver="GTiff", width=bands.shape[2], height=bands.shape[1],
        count=len(bands), dtype=bands.dtype, nodata=nodata, **geo,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(bands)
            for i, name in enumerate(names or ()):
                dst.set_band_description(i + 1, name)
    return str(path)


def save_png(path, array):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return str(path)


DB = Scaling(sar_channels=1, sar_input="db")


# -- parsing the settings ---------------------------------------------------------


def test_db_range_forms_and_errors():
    assert parse_db_range("") == ()
    assert parse_db_range("-25,0") == ((-25.0, 0.0),)
    assert parse_db_range("-25,0,-32.5,0") == ((-25.0, 0.0), (-32.5, 0.0))
    with pytest.raises(DataError, match="--sar_db_range 0,-25.*min < max"):
        parse_db_range("0,-25")
    with pytest.raises(DataError, match="--sar_db_range -25,0,-30: give pairs"):
        parse_db_range("-25,0,-30")
    with pytest.raises(DataError, match="--sar_db_range low,0: expected numbers"):
        parse_db_range("low,0")


def test_a_range_that_starts_with_a_minus_sign_parses_as_printed():
    parser = argparse.ArgumentParser()
    settings.add_to_parser(parser, "inputs")
    args = parser.parse_args(
        ["--sar_db_range", "-25,0,-32.5,0", "--sar_nodata", "-9999"]
    )
    assert args.sar_db_range == "-25,0,-32.5,0" and args.sar_nodata == "-9999"
    scaling = Scaling.from_settings(args, sar_channels=2)
    assert scaling.sar_db_range == ((-25.0, 0.0), (-32.5, 0.0))
    assert scaling.sar_nodata == -9999.0


def test_record_round_trip_keeps_nan_nodata():
    scaling = Scaling(
        sar_channels=2, sar_input="power", sar_db_range=((-25.0, 0.0), (-30.0, -5.0)),
        sar_nodata=float("nan"), sar_bands=("VV", 2), sar_band_names=("VV", "VH"),
        opt_bands=(4, 3, 2), opt_range=(0.0, 3000.0),
    )  # fmt: skip
    record = json.loads(json.dumps(scaling.record()))  # strict JSON: NaN as text
    back = Scaling.from_record(record)
    assert math.isnan(back.sar_nodata)
    assert back == Scaling(**{**scaling.__dict__, "sar_nodata": back.sar_nodata})


@pytest.mark.parametrize(
    "text, expected",
    [("Sigma0_VH", "VH"), ("Sigma0_VV_db", "VV"), ("vv", "VV"), ("HH", "HH"),
     ("Amplitude_HV", "HV"), ("B4", None), ("VVH", None), ("", None)],
)  # fmt: skip
def test_polarisation_is_read_from_band_descriptions(text, expected):
    assert polarisation(text) == expected


# -- SAR scaling, by kind ---------------------------------------------------------


def test_db_values_clip_and_map_linearly(tmp_path):
    db = np.array([[-30.0, -25.0, -12.5, 0.0, 5.0, -6.25]], np.float32)
    # a square at the model's size, so no resampling mixes the values
    path = write_tif(tmp_path / "db.tif", np.tile(db, (6, 1)))
    arr, valid, stats = load_sar_patch(path, 6, DB)
    expected = [-1.0, -1.0, 0.0, 1.0, 1.0, 0.5]  # (clip(v, -25, 0) + 25) / 25 * 2 - 1
    np.testing.assert_allclose(arr[0, 0], expected, atol=1e-6)
    assert valid.all() and stats.nodata == 0
    assert stats.clipped[0] == pytest.approx((1 / 6, 1 / 6))
    assert stats.observed[0] == pytest.approx((-30.0, 5.0))


@pytest.mark.parametrize(
    "kind, values",
    [
        # 10 log10(p): 1e-3 -> -30 dB, 10**-1.25 -> -12.5 dB, 1 -> 0 dB
        ("power", [1e-3, 10**-1.25, 1.0, 10**-0.625]),
        # 20 log10(a): the square roots of the same powers
        ("amplitude", [10**-1.5, 10**-0.625, 1.0, 10**-0.3125]),
    ],
)
def test_power_and_amplitude_are_turned_into_db(tmp_path, kind, values):
    square = np.tile(np.array(values, np.float32), (4, 1))
    path = write_tif(tmp_path / f"{kind}.tif", square)
    arr, valid, _ = load_sar_patch(path, 4, Scaling(sar_channels=1, sar_input=kind))
    np.testing.assert_allclose(arr[0, 0], [-1.0, 0.0, 1.0, 0.5], atol=1e-5)
    assert valid.all()


def test_per_band_ranges_follow_the_polarisation_names(tmp_path):
    # SNAP's order, VH first; the model reads VV first with the convention's ranges
    vh = np.full((4, 4), -16.25, np.float32)  # middle of -32.5..0
    vv = np.full((4, 4), -18.75, np.float32)  # a quarter of -25..0
    path = write_tif(
        tmp_path / "s1.tif", [vh, vv], names=["Sigma0_VH_db", "Sigma0_VV_db"]
    )
    scaling = Scaling(sar_channels=2, sar_input="db")
    arr, _, stats = load_sar_patch(path, 4, scaling)
    assert stats.labels == ["VV", "VH"]
    np.testing.assert_allclose(arr[:, 0, 0], [-0.5, 0.0], atol=1e-6)
    # one range for every band
    one = Scaling(sar_channels=2, sar_input="db", sar_db_range=((-20.0, -10.0),))
    np.testing.assert_allclose(load_sar(path, 4, scaling=one)[:, 0, 0], [-0.75, -0.25])
    # one per band, in model order
    per = Scaling(
        sar_channels=2, sar_input="db", sar_db_range=((-20.0, -17.5), (-20.0, -12.5))
    )
    np.testing.assert_allclose(load_sar(path, 4, scaling=per)[:, 0, 0], [0.0, 0.0])


def test_unnamed_bands_take_the_convention_of_their_place_in_the_file(tmp_path):
    path = write_tif(tmp_path / "s1.tif", [np.full((4, 4), -12.5, np.float32)] * 2)
    arr = load_sar(path, 4, scaling=Scaling(sar_channels=2, sar_input="db"))
    # band 1 as VV: -12.5 in -25..0 -> 0; band 2 as VH: -12.5 in -32.5..0 -> 0.2308
    vh = 20 / 32.5 * 2 - 1
    np.testing.assert_allclose(arr[:, 0, 0], [0.0, vh], atol=1e-6)
    # band 2 alone is still the cross-polarised band of a SEN12MS file
    alone = Scaling(sar_channels=1, sar_input="db", sar_bands=(2,))
    np.testing.assert_allclose(load_sar(path, 4, scaling=alone)[0, 0, 0], vh, atol=1e-6)
    swapped = Scaling(sar_channels=2, sar_input="db", sar_bands=(2, 1))
    np.testing.assert_allclose(
        load_sar(path, 4, scaling=swapped)[:, 0, 0], [vh, 0.0], atol=1e-6
    )


@pytest.mark.parametrize(
    "mode, channels", [("LA", 1), ("LA", 3), ("RGB", 1), ("RGBA", 3)]
)
def test_8_bit_images_resolve_as_the_original_reads_them(tmp_path, mode, channels):
    image = Image.new(
        mode, (8, 8), (90, 200) if mode == "LA" else (10, 20, 30, 255)[: len(mode)]
    )
    image.save(tmp_path / "s1.png")
    scaling, _ = resolve(Scaling(sar_channels=channels), str(tmp_path / "s1.png"))
    assert scaling == Scaling(sar_channels=channels)  # nothing to fix for 8-bit files
    arr = load_sar(str(tmp_path / "s1.png"), 8, scaling=scaling)
    grey = 90 if mode == "LA" else round(10 * 0.299 + 20 * 0.587 + 30 * 0.114)
    first = grey if channels == 1 or mode == "LA" else 10
    assert arr.shape == (channels, 8, 8) and round((arr[0, 0, 0] + 1) * 127.5) == first
    if mode == "LA":  # alpha is never a second polarisation
        with pytest.raises(
            DataError, match="has 1 band but the model takes --sar_channels 2"
        ):
            load_sar(str(tmp_path / "s1.png"), 8, scaling=Scaling(sar_channels=2))


# -- nodata -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["tag", "flag", "nan", "zero_power"])
def test_nodata_is_filled_with_minus_one_and_masked(tmp_path, how):
    values = np.full((4, 4), -12.5, np.float32)
    kind, scaling_nodata, tag = "db", None, None
    if how == "tag":
        values[0] = -9999.0
        tag = -9999.0
    elif how == "flag":
        values[0] = -9999.0
        scaling_nodata = -9999.0
    elif how == "nan":
        values[0] = np.nan
    else:
        values = np.full((4, 4), 10**-1.25, np.float32)  # -12.5 dB in power
        values[0] = 0.0  # SNAP's nodata: its log is -inf
        kind = "power"
    path = write_tif(tmp_path / "s1.tif", values, nodata=tag)
    scaling = Scaling(sar_channels=1, sar_input=kind, sar_nodata=scaling_nodata)
    with np.errstate(all="raise"):  # no log of zero, no NaN arithmetic
        arr, valid, stats = load_sar_patch(path, 4, scaling)
    assert np.isfinite(arr).all()
    np.testing.assert_allclose(arr[0, 0], -1.0)
    np.testing.assert_allclose(arr[0, 1:], 0.0, atol=1e-6)
    assert not valid[0].any() and valid[1:].all()
    assert stats.nodata == 4 and stats.pixels == 16
    assert stats.clipped[0] == (0.0, 0.0)  # nodata is not counted as clipping


def test_a_nan_nodata_flag_and_an_all_nodata_file(tmp_path):
    path = write_tif(tmp_path / "s1.tif", np.full((4, 4), np.nan, np.float32))
    arr, valid, stats = load_sar_patch(path, 4, Scaling(sar_channels=3, sar_input="db"))
    assert arr.shape == (3, 4, 4) and (arr == -1).all() and not valid.any()
    assert stats.all_nodata


# -- bands: names, selection, counts ----------------------------------------------


def test_sar_bands_select_by_name_and_index(tmp_path):
    vh, vv = np.full((4, 4), -32.5, np.float32), np.full((4, 4), 0.0, np.float32)
    path = write_tif(tmp_path / "s1.tif", [vh, vv], names=["Sigma0_VH", "Sigma0_VV"])
    by_name = Scaling(sar_channels=1, sar_input="db", sar_bands=("VH",))
    # VH alone, with the cross-pol convention -32.5..0
    assert load_sar(path, 4, scaling=by_name)[0, 0, 0] == -1.0
    by_index = Scaling(sar_channels=2, sar_input="db", sar_bands=(1, 2))
    _, _, stats = load_sar_patch(path, 4, by_index)
    assert stats.labels == ["VH", "VV"]  # the order given, not the convention's


def test_a_missing_band_names_the_file_the_flag_and_the_bands(tmp_path):
    path = write_tif(
        tmp_path / "s1.tif", np.zeros((2, 4, 4), np.float32), names=["VV", "VH"]
    )
    for bands in (("HH",), (3,)):
        scaling = Scaling(sar_channels=1, sar_input="db", sar_bands=bands)
        with pytest.raises(DataError) as err:
            load_sar(path, 4, scaling=scaling)
        message = str(err.value)
        assert f"--sar_bands {bands[0]}" in message and path in message
        assert "1 VV, 2 VH" in message and "\n" not in message


def test_a_band_count_that_does_not_fit_the_model_is_named(tmp_path):
    path = write_tif(
        tmp_path / "s1.tif", np.zeros((2, 4, 4), np.float32), names=["VV", "VH"]
    )
    for channels in (1, 3):
        with pytest.raises(DataError) as err:
            load_sar(path, 4, scaling=Scaling(sar_channels=channels, sar_input="db"))
        message = str(err.value)
        assert path in message and "2 bands (VV, VH)" in message
        assert f"--sar_channels {channels}" in message and "--sar_channels 2" in message


def test_sampling_reads_the_bands_the_model_learned_on_by_name(tmp_path):
    vh, vv = np.full((4, 4), -32.5, np.float32), np.full((4, 4), 0.0, np.float32)
    snap = write_tif(tmp_path / "snap.tif", [vh, vv], names=["Sigma0_VH", "Sigma0_VV"])
    learned = Scaling(sar_channels=2, sar_input="db", sar_band_names=("VV", "VH"))
    np.testing.assert_array_equal(load_sar(snap, 4, scaling=learned)[:, 0, 0], [1, -1])
    gf3 = write_tif(tmp_path / "gf3.tif", [vh, vv], names=["HH", "HV"])
    with pytest.raises(
        DataError,
        match="learned on VV, VH but .* has HH, HV; pick its bands with --sar_bands",
    ):
        load_sar(gf3, 4, scaling=learned)


# -- 8-bit files: unchanged, and the same tensor from a TIFF ------------------------


def test_a_float_sar_with_the_default_input_names_the_flag_and_its_choices(tmp_path):
    path = write_tif(tmp_path / "s1.tif", np.full((4, 4), -12.0, np.float32))
    with pytest.raises(DataError) as err:
        load_sar(path, 4)
    message = str(err.value)
    assert path in message and "float32" in message and "--sar_input" in message
    assert "db, power or amplitude" in message
    png16 = save_png(tmp_path / "s1_16.png", np.full((4, 4), 4000, np.uint16))
    with pytest.raises(DataError, match="uint16 values, not 8-bit; --sar_input"):
        load_sar(png16, 4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bands", [1, 3])
def test_an_8_bit_geotiff_gives_the_tensor_of_the_same_png(tmp_path, channels, bands):
    rng = np.random.default_rng(bands)
    image = rng.integers(
        0, 256, (40, 52) if bands == 1 else (40, 52, 3), dtype=np.uint8
    )
    png = save_png(tmp_path / "a.png", image)
    tif = write_tif(
        tmp_path / "a.tif", image if bands == 1 else image.transpose(2, 0, 1)
    )
    for crop, flip in ((None, False), ((36, 0.3, 0.7), True)):
        a = load_sar(png, 32, channels, crop, flip)
        b = load_sar(tif, 32, channels, crop, flip)
        np.testing.assert_array_equal(a, b)
    if bands == 3:
        np.testing.assert_array_equal(load_opt(png, 32), load_opt(tif, 32))


def test_a_16_bit_png_and_geotiff_give_the_same_tensor(tmp_path):
    rng = np.random.default_rng(0)
    amplitude = rng.integers(1, 65535, (40, 52), dtype=np.uint16)  # raw GRD-like
    png = save_png(tmp_path / "a.png", amplitude)
    tif = write_tif(tmp_path / "a.tif", amplitude)
    scaling = Scaling(
        sar_channels=1, sar_input="amplitude", sar_db_range=((40.0, 90.0),)
    )
    a, b = (load_sar(p, 32, scaling=scaling, crop=(36, 0.5, 0.2)) for p in (png, tif))
    np.testing.assert_array_equal(a, b)
    # at native size each pixel is 20 log10(a) mapped from 40..90 dB
    native = load_sar(tif, 40, scaling=scaling, crop=(40, 0.0, 0.0))
    expected = (
        np.clip(20 * np.log10(amplitude[:, :40].astype(np.float64)), 40, 90) - 40
    ) / 50 * 2 - 1
    np.testing.assert_allclose(native[0], expected, atol=1e-5)


# -- clipping: uncalibrated input ----------------------------------------------------


def test_uncalibrated_numbers_trigger_one_warning_naming_the_flag(tmp_path):
    grd = np.random.default_rng(0).uniform(40, 60, (8, 8)).astype(np.float32)
    _, _, stats = load_sar_patch(write_tif(tmp_path / "grd.tif", grd), 8, DB)
    warning = stats.clipping_warning()
    assert (
        warning and "--sar_input" in warning and "above the range -25..0 dB" in warning
    )
    assert f"observed {grd.min():.1f}..{grd.max():.1f} dB" in warning
    # a calibrated image with a few dark pixels stays quiet
    db = np.full((10, 10), -12.0, np.float32)
    db.flat[: int(100 * CLIP_WARN_SHARE)] = -40.0  # exactly 5%: not above it
    _, _, stats = load_sar_patch(write_tif(tmp_path / "ok.tif", db), 10, DB)
    assert stats.clipping_warning() is None


# -- optical -------------------------------------------------------------------------


def test_sentinel_2_bands_and_range(tmp_path):
    bands = np.zeros((13, 4, 4), np.uint16)
    bands[3], bands[2], bands[1] = 3000, 1500, 4500  # B4 (red), B3, B2 (over range)
    path = write_tif(tmp_path / "s2.tif", bands)
    scaling = Scaling(opt_bands=(4, 3, 2), opt_range=(0.0, 3000.0))
    np.testing.assert_allclose(load_opt(path, 4, scaling=scaling)[:, 0, 0], [1, 0, 1])
    with pytest.raises(
        DataError, match="13 bands; pick its red, green and blue bands with --opt_bands"
    ):
        load_opt(path, 4, scaling=Scaling(opt_range=(0.0, 3000.0)))
    with pytest.raises(
        DataError, match="--opt_bands 14,3,2: optical image .* has 13 bands"
    ):
        load_opt(path, 4, scaling=Scaling(opt_bands=(14, 3, 2), opt_range=(0.0, 1.0)))
    rgb16 = write_tif(tmp_path / "rgb16.tif", bands[1:4])
    with pytest.raises(
        DataError, match="uint16 values; give their range with --opt_range"
    ):
        load_opt(rgb16, 4)


# -- unreadable files ------------------------------------------------------------------


def test_truncated_and_foreign_tiffs_are_one_line_errors(tmp_path):
    path = write_tif(tmp_path / "s1.tif", np.random.rand(2, 64, 64).astype(np.float32))
    data = open(path, "rb").read()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    for name in ("cut.tif", "junk.tif"):
        with pytest.raises(DataError) as err:
            read_raster(str(tmp_path / name))
        message = str(err.value)
        assert message.startswith(f"cannot read image {tmp_path / name}")
        assert "replace or remove the file" in message and "\n" not in message


# -- the record: resolved from the first pair, read back by sampling ---------------------


def test_resolve_fixes_band_names_ranges_and_pixel_size(tmp_path):
    sar = write_tif(
        tmp_path / "s1.tif", np.full((2, 4, 4), -10.0, np.float32), names=["VH", "VV"]
    )
    opt = write_tif(tmp_path / "s2.tif", np.zeros((13, 4, 4), np.uint16))
    given = Scaling(
        sar_channels=2, sar_input="db", opt_bands=(4, 3, 2), opt_range=(0.0, 3000.0)
    )
    scaling, facts = resolve(given, sar, opt)
    assert scaling.sar_band_names == ("VV", "VH")
    assert scaling.sar_db_range == ((-25.0, 0.0), (-32.5, 0.0))
    assert facts == {"crs": "EPSG:32632", "pixel_size": [10.0, 10.0]}
    plain = write_tif(
        tmp_path / "plain.tif", np.zeros((4, 4), np.float32), georef=False
    )
    assert (
        resolve(Scaling(sar_channels=1, sar_input="db"), plain)[1]["pixel_size"] is None
    )


def test_sampling_takes_the_record_and_lets_file_settings_differ():
    record = Scaling(
        sar_channels=2, sar_input="db", sar_db_range=((-25.0, 0.0), (-32.5, 0.0)),
        sar_band_names=("VV", "VH"), opt_bands=(4, 3, 2), opt_range=(0.0, 3000.0),
    ).record()  # fmt: skip
    config = {"inputs": record}
    none = dict.fromkeys(settings.names("inputs"))
    scaling, conflicts = input_scaling(config, none, 2)
    assert scaling == Scaling.from_record(record) and conflicts == {}
    given = {**none, "sar_input": "power", "sar_nodata": "0", "sar_db_range": "-20,0"}
    scaling, conflicts = input_scaling(config, given, 2)
    assert scaling.sar_input == "power" and scaling.sar_nodata == 0.0
    assert scaling.sar_db_range == ((-20.0, 0.0),)
    assert list(conflicts) == ["sar_db_range"]  # the model's scaling, not the file's
    # a checkpoint without a record: the flags, else 8-bit as the original
    assert input_scaling(None, none, 3) == (Scaling(), {})


# -- training data: all-nodata patches, reports, SEN12MS trees ------------------------------


def test_an_all_nodata_patch_is_skipped_and_named(tmp_path):
    for i in range(4):
        values = np.full((8, 8), np.nan if i == 1 else -10.0 * (i + 1), np.float32)
        write_tif(tmp_path / "sar" / f"{i}.tif", values)
        save_png(tmp_path / "opt" / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    pairs = find_pairs(str(tmp_path / "sar"), str(tmp_path / "opt"))
    samples = _Samples(
        PairedDataset(pairs, 8, scaling=Scaling(sar_channels=1, sar_input="db"))
    )
    array, stats, skipped = samples[1, 0]
    assert skipped == [str(tmp_path / "sar" / "1.tif")]
    assert stats.path == str(tmp_path / "sar" / "2.tif")  # the next pair instead
    np.testing.assert_allclose(array[0], -1.0)  # pair 2 holds -30 dB: below -25
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    try:
        batches = load_data(
            data_dir_sar=str(tmp_path / "sar"), data_dir_opt=str(tmp_path / "opt"),
            batch_size=4, image_size=8, deterministic=True, num_workers=0,
            scaling=Scaling(sar_channels=1, sar_input="db"),
        )  # fmt: skip
        batch, _ = next(batches)
    finally:
        logger.configure(dir=str(tmp_path / "log2"), format_strs=[])
    # pair 1 is replaced by pair 2: the optical values 0, 2, 2, 3
    assert [round(float(v)) for v in (batch[:, 1, 0, 0] + 1) * 127.5] == [0, 2, 2, 3]
    log = (tmp_path / "log" / "log.txt").read_text()
    assert f"skipped {tmp_path / 'sar' / '1.tif'}: no valid SAR pixel" in log


def sen12ms_cr_names(product, scene=1, patches=(3, 30)):
    roi = "ROIs1158_spring"
    return [
        f"{roi}_{product}/{product}_{scene}/{roi}_{product}_{scene}_p{p}.tif"
        for p in patches
    ]


def test_sen12ms_cr_tree_under_one_root_leaves_other_products_out(tmp_path):
    for s1, s2, cloudy in zip(
        sen12ms_cr_names("s1"), sen12ms_cr_names("s2"), sen12ms_cr_names("s2_cloudy")
    ):
        write_tif(tmp_path / s1, np.zeros((2, 4, 4), np.float32))
        write_tif(tmp_path / s2, np.zeros((13, 4, 4), np.uint16))
        write_tif(tmp_path / cloudy, np.zeros((13, 4, 4), np.uint16))
    write_tif(
        tmp_path / "ROIs1158_spring_lc" / "lc_1" / "ROIs1158_spring_lc_1_p3.tif",
        np.zeros((4, 4, 4), np.uint8),
    )
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    try:
        pairs = find_pairs(str(tmp_path), str(tmp_path))
    finally:
        logger.configure(dir=str(tmp_path / "log2"), format_strs=[])
    assert [os.path.relpath(o, tmp_path) for _, o, _ in pairs] == sen12ms_cr_names("s2")
    log = (tmp_path / "log" / "log.txt").read_text()
    assert "left out 3 file(s) of other products (lc_*, s2_cloudy_*" in log
    notes = []  # the training script logs them once its run folder exists
    assert find_pairs(str(tmp_path), str(tmp_path), notes) == pairs
    assert len(notes) == 1 and "left out 3 file(s)" in notes[0]
