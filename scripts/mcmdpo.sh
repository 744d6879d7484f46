#!/usr/bin/env bash
# Stage 2, MCM-DPO (--loss mcm_dpo): all seven terms, from the SFT checkpoint.
# The settings are configs/mcmdpo.yaml (the released run: lr 5e-7, 2 epochs, batch 1 x accumulation
# 16, beta 0.1, diffusion-corrupted images at step 700, weights r1..r7 and norm 2.8); this script adds
# the paths and the host's launcher, ZeRO-3 config and precision (scripts/common.sh, which lists the
# variables that override the YAML; the stage's own are below). Extra arguments go to the trainer and
# win over the YAML:
#   bash scripts/mcmdpo.sh --max_steps 2
# The launch it makes, without the script: llava-mcmdpo train configs/mcmdpo.yaml --nproc 2 --max_steps 2
# The same settings without DeepSpeed: llava-mcmdpo train configs/mcmdpo.yaml --max_steps 2
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/sft}
DATA_PATH=${DATA_PATH:-data/sample/preference.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/mcmdpo}
# BETA           --beta (default: the YAML's, 0.1)
# IMAGE_TYPE     --use_image_type (default: the YAML's, diffusion)
# CL_REWARD_NUM  --use_cl_reward_num (a released alias), how many of the seven terms stay on over the
#                YAML's term_weights (default: all 7); TERMS is its old name, still read
CL_REWARD_NUM=${CL_REWARD_NUM:-${TERMS:-}}

require_default_model "run scripts/sft.sh first, or set MODEL_PATH to an SFT checkpoint"
stage_flags align configs/mcmdpo.yaml
set_flags BETA=--beta IMAGE_TYPE=--use_image_type CL_REWARD_NUM=--use_cl_reward_num
launch "$@"
