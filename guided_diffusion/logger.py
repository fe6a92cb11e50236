"""
Run logger with guided-diffusion's API: key/value diagnostics dumped as a
table (stdout, log.txt), as rows (progress.csv) or as JSON lines
(progress.json), plus free-form messages.

The run folder is ``configure(dir=...)``, else ``$OPENAI_LOGDIR``, else a new
timestamped folder under ``./logs/`` (never the system temp dir, where runs
get deleted). Only rank 0 writes files or prints; other ranks print errors.
"""

import csv
import datetime
import io
import json
import os
import sys

from . import dist_util
from .base.atomic import write_text

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

DEFAULT_FORMATS = "stdout,log,csv"


class _TextOutput:
    """Messages and a key/value table, written to stdout or to a text file."""

    def __init__(self, path=None, append=False):
        # stdout is looked up at each write so redirections made later still apply.
        self.file = (
            open(path, "a" if append else "w", encoding="utf-8")
            if path is not None
            else None
        )

    def _write(self, text):
        stream = self.file if self.file is not None else sys.stdout
        stream.write(text)
        stream.flush()

    def write_message(self, text):
        self._write(text + "\n")

    def write_kvs(self, kvs):
        if not kvs:
            return
        rows = [
            (_truncate(str(k)), _truncate(_compact(v))) for k, v in sorted(kvs.items())
        ]
        key_width = max(len(k) for k, _ in rows)
        val_width = max(len(v) for _, v in rows)
        rule = "-" * (key_width + val_width + 7)
        lines = [rule]
        lines += [f"| {k:<{key_width}} | {v:<{val_width}} |" for k, v in rows]
        lines.append(rule)
        self._write("\n".join(lines) + "\n")

    def close(self):
        if self.file is not None:
            self.file.close()


class _CSVOutput:
    """One row per dump; a key first seen mid-run extends the header."""

    def __init__(self, path, append=False):
        self.path = path
        self.keys = []
        if append and os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                self.keys = next(csv.reader(f), [])
        else:
            open(path, "w", encoding="utf-8").close()

    def write_kvs(self, kvs):
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._extend_header(new_keys)
        # Opened per dump, so each row is on disk as soon as it is dumped.
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_plain(kvs.get(k, "")) for k in self.keys])

    def _extend_header(self, new_keys):
        with open(self.path, newline="", encoding="utf-8") as f:
            old_rows = list(csv.reader(f))[1:]
        self.keys.extend(new_keys)
        padding = [""] * len(new_keys)
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(self.keys)
        writer.writerows(row + padding for row in old_rows)
        # A crash mid-rewrite leaves the old file intact.
        write_text(self.path, text.getvalue())

    def close(self):
        pass


