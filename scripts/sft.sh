#!/usr/bin/env bash
# Stage 1, SFT (--task LM): next-token training on (image, question with context, alt-text).
# Defaults are the released run: lr 2e-5, 1 epoch, cosine, warmup 0.03, per-device batch 1 x
# accumulation 32, ZeRO-3 (scripts/common.sh adds the settings every stage shares). Paths are
# relative to your directory; extra arguments go to the trainer. Try it on the tiny test model:
#   python -m llava.model.tiny --out outputs/tiny-llava     # from the repository root
#   bash scripts/sft.sh --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/tiny-llava}            # an HF / original-format LLaVA, or a causal LM with VISION_TOWER
DATA_PATH=${DATA_PATH:-data/sample/sft.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft}
VISION_TOWER=${VISION_TOWER:-}                          # a CLIP directory, to compose a new LLaVA
EPOCHS=${EPOCHS:-1}                                     # released
LR=${LR:-2e-5}                                          # released
BATCH_SIZE=${BATCH_SIZE:-1}                             # released
GRAD_ACCUM=${GRAD_ACCUM:-32}                            # released

require_default_model "set MODEL_PATH to a LLaVA checkpoint, or build the tiny test model with: $PYTHON -m llava.model.tiny --out $REPO_ROOT/outputs/tiny-llava"
stage_flags sft
launch "${STAGE_FLAGS[@]}" \
  ${VISION_TOWER:+--vision_tower "$VISION_TOWER"} --task LM \
  "$@"
