"""
One rule for which files of a folder are images (guided_diffusion/base/image_files.py),
checked against a folder built here and a list of what it holds written by hand.
"""

import os

import pytest

from guided_diffusion.base.image_files import (
    IMAGE_EXTENSIONS,
    is_image_name,
    list_images,
)
from guided_diffusion.evaluation import metrics
from guided_diffusion.image_datasets import find_pairs

# Every file of the test folder; the images among them are IMAGES.
FILES = [
    "10.png",
    "2.png",
    "1.PNG",
    "B.jpg",
    "a.tif",
    "c.TIFF",
    "d.JpEg",
    "e.bmp",
    "f.webp",
    "notes.txt",
    "scene.tif.aux.xml",
    "png",
    ".DS_Store",
    "._2.png",
    ".hidden.png",
    ".cache/3.png",
    "sub/.thumbs/4.png",
    "sub/20.png",
    "sub/3.png",
    "sub/x.tiff",
    "sub/deeper/7.Png",
]

# Written by hand: the images, numbers by value, letters regardless of case,
# folder by folder.
IMAGES = [
    "1.PNG",
    "2.png",
    "10.png",
    "a.tif",
    "B.jpg",
    "c.TIFF",
    "d.JpEg",
    "e.bmp",
    "f.webp",
    "sub/3.png",
    "sub/20.png",
    "sub/deeper/7.Png",
    "sub/x.tiff",
]


def make_tree(root, files=FILES):
    for name in files:
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"")  # listing never opens a file


def test_lists_the_images_in_natural_order(tmp_path):
    make_tree(tmp_path)
    assert list_images(str(tmp_path)) == IMAGES


def test_lists_one_folder_without_its_subfolders(tmp_path):
    make_tree(tmp_path)
    assert list_images(str(tmp_path), recursive=False) == [
        n for n in IMAGES if "/" not in n
    ]


def test_missing_folder_holds_no_images(tmp_path):
    assert list_images(str(tmp_path / "absent")) == []


def test_follows_links_and_walks_a_link_cycle_once(tmp_path):
    make_tree(tmp_path / "data", ["1.png", "sub/2.png"])
    os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "back")
    os.symlink(tmp_path / "data", tmp_path / "linked")
    assert list_images(str(tmp_path / "linked")) == ["1.png", "sub/2.png"]


@pytest.mark.parametrize("name", ["x.PNG", "x.Tif", "x.JPG", "x.webp", "x.tiff"])
def test_an_extension_in_any_case_is_an_image(name):
    assert is_image_name(name)


@pytest.mark.parametrize("name", [".DS_Store", "._x.png", ".x.png", "x.txt", "png"])
def test_hidden_files_and_other_files_are_not_images(name):
    assert not is_image_name(name)


def test_one_definition_of_the_extensions():
    from guided_diffusion import image_datasets
    from guided_diffusion.io import rasters
    from guided_diffusion.page import app

    assert set(IMAGE_EXTENSIONS) == {
        ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"
    }  # fmt: skip
    assert set(rasters.PILLOW_EXTENSIONS) < set(IMAGE_EXTENSIONS)
    assert set(app.INPUT_EXTENSIONS) == set(IMAGE_EXTENSIONS)
    assert not hasattr(image_datasets, "IMG_EXTENSIONS")


def test_evaluation_and_training_pair_the_same_images(tmp_path):
    # the same tree on both sides: every image pairs with its namesake, and
    # evaluation must see exactly the pairs that training and sampling see
    make_tree(tmp_path / "gen")
    make_tree(tmp_path / "gt")
    gen, gt = str(tmp_path / "gen"), str(tmp_path / "gt")
    expected = [
        (os.path.join(gen, *n.split("/")), os.path.join(gt, *n.split("/")))
        for n in IMAGES
    ]
    assert [(s, o) for s, o, _ in find_pairs(gen, gt)] == expected
    assert [(g, t) for _, g, t in metrics.pair_folders(gen, gt)] == expected
    assert list(metrics.list_images(gen).values()) == [p for p, _ in expected]
