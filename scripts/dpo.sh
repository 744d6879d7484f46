#!/usr/bin/env bash
# Stage 2, plain DPO (--task DPO --use_cross_modal_loss False) from the SFT checkpoint.
# Published: lr 5e-7, 1 epoch, per-device batch 1, accumulation 16, bf16, ZeRO-3, 4 GPUs.
#   bash scripts/dpo.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dpo}
EPOCHS=${EPOCHS:-1}
LR=${LR:-5e-7}
BATCH_SIZE=${BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-16}
BETA=${BETA:-0.1}

stage_flags align
launch "${STAGE_FLAGS[@]}" \
  --task DPO --use_cross_modal_loss False --beta "$BETA" \
  "$@"
