#!/usr/bin/env bash
# The H100 acceptance run for pretraining and SFT on the Qwen2.5-0.5B shape (see docs/GPU_RUNS.md):
#   ZeRO-2 pretraining with a planned stop and a resume, ZeRO-3 pretraining with a gathered save,
#   full SFT with ZeRO-2, LoRA SFT, and the classic-recipe reference (.whl/seed_recipe.py) in the same command.
# Run on the GPU machine from the repository root, carrying .whl and data (data/shakespeare.jsonl,
# data/tok32k, data/sft_demo made on the CPU machine):  STEPS=60 bash bench/gpu_pretrain_sft.sh
source .whl/setup.sh   # before `set -e`: its install pipeline ends in a grep that may match nothing
set -euo pipefail
WORK=${WORK:-/tmp/gpu}          # models and data (large; stay on the GPU machine)
LOGS=${LOGS:-$WORK/logs}        # logs (small; bring these back)
STEPS=${STEPS:-60}
PHASE=${PHASE:-all}             # pretrain, sft or all (one device command has a 10-minute limit)
mkdir -p "$WORK" "$LOGS"
export LMTRAIN_CACHE=$WORK/cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$LOGS/gpu.txt"
OUT=$WORK

if [ "$PHASE" != sft ]; then
python data_prep/prepare_pretrain.py --tokenizer_name data/tok32k --sources data/shakespeare.jsonl \
  --block_size 2048 --preprocessing_num_workers 8 --output_dir "$OUT/data" > "$LOGS/prepare.log" 2>&1
tail -12 "$LOGS/prepare.log"

COMMON=(--config_name qwen2.5-0.5b --tokenizer_name data/tok32k --dataset_path "$OUT/data" --bf16
        --per_device_train_batch_size 8 --gradient_checkpointing --learning_rate 3e-4 --warmup_steps 10
        --logging_steps 5 --save_steps 1000 --eval_strategy steps --eval_steps 30 --max_eval_samples 32
        --max_steps "$STEPS" --report_to tensorboard --disable_tqdm true --dataloader_num_workers 2)
echo "== ZeRO-2: planned stop at $((STEPS / 2)), then resume"
deepspeed --num_gpus 1 pretrain.py --deepspeed ds_configs/zero2.json "${COMMON[@]}" --output_dir "$OUT/pt-z2" \
  --stop_after_steps $((STEPS / 2)) > "$LOGS/pt-z2-part1.log" 2>&1
deepspeed --num_gpus 1 pretrain.py --deepspeed ds_configs/zero2.json "${COMMON[@]}" --output_dir "$OUT/pt-z2" \
  > "$LOGS/pt-z2-part2.log" 2>&1
grep -hE "resuming|'loss'|eval_loss|saved the final" "$LOGS"/pt-z2-part*.log | tail -30

echo "== ZeRO-3 (gathered save)"
deepspeed --num_gpus 1 pretrain.py --deepspeed ds_configs/zero3.json "${COMMON[@]}" --max_steps 20 \
  --eval_strategy no --output_dir "$OUT/pt-z3" > "$LOGS/pt-z3.log" 2>&1
grep -hE "'loss'|saved the final" "$LOGS/pt-z3.log" | tail -5

echo "== reload + generate"
python generate.py --model "$OUT/pt-z2" --prompt "ROMEO." --max_new_tokens 40 > "$LOGS/generate.log" 2>&1; tail -4 "$LOGS/generate.log"
python - "$OUT/pt-z3" <<'PY' | tee -a "$LOGS/generate.log"
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("zero3 reload:", sum(p.numel() for p in m.parameters()) / 1e6, "M params, all finite:",
      all(torch.isfinite(p).all() for p in m.parameters()))
PY

echo "== reference: the classic recipe, same GPU, same command"
deepspeed --num_gpus 1 .whl/seed_recipe.py --arch 0.5b --bs 8 --gc > "$LOGS/seed.log" 2>&1; grep RESULT "$LOGS/seed.log"
fi
[ "$PHASE" = pretrain ] && exit 0

echo "== full SFT, ZeRO-2"
SFT=(--train_files data/sft_demo/train.jsonl --max_length 512 --bf16 --per_device_train_batch_size 16
     --logging_steps 5 --max_steps "$STEPS" --warmup_steps 5 --report_to none --disable_tqdm true --save_strategy no)
deepspeed --num_gpus 1 sft.py --deepspeed ds_configs/zero2.json --model_name_or_path "$OUT/pt-z2" "${SFT[@]}" \
  --learning_rate 1e-4 --output_dir "$OUT/sft-full" > "$LOGS/sft-full.log" 2>&1
grep -hE "SFT data|'loss'|saved the final" "$LOGS/sft-full.log" | tail -6
echo "== LoRA SFT"
deepspeed --num_gpus 1 sft.py --deepspeed ds_configs/zero2.json --model_name_or_path "$OUT/pt-z2" "${SFT[@]}" \
  --use_lora --lora_r 16 --learning_rate 1e-3 --output_dir "$OUT/sft-lora" > "$LOGS/sft-lora.log" 2>&1
grep -hE "LoRA|'loss'|merged" "$LOGS/sft-lora.log" | tail -6
python evaluate.py --model "$OUT/sft-full" --sft_eval_file data/sft_demo/eval.jsonl --max_new_tokens 16 \
  > "$LOGS/eval-sft-full.log" 2>&1; tail -8 "$LOGS/eval-sft-full.log"
