#!/usr/bin/env bash
# The demo: generated SAR/optical scenes, a small model trained on the CPU,
# the test set translated, scored against two trivial baselines and drawn.
#   bash demo.sh                  # 12 to 26 minutes on 2 idle CPU cores
#   bash demo.sh --update_assets  # also copy the picture to assets/demo.png
#   DATA_FORMAT=sen12ms bash demo.sh --update_assets
#                                 # also refresh the bundled scene model,
#                                 # assets/scene_model/ (translate_scene.py's default)
# Every setting below can be overridden from the environment, e.g.
#   STEPS=3000 RUN_DIR=logs/demo_long bash demo.sh
# Running it again reuses the data and the finished training and translations.
#
# DATA_FORMAT picks the data: png (the default, 8-bit PNGs in data/synthetic32,
# run in logs/demo) or sen12ms, the same kind of scenes as a SEN12MS-like GeoTIFF
# tree (float32 dB VV+VH SAR with NaN nodata borders, 13-band uint16 optical) in
# data/sen12ms32, run in logs/demo_sen12ms:
#   DATA_FORMAT=sen12ms bash demo.sh
# The model then learns from two SAR channels (VV, VH) in dB and the optical
# bands 4,3,2 over 0..3000; the training run records that scaling in its
# config.json, where sampling and the report read it back.
set -euo pipefail
cd "$(dirname "$0")"

DATA_FORMAT=${DATA_FORMAT:-png}
case "$DATA_FORMAT" in
  png)
    DATA_DIR=${DATA_DIR:-data/synthetic32}
    RUN_DIR=${RUN_DIR:-logs/demo}
    ;;
  sen12ms)
    DATA_DIR=${DATA_DIR:-data/sen12ms32}
    RUN_DIR=${RUN_DIR:-logs/demo_sen12ms}
    ;;
  *)
    echo "demo.sh: unknown DATA_FORMAT $DATA_FORMAT; choose png (the default) or sen12ms" >&2
    exit 2
    ;;
esac
NUM_TRAIN=${NUM_TRAIN:-2000}
NUM_TEST=${NUM_TEST:-64}
STEPS=${STEPS:-1000}  # the training budget: ~11 min on 2 idle cores at the ~50 images/s measured

# x_start prediction, unweighted: of eps, x_start and v, each with and without Min-SNR,
# it scores best after 200 and after 1000 steps; eps has not learned colours by then
# (benchmarks/bench_targets.py; README, "Which target and weighting").
MODEL_FLAGS=${MODEL_FLAGS:-"--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 --learn_sigma False"}
DIFFUSION_FLAGS=${DIFFUSION_FLAGS:-"--diffusion_steps 1000 --noise_schedule linear --predict_xstart True"}
TRAIN_FLAGS=${TRAIN_FLAGS:-"--lr 1e-3 --batch_size 32 --ema_rate 0.995 --log_interval 100 --save_interval 200 --keep_checkpoints 1"}
# Sampling: the results land in sample_results/$SAMPLER$SAMPLE_STEPS/ of the run.
# DPM-Solver++(2M) in 20 steps matches DDIM in 50 on SSIM and sharpness in 40% of
# the time (benchmarks/bench_quality.py); fewer steps raise SSIM by blurring.
SAMPLER=${SAMPLER:-dpm++2m}
SAMPLE_STEPS=${SAMPLE_STEPS:-20}
if [ "$SAMPLER" = ddim ]; then respacing=ddim$SAMPLE_STEPS; else respacing=$SAMPLE_STEPS; fi
SAMPLE_FLAGS=${SAMPLE_FLAGS:-"--sampler $SAMPLER --timestep_respacing $respacing --batch_size 64 --seed 0"}

report_flags=()
for arg in "$@"; do
  case "$arg" in
    --update_assets) report_flags+=(--update_assets) ;;
    *)
      echo "demo.sh: unknown argument $arg; the only one is --update_assets (settings come from the environment, see the top of demo.sh)" >&2
      exit 2
      ;;
  esac
done

image_size=$(sed -n 's/.*--image_size \([0-9]*\).*/\1/p' <<<"$MODEL_FLAGS")
if [ -z "$image_size" ]; then
  echo "demo.sh: MODEL_FLAGS must contain --image_size N" >&2
  exit 2
