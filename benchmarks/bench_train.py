"""
Training throughput of the speed levers: images per second and peak memory of
TrainLoop.run_step (forward, backward, AdamW step, EMA update) for the slow path,
each lever alone and all of them together, at the small configuration (64 px,
64 channels, 2 residual blocks, batch 8) and the paper's (256 px, 128 channels,
3 residual blocks, 2000 steps, batch 2).

    python benchmarks/bench_train.py                       # both, see README.md for the time
    python benchmarks/bench_train.py --configs small --rounds 3
    python benchmarks/bench_train.py --quick --results smoke.md   # a smoke test

Every variant runs in a process of its own, so that its peak memory is its own;
the variants take turns, round after round, so that drift of the machine (other
load, heat) hits them all alike. Each process times --steps steps after --warmup
steps (compiling happens in the warm-up and is not timed).
"""

import argparse
import os
import statistics
import sys
import time

import common
import torch as th

from guided_diffusion import dist_util
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.train_util import TrainLoop

TRAIN_LEVERS = ("sdpa", "channels_last", "bf16", "compile", "fused_optim")
DEFAULT_VARIANTS = (
    "slow,sdpa,channels_last,bf16,compile,fused_optim,all,all-channels_last"
)
BATCH = {"tiny": 2, "small": 8, "paper": 2}
# (warm-up steps, timed steps, rounds) per configuration: the paper's step takes
# tens of seconds on two CPU cores.
SCHEDULE = {"tiny": (1, 1, 1), "small": (2, 5, 2), "paper": (1, 2, 2)}


def measure(config, levers, batch_size, warmup, steps):
    """
    Time training steps of one variant in this process.

    :return: a dict of images_per_s, s_per_step, peak_mib and window_peak_mib (the
        peak over the timed steps alone).
    """
    dist_util.setup_dist()
    device = dist_util.dev()
    memory = common.PeakMemory(device)
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(
        **common.CONFIGS[config], use_sdpa="sdpa" in levers
    )
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=None,  # run_step is given the batches
        batch_size=batch_size,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10**9,
        save_interval=10**9,
        resume_checkpoint="",
        use_bf16="bf16" in levers,
        channels_last="channels_last" in levers,
        compile="compile" in levers,
        fused_optim="fused_optim" in levers,
    )
    size = common.CONFIGS[config]["image_size"]
    batch = th.rand(batch_size, 6, size, size, generator=th.Generator().manual_seed(0))
    batch = batch * 2 - 1
    for _ in range(warmup):
        loop.run_step(batch, {})
    common.synchronize(device)
    memory.start_window()
    start = time.perf_counter()
    for _ in range(steps):
        loop.run_step(batch, {})
    common.synchronize(device)
    elapsed = time.perf_counter() - start
    peak, window_peak = memory.read()
    return {
        "images_per_s": steps * batch_size / elapsed,
        "s_per_step": elapsed / steps,
        "peak_mib": peak,
        "window_peak_mib": window_peak,
    }


def table_rows(results, skip_compile):
    """One row per variant: throughput (median over rounds), ratio, memory."""
    rows = []
    good = {v: [r for r in rs if "error" not in r] for v, rs in results.items()}
    slow = good.get("slow")
    slow_ips = statistics.median([r["images_per_s"] for r in slow]) if slow else None
    for variant, runs in results.items():
        levers = common.variant_levers(variant, TRAIN_LEVERS, skip_compile)
        lever_text = ", ".join(sorted(levers)) or "-"
        if not good[variant]:
            rows.append(
                [variant, lever_text, "failed", "", "", "", "", runs[0]["error"]]
            )
            continue
        ok = good[variant]
        ips = [r["images_per_s"] for r in ok]
        windows = [r["window_peak_mib"] for r in ok if r["window_peak_mib"] is not None]
        failed = len(runs) - len(ok)
        rows.append(
            [
                variant,
                lever_text,
                f"{statistics.median(ips):.3f}",
                f"{min(ips):.3f}-{max(ips):.3f}",
                f"{statistics.median(ips) / slow_ips:.2f}x" if slow_ips else "n/a",
                f"{max(r['peak_mib'] for r in ok):.0f}",
                f"{max(windows):.0f}" if windows else "n/a",
                f"{failed} of {len(runs)} rounds failed: {runs[0].get('error', '')}"
                if failed
                else "",
            ]
        )
    return rows


def main():
    args = parse_args()
    if args.variant:
        levers = common.variant_levers(args.variant, TRAIN_LEVERS, args.skip_compile)
        # A lever that cannot run here (compile without a C compiler) is a result too.
        try:
            result = measure(
                args.configs, levers, args.batch_size, args.warmup, args.steps
            )
        except Exception as err:
            result = {"error": common.short_error(err)}
        common.print_result(result)
        return

    for config in args.configs.split(","):
        warmup, steps, rounds = SCHEDULE[config]
        warmup = warmup if args.warmup is None else args.warmup
        steps = steps if args.steps is None else args.steps
        rounds = rounds if args.rounds is None else args.rounds
        batch = args.batch_size or BATCH[config]
        child_args = [
            *("--configs", config, "--batch_size", str(batch)),
            *("--warmup", str(warmup), "--steps", str(steps)),
            *("--skip_compile", str(args.skip_compile)),
        ]
        results = common.run_rounds(
            os.path.abspath(__file__),
            args.variant_list,
            rounds,
            child_args,
            args.timeout,
            label=config,
        )
        header = [
            *("variant", "levers", "images/s", "range", "vs slow"),
            *("peak MiB", "peak MiB (timed steps)", "notes"),
        ]
        flags = common.CONFIGS[config]
        common.report(
            f"Training throughput, {config} config, batch {batch}",
            common.markdown_table(header, table_rows(results, args.skip_compile)),
            [
                "model: " + ", ".join(f"{k} {v}" for k, v in flags.items()),
                f"{warmup} warm-up + {steps} timed steps per variant and round, "
                f"{rounds} round(s), variants in turn; images/s is the median over rounds",
                "slow path: fp32, contiguous memory, einsum attention, no compile, per-parameter AdamW and EMA loops; "
                + "; ".join(f"{k}: {common.LEVERS[k]}" for k in TRAIN_LEVERS),
                "peak MiB: the process's peak resident memory (CUDA: max allocated), "
                "also over the timed steps alone (after warm-up and compiling)",
                *(
                    ["compile left out (--skip_compile True)"]
                    if args.skip_compile
                    else []
                ),
            ],
            args.results,
        )


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_speed_arguments(parser, batch_help="0: 8 for small, 2 for paper")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    args = parser.parse_args()
    common.check_speed_arguments(parser, args, TRAIN_LEVERS)
    return args


if __name__ == "__main__":
    sys.exit(main())
