"""
Which files are images, and the images of a folder: one rule for every job.

Training, sampling, evaluation and the page all find their images here, so a
folder holds the same images whichever job reads it:

* an image has one of :data:`IMAGE_EXTENSIONS`, in any letter case
  (``12.PNG`` and ``scene.TIF`` are images);
* hidden entries are not: a file or folder whose name starts with ``.``
  (``.DS_Store``, macOS's ``._12.png`` companions, anything under ``.cache/``);
* symbolic links are followed, as datasets are often linked into place;
* the order is :func:`natural_key`'s, numbers by value (``2.png`` before
  ``10.png``), as the original code sorted its numbered files.

The module imports only the standard library: it sits at the bottom of the
package, under ``rasters`` and ``image_datasets``.
"""

from __future__ import annotations

import os
import re

# Read by Pillow when 8-bit (rasters.py); TIFF and GeoTIFF by rasterio.
PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS + TIFF_EXTENSIONS


def is_image_name(name: str) -> bool:
    """Whether a file name (no folder) is an image's: not hidden, an image extension."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def natural_key(path: str) -> tuple:
    """
    Sort key that orders the numbers inside names by value ("2.png" before "10.png").

    :param path: a relative path with "/" separators.
    :return: a key comparing folder by folder, digits as integers, text
        case-insensitively; the path itself breaks ties ("01.png" vs "1.png")
        so the order is total.
    """
    parts = []
    for component in path.split("/"):
        # re.split with a group alternates text and digits, starting with text,
        # so the same positions hold the same types in every key
        pieces = re.split(r"(\d+)", component)
        parts.append(
            tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(pieces))
        )
    return tuple(parts), path


def list_images(folder: str, recursive: bool = True) -> list[str]:
    """
    The images of a folder, by the rule of this module's docstring.

    :param folder: the folder to search; a missing folder holds no images.
    :param recursive: search the subfolders too (hidden ones excepted).
    :return: the images' paths relative to ``folder`` with "/" separators, in
        :func:`natural_key` order.
    """
    names = []
    seen = set()  # real paths of the folders walked: a link cycle is walked once
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        rel_root = os.path.relpath(root, folder)
        for f in files:
            if is_image_name(f):
                rel = f if rel_root == "." else os.path.join(rel_root, f)
                names.append(rel.replace(os.sep, "/"))
    return sorted(names, key=natural_key)
