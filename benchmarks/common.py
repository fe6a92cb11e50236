"""
Helpers shared by the benchmarks: the configurations and speed levers they compare,
one process per measured variant, peak memory, the machine's description and the
tables they print and append to RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys

import torch as th

# Nothing of the project's package is imported at the top: bench_reference.py's
# children import this module with another codebase's guided_diffusion on the path.

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(BENCH_DIR, "RESULTS.md")

# Model and diffusion flags of the measured configurations. "small" and "paper" are
# the (the paper's published U-Net and schedule); "tiny" is for --quick.
CONFIGS = {
    "tiny": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16",
        diffusion_steps=50,
    ),
    "small": dict(
        image_size=64, num_channels=64, num_res_blocks=2, diffusion_steps=1000
    ),
    "paper": dict(
        image_size=256,
        num_channels=128,
        num_res_blocks=3,
        learn_sigma=False,
        diffusion_steps=2000,
        noise_schedule="linear",
    ),
}

# The speed levers. Each is off on the slow path, which computes as the original
# does: fp32, contiguous memory, einsum attention, no compile, per-parameter
# AdamW, gradient norm and EMA loops.
LEVERS = {
    "sdpa": "attention through scaled_dot_product_attention (--use_sdpa)",
    "channels_last": "weights and inputs in NHWC memory (--channels_last)",
    "bf16": "bfloat16 autocast (--use_bf16)",
    "compile": "torch.compile (--compile)",
    "fused_optim": "fused AdamW kernel, multi-tensor grad norm and EMA (--fused_optim)",
}

RESULT_PREFIX = "RESULT "


def variant_levers(name, available, skip_compile=False):
    """
    The levers a variant switches on.

    :param name: "slow" (none), "all" (every available lever), "all-LEVER" (all
        but one), or a lever's name.
    :param available: the levers the benchmark measures (keys of LEVERS).
    :param skip_compile: leave compile out of "all" and "all-LEVER".
    :return: a set of lever names.
    :raises ValueError: a name that is none of these.
    """
    every = {lever for lever in available if not (skip_compile and lever == "compile")}
    if name == "slow":
        return set()
    if name == "all":
        return every
    if name.startswith("all-") and name[4:] in available:
        return every - {name[4:]}
    if name not in available:
        raise ValueError(
            f"unknown variant {name!r}: choose slow, all, all-LEVER or a LEVER, "
            f"LEVER one of {', '.join(available)}"
        )
    return {name}


def parse_variants(text, available, skip_compile):
    """The comma-separated variant names of a --variants flag, checked."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        variant_levers(name, available)
    if skip_compile:
        names = [n for n in names if n != "compile"]
    if not names:
        raise ValueError("--variants names no variant to run")
    return names


def add_speed_arguments(parser, batch_help):
    """The flags bench_train.py and bench_sample.py share."""
    from guided_diffusion.script_util import str2bool

    parser.add_argument(
        "--configs", default="small,paper", help="comma-separated: tiny, small, paper"
    )
    parser.add_argument("--batch_size", type=int, default=0, help=batch_help)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--skip_compile", type=str2bool, default=False, help="leave torch.compile out"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per variant process"
    )
    parser.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="append the tables here ('' for nowhere)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny config, one round, no compile: seconds",
    )
    # Set by the parent in the process that measures one variant.
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)


def check_speed_arguments(parser, args, available):
    """Apply --quick, check --configs and --variants; sets args.variant_list."""
    if args.quick:
        args.configs, args.skip_compile = "tiny", True
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(
            f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}"
        )
    try:
        args.variant_list = parse_variants(args.variants, available, args.skip_compile)
    except ValueError as err:
        parser.error(f"--variants: {err}")


def run_rounds(script, variants, rounds, child_args, timeout, label, alternate=False):
    """
    Run every variant in a process of its own, in turn, ``rounds`` times.

    :param script: the benchmark script, run as ``script --variant NAME *child_args``.
    :param alternate: reverse the order of the variants every other round, so that
        none always runs first (after a pause) or second (after the other's load).
    :return: variant name -> list of the dicts its processes printed (one per round).
    """
    results = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[::-1] if alternate and r % 2 else variants
        for variant in order:
            print(f"{label}: round {r + 1}/{rounds}, {variant} ...", flush=True)
            results[variant].append(
                run_variant_process(
                    script, ["--variant", variant, *child_args], timeout
                )
            )
    return results


def machine_description():
    """One line: CPU model, cores, torch threads, GPU, torch version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    usable = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    parts = [
        f"CPU {cpu}",
        f"{usable} usable cores of {os.cpu_count()}",
        f"{th.get_num_threads()} torch threads",
    ]
    if th.cuda.is_available():
        parts.append(f"GPU {th.cuda.get_device_name()}")
    parts.append(f"torch {th.__version__}")
    parts.append(datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    return ", ".join(parts)


def markdown_table(header, rows):
    """A Markdown table of string cells, columns padded to line up."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def report(title, table, notes, results_path):
    """
    Print a table with its title, the machine and notes, and append the same
    section to ``results_path`` (none when it is empty).
    """
    # As typed in the repository's root; the arguments as the user gave them.
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(BENCH_DIR))
    command = " ".join(shlex.quote(a) for a in ["python", script, *sys.argv[1:]])
    section = "\n".join(
        [
            f"## {title}",
            "",
            f"Machine: {machine_description()}.  ",
            f"Command: `{command}`",
            "",
            table,
            "",
            *[f"- {note}" for note in notes],
            "",
        ]
    )
    print(section, flush=True)
    if results_path:
        new = not os.path.exists(results_path)
        with open(results_path, "a", encoding="utf-8") as f:
            if new:
                f.write(
                    "# Benchmark results\n\nAppended by the scripts in benchmarks/ (see README.md).\n\n"
                )
            f.write(section + "\n")
        print(f"appended to {results_path}", flush=True)


def synchronize(device):
    """Wait for the device's queued work, so that a clock reading covers it."""
    if device.type == "cuda":
        th.cuda.synchronize(device)


def _max_rss_mib():
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class PeakMemory:
    """
    The peak memory of this process: over its whole life and over a window that
    :meth:`start_window` opens (after warm-up and compiling, say). On the CPU this
    is the peak resident set size (ru_maxrss; Linux resets it for the window through
    /proc/self/clear_refs), on a GPU torch.cuda.max_memory_allocated.
    """

    def __init__(self, device):
        self.device = device
        self.before_window = None
        self.window_supported = True

    def _now(self):
        if self.device.type == "cuda":
            return th.cuda.max_memory_allocated(self.device) / 2**20
        return _max_rss_mib()

    def start_window(self):
        """Begin the window: from here on :meth:`read` also reports its own peak."""
        self.before_window = self._now()
        if self.device.type == "cuda":
            th.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS to the current RSS (Linux)
        except OSError:
            self.window_supported = False

    def read(self):
        """(peak MiB over the process's life, peak MiB since start_window or None)."""
        now = self._now()
        if self.before_window is None:
            return now, None
        window = now if self.window_supported else None
        return max(self.before_window, now), window


def print_result(result):
    """How a variant's process hands its figures to the parent: one marked JSON line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_variant_process(script, args, timeout):
    """
    Run ``python script args`` and return the dict it printed with
    :func:`print_result`, or {"error": why} when it failed, printed none or timed out.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, script, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    # The last line a failed Python process writes is usually the exception.
    lines = [
        text
        for stream in (proc.stdout, proc.stderr)
        for text in stream.splitlines()
        if text.strip()
    ]
    return {
        "error": f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'}"
    }


def short_error(err):
    """An exception as one short table cell."""
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."
