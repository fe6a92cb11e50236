"""logger: run folder choice, output formats, progress.csv, resume, rank pooling."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from guided_diffusion import logger


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Each test in its own directory, without the caller's logger settings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.delenv("OPENAI_LOG_FORMAT", raising=False)
    monkeypatch.setattr(logger, "_current", None)
    yield
    logger.get_current().close()


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _dump(**kvs):
    logger.logkvs(kvs)
    return logger.dumpkvs()


def test_openai_logdir_is_used(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPENAI_LOGDIR", "runs/exp1")
    logger.configure()
    expected = str(tmp_path / "runs" / "exp1")
    assert logger.get_dir() == expected
    assert os.path.isdir(expected)
    assert capsys.readouterr().out.splitlines()[0] == f"Logging to {expected}"


def test_default_is_new_timestamped_folder_under_logs(tmp_path, capsys):
    logger.configure()
    run_dir = logger.get_dir()
    assert os.path.dirname(run_dir) == str(tmp_path / "logs")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", os.path.basename(run_dir)
    )
    assert os.path.isdir(run_dir)
    assert capsys.readouterr().out.splitlines()[0] == f"Logging to {run_dir}"


def test_runs_started_in_the_same_second_get_distinct_folders(monkeypatch, tmp_path):
    monkeypatch.setattr(logger, "_timestamp", lambda: "2026-11-26_07-30-12")
    folders = []
    for _ in range(3):
        logger.configure(format_strs=["csv"])
        folders.append(logger.get_dir())
    assert len(set(folders)) == 3
    assert sorted(os.listdir(tmp_path / "logs")) == [
        "2026-11-26_07-30-12",
        "2026-11-26_07-30-12-1",
        "2026-11-26_07-30-12-2",
    ]


def test_log_format_env_picks_outputs(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "run"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "json,csv")
    logger.configure()
    _dump(step=3, loss=0.5)
    logger.log("a message")
    assert sorted(os.listdir(tmp_path / "run")) == ["progress.csv", "progress.json"]
    with open(tmp_path / "run" / "progress.json") as f:
        assert [json.loads(line) for line in f] == [{"step": 3, "loss": 0.5}]
    # Without "stdout" only the folder is announced: no table, no messages.
    assert capsys.readouterr().out == f"Logging to {tmp_path / 'run'}\n"


def test_log_txt_holds_messages_and_tables(tmp_path, capsys):
    logger.configure(dir=str(tmp_path / "run"), format_strs="stdout,log")
    logger.log("hello", 42)
    _dump(loss=0.123456789)
    logger.set_level(logger.WARN)
    logger.info("dropped")
    logger.warn("kept")
    out = capsys.readouterr().out
    text = (tmp_path / "run" / "log.txt").read_text()
    assert text == out
    lines = text.splitlines()
    assert lines[0] == f"Logging to {tmp_path / 'run'}"
    assert lines[1] == "hello 42"
    assert "| loss | 0.123 |" in lines
    assert "dropped" not in text and lines[-1] == "kept"


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="'tensorbored'"):
        logger.configure(dir="run", format_strs=["stdout", "tensorbored"])


def test_progress_csv_after_two_dumps(tmp_path):
    logger.configure(dir="run", format_strs=["csv"])
    first = _dump(step=0, loss=0.5)
    logger.logkv("step", 1)
    for value in (1.0, 2.0, 6.0):
        logger.logkv_mean("loss", value)
    second = logger.dumpkvs()
    assert first == {"step": 0, "loss": 0.5}
    assert second == {"step": 1, "loss": 3.0}
    header, rows = _read_csv(tmp_path / "run" / "progress.csv")
    assert header == ["loss", "step"]
    assert rows == [["0.5", "0"], ["3.0", "1"]]


def test_new_key_mid_run_extends_header_and_keeps_rows(tmp_path):
    logger.configure(dir="run", format_strs=["csv"])
    _dump(step=0, loss=0.5)
    _dump(step=1, loss=0.25, grad_norm=2.0, fid=30.0)
    _dump(step=2, loss=0.125)
    header, rows = _read_csv(tmp_path / "run" / "progress.csv")
    assert header == ["loss", "step", "fid", "grad_norm"]
    assert rows == [
        ["0.5", "0", "", ""],
        ["0.25", "1", "30.0", "2.0"],
        ["0.125", "2", "", ""],
    ]


def test_append_keeps_old_rows_and_default_truncates(tmp_path):
    logger.configure(dir="run", format_strs=["csv", "log"])
    _dump(step=0, loss=0.5)
    logger.configure(dir="run", format_strs=["csv", "log"], append=True)
    _dump(step=1, loss=0.25, lr=1e-4)
    header, rows = _read_csv(tmp_path / "run" / "progress.csv")
    assert header == ["loss", "step", "lr"]
    assert rows == [["0.5", "0", ""], ["0.25", "1", "0.0001"]]
    log_lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert "| step | 0   |" in log_lines and "| step | 1      |" in log_lines

    logger.configure(dir="run", format_strs=["csv", "log"])
    _dump(step=2, loss=0.125)
    header, rows = _read_csv(tmp_path / "run" / "progress.csv")
    assert header == ["loss", "step"]
    assert rows == [["0.125", "2"]]
    assert "| step | 0   |" not in (tmp_path / "run" / "log.txt").read_text()


# Each rank logs different losses; rank 0 has two values, rank 1 one, so the
# pooled mean (1 + 2 + 6) / 3 = 3 differs from the mean of rank means 3.75.
# Each rank writes its report to its own file: lines that two ranks print to
# one pipe can interleave, and then rank 0's stdout is all that is on the pipe.
WORKER = r"""
import json
from guided_diffusion import dist_util, logger

dist_util.setup_dist()
rank = dist_util.get_rank()
logger.configure(format_strs=["stdout", "log", "csv"])
for value in ([1.0, 2.0] if rank == 0 else [6.0]):
    logger.logkv_mean("loss", value)
logger.logkv("rank", rank)
dumped = logger.dumpkvs()
logger.log("only rank 0 says this")
with open(f"report-{rank}.json", "w") as f:
    json.dump(dict(rank=rank, dir=logger.get_dir(), dumped=dumped), f)
dist_util.cleanup()
"""


@pytest.mark.skipif(
    shutil.which("mpiexec") is None, reason="no mpiexec (pip install mpich)"
)
def test_logkv_mean_pools_two_ranks_under_mpiexec(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "OPENAI_LOGDIR", "OPENAI_LOG_FORMAT")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = sorted(
        (json.loads(path.read_text()) for path in tmp_path.glob("report-*.json")),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["dumped"] for r in reports] == [{"rank": 0, "loss": 3.0}] * 2

    # Rank 0 chose one folder and both ranks use it; nothing else was created.
    (run_name,) = os.listdir(tmp_path / "logs")
    run_dir = str(tmp_path / "logs" / run_name)
    assert [r["dir"] for r in reports] == [run_dir, run_dir]
    assert sorted(os.listdir(run_dir)) == ["log.txt", "progress.csv"]
    assert _read_csv(os.path.join(run_dir, "progress.csv")) == (
        ["loss", "rank"],
        [["3.0", "0"]],
    )

    # Rank 0 printed exactly what it wrote to log.txt, once, and rank 1 printed
    # nothing: any line of rank 1 would make stdout differ from the file.
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert proc.stdout == f.read()
    lines = proc.stdout.splitlines()
    assert lines[0] == f"Logging to {run_dir}"
    assert lines.count("only rank 0 says this") == 1
    assert sum(line.startswith("| loss") for line in lines) == 1
