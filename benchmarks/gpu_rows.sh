#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one prepared run, made to fit 8 minutes on
# one H100: the paper configuration's training step (fp32, TF32, fp16, bf16, bf16
# with every lever, compile last), a 64-tile scene batch, the same noise and images
# on the CPU and the GPU, host syncs per step and the SDPA kernel that ran. Each row
# has its own time limit and is appended to the results as soon as it is measured.
# See benchmarks/gpu_rows.py for the rows and benchmarks/README.md for the flags.
#
#     bash benchmarks/gpu_rows.sh                  # on the GPU machine
#     bash benchmarks/gpu_rows.sh --dry_run        # on any CPU first: the tiny model, seconds
#     bash benchmarks/gpu_rows.sh --only noise,sdpa --results out.md
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_rows.py" "$@"
