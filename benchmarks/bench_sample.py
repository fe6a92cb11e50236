"""
Sampling latency of the speed levers: time per image of one model evaluation and
of a 20-step DPM-Solver++(2M) run (guided_diffusion.translation.sampling.translate), for the
slow path, each lever alone and all together, at the small configuration (64 px,
64 channels, 2 residual blocks, batch 8) and the paper's (256 px, 128 channels,
3 residual blocks, 2000 steps, batch 1).

    python benchmarks/bench_sample.py                      # both, see README.md for the time
    python benchmarks/bench_sample.py --configs small
    python benchmarks/bench_sample.py --quick --results smoke.md  # a smoke test

As in bench_train.py, each variant runs in a process of its own, the variants in
turn, round after round; compiling happens in the warm-up and is not timed.
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
from guided_diffusion.translation.sampling import (
    Bfloat16Model,
    prepare_model,
    translate,
)

SAMPLE_LEVERS = ("sdpa", "channels_last", "bf16", "compile")
DEFAULT_VARIANTS = "slow,sdpa,channels_last,bf16,compile,all,all-channels_last"
BATCH = {"tiny": 2, "small": 8, "paper": 1}
# (warm-up evaluations, timed evaluations, rounds) per configuration.
SCHEDULE = {"tiny": (1, 2, 1), "small": (2, 5, 2), "paper": (1, 2, 2)}


def measure(config, levers, batch_size, warmup, evals, solver_steps):
    """
    Time model evaluations and one solver run of one variant in this process.

    :return: a dict of eval_ms_per_image, solver_s_per_image and peak_mib.
    """
    dist_util.setup_dist()
    device = dist_util.dev()
    memory = common.PeakMemory(device)
    th.manual_seed(0)
    flags = dict(common.CONFIGS[config], timestep_respacing=str(solver_steps))
    model, diffusion = create_model_and_diffusion(**flags, use_sdpa="sdpa" in levers)
    model = prepare_model(
        model.to(device).eval(),
        channels_last="channels_last" in levers,
        compile="compile" in levers,
    )
    # The call translate makes, so that compiled code made in the warm-up is reused.
    call = Bfloat16Model(model) if "bf16" in levers else model
    size = flags["image_size"]
    gen = th.Generator().manual_seed(0)
    sar = (th.rand(batch_size, 3, size, size, generator=gen) * 2 - 1).to(device)
    x_in = th.cat(
        [th.randn(batch_size, 3, size, size, generator=gen).to(device), sar], 1
    )
    t = th.full((batch_size,), flags["diffusion_steps"] - 1, device=device)

    with th.no_grad():
        for _ in range(warmup):
            call(x_in, t)
        common.synchronize(device)
        start = time.perf_counter()
        for _ in range(evals):
            call(x_in, t)
        common.synchronize(device)
        eval_s = (time.perf_counter() - start) / evals
    start = time.perf_counter()
    translate(model, diffusion, sar, sampler="dpm++2m", use_bf16="bf16" in levers)
    common.synchronize(device)
    solver_s = time.perf_counter() - start
    return {
        "eval_ms_per_image": 1000 * eval_s / batch_size,
        "solver_s_per_image": solver_s / batch_size,
        "peak_mib": memory.read()[0],
    }


def table_rows(results, skip_compile):
    """One row per variant: latencies (medians over rounds), ratios, memory."""
    good = {v: [r for r in rs if "error" not in r] for v, rs in results.items()}

    def med(variant, key):
        runs = good.get(variant)
        return statistics.median([r[key] for r in runs]) if runs else None

    rows = []
    for variant, runs in results.items():
        levers = common.variant_levers(variant, SAMPLE_LEVERS, skip_compile)
        lever_text = ", ".join(sorted(levers)) or "-"
        if not good[variant]:
            rows.append(
                [variant, lever_text, "failed", "", "", "", "", runs[0]["error"]]
            )
            continue
        row = [variant, lever_text]
        for key, fmt in (
            ("eval_ms_per_image", "{:.1f}"),
            ("solver_s_per_image", "{:.2f}"),
        ):
            value, slow = med(variant, key), med("slow", key)
            row += [fmt.format(value), f"{slow / value:.2f}x" if slow else "n/a"]
        row.append(f"{max(r['peak_mib'] for r in good[variant]):.0f}")
        failed = len(runs) - len(good[variant])
        row.append(
            f"{failed} of {len(runs)} rounds failed: {runs[0].get('error', '')}"
            if failed
            else ""
        )
        rows.append(row)
    return rows


def main():
    args = parse_args()
    if args.variant:
        levers = common.variant_levers(args.variant, SAMPLE_LEVERS, args.skip_compile)
        # A lever that cannot run here (compile without a C compiler) is a result too.
        try:
            result = measure(
                args.configs,
                levers,
                args.batch_size,
                args.warmup,
                args.evals,
                args.solver_steps,
            )
        except Exception as err:
            result = {"error": common.short_error(err)}
        common.print_result(result)
        return

    for config in args.configs.split(","):
        warmup, evals, rounds = SCHEDULE[config]
        warmup = warmup if args.warmup is None else args.warmup
        evals = evals if args.evals is None else args.evals
        rounds = rounds if args.rounds is None else args.rounds
        batch = args.batch_size or BATCH[config]
        child_args = [
            *("--configs", config, "--batch_size", str(batch)),
            *("--warmup", str(warmup), "--evals", str(evals)),
            *("--solver_steps", str(args.solver_steps)),
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
            *("variant", "levers", "ms per evaluation per image", "vs slow"),
            *(f"s per image, {args.solver_steps}-step dpm++2m", "vs slow"),
            *("peak MiB", "notes"),
        ]
        flags = common.CONFIGS[config]
        common.report(
            f"Sampling latency, {config} config, batch {batch}",
            common.markdown_table(header, table_rows(results, args.skip_compile)),
            [
                "model: " + ", ".join(f"{k} {v}" for k, v in flags.items()),
                f"{warmup} warm-up + {evals} timed model evaluations, then one "
                f"{args.solver_steps}-step solver run, per variant and round; {rounds} "
                "round(s), variants in turn; figures are medians over rounds",
                "slow path: fp32, contiguous memory, einsum attention, no compile; "
                + "; ".join(f"{k}: {common.LEVERS[k]}" for k in SAMPLE_LEVERS),
                "peak MiB: the process's peak resident memory (CUDA: max allocated)",
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
    common.add_speed_arguments(parser, batch_help="0: 8 for small, 1 for paper")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument(
        "--evals", type=int, default=None, help="timed model evaluations"
    )
    parser.add_argument("--solver_steps", type=int, default=20)
    args = parser.parse_args()
    if args.solver_steps < 2:
        parser.error("--solver_steps must be at least 2")
    common.check_speed_arguments(parser, args, SAMPLE_LEVERS)
    return args


if __name__ == "__main__":
    sys.exit(main())
