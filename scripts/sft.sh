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

launch \
  --model_name_or_path "$MODEL_PATH" ${VISION_TOWER:+--vision_tower "$VISION_TOWER"} \
  --version v1 --task LM \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio pad --group_by_modality_length True \
  --unfreeze_mm_vision_tower "$(vit_trains sft)" \
  --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --learning_rate "$LR" --weight_decay 0. \
  --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --output_dir "$OUTPUT_DIR" "$@"
