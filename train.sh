#!/usr/bin/env bash
# Train with the paper's configuration (SEN1-2, 256x256, 4 GPUs x batch 6).
# Edit the paths below, or override any setting from the environment, e.g.
#   DATA_DIR_SAR=/data/sen12/sar DATA_DIR_OPT=/data/sen12/opt NUM_GPUS=2 bash train.sh
# Extra arguments are passed on to scripts/image_train.py (e.g. --max_steps 200000).
# Running it again continues from the newest complete checkpoint in OPENAI_LOGDIR.
set -euo pipefail
cd "$(dirname "$0")"

DATA_DIR_SAR=${DATA_DIR_SAR:-/path/to/SEN1-2/sar}
DATA_DIR_OPT=${DATA_DIR_OPT:-/path/to/SEN1-2/opt}
NUM_GPUS=${NUM_GPUS:-4}
LAUNCHER=${LAUNCHER:-mpiexec}  # or torchrun
export OPENAI_LOGDIR=${OPENAI_LOGDIR:-./logs/sen12_paper}

MODEL_FLAGS=${MODEL_FLAGS:-"--image_size 256 --num_channels 128 --num_res_blocks 3 --learn_sigma False"}
DIFFUSION_FLAGS=${DIFFUSION_FLAGS:-"--diffusion_steps 2000 --noise_schedule linear"}
TRAIN_FLAGS=${TRAIN_FLAGS:-"--lr 1e-4 --batch_size 6 --save_interval 10000 --resume_checkpoint auto"}

for dir in "$DATA_DIR_SAR" "$DATA_DIR_OPT"; do
  if [ ! -d "$dir" ]; then
    echo "train.sh: no folder $dir; set DATA_DIR_SAR and DATA_DIR_OPT (top of train.sh or environment)" >&2
    exit 2
  fi
done

if [ "$NUM_GPUS" -le 1 ]; then
  launch=(python)
elif [ "$LAUNCHER" = torchrun ]; then
  launch=(torchrun --nproc_per_node "$NUM_GPUS")
else
  launch=(mpiexec -n "$NUM_GPUS" python)
fi

# shellcheck disable=SC2086  # the flag strings are meant to split into words
"${launch[@]}" scripts/image_train.py --data_dir_sar "$DATA_DIR_SAR" --data_dir_opt "$DATA_DIR_OPT" \
  $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS "$@"
