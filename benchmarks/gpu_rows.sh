#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md: paper config, batch 8, float32 (the slow
# path) against bf16 and against every lever, for training and for sampling.
# Made to fit one short session on a lent GPU (an estimate of about 10 minutes,
# not yet measured; compile is left out: it would take most of that). Usage, from the repository
# root on the GPU machine:
#
#     bash benchmarks/gpu_rows.sh [RESULTS_FILE]
#
# RESULTS_FILE defaults to benchmarks/RESULTS.md; the tables are also printed.
set -euo pipefail
RESULTS="${1:-benchmarks/RESULTS.md}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu_rows.sh: no CUDA GPU visible; run it on a machine with one (the CPU tables come from bench_train.py and bench_sample.py)')"
COMMON=(--configs paper --batch_size 8 --skip_compile True --rounds 2 --results "$RESULTS")
python benchmarks/bench_train.py "${COMMON[@]}" --variants slow,bf16,all --warmup 2 --steps 5
python benchmarks/bench_sample.py "${COMMON[@]}" --variants slow,bf16,all --warmup 2
