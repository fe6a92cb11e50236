"""
Atomic writes: every file the project writes is either its old self or its new self.

The one recipe (:func:`temporary_path`): write into a temporary file in the same
folder, fsync it, rename it over the destination and fsync the folder (where the OS
allows), so that a crash, a kill or a full disk at any moment leaves the destination
as it was. On a failure the temporary file is removed. A full disk (ENOSPC, or EDQUOT
for a quota) becomes :class:`DiskFull`, whose message names the file and the disk
with its free bytes; that includes the RuntimeError torch's zip writer raises when
``th.save``'s own writes have just failed for lack of space, and the error GDAL
raises for a GeoTIFF (which names no errno: an I/O error on a disk left with less
than :data:`NEARLY_FULL` bytes is taken for a full one).

This module imports nothing from the package, so every layer may use it.
"""

import contextlib
import errno
import json
import os
import shutil

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))

# A disk with less free space than this after a failed write was full for it: more
# than the largest block a writer (GDAL's tiles, torch's zip records) writes at once.
NEARLY_FULL = 16 * 2**20


class DiskFull(OSError):
    """A write that failed because the disk (or the user's quota) is full."""

    def __init__(self, path, message=None):
        self.path = path
        super().__init__(errno.ENOSPC, message or _describe(path))

    def __str__(self):
        return self.strerror


def write_atomic(path, write, suffix=""):
    """
    Call ``write(file)`` on a temporary binary file beside ``path``, then make it
    ``path``, durably. The folder of ``path`` is made when missing.

    :param write: a function of one open binary file, e.g. ``lambda f: th.save(obj, f)``.
    :param suffix: ends the temporary file's name, for writers that choose the format
        by the extension (``".png"``).
    :raises DiskFull: when the disk is full; ``path`` is then as it was.
    """
    with temporary_path(path, suffix) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return path


@contextlib.contextmanager
def temporary_path(path, suffix=""):
    """
    A temporary file name beside ``path`` for a writer that opens files by name
    (rasterio): when the ``with`` block ends without an error, the file written
    there is fsync'd and made ``path``, durably; on an error it is removed. The
    folder of ``path`` is made when missing.

    :param suffix: ends the temporary file's name (``".tif"``).
    :raises DiskFull: when the disk is full; ``path`` is then as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        os.makedirs(folder, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and (
            is_disk_full(err)
            or (isinstance(err, (OSError, RuntimeError)) and _nearly_full(folder))
        )
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFull(path) from err
        raise
    _fsync_folder(folder)


def write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(data))


def write_text(path, text):
    """Write ``text`` to ``path`` atomically, as UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, value, **dump_options):
    """Write ``value`` as JSON to ``path`` atomically (``dump_options`` go to json.dumps)."""
    return write_text(path, json.dumps(value, **dump_options))


def is_disk_full(err):
    """
    Whether ``err`` (or an exception it was raised from or during) is a full disk: an
    OSError with ENOSPC/EDQUOT, or an error whose text says so (torch's C++ writers).
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if any(text in str(err) for text in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_of(path):
    """The mount point of the disk that holds ``path`` (its nearest existing folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    while not os.path.ismount(folder):
        folder = os.path.dirname(folder)
    return folder


def _describe(path):
    disk = disk_of(path)
    try:
        free = f"{shutil.disk_usage(disk).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return f"disk full: could not write {path} (the disk at {disk} has {free})"


def _nearly_full(folder):
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def _fsync_file(path):
    # Any descriptor of the file flushes all of its data; a writable one, since
    # some systems refuse to fsync a read-only one.
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    # Makes the rename itself durable; not every OS lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
