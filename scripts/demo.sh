#!/usr/bin/env bash
# The whole pipeline on the built-in Shakespeare corpus, on whatever this machine has:
#   tokenizer -> prepared data -> pretrain a tiny Qwen2 -> sample text  (SFT and evaluation continue it)
# CPU: a ~1M-parameter model, a few minutes on 2 cores. GPU: bf16 + DeepSpeed ZeRO-2, a larger model.
#
#   bash scripts/demo.sh                      # everything under outputs/demo
#   DEMO_STEPS=200 bash scripts/demo.sh       # shorter
#   OUT=/tmp/demo NGPU=2 bash scripts/demo.sh
# Rerunning resumes/reuses what is already there (tokenizer, prepared data, checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/demo}
PYTHON=${PYTHON:-python}

if $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NGPU=${NGPU:-$($PYTHON -c "import torch; print(torch.cuda.device_count())")}
  DEMO_STEPS=${DEMO_STEPS:-2000}
  LAUNCH=(deepspeed --num_gpus "$NGPU" pretrain.py --deepspeed ds_configs/zero2.json --bf16)
  MODEL=(--config_name qwen2-tiny --config_overrides hidden_size=512,intermediate_size=1536,num_hidden_layers=8,num_attention_heads=8,num_key_value_heads=4)
  BATCH_SIZE=32 BLOCK=512
else
  DEMO_STEPS=${DEMO_STEPS:-600}
  LAUNCH=($PYTHON pretrain.py)
  MODEL=(--config_name qwen2-tiny)
  BATCH_SIZE=16 BLOCK=256
fi

echo "== 1/4 tokenizer"
[ -f "$OUT/tokenizer/tokenizer.json" ] || $PYTHON data_prep/train_tokenizer.py --vocab_size 4096 --output_dir "$OUT/tokenizer"

echo "== 2/4 data"
[ -f "$OUT/data/dataset_dict.json" ] || $PYTHON data_prep/prepare_pretrain.py --tokenizer_name "$OUT/tokenizer" \
  --sources shakespeare --block_size "$BLOCK" --validation_split_percentage 2 --output_dir "$OUT/data"

echo "== 3/4 pretrain (${DEMO_STEPS} steps)"
"${LAUNCH[@]}" "${MODEL[@]}" --tokenizer_name "$OUT/tokenizer" --dataset_path "$OUT/data" --per_device_train_batch_size "$BATCH_SIZE" \
  --max_steps "$DEMO_STEPS" --learning_rate 3e-3 --warmup_steps 50 --logging_steps 25 \
  --eval_strategy steps --eval_steps 200 --max_eval_samples 64 --save_steps 200 --save_total_limit 2 \
  --report_to tensorboard --output_dir "$OUT/pretrain" --disable_tqdm true

echo "== 4/4 samples"
$PYTHON generate.py --model "$OUT/pretrain" --prompt "ROMEO." --prompt "KING HENRY." --prompt "To be, or not" \
  --max_new_tokens 80 --temperature 0.8
echo "curves: $OUT/pretrain/training_curves.png"
