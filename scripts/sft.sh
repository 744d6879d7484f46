#!/usr/bin/env bash
# Stage 1, SFT (--loss sft): next-token training on (image, question with context, alt-text).
# The settings are configs/sft.yaml (the released run: lr 2e-5, 1 epoch, batch 1 x accumulation 32);
# this script adds the paths and the host's launcher, ZeRO-3 config and precision (scripts/common.sh,
# which lists the variables that override the YAML). Paths are relative to your directory; extra
# arguments go to the trainer and win over the YAML. Try it on the tiny test model:
#   python -m llava.model.tiny --out outputs/tiny-llava     # from the repository root
#   bash scripts/sft.sh --max_steps 2
# The launch it makes, without the script: llava-mcmdpo train configs/sft.yaml --nproc 2 --max_steps 2
# The same settings without DeepSpeed: llava-mcmdpo train configs/sft.yaml --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/tiny-llava}            # an HF / original-format LLaVA, or a causal LM with VISION_TOWER
DATA_PATH=${DATA_PATH:-data/sample/sft.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft}
VISION_TOWER=${VISION_TOWER:-}                          # a CLIP directory, to compose a new LLaVA

require_default_model "set MODEL_PATH to a LLaVA checkpoint, or build the tiny test model with: $PYTHON -m llava.model.tiny --out $REPO_ROOT/outputs/tiny-llava"
stage_flags sft configs/sft.yaml
launch "$@"
