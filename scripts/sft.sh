#!/usr/bin/env bash
# Stage 1, SFT (--task LM): next-token training on (image, question with context, alt-text).
# Published: lr 2e-5, 1 epoch, cosine, warmup 0.03, ZeRO-3. Extra arguments go to the trainer:
#   bash scripts/sft.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/tiny-llava}            # an HF / original-format LLaVA, or a causal LM with VISION_TOWER
DATA_PATH=${DATA_PATH:-data/sample/sft.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft}
VISION_TOWER=${VISION_TOWER:-}                          # a CLIP directory, to compose a new LLaVA
EPOCHS=${EPOCHS:-1}
LR=${LR:-2e-5}
BATCH_SIZE=${BATCH_SIZE:-4}
GRAD_ACCUM=${GRAD_ACCUM:-4}

stage_flags sft
launch "${STAGE_FLAGS[@]}" \
  ${VISION_TOWER:+--vision_tower "$VISION_TOWER"} --task LM \
  "$@"
