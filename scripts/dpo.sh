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

launch \
  --model_name_or_path "$MODEL_PATH" --version v1 \
  --task DPO --use_cross_modal_loss False --beta "$BETA" \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio pad --group_by_modality_length True \
  --unfreeze_mm_vision_tower "$(vit_trains align)" \
  --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH_SIZE" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --learning_rate "$LR" --weight_decay 0. \
  --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True \
  --save_strategy steps --save_steps 50000 --save_total_limit 1 \
  --output_dir "$OUTPUT_DIR" "$@"
