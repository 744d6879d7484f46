#!/usr/bin/env bash
# Stage 2, plain DPO (--loss dpo) from the SFT checkpoint.
# The settings are configs/dpo.yaml (the released run: lr 5e-7, 1 epoch, batch 1 x accumulation 16,
# beta 0.1); this script adds the paths and the host's launcher, ZeRO-3 config and precision
# (scripts/common.sh, which lists the variables that override the YAML; BETA here). Extra arguments
# go to the trainer and win over the YAML:
#   bash scripts/dpo.sh --max_steps 2
# The launch it makes, without the script: llava-mcmdpo train configs/dpo.yaml --nproc 2 --max_steps 2
# The same settings without DeepSpeed: llava-mcmdpo train configs/dpo.yaml --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/dpo}
# BETA        --beta (default: the YAML's, 0.1)

require_default_model "run scripts/sft.sh first, or set MODEL_PATH to an SFT checkpoint"
stage_flags align configs/dpo.yaml
set_flags BETA=--beta
launch "$@"
