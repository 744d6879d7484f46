#!/usr/bin/env bash
# Stage 2, MCM-DPO (--task DPO --use_cross_modal_loss True): all seven terms, from the SFT checkpoint.
# Published: lr 5e-7, 2 epochs, per-device batch 1, accumulation 16, bf16, ZeRO-3, 4 GPUs;
# diffusion-corrupted images at step 700; weights r1..r7 = 0.5 0.5 1.0 0.2 0.2 0.2 0.2, norm 2.8.
#   bash scripts/mcmdpo.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/mcmdpo}
EPOCHS=${EPOCHS:-2}
LR=${LR:-5e-7}
BATCH_SIZE=${BATCH_SIZE:-1}
GRAD_ACCUM=${GRAD_ACCUM:-16}
BETA=${BETA:-0.1}
IMAGE_TYPE=${IMAGE_TYPE:-diffusion}
TERMS=${TERMS:-7}

stage_flags align
launch "${STAGE_FLAGS[@]}" \
  --task DPO --use_cross_modal_loss True --beta "$BETA" \
  --use_cl_reward_num "$TERMS" --para_norm 2.8 \
  --para_r1 0.5 --para_r2 0.5 --para_r3 1.0 --para_r4 0.2 --para_r5 0.2 --para_r6 0.2 --para_r7 0.2 \
  --use_image_type "$IMAGE_TYPE" --diffusion_step 700 \
  "$@"