class _JSONOutput:
    """One JSON object per line and per dump."""

    def __init__(self, path, append=False):
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def write_kvs(self, kvs):
        self.file.write(json.dumps({k: _plain(v) for k, v in kvs.items()}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _plain(value):
    """Tensors and numpy scalars as Python numbers, so every output can print them."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _compact(value):
    value = _plain(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _truncate(text, width=30):
    return text if len(text) <= width else text[: width - 3] + "..."


def _make_output(name, folder, log_suffix, append):
    if name == "stdout":
        return _TextOutput()
    if name == "log":
        return _TextOutput(os.path.join(folder, f"log{log_suffix}.txt"), append)
    if name == "csv":
        return _CSVOutput(os.path.join(folder, f"progress{log_suffix}.csv"), append)
    if name == "json":
        return _JSONOutput(os.path.join(folder, f"progress{log_suffix}.json"), append)
    raise ValueError(
        f"unknown log format {name!r} (from format_strs or $OPENAI_LOG_FORMAT): "
        "use a comma-separated list of stdout, log, csv, json"
    )


class Logger:
    """
    Collects key/values between dumps and sends them and messages to outputs.

    :param dir: absolute run folder, or None for a logger without files.
    :param output_formats: list of outputs made by ``_make_output``.
    :param is_main: whether this is rank 0 (other ranks only print errors).
    """

    def __init__(self, dir, output_formats, is_main=True):
        self.dir = dir
        self.output_formats = output_formats
        self.is_main = is_main
        self.level = INFO
        self.values = {}
        # key -> [sum, count] for logkv_mean, kept apart so that ranks can
        # pool them with the right weights.
        self.sums = {}

    def logkv(self, key, val):
        self.values[key] = val

    def logkv_mean(self, key, val):
        total = self.sums.setdefault(key, [0.0, 0])
        total[0] += val
        total[1] += 1

    def dumpkvs(self):
        kvs = {k: _plain(v) for k, v in self.values.items()}
        local = {k: (float(s), n) for k, (s, n) in self.sums.items()}
        if dist_util.get_world_size() > 1:
            # One collective carries both: rank 0's plain values and every
            # rank's (sum, count) pairs.
            gathered = dist_util.all_gather_object(
                (kvs if self.is_main else None, local)
            )
            kvs = gathered[0][0]
            pooled = {}
            for _, sums in gathered:
                for k, (s, n) in sums.items():
                    acc = pooled.setdefault(k, [0.0, 0])
                    acc[0] += s
                    acc[1] += n
        else:
            pooled = local
        kvs.update({k: s / n for k, (s, n) in pooled.items()})
        for fmt in self.output_formats:
            fmt.write_kvs(kvs)
        self.values.clear()
        self.sums.clear()
        return kvs

    def log(self, *args, level=INFO):
        if level < self.level:
            return
        text = " ".join(map(str, args))
        if self.is_main:
            for fmt in self.output_formats:
                if isinstance(fmt, _TextOutput):
                    fmt.write_message(text)
        elif level >= ERROR:
            print(f"[rank {dist_util.get_rank()}] {text}", file=sys.stderr, flush=True)

    def set_level(self, level):
        self.level = level

    def close(self):
        for fmt in self.output_formats:
            fmt.close()


_current = None


def _timestamp():
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _new_run_dir(parent):
    """Create and return a fresh folder named after the current time under ``parent``."""
    os.makedirs(parent, exist_ok=True)
    stamp = _timestamp()
    attempt = 0
    while True:
        path = os.path.join(parent, stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            # mkdir is atomic, so two runs started in the same second cannot
            # both claim the same name.
            os.mkdir(path)
            return path
        except FileExistsError:
            attempt += 1


def _choose_dir(dir):
    dir = dir or os.environ.get("OPENAI_LOGDIR")
    if dir:
        dir = os.path.abspath(os.path.expanduser(dir))
        os.makedirs(dir, exist_ok=True)
        return dir
    return _new_run_dir(os.path.abspath("logs"))


def configure(dir=None, format_strs=None, log_suffix="", append=False):
    """
    Start logging to a run folder; prints ``Logging to <folder>`` first.

    With several ranks this is collective: every rank must call it, rank 0
    picks the folder and the others get the same one.

    :param dir: the run folder; default ``$OPENAI_LOGDIR``, else a new
        ``./logs/<date>_<time>`` folder.
    :param format_strs: outputs among "stdout", "log" (log.txt), "csv"
        (progress.csv), "json" (progress.json); a list or a comma-separated
        string. Default ``$OPENAI_LOG_FORMAT``, else "stdout,log,csv".
    :param log_suffix: inserted before the file extensions (log{suffix}.txt).
    :param append: add to existing log/progress files (resuming a run)
        instead of starting them afresh.
    """
    global _current
    is_main = dist_util.is_main_process()
    folder = _choose_dir(dir) if is_main else None
    folder = dist_util.broadcast_object(folder)

    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT") or DEFAULT_FORMATS
    if isinstance(format_strs, str):
        format_strs = format_strs.split(",")
    names = [name.strip() for name in format_strs if name.strip()]
    outputs = (
        [_make_output(n, folder, log_suffix, append) for n in names] if is_main else []
    )

    if _current is not None:
        _current.close()
    _current = Logger(folder, outputs, is_main)
    if is_main and "stdout" not in names:
        # The folder is announced even when the table does not go to stdout.
        print(f"Logging to {folder}", flush=True)
    log(f"Logging to {folder}")


def get_current():
    """The active :class:`Logger`; before :func:`configure`, one that only prints."""
    global _current
    if _current is None:
        is_main = dist_util.is_main_process()
        _current = Logger(None, [_TextOutput()] if is_main else [], is_main)
    return _current


def get_dir():
    """Absolute path of the run folder, or None before :func:`configure`."""
    return get_current().dir


def logkv(key, val):
    """
    Record a value for the next dump; a later call with the same key replaces
    it. With several ranks, rank 0's value is the one dumped.

    :param key: column name.
    :param val: a number (or anything printable).
    """
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """
    Add a value to a running mean that is dumped at the next dump, averaged
    over all calls on all ranks.

    :param key: column name.
    :param val: a number or a one-element tensor.
    """
    get_current().logkv_mean(key, val)


def logkvs(d):
    """
    :param d: a dict of key/values to :func:`logkv`.
    """
    for key, val in d.items():
        logkv(key, val)


def dumpkvs():
    """
    Write the recorded key/values as one row/table and clear them.
    Collective with several ranks: every rank must call it.

    :return: the dict written (the same on every rank).
    """
    return get_current().dumpkvs()


def log(*args, level=INFO):
    """
    Write a message (the args joined by spaces) to stdout and log.txt.

    :param level: DEBUG, INFO, WARN or ERROR; messages below the current
        level (see :func:`set_level`) are dropped.
    """
    get_current().log(*args, level=level)


def debug(*args):
    """:func:`log` at level DEBUG; ``args`` are joined by spaces."""
    log(*args, level=DEBUG)


def info(*args):
    """:func:`log` at level INFO; ``args`` are joined by spaces."""
    log(*args, level=INFO)


def warn(*args):
    """:func:`log` at level WARN; ``args`` are joined by spaces."""
    log(*args, level=WARN)


def error(*args):
    """:func:`log` at level ERROR; ``args`` are joined by spaces."""
    log(*args, level=ERROR)


def set_level(level):
    """
    :param level: the lowest level of message that is written (default INFO).
    """
    get_current().set_level(level)


record_tabular = logkv
dump_tabular = dumpkvs