fi
if [ "$DATA_FORMAT" = sen12ms ]; then
  format_note=" as SEN12MS-like GeoTIFFs"
  dataset_flags=(--format sen12ms)
  # one root for both: s1_*/ files pair with s2_*/ ones, lc_*/ are left out
  train_data_flags=(--data_dir_sar "$DATA_DIR/train" --data_dir_opt "$DATA_DIR/train"
    --sar_input db --sar_channels 2 --opt_bands 4,3,2 --opt_range 0,3000)
else
  format_note=""
  dataset_flags=()
  train_data_flags=(--data_dir_sar "$DATA_DIR/train/sar" --data_dir_opt "$DATA_DIR/train/opt")
fi
export OPENAI_LOGDIR=$RUN_DIR
start=$SECONDS

echo "== 1/4 data: $NUM_TRAIN training and $NUM_TEST test scenes of ${image_size}x${image_size} pixels$format_note in $DATA_DIR"
if [ -f "$DATA_DIR/dataset.json" ]; then
  # a PNG dataset's dataset.json has no "format"
  found_format=$(sed -n 's/^  "format": "\([^"]*\)".*/\1/p' "$DATA_DIR/dataset.json")
  if [ "${found_format:-png}" != "$DATA_FORMAT" ]; then
    echo "demo.sh: $DATA_DIR holds a ${found_format:-png} dataset, not DATA_FORMAT=$DATA_FORMAT; use another DATA_DIR or delete $DATA_DIR" >&2
    exit 2
  fi
  echo "$DATA_DIR/dataset.json exists: using that dataset (delete $DATA_DIR to make a new one)"
else
  python scripts/make_synthetic_dataset.py --out "$DATA_DIR" --overwrite \
    --num_train "$NUM_TRAIN" --num_test "$NUM_TEST" --image_size "$image_size" \
    ${dataset_flags[@]+"${dataset_flags[@]}"}
fi

echo "== 2/4 training to step $STEPS in $RUN_DIR (continues a stopped run; Ctrl-C saves and stops)"
# shellcheck disable=SC2086  # the flag strings are meant to split into words
python scripts/image_train.py "${train_data_flags[@]}" \
  $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS --resume_checkpoint auto --max_steps "$STEPS" --progress True
ema_rate=$(sed -n 's/.*--ema_rate \([0-9.]*\).*/\1/p' <<<"$TRAIN_FLAGS")
checkpoint=$(printf '%s/ema_%s_%06d.pt' "$RUN_DIR" "${ema_rate:-0.9999}" "$STEPS")
if [ ! -f "$checkpoint" ]; then
  echo "demo.sh: training stopped before step $STEPS ($checkpoint is missing); run demo.sh again to continue, or use a new RUN_DIR" >&2
  exit 1
fi

echo "== 3/4 translating the test scenes of $DATA_DIR with $checkpoint ($SAMPLE_FLAGS)"
# the model flags come from config.json beside the checkpoint, and so does the
# scaling of the inputs (no --sar_input, --opt_bands, ... here, for either format)
# shellcheck disable=SC2086
python scripts/image_sample_realtime.py --data_dir "$DATA_DIR/test" --model_path "$checkpoint" $SAMPLE_FLAGS
gen_dir=$RUN_DIR/sample_results/$SAMPLER$SAMPLE_STEPS/gen_opt
if [ ! -d "$gen_dir" ]; then
  echo "demo.sh: no translations in $gen_dir; SAMPLE_FLAGS must sample with SAMPLER ($SAMPLER) in SAMPLE_STEPS ($SAMPLE_STEPS) steps" >&2
  exit 1
fi

echo "== 4/4 scoring $gen_dir against the ground truth and two baselines"
if [ "$DATA_FORMAT" = sen12ms ]; then
  # the README's picture is the PNG demo's; this run's model is the bundled one
  python scripts/demo_report.py --data_dir "$DATA_DIR" --gen_dir "$gen_dir" --out "$RUN_DIR"
  if [ ${#report_flags[@]} -gt 0 ]; then
    python -c 'import sys; from guided_diffusion.demo.report import bundle_model; print("bundled", bundle_model(sys.argv[1], "assets/scene_model"))' "$checkpoint"
  fi
else
  python scripts/demo_report.py --data_dir "$DATA_DIR" --gen_dir "$gen_dir" --out "$RUN_DIR" ${report_flags[@]+"${report_flags[@]}"}
fi
echo "done in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s: picture $RUN_DIR/demo.png, figures $RUN_DIR/demo_metrics.json"
