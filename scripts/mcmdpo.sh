#!/usr/bin/env bash
# Stage 2, MCM-DPO (--task DPO --use_cross_modal_loss True): all seven terms, from the SFT checkpoint.
# Defaults are the released run: lr 5e-7, 2 epochs, per-device batch 1 x accumulation 16, beta 0.1,
# diffusion-corrupted images at step 700, weights r1..r7 = 0.5 0.5 1.0 0.2 0.2 0.2 0.2, norm 2.8,
# ZeRO-3 (scripts/common.sh adds the settings every stage shares). Extra arguments go to the trainer:
#   bash scripts/mcmdpo.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/mcmdpo}
EPOCHS=${EPOCHS:-2}                                     # released
LR=${LR:-5e-7}                                          # released
BATCH_SIZE=${BATCH_SIZE:-1}                             # released
GRAD_ACCUM=${GRAD_ACCUM:-16}                            # released
BETA=${BETA:-0.1}                                       # released
IMAGE_TYPE=${IMAGE_TYPE:-diffusion}                     # released
TERMS=${TERMS:-7}                                       # released

require_default_model "run scripts/sft.sh first, or set MODEL_PATH to an SFT checkpoint"
stage_flags align
launch "${STAGE_FLAGS[@]}" \
  --task DPO --use_cross_modal_loss True --beta "$BETA" \
  --use_cl_reward_num "$TERMS" --para_norm 2.8 \
  --para_r1 0.5 --para_r2 0.5 --para_r3 1.0 --para_r4 0.2 --para_r5 0.2 --para_r6 0.2 --para_r7 0.2 \
  --use_image_type "$IMAGE_TYPE" --diffusion_step 700 \
  "$@"
