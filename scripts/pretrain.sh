#!/usr/bin/env bash
# Pretrain on one node with DeepSpeed. Environment variables pick the size; extra arguments pass through
# to pretrain.py and override the defaults below.
#
#   NGPU=8 MODEL_CONFIG=qwen2.5-0.5b DATA=data/mix bash scripts/pretrain.sh --max_steps 20000
#   DS_CONFIG=ds_configs/zero3.json MODEL_CONFIG=llama-1b bash scripts/pretrain.sh --learning_rate 2e-4
#
# Variables: NGPU (all visible GPUs), MODEL_CONFIG (configs/ name or directory), TOKENIZER, DATA (prepared
# dataset directory), DS_CONFIG, OUTPUT_DIR, BATCH (per GPU), GRAD_ACC, BLOCK (only used for raw data).
# Rerunning the same command resumes from the newest complete checkpoint in OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MODEL_CONFIG=${MODEL_CONFIG:-qwen2.5-0.5b}
TOKENIZER=${TOKENIZER:-outputs/tokenizer}
DATA=${DATA:-data/prepared}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain-${MODEL_CONFIG}}
BATCH=${BATCH:-8}
GRAD_ACC=${GRAD_ACC:-4}

deepspeed --num_gpus "$NGPU" pretrain.py \
  --deepspeed "$DS_CONFIG" --bf16 --gradient_checkpointing \
  --config_name "$MODEL_CONFIG" --tokenizer_name "$TOKENIZER" --dataset_path "$DATA" \
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$GRAD_ACC" \
  --learning_rate 3e-4 --warmup_steps 1000 --max_steps 100000 --weight_decay 0.1 \
  --logging_steps 10 --save_steps 1000 --save_total_limit 3 \
  --eval_strategy steps --eval_steps 1000 --max_eval_samples 2000 \
  --report_to swanlab --output_dir "$OUTPUT_DIR" "$@"
