#!/usr/bin/env bash
# Usage: tests/soak_multiprocess.sh [TRAIN_RUNS] [TEST_RUNS]
#
# Repeats the runs that start several processes, to catch failures that come
# by chance (an abort at exit, interleaved output, a lost rendezvous):
#   TRAIN_RUNS (default 50) two-rank trainings under mpiexec, with the flags of
#   tests/test_train.py::test_two_ranks_equal_one_process_at_twice_the_batch;
#   TEST_RUNS (default 20) of each pytest test that starts two ranks.
# Prints one line per run and a count at the end; exits 1 if any run failed.
# Logs of failed runs are kept in the folder named at the start. Not a pytest
# test: with the defaults it takes one to two hours on 2 CPU cores.
set -u -o pipefail

TRAIN_RUNS=${1:-50}
TEST_RUNS=${2:-20}
# Each test here starts two ranks (mpiexec, torchrun or two Popen calls).
TESTS=(
    tests/test_dist_util.py::test_two_ranks_under_mpiexec
    tests/test_dist_util.py::test_two_ranks_under_torchrun
    tests/test_logger.py::test_logkv_mean_pools_two_ranks_under_mpiexec
    tests/test_losses_resample.py::test_local_update_syncs_two_ranks
    tests/test_sampling.py::test_two_ranks_at_batch_1_match_one_process_at_batch_4
    tests/test_train.py::test_two_ranks_equal_one_process_at_twice_the_batch
)
TRAIN_TIMEOUT_S=300 # a hang counts as a failure instead of stopping the soak
TEST_TIMEOUT_S=900

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if ! command -v mpiexec >/dev/null; then
    echo "mpiexec not found: install it (pip install mpich) and run again" >&2
    exit 2
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/soak_multiprocess.XXXXXX")
echo "soak: $TRAIN_RUNS trainings, $TEST_RUNS runs of ${#TESTS[@]} tests; logs of failures in $WORK"

clean=0
failed=0

# report NAME RC LOG SECONDS: a run is clean when it exited with 0 and nothing
# in its output says a process aborted (an abort after the last line a rank
# wrote can leave the launcher's status at 0).
report() {
    local name=$1 rc=$2 log=$3 seconds=$4
    if [ "$rc" -eq 0 ] && ! grep -q -e "terminate called" -e "Aborted" -e "BAD TERMINATION" "$log"; then
        clean=$((clean + 1))
        echo "$name: clean (${seconds} s)"
        rm -f "$log"
    else
        failed=$((failed + 1))
        echo "$name: FAILED, exit status $rc (${seconds} s), log $log"
    fi
}

# Twenty pairs of 20x20 images, as the pairs_dir fixture of tests/test_train.py.
"$PYTHON" - "$WORK/pairs" <<'EOF' || exit 2
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for sub in ("sar", "opt"):
    (root / sub).mkdir(parents=True)
for i in range(20):
    opt = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(opt).save(root / "opt" / f"{i}.png")
    Image.fromarray(opt.mean(-1).astype(np.uint8)).save(root / "sar" / f"{i}.png")
EOF

for i in $(seq 1 "$TRAIN_RUNS"); do
    run="$WORK/train$i"
    start=$SECONDS
    OPENAI_LOGDIR="$run" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
        timeout "$TRAIN_TIMEOUT_S" mpiexec -n 2 "$PYTHON" "$REPO/scripts/image_train.py" \
        --data_dir_sar="$WORK/pairs/sar" --data_dir_opt="$WORK/pairs/opt" \
        --image_size=16 --num_channels=32 --num_res_blocks=1 --channel_mult=1,2 \
        --attention_resolutions=8 --diffusion_steps=50 --lr=1e-3 --max_steps=3 \
        --save_interval=3 --random_flip=True --num_workers=0 --ema_rate=0.9 \
        --batch_size=2 >"$run.log" 2>&1
    rc=$?
    # The run must also have written its final checkpoint.
    if [ "$rc" -eq 0 ] && [ ! -f "$run/state000003.pt" ]; then
        echo "no $run/state000003.pt" >>"$run.log"
        rc=1
    fi
    report "train $i/$TRAIN_RUNS" "$rc" "$run.log" $((SECONDS - start))
    [ -f "$run.log" ] || rm -rf "$run"
done

for test in "${TESTS[@]}"; do
    for i in $(seq 1 "$TEST_RUNS"); do
        log="$WORK/$(basename "${test//::/.}").$i.log"
        start=$SECONDS
        (cd "$REPO" && timeout "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -p no:cacheprovider \
            "$test") >"$log" 2>&1
        rc=$?
        # A skip (no mpiexec, a missing fixture) is not a clean run.
        if [ "$rc" -eq 0 ] && ! grep -q "1 passed" "$log"; then
            rc=1
        fi
        report "$test $i/$TEST_RUNS" "$rc" "$log" $((SECONDS - start))
    done
done

echo "soak: $clean clean, $failed failed"
if [ "$failed" -eq 0 ]; then
    rm -rf "$WORK"
    exit 0
fi
exit 1
