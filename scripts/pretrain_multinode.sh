#!/usr/bin/env bash
# Pretrain across several nodes with DeepSpeed's launcher and a hostfile. Run it on the first node; the
# launcher starts the other nodes over passwordless ssh. Every node needs the same repository path,
# environment and data (a shared filesystem is easiest), and the nodes must reach MASTER_ADDR:MASTER_PORT.
#
#   hostfile (one line per node):      node1 slots=8
#                                      node2 slots=8
#   HOSTFILE=hostfile MASTER_ADDR=node1 MODEL_CONFIG=llama-1b DATA=data/mix bash scripts/pretrain_multinode.sh
#
# Extra arguments pass through to pretrain.py. Without ssh, start `deepspeed --no_ssh --node_rank N ...`
# (or torchrun with --nnodes/--node_rank) on each node yourself, with the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}
MASTER_PORT=${MASTER_PORT:-29500}
MODEL_CONFIG=${MODEL_CONFIG:-qwen2.5-1.5b}
TOKENIZER=${TOKENIZER:-outputs/tokenizer}
DATA=${DATA:-data/prepared}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain-${MODEL_CONFIG}-multinode}

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" pretrain.py \
  --deepspeed "$DS_CONFIG" --bf16 --gradient_checkpointing \
  --config_name "$MODEL_CONFIG" --tokenizer_name "$TOKENIZER" --dataset_path "$DATA" \
  --per_device_train_batch_size "${BATCH:-8}" --gradient_accumulation_steps "${GRAD_ACC:-1}" \
  --learning_rate 3e-4 --warmup_steps 1000 --max_steps 100000 \
  --logging_steps 10 --save_steps 1000 --save_total_limit 3 --save_on_each_node false \
  --report_to swanlab --output_dir "$OUTPUT_DIR" "$@"
