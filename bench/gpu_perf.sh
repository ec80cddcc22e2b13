#!/usr/bin/env bash
# The one-H200 speed runs of docs/PERFORMANCE.md: our pretraining path (bench/throughput.py) and the classic
# recipe (.whl/seed_recipe.py) in the same command, so every figure is a ratio to the reference.
# Run on the GPU machine from the repository root, carrying .whl:
#   PHASE=speed LOGS=$OUT bash bench/gpu_perf.sh
# PHASE: speed (the headline rows), candidates (one optimization at a time), loss (fast vs plain path over
# 200 steps), sft (packed vs padded), tune / tune2 ... tune7 (one-GPU settings; tune6/7: --compile_layers), memory2 / memory3 (largest
# Qwen2.5 shapes per ZeRO stage). A device command has 10 minutes: results.jsonl and a tarball of the logs
# under $OUT (a call brings back only a few files), and carry .whl. tune8/tune9 (--fp8) need torchao there too:
#   pip download torchao==0.18.0 --no-deps -d .whl
source .whl/setup.sh   # before `set -u`: its install pipeline may match nothing
set -uo pipefail       # not -e: one failed row must not lose the others
LOGS=${LOGS:-/tmp/gpu-logs}
PHASE=${PHASE:-speed}
LIMIT=${LIMIT:-200}    # seconds per row
mkdir -p "$LOGS"
RESULTS=$LOGS/results.jsonl
export LMTRAIN_CACHE=/tmp/lmtrain-cache

ours() {  # ours LABEL [throughput.py options...]
  local label=$1; shift
  timeout "$LIMIT" python bench/throughput.py --label "$label" --output_json "$RESULTS" --bf16 \
    --deepspeed ds_configs/zero2.json --dataloader_num_workers 2 "$@" > "$LOGS/$label.log" 2>&1
  echo "$label rc=$? $(grep -h RESULT "$LOGS/$label.log" | cut -c1-330)"
}
seed() {  # seed LABEL [seed_recipe.py options...]
  local label=$1; shift
  timeout "$LIMIT" deepspeed --num_gpus 1 .whl/seed_recipe.py "$@" > "$LOGS/$label.log" 2>&1
  local rc=$? line; line=$(grep -h RESULT "$LOGS/$label.log" | sed 's/^RESULT //')
  echo "$label rc=$rc $line"
  [ -n "$line" ] && echo "{\"label\": \"$label\", \"reference\": $line}" >> "$RESULTS"
}

# DeepSpeed ZeRO-2 variants for the one-GPU tuning rows (written next to the logs, not shipped).
ds_variant() {  # ds_variant NAME PYTHON-EXPRESSION-ON-c
  python - "$LOGS/ds-$1.json" "$2" <<'PY'
import json, sys
c = json.load(open("ds_configs/zero2.json"))
exec(sys.argv[2])
json.dump(c, open(sys.argv[1], "w"), indent=1)
PY
  echo "$LOGS/ds-$1.json"
}

for phase in $PHASE; do
case "$phase" in
tune)  # one-GPU DeepSpeed settings: overlap_comm (nothing to overlap on one GPU), buckets, the overflow check
  NOOVERLAP=$(ds_variant nooverlap 'c["zero_optimization"]["overlap_comm"] = False')
  BIG=$(ds_variant nooverlap-big 'c["zero_optimization"].update(overlap_comm=False, reduce_bucket_size=5e8, allgather_bucket_size=5e8)')
  NOCHECK=$(ds_variant nocheck 'c["zero_optimization"]["overlap_comm"] = False; c["bf16"]["check_grad_overflow"] = False')
  short=(--steps 20 --skip_steps 8 --logging_steps 4)
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours base-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}"
  ours nooverlap-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$NOOVERLAP"
  ours nooverlap-big-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$BIG"
  ours nocheck-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$NOCHECK"
  ours nooverlap-1.5b-bs24 --config qwen2.5-1.5b --batch 24 "${short[@]}" --deepspeed "$NOOVERLAP"
  ours nooverlap-1.5b-bs16-ga4 --config qwen2.5-1.5b --batch 16 --accumulation 4 --steps 10 --skip_steps 4 \
    --logging_steps 2 --deepspeed "$NOOVERLAP"
  seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  ours base-0.5b-bs32 --config qwen2.5-0.5b --batch 32 "${short[@]}"
  ours nooverlap-0.5b-bs32 --config qwen2.5-0.5b --batch 32 "${short[@]}" --deepspeed "$NOOVERLAP"
  ours nooverlap-0.5b-bs32-ga4 --config qwen2.5-0.5b --batch 32 --accumulation 4 --steps 10 --skip_steps 4 \
    --logging_steps 2 --deepspeed "$NOOVERLAP"
  ours nooverlap-0.5b-bs48 --config qwen2.5-0.5b --batch 48 "${short[@]}" --deepspeed "$NOOVERLAP"
  ;;
