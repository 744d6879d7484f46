#!/usr/bin/env bash
# Stage 2, plain DPO (--task DPO --use_cross_modal_loss False) from the SFT checkpoint.
# Defaults are the released run: lr 5e-7, 1 epoch, per-device batch 1 x accumulation 16, beta 0.1,
# ZeRO-3 (scripts/common.sh adds the settings every stage shares). Extra arguments go to the trainer:
#   bash scripts/dpo.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dpo}
EPOCHS=${EPOCHS:-1}                                     # released
LR=${LR:-5e-7}                                          # released
BATCH_SIZE=${BATCH_SIZE:-1}                             # released
GRAD_ACCUM=${GRAD_ACCUM:-16}                            # released
BETA=${BETA:-0.1}                                       # released

require_default_model "run scripts/sft.sh first, or set MODEL_PATH to an SFT checkpoint"
stage_flags align
launch "${STAGE_FLAGS[@]}" \
  --task DPO --use_cross_modal_loss False --beta "$BETA" \
  "$@"
