"""
Our U-Net against the original code's: the same architecture built in both
codebases, the same random weights loaded into both, a check that they compute
the same output, then the time of one forward pass (batch 1, float32, no
gradients, no speed flags) of each, interleaved round after round.

    python benchmarks/bench_reference.py --reference_code ../guided-diffusion
    python benchmarks/bench_reference.py --reference_code PATH --configs small --results ''
    python benchmarks/bench_reference.py --reference_code PATH --quick --results ''

PATH is a checkout of openai/guided-diffusion, or its unpacked sdist (see
README.md): the folder that holds its guided_diffusion/ package. Its package has
our package's name, so it is never installed and never imported here: each
measurement runs in a child process that puts PATH first on sys.path.

Why fresh processes, in alternating order: each codebase starts alike (same
script, imports, threads, weights and input, an empty heap; only the
guided_diffusion on the path differs), nothing of one round (the heap's layout,
memory the allocator kept) carries into the next, and the two packages of one
name never meet in a process. The codebase that runs first alternates from round
to round, so neither always runs after the other's load. A round's figure is the
median of the timed passes in its process; the summary is the median over rounds,
its ratio the median of the rounds' ratios (each a pair measured seconds apart).
"""

import argparse
import importlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import common
import torch as th

# (warm-up passes, timed passes) per process, per configuration.
SCHEDULE = {"tiny": (1, 3), "small": (2, 5), "paper": (1, 3)}
CODEBASES = ("ours", "reference")
# Both outputs come from the same operations on the same numbers; 1e-5 leaves
# room for kernels that sum in another order, and no room for a different function.
MAX_REL_ERR = 1e-5
REFERENCE_HELP = (
    "get it with `pip download guided_diffusion_sdk==1.0.0 --no-deps` (then unpack "
    "the .tar.gz) or `git clone https://github.com/openai/guided-diffusion`"
)


def unet_kwargs(config):
    """
    The UNetModel arguments of a configuration, which both codebases' constructors
    take: our flag defaults with the configuration's flags, resolved as
    script_util.create_model resolves them (6 input channels: optical and SAR).
    """
    from guided_diffusion.script_util import (
        OPT_CHANNELS,
        diffusion_defaults,
        model_defaults,
        parse_channel_mult,
    )

    flags = {**model_defaults(), **diffusion_defaults(), **common.CONFIGS[config]}
    size = flags["image_size"]
    return dict(
        image_size=size,
        in_channels=OPT_CHANNELS + flags["sar_channels"],
        model_channels=flags["num_channels"],
        out_channels=OPT_CHANNELS * (2 if flags["learn_sigma"] else 1),
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=[
            size // int(r) for r in flags["attention_resolutions"].split(",")
        ],
        dropout=flags["dropout"],
        channel_mult=list(parse_channel_mult(flags["channel_mult"], size)),
        num_heads=flags["num_heads"],
        num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        use_new_attention_order=flags["use_new_attention_order"],
    )


def random_state_dict(model, seed=0):
    """
    Random values for every tensor of a state dict, at the scale of a trained
    network (weights N(0, 1/fan_in), norm gains near 1, small biases), so that no
    layer outputs zero (the output convolutions start at zero) and none overflows.
    """
    gen = th.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        noise = th.randn(value.shape, generator=gen)
        if value.dim() > 1:
            noise /= (value.numel() / value.shape[0]) ** 0.5
        elif name.endswith("weight"):
            noise = 1 + 0.1 * noise
        else:
            noise *= 0.1
        state[name] = noise.to(value.dtype)
    return state


def import_unet(codebase, reference_code):
    """The unet module of one codebase, checked to come from where it should."""
    if codebase == "reference":
        sys.path.insert(0, reference_code)
    unet = importlib.import_module("guided_diffusion.unet")
    inside = os.path.abspath(unet.__file__).startswith(reference_code + os.sep)
    if inside != (codebase == "reference"):
        raise RuntimeError(
            f"the {codebase} run imported guided_diffusion from {unet.__file__}"
        )
    return unet


def measure(args):
    """
    In a child process: build one codebase's U-Net, load the shared weights, then
    either save its output (--output) or time forward passes.

    :return: the dict the child prints for the parent.
    """
    th.set_num_threads(args.threads)
    unet = import_unet(args.variant, args.reference_root)
    kwargs = json.loads(args.unet_kwargs)
    model = unet.UNetModel(**kwargs).eval()
    if not os.path.exists(args.weights):
        th.save(random_state_dict(model), args.weights)
    try:
        model.load_state_dict(th.load(args.weights, weights_only=True), strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"the {args.variant} U-Net does not take the shared state dict: {err}"
        ) from None
    gen = th.Generator().manual_seed(1)
    size = kwargs["image_size"]
    x = th.randn(1, kwargs["in_channels"], size, size, generator=gen)
    t = th.tensor([500])
    with th.no_grad():
        if args.output:
            th.save(model(x, t), args.output)
            return {"unet_py": unet.__file__}
        for _ in range(args.warmup):
            model(x, t)
        seconds, faults = [], []
        for _ in range(args.evals):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            model(x, t)
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "seconds": statistics.median(seconds),
        "page_faults": statistics.median(faults),
        "unet_py": unet.__file__,
    }


