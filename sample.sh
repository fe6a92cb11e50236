#!/usr/bin/env bash
# Translate SAR test images with a trained model, with the paper's sampling settings
# (SEN1-2, 256x256, 250 respaced DDPM steps of the 2000-step model).
# Edit the paths below, or override any setting from the environment, e.g.
#   MODEL_PATH=logs/sen12_paper/ema_0.9999_200000.pt DATA_DIR=/data/sen12_test bash sample.sh
# DATA_DIR holds sar/ and, optionally, opt/ (ground truth). The flags below are the
# paper's model in full, so a checkpoint of the original code (no config.json beside
# it) samples as trained; for a run of this project, MODEL_FLAGS= DIFFUSION_FLAGS=
# (empty) takes them all from the run's config.json instead.
# Extra arguments are passed on to scripts/image_sample_realtime.py
# (e.g. --sampler ddim --timestep_respacing ddim50).
# Results go to $OPENAI_LOGDIR/sample_results/; running it again resumes.
set -euo pipefail
cd "$(dirname "$0")"

MODEL_PATH=${MODEL_PATH:-/path/to/logs/sen12_paper/ema_0.9999_200000.pt}
DATA_DIR=${DATA_DIR:-/path/to/SEN1-2/test}
NUM_GPUS=${NUM_GPUS:-1}
LAUNCHER=${LAUNCHER:-mpiexec}  # or torchrun
export OPENAI_LOGDIR=${OPENAI_LOGDIR:-./logs/sen12_paper_samples}

# "-" rather than ":-": a variable set to the empty string stays empty.
MODEL_FLAGS=${MODEL_FLAGS-"--image_size 256 --num_channels 128 --num_res_blocks 3 --learn_sigma False \
  --num_heads 4 --num_head_channels -1 --num_heads_upsample -1 --use_new_attention_order False"}
DIFFUSION_FLAGS=${DIFFUSION_FLAGS-"--diffusion_steps 2000 --noise_schedule linear \
  --predict_xstart False --rescale_timesteps False --sigma_small False"}
SAMPLE_FLAGS=${SAMPLE_FLAGS-"--batch_size 8 --num_samples 100 --timestep_respacing 250"}

if [ ! -f "$MODEL_PATH" ]; then
  echo "sample.sh: no file $MODEL_PATH; set MODEL_PATH (top of sample.sh or environment) to a model or EMA file" >&2
  exit 2
fi
if [ ! -d "$DATA_DIR/sar" ]; then
  echo "sample.sh: no folder $DATA_DIR/sar; set DATA_DIR (top of sample.sh or environment) to a folder with sar/ and optional opt/" >&2
  exit 2
fi

if [ "$NUM_GPUS" -le 1 ]; then
  launch=(python)
elif [ "$LAUNCHER" = torchrun ]; then
  launch=(torchrun --nproc_per_node "$NUM_GPUS")
else
  launch=(mpiexec -n "$NUM_GPUS" python)
fi

# shellcheck disable=SC2086  # the flag strings are meant to split into words
"${launch[@]}" scripts/image_sample_realtime.py --model_path "$MODEL_PATH" --data_dir "$DATA_DIR" \
  $MODEL_FLAGS $DIFFUSION_FLAGS $SAMPLE_FLAGS "$@"
