#!/usr/bin/env bash
# Stage 1, projector alignment (LLaVA's pre-training): a language model and a CLIP vision tower are
# composed into a new LLaVA, and only its projector trains, on image captions, with the `plain`
# template (image, then caption; only the caption is learned). LLaVA-1.5's settings are the
# defaults: lr 1e-3, 1 epoch, cosine, warmup 0.03, global batch 256, model_max_length 2048,
# mlp2x_gelu projector on the vision layer -2, ZeRO-2, images resized and centre-cropped (LLaVA's
# stage 1 leaves --image_aspect_ratio at its default, square). Extra arguments go to the trainer:
#   bash scripts/pretrain.sh --max_steps 2
#
# Out, in OUTPUT_DIR: the whole model in HF format, and mm_projector.bin (the projector alone, with
# LLaVA's names), which stage 2 reads with --pretrain_mm_mlp_adapter:
#   MODEL_PATH=vicuna-dir VISION_TOWER=clip-dir ... bash scripts/sft.sh --pretrain_mm_mlp_adapter OUTPUT_DIR/mm_projector.bin
set -euo pipefail
ZERO=${ZERO:-zero2}  # LLaVA's stage 1 runs ZeRO-2 (common.sh's default is ZeRO-3, for stage 2)
source "$(dirname "$0")/common.sh"

MODEL_PATH=${MODEL_PATH:-outputs/tiny-llama}            # the language model (Vicuna in LLaVA-1.5)
VISION_TOWER=${VISION_TOWER:-llava/model/assets/sample_clip}  # a CLIP directory (CLIP ViT-L/14-336 in LLaVA-1.5)
DATA_PATH=${DATA_PATH:-data/sample/pretrain.json}      # caption records (blip_laion_cc_sbu_558k.json in LLaVA-1.5)
IMAGE_FOLDER=${IMAGE_FOLDER:-data/sample}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-3}
BATCH_SIZE=${BATCH_SIZE:-32}                            # per device
GLOBAL_BATCH=${GLOBAL_BATCH:-256}                       # LLaVA-1.5: 32 per device x 8 GPUs
# GRAD_ACCUM, when set, is the accumulation; else the launcher keeps the global batch whatever the process
# count: GLOBAL_BATCH / (BATCH_SIZE x NUM_GPUS), at least 1
if [ -n "${GRAD_ACCUM:-}" ]; then ACCUM=(--gradient_accumulation_steps "$GRAD_ACCUM"); else ACCUM=(--global_batch "$GLOBAL_BATCH"); fi

launch \
  --model_name_or_path "$MODEL_PATH" --vision_tower "$VISION_TOWER" --version plain \
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --task LM \
  --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True --mm_vision_select_layer -2 \
  --mm_use_im_start_end False --mm_use_im_patch_token False \
  --image_aspect_ratio square --group_by_modality_length False \
  --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH_SIZE" \
  "${ACCUM[@]}" --learning_rate "$LR" --weight_decay 0. \
  --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 \
  --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True \
  --save_strategy steps --save_steps 24000 --save_total_limit 1 \
  --output_dir "$OUTPUT_DIR" \
  "$@"