def check_outputs(config, child_args, tmp, timeout):
    """
    Our U-Net makes the weights and both compute one output from them.

    :return: the relative error of ours against the reference's.
    :raises SystemExit: a child failed, or the outputs differ.
    """
    script = os.path.abspath(__file__)
    outputs = {}
    for codebase in CODEBASES:  # ours first: it writes the shared weights
        outputs[codebase] = os.path.join(tmp, f"{codebase}.pt")
        print(f"{config}: output check, {codebase} ...", flush=True)
        result = common.run_variant_process(
            script,
            ["--variant", codebase, *child_args, "--output", outputs[codebase]],
            timeout,
        )
        if "error" in result:
            sys.exit(
                f"{config}: the output check of {codebase} failed: {result['error']}"
            )
    ours, ref = (th.load(outputs[c], weights_only=True) for c in CODEBASES)
    if ref.norm() == 0:
        sys.exit(
            f"{config}: the reference output is all zeros; the check proves nothing"
        )
    rel_err = ((ours - ref).norm() / ref.norm()).item()
    if not rel_err < MAX_REL_ERR:
        sys.exit(
            f"{config}: our U-Net and the reference compute different outputs from the "
            f"same weights (relative error {rel_err:.3g}, allowed {MAX_REL_ERR:g}); "
            "timing them would compare different functions"
        )
    return rel_err


def table_rows(config, results):
    """Per round: seconds of each codebase and their ratio; then the medians."""
    rows, ratios = [], []
    for i, (ours, ref) in enumerate(zip(results["ours"], results["reference"])):
        first = "ours" if i % 2 == 0 else "reference"
        failed = [r["error"] for r in (ours, ref) if "error" in r]
        if failed:
            rows.append([config, i + 1, first, "", "", "failed: " + failed[0]])
            continue
        ratios.append(ref["seconds"] / ours["seconds"])
        rows.append(
            [config, i + 1, first]
            + [f"{ours['seconds']:.3f}", f"{ref['seconds']:.3f}", f"{ratios[-1]:.3f}"]
        )
    good = {c: [r for r in results[c] if "error" not in r] for c in CODEBASES}
    if ratios:
        rows.append(
            [config, "median", ""]
            + [
                f"{statistics.median(r['seconds'] for r in good[c]):.3f}"
                for c in CODEBASES
            ]
            + [f"{statistics.median(ratios):.3f}"]
        )
    return rows


def main():
    args = parse_args()
    if args.variant:
        try:
            result = measure(args)
        except Exception as err:
            result = {"error": common.short_error(err)}
        common.print_result(result)
        return

    # The children inherit the thread count before torch starts its pools.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    th.set_num_threads(args.threads)  # and the report's machine line says it
    rows, notes = [], []
    for config in args.configs.split(","):
        warmup, evals = SCHEDULE[config]
        warmup = warmup if args.warmup is None else args.warmup
        evals = evals if args.evals is None else args.evals
        with tempfile.TemporaryDirectory() as tmp:
            child_args = [
                *("--reference_code", args.reference_code),
                *("--unet_kwargs", json.dumps(unet_kwargs(config))),
                *("--weights", os.path.join(tmp, "weights.pt")),
                *("--threads", str(args.threads)),
                *("--warmup", str(warmup), "--evals", str(evals)),
            ]
            rel_err = check_outputs(config, child_args, tmp, args.timeout)
            results = common.run_rounds(
                os.path.abspath(__file__),
                list(CODEBASES),
                args.rounds,
                child_args,
                args.timeout,
                label=config,
                alternate=True,
            )
        rows += table_rows(config, results)
        faults = {
            c: statistics.median(
                r["page_faults"] for r in results[c] if "error" not in r
            )
            for c in CODEBASES
            if any("error" not in r for r in results[c])
        }
        flags = common.CONFIGS[config]
        notes += [
            f"{config}: "
            + ", ".join(f"{k} {v}" for k, v in flags.items())
            + f"; outputs agree to a relative error of {rel_err:.1e}; "
            f"{warmup} warm-up + {evals} timed passes per process; minor page faults "
            "per pass (median): "
            + ", ".join(f"{c} {n:.0f}" for c, n in faults.items()),
        ]
    header = ["config", "round", "first", "ours s", "reference s", "reference / ours"]
    common.report(
        "U-Net forward pass against the original guided-diffusion",
        common.markdown_table(header, rows),
        [
            "one forward pass, batch 1, float32, no gradients, no speed flags "
            "(einsum attention, contiguous memory); same random weights and input in both",
            f"reference: the guided_diffusion package under {args.reference_code}",
            "each codebase and round in a fresh process, the codebases alternating "
            "which runs first; s: the median of the timed passes of that process; "
            "median row: medians over rounds, the ratio the median of the rounds' ratios "
            "(above 1: ours is faster)",
            *notes,
        ],
        args.results,
    )


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference_code",
        required=True,
        help="the folder holding the original code's guided_diffusion/ package",
    )
    parser.add_argument(
        "--configs", default="small,paper", help="comma-separated: tiny, small, paper"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=th.get_num_threads())
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--evals", type=int, default=None, help="timed passes")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per child process"
    )
    parser.add_argument(
        "--results",
        default=common.DEFAULT_RESULTS,
        help="append the table here ('' for nowhere)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny config, two rounds (one in each order): seconds",
    )
    # Set by the parent in the processes that measure one codebase.
    for name in ("--variant", "--unet_kwargs", "--weights", "--output"):
        parser.add_argument(name, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    path = os.path.abspath(args.reference_code)
    if os.path.isfile(os.path.join(path, "unet.py")):  # the package folder itself
        path = os.path.dirname(path)
    if not os.path.isfile(os.path.join(path, "guided_diffusion", "unet.py")):
        parser.error(
            f"--reference_code {args.reference_code}: no guided_diffusion/unet.py "
            f"there; {REFERENCE_HELP}"
        )
    args.reference_root = path  # --reference_code stays as given, for the report
    if args.quick:
        args.configs, args.rounds = "tiny", 2
    unknown = [c for c in args.configs.split(",") if c not in SCHEDULE]
    if unknown:
        parser.error(
            f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(SCHEDULE)}"
        )
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
