"""
Seeds from strings: the helper against hashlib, and every seed the project draws
with it against numbers recorded before the recipe moved into one place (so that
every image stays the same to the bit).
"""

import hashlib

import numpy as np
import pytest

from guided_diffusion.base.seeds import hashed_seed, hashed_words
from guided_diffusion.translation.samples import seed_of_sample
from guided_diffusion.translation.sampling import sample_seed
from guided_diffusion.translation.scene import band_seed, scene_sample_seed, step_shift


@pytest.mark.parametrize(
    "parts, text",
    [
        ((7, "a/p30.png"), "7\0a/p30.png"),
        ((0, "é/x.tif", 3), "0\0é/x.tif\x003"),
        ((-5, "scene band 2"), "-5\0scene band 2"),
        (("only",), "only"),
    ],
)
def test_hashed_words_and_seed_are_sha256_of_the_joined_text(parts, text):
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    words = [int(digest[i : i + 8].hex(), 16) for i in range(0, 32, 8)]
    assert hashed_words(*parts, count=4) == tuple(words)
    assert hashed_words(*parts) == (words[0],)
    assert hashed_seed(*parts) == words[0] // 2
    assert 0 <= hashed_seed(*parts) < 2**63


def test_hashed_words_refuses_more_than_a_digest_holds():
    with pytest.raises(ValueError, match="count=5"):
        hashed_words(1, count=5)


# Recorded with the code before issue 22, where each function hashed its own string.


def test_image_seeds_are_unchanged():
    assert sample_seed(7, "a/p30.png") == 5243378501971487718
    assert sample_seed(0, "é/x.tif") == 3603139587353099731
    assert sample_seed(7, "S1/ROIs_p30.TIF") == 6296051605483507285
    assert seed_of_sample(7, "a/p30.png", 0) == 5243378501971487718
    assert seed_of_sample(7, "a/p30.png", 1) == 8057290367883361937
    assert seed_of_sample(7, "a/p30.png", 2) == 4129628141786455264
    assert seed_of_sample(3, "S1/ROIs_p30.TIF", 4) == 8548997795468832213


def test_scene_seeds_are_unchanged():
    assert band_seed(7, 0) == 5741378473671786705
    assert band_seed(7, 3) == 5048981784997688369
    assert band_seed(0, np.int64(2)) == 7468310699822270940
    assert scene_sample_seed(7, 0) == 7
    assert scene_sample_seed(7, 1) == 4731145895414599625
    assert scene_sample_seed(7, 2) == 8012780450223748573


def test_tile_shifts_are_unchanged():
    assert step_shift(7, 0, 8) == (4, 7)
    assert step_shift(7, 5, 8) == (6, 1)
    assert step_shift(1, 12, 31) == (11, 4)
    assert step_shift(0, 3, 0) == (0, 0)