profile)
  ours profile-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 20 --profile_steps 12 16
  head -1 "$LOGS/profile-profile-1.5b-bs16.txt"
  ours nanfilter-off-0.5b-bs16 --config qwen2.5-0.5b --batch 16 --steps 30 --logging_nan_inf_filter false
  timeout 120 python -m cProfile -s tottime bench/throughput.py --config qwen2-tiny --seq 256 --batch 4 --steps 40 \
    --bf16 --deepspeed ds_configs/zero2.json > "$LOGS/cprofile-tiny.txt" 2>&1
  grep -A45 "Ordered by" "$LOGS/cprofile-tiny.txt" | head -50
  ;;
speed)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
  python -c "import torch; from lmtrain.model.attention import varlen_kernel; print('torch', torch.__version__, 'varlen', varlen_kernel() is not None)" | tee -a "$LOGS/gpu.txt"
  ours smoke --config qwen2-tiny --seq 256 --batch 4 --steps 12 --skip_steps 5
  timeout 120 python bench/attention_isolation.py --liger > "$LOGS/isolation.log" 2>&1; grep -h ISOLATION "$LOGS/isolation.log"
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours fast-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30
  ours fast-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 30
  seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  ours fast-0.5b-bs16 --config qwen2.5-0.5b --batch 16 --steps 30
  ours fast-0.5b-bs32 --config qwen2.5-0.5b --batch 32 --steps 30
  ;;
final2)  # the 1.5B row at the largest batch that fits, with its reference
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours fast-1.5b-bs24 --config qwen2.5-1.5b --batch 24 --steps 20 --skip_steps 8 --logging_steps 4
  ;;
final)  # in priority order: a short device budget cuts the tail
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours fast-1.5b-bs24 --config qwen2.5-1.5b --batch 24 --steps 25
  seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  ours fast-0.5b-bs48 --config qwen2.5-0.5b --batch 48 --steps 25
  ours fast-1.5b-bs16-ga4 --config qwen2.5-1.5b --batch 16 --accumulation 4 --steps 14 --skip_steps 6 --logging_steps 2
  ours fast-0.5b-bs32-ga4 --config qwen2.5-0.5b --batch 32 --accumulation 4 --steps 14 --skip_steps 6 --logging_steps 2
  ours mem-llama-7b-z2-gc --config llama-7b --vocab 32000 --batch 1 --steps 8 --skip_steps 3 --logging_steps 1 \
    --gradient_checkpointing
  ;;
candidates)
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours plain-1.5b-bs4-gc --config qwen2.5-1.5b --batch 4 --steps 30 --gradient_checkpointing \
    --attn_implementation sdpa --use_liger_kernel false
  ours noliger-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30 --use_liger_kernel false
  ours sdpa-docs-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30 --doc_length 1024 --attn_implementation sdpa
  ours flex-docs-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30 --doc_length 1024 --attn_implementation flex_attention
  ours varlen-docs-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30 --doc_length 1024
  ours compile-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 30 --torch_compile
  ;;
loss)
  ours loss-plain-0.5b --config qwen2.5-0.5b --batch 8 --steps 200 --logging_steps 10 --data markov \
    --doc_length 512 --gradient_checkpointing --attn_implementation sdpa --use_liger_kernel false
  ours loss-fast-0.5b --config qwen2.5-0.5b --batch 8 --steps 200 --logging_steps 10 --data markov --doc_length 512
  ;;
sft)
  ours sft-padded --stage sft --config qwen2.5-0.5b --seq 2048 --batch 8 --steps 30 --packing false
  ours sft-padding-free --stage sft --config qwen2.5-0.5b --seq 2048 --batch 8 --steps 30 --packing false --padding_free true
  ours sft-packed --stage sft --config qwen2.5-0.5b --seq 2048 --batch 8 --steps 30
  ;;
tune2)  # prepared, not run yet: where the per-micro-batch ~0.12 s of ZeRO-2 goes (lmtrain already turns overlap_comm
  # off with one process); contiguous_gradients and reduce_scatter copy/reduce every gradient with nothing to reduce
  NOCONTIG=$(ds_variant nocontig 'c["zero_optimization"]["contiguous_gradients"] = False')
  NOSCATTER=$(ds_variant noscatter 'c["zero_optimization"]["reduce_scatter"] = False')
  short=(--steps 20 --skip_steps 8 --logging_steps 4)
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours tuned-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}"
  ours nocontig-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$NOCONTIG"
  ours noscatter-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$NOSCATTER"
  ours profile-tuned-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 20 --profile_steps 12 16
  seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  ours tuned-0.5b-bs32-ga4 --config qwen2.5-0.5b --batch 32 --accumulation 4 --steps 10 --skip_steps 4 --logging_steps 2
  ours tuned-0.5b-bs48 --config qwen2.5-0.5b --batch 48 "${short[@]}"
  ;;
