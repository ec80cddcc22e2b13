#!/usr/bin/env bash
# Supervised fine-tuning on one node with DeepSpeed. Environment variables pick the run; extra arguments
# pass through to sft.py and override the defaults below.
#
#   NGPU=8 MODEL=outputs/qwen-0.5b DATA=data/chat/train.jsonl bash scripts/sft.sh
#   LORA=1 MODEL=Qwen/Qwen2.5-0.5B DATA="data/chat/*.jsonl" bash scripts/sft.sh --lora_r 32
#
# Variables: NGPU (all visible GPUs), MODEL (HF directory or hub name), DATA (files/globs, space-separated),
# DS_CONFIG, OUTPUT_DIR, MAX_LENGTH, BATCH (per GPU), GRAD_ACC, LR, LORA (1: LoRA instead of full SFT).
# Rerunning the same command resumes from the newest complete checkpoint in OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MODEL=${MODEL:?set MODEL to the model to fine-tune (a pretrain.py output directory or a hub name)}
DATA=${DATA:-data/sft_demo/train.jsonl}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft}
LORA_ARGS=()
if [ "${LORA:-0}" = 1 ]; then LORA_ARGS=(--use_lora --learning_rate "${LR:-2e-4}"); fi

# shellcheck disable=SC2086  # DATA may hold several space-separated files or globs
deepspeed --num_gpus "$NGPU" sft.py \
  --deepspeed "$DS_CONFIG" --bf16 --model_name_or_path "$MODEL" --train_files $DATA \
  --max_length "${MAX_LENGTH:-2048}" --per_device_train_batch_size "${BATCH:-4}" \
  --gradient_accumulation_steps "${GRAD_ACC:-4}" --learning_rate "${LR:-2e-5}" --num_train_epochs 3 \
  --warmup_steps 50 --logging_steps 10 --save_steps 500 --save_total_limit 2 \
  --eval_strategy steps --eval_steps 500 --report_to swanlab --output_dir "$OUTPUT_DIR" "${LORA_ARGS[@]}" "$@"
