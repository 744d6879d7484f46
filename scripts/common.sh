# Shared by sft.sh, dpo.sh and mcmdpo.sh: it only assembles the launcher and the flags that
# depend on the host. Every setting is an environment variable with a working default.
#
#   NUM_GPUS      processes on this node (default: the GPUs present; on a host without CUDA: 1 CPU process)
#   HOSTFILE      DeepSpeed hostfile for multi-node runs (default: none, one node)
#   MASTER_PORT   rendezvous port (default 29500)
#   ZERO          zero2 | zero3 | zero3_offload (default zero3, as published)
#   PRECISION     bf16 | fp16 | fp32 (default: bf16 with CUDA, fp32 without)
#   PARADIGM      a | b | c | d: when the vision tower trains (METHOD.md); default d (both stages)
#   REPORT_TO     wandb | tensorboard | none (default wandb, as published)
#   NUM_WORKERS   data loader workers (default 4 with CUDA, 0 without)
#   OMP_NUM_THREADS  threads per process on a host without CUDA (default: cores / NUM_GPUS)
#   PYTHON        interpreter (default: .venv/bin/python if present, else python3)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ -z "${NUM_GPUS:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())"); else NUM_GPUS=1; fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
ZERO=${ZERO:-zero3}
PARADIGM=${PARADIGM:-d}
case "$PARADIGM" in a|b|c|d) ;; *) echo "PARADIGM must be a, b, c or d (got $PARADIGM)" >&2; exit 2 ;; esac
REPORT_TO=${REPORT_TO:-wandb}
if [ -z "${PRECISION:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then PRECISION=bf16; else PRECISION=fp32; fi
fi
# CPU processes share the cores: more threads than cores makes OpenMP spin in the kernel.
if [ "$HAS_CUDA" != 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NUM_GPUS )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
if [ -z "${NUM_WORKERS:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then NUM_WORKERS=4; else NUM_WORKERS=0; fi
fi

case "$PRECISION" in
  bf16) PRECISION_FLAGS=(--bf16 True --fp16 False) ;;
  fp16) PRECISION_FLAGS=(--bf16 False --fp16 True) ;;
  fp32) PRECISION_FLAGS=(--bf16 False --fp16 False) ;;
  *) echo "PRECISION must be bf16, fp16 or fp32 (got $PRECISION)" >&2; exit 2 ;;
esac
# TF32 matmuls exist on NVIDIA GPUs only.
if [ "$HAS_CUDA" = 1 ]; then PRECISION_FLAGS+=(--tf32 True); fi

# vit_trains STAGE: does the vision tower train in this stage (sft | align) under $PARADIGM?
#   (a) frozen, frozen  (b) frozen, trained  (c) trained, frozen  (d) trained, trained
vit_trains() {
  case "$PARADIGM:$1" in
    a:*|b:sft|c:align) echo False ;;
    b:align|c:sft|d:*) echo True ;;
    *) echo "PARADIGM must be a, b, c or d (got $PARADIGM)" >&2; exit 2 ;;
  esac
}

# stage_flags STAGE: the published flags every stage shares, from the stage's variables
# (MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR EPOCHS LR BATCH_SIZE GRAD_ACCUM).
stage_flags() {
  STAGE_FLAGS=(
    --model_name_or_path "$MODEL_PATH" --version v1
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_use_im_start_end False --mm_use_im_patch_token False
    --image_aspect_ratio pad --group_by_modality_length True
    --unfreeze_mm_vision_tower "$(vit_trains "$1")"
    --num_train_epochs "$EPOCHS" --per_device_train_batch_size "$BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUM" --learning_rate "$LR" --weight_decay 0.
    --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1
    --model_max_length 2048 --gradient_checkpointing True --lazy_preprocess True
    --save_strategy steps --save_steps 50000 --save_total_limit 1
    --output_dir "$OUTPUT_DIR"
  )
}

# launch ARGS...: the trainer under DeepSpeed's launcher, one process per GPU (or CPU process).
launch() {
  local config="scripts/${ZERO}.json"
  [ -f "$config" ] || { echo "no DeepSpeed config $config (ZERO=$ZERO)" >&2; exit 2; }
  local launcher=("$(dirname "$PYTHON")/deepspeed")
  [ -x "${launcher[0]}" ] || launcher=(deepspeed)
  if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
  set -x
  "${launcher[@]}" --master_port "$MASTER_PORT" llava/train/train.py --deepspeed "$config" \
    "${PRECISION_FLAGS[@]}" --report_to "$REPORT_TO" --dataloader_num_workers "$NUM_WORKERS" "$@"
  { set +x; } 2>/dev/null
}