tune3)  # one process: ZeRO-2's per-micro-batch gradient hooks against ZeRO-1 without hooks and no DeepSpeed at all
  # (the HF Trainer's own loop, torch's fused AdamW, bf16 autocast); the reference first, priority order
  Z1=$(ds_variant zero1 'c["zero_optimization"].update(stage=1, overlap_comm=False, contiguous_gradients=False)')
  NOCONTIG=$(ds_variant nocontig 'c["zero_optimization"]["contiguous_gradients"] = False')
  short=(--steps 18 --skip_steps 6 --logging_steps 4)
  ga=(--accumulation 4 --steps 9 --skip_steps 3 --logging_steps 2)
  LIMIT=160 seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc   # 100 s ran out in the FusedAdam JIT build
  ours tuned-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}"
  ours nods-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed ""
  ours zero1-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$Z1"
  ours nods-1.5b-bs16-ga4 --config qwen2.5-1.5b --batch 16 "${ga[@]}" --deepspeed ""
  ours nocontig-1.5b-bs16 --config qwen2.5-1.5b --batch 16 "${short[@]}" --deepspeed "$NOCONTIG"
  ;;
tune4)  # the accumulation rows session 2 could not finish, with their references; compile without Liger last
  ga=(--accumulation 4 --steps 9 --skip_steps 3 --logging_steps 2)
  LIMIT=160 seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc   # the first DeepSpeed run JIT-builds FusedAdam
  ours tuned-0.5b-bs32-ga4 --config qwen2.5-0.5b --batch 32 "${ga[@]}"
  ours tuned-0.5b-bs48 --config qwen2.5-0.5b --batch 48 --steps 18 --skip_steps 6 --logging_steps 4
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  ours tuned-1.5b-bs16-ga4 --config qwen2.5-1.5b --batch 16 "${ga[@]}"
  LIMIT=150 ours compile-noliger-1.5b-bs8 --config qwen2.5-1.5b --batch 8 --steps 18 --skip_steps 8 --logging_steps 4 \
    --torch_compile
  ;;
tune5)  # torch.compile without Liger at the large batches (compile + Liger gave NaN; bs8 compile beat Liger bs8)
  LIMIT=160 seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  LIMIT=170 ours compile-noliger-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 18 --skip_steps 6 --logging_steps 4 \
    --torch_compile
  seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  LIMIT=150 ours compile-noliger-0.5b-bs32 --config qwen2.5-0.5b --batch 32 --steps 18 --skip_steps 6 --logging_steps 4 \
    --torch_compile
  ;;
tune6)  # --compile_layers: each decoder layer compiled, Liger's fused linear cross-entropy kept for the loss
  LIMIT=160 seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc   # the first DeepSpeed run JIT-builds FusedAdam
  LIMIT=190 ours layers-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 18 --skip_steps 6 --logging_steps 4 \
    --compile_layers
  LIMIT=190 ours layers-1.5b-bs24 --config qwen2.5-1.5b --batch 24 --steps 14 --skip_steps 6 --logging_steps 4 \
    --compile_layers
  ;;
tune7)  # the 0.5B rows of --compile_layers
  LIMIT=160 seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  LIMIT=190 ours layers-0.5b-bs32 --config qwen2.5-0.5b --batch 32 --steps 18 --skip_steps 6 --logging_steps 4 \
    --compile_layers
  LIMIT=190 ours layers-0.5b-bs48 --config qwen2.5-0.5b --batch 48 --steps 14 --skip_steps 6 --logging_steps 4 \
    --compile_layers
  ;;
tune8)  # --fp8 (torchao float8 linears in the decoder layers) with --compile_layers; needs the torchao wheel in .whl
  python -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)" 2>&1 | tail -1
  LIMIT=160 seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  LIMIT=190 ours fp8-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 18 --skip_steps 6 --logging_steps 4 \
    --compile_layers --fp8
  LIMIT=190 ours fp8-1.5b-bs24 --config qwen2.5-1.5b --batch 24 --steps 14 --skip_steps 6 --logging_steps 4 \
    --compile_layers --fp8
  ;;
