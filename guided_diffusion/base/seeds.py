"""
Seeds from strings: the one recipe every per-image, per-band, per-sample and
per-step seed of the project is drawn with.

The parts (the run's seed, then what names the thing seeded, e.g. an image's
relative path or "scene band 3") are written as text joined by NUL bytes, and
hashed with SHA-256. The digest is the same in every process and on every
machine, where Python's ``hash`` is salted per process and a seed added to an
index collides with a neighbouring run's seeds.

The strings are part of the results: changing one, or how the parts are joined,
changes every image drawn from it. This module imports nothing from the package,
so every layer may use it.
"""

import hashlib


def hashed_words(*parts, count=1):
    """
    Unsigned 64-bit integers read from SHA-256 of the parts.

    :param parts: the values hashed, each written with ``f"{part}"`` and joined by
        ``"\\0"``, UTF-8 encoded.
    :param count: how many integers, 1 to 4 (the digest holds 32 bytes).
    :return: a tuple of ``count`` integers, bytes 8 i to 8 i + 8 of the digest read
        big-endian.
    """
    if not 1 <= count <= 4:
        raise ValueError(f"count={count}: a SHA-256 digest holds 1 to 4 64-bit words")
    text = "\0".join(f"{part}" for part in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return tuple(
        int.from_bytes(digest[i : i + 8], "big") for i in range(0, 8 * count, 8)
    )


def hashed_seed(*parts):
    """
    A 63-bit seed from the parts: the first word of :func:`hashed_words` shifted
    right by one, so that it is a non-negative int64 (what ``torch.Generator``
    and numpy take).

    :param parts: as for :func:`hashed_words`, e.g. ``(seed, name)``.
    :return: an integer in [0, 2**63).
    """
    return hashed_words(*parts)[0] >> 1