tune9)  # 0.5B --fp8 at batch 48, the 1.5B --fp8 row again beside a second reference, fp8's 200-step loss curve
  LIMIT=160 seed seed-0.5b-bs8-gc --arch 0.5b --bs 8 --gc
  LIMIT=170 ours fp8-0.5b-bs48 --config qwen2.5-0.5b --batch 48 --steps 14 --skip_steps 6 --logging_steps 4 \
    --compile_layers --fp8
  seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  LIMIT=170 ours fp8-1.5b-bs24 --config qwen2.5-1.5b --batch 24 --steps 14 --skip_steps 6 --logging_steps 4 \
    --compile_layers --fp8
  # the loss phase's settings (its plain and fast curves are in docs/gpu_logs/h200-2026-12-02/call2-results.jsonl)
  LIMIT=150 ours loss-fp8-0.5b --config qwen2.5-0.5b --batch 8 --steps 200 --logging_steps 10 --data markov \
    --doc_length 512 --compile_layers --fp8
  ;;
docs)  # document masking on packed blocks (documents of mean length 1024): varlen, SDPA's materialized mask, flex
  LIMIT=150 seed seed-1.5b-bs4-gc --arch 1.5b --bs 4 --gc
  short=(--config qwen2.5-1.5b --batch 8 --steps 12 --skip_steps 4 --logging_steps 4 --doc_length 1024)
  LIMIT=80 ours varlen-docs-1.5b-bs8 "${short[@]}"
  LIMIT=80 ours sdpa-docs-1.5b-bs8 "${short[@]}" --attn_implementation sdpa
  LIMIT=80 ours flex-docs-1.5b-bs8 "${short[@]}" --attn_implementation flex_attention
  ;;
memory2)  # the largest Qwen2.5-family shape per strategy on one H200 (plan.py predicts 7B does not fit ZeRO-2/3)
  Q3B=hidden_size=2048,intermediate_size=11008,num_hidden_layers=36,num_attention_heads=16,num_key_value_heads=2,vocab_size=151936
  Q7B=hidden_size=3584,intermediate_size=18944,num_hidden_layers=28,num_attention_heads=28,num_key_value_heads=4,tie_word_embeddings=false,vocab_size=152064
  mem=(--config qwen2.5-1.5b --vocab 0 --batch 1 --steps 6 --skip_steps 2 --logging_steps 1 --gradient_checkpointing)
  ours mem-qwen2.5-7b-zero2 "${mem[@]}" --config_overrides "$Q7B" --deepspeed ds_configs/zero2.json
  ours mem-qwen2.5-3b-zero2 "${mem[@]}" --config_overrides "$Q3B" --deepspeed ds_configs/zero2.json
  ours mem-qwen2.5-7b-zero3_offload "${mem[@]}" --config_overrides "$Q7B" --deepspeed ds_configs/zero3_offload.json
  ours mem-qwen2.5-7b-zero3 "${mem[@]}" --config_overrides "$Q7B" --deepspeed ds_configs/zero3.json
  ours mem-qwen2.5-3b-zero3 "${mem[@]}" --config_overrides "$Q3B" --deepspeed ds_configs/zero3.json
  ours compile-1.5b-bs16 --config qwen2.5-1.5b --batch 16 --steps 20 --skip_steps 8 --logging_steps 4 --torch_compile
  ;;
memory3)  # the two rows memory2 could not finish: 7B ZeRO-2 (the disk check refused it), 7B ZeRO-3 + offload
  Q7B=hidden_size=3584,intermediate_size=18944,num_hidden_layers=28,num_attention_heads=28,num_key_value_heads=4,tie_word_embeddings=false,vocab_size=152064
  mem=(--config qwen2.5-1.5b --vocab 0 --batch 1 --steps 5 --skip_steps 2 --logging_steps 1 --gradient_checkpointing)
  LIMIT=100 ours mem-qwen2.5-7b-zero2 "${mem[@]}" --config_overrides "$Q7B" --deepspeed ds_configs/zero2.json
  LIMIT=190 ours mem-qwen2.5-7b-zero3_offload "${mem[@]}" --config_overrides "$Q7B" --deepspeed ds_configs/zero3_offload.json
  ;;
memory)  # the largest shapes per strategy: llama-7b (6.7B) under each; a 13B LLaMA shape with offload
  LLAMA13B=hidden_size=5120,intermediate_size=13824,num_hidden_layers=40,num_attention_heads=40,num_key_value_heads=40,vocab_size=32000
  for ds in zero2 zero3 zero3_offload; do
    ours "mem-llama-7b-$ds" --config llama-7b --vocab 32000 --batch 1 --steps 8 --skip_steps 3 --logging_steps 1 \
      --gradient_checkpointing --deepspeed "ds_configs/$ds.json"
  done
  ours mem-llama-13b-zero3_offload --config llama-7b --vocab 0 --config_overrides "$LLAMA13B" --batch 1 \
    --steps 6 --skip_steps 2 --logging_steps 1 --gradient_checkpointing --deepspeed ds_configs/zero3_offload.json
  ;;
esac
done
