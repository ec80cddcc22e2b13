#!/usr/bin/env bash
# Pretrain across several nodes. Every node needs the same repository path, environment and data (a shared
# filesystem is easiest); the training checks that before it starts (lmtrain/preflight_nodes.py) and stops on
# every rank if one node differs. docs/MULTI_GPU.md has the whole story.
#
# Route 1, DeepSpeed's launcher (LAUNCHER=deepspeed, the default): run it on the first node; it starts the
# others over passwordless ssh (pdsh). A hostfile has one line per node:
#     node1 slots=8
#     node2 slots=8
#   HOSTFILE=hostfile MODEL_CONFIG=llama-1b DATA=data/mix bash scripts/pretrain_multinode.sh
#
# Route 2, torchrun (LAUNCHER=torchrun): run the same command on every node, with its NODE_RANK
# (scripts/slurm/pretrain.sbatch does this through srun):
#   LAUNCHER=torchrun NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 bash scripts/pretrain_multinode.sh   # on node1
#   LAUNCHER=torchrun NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 bash scripts/pretrain_multinode.sh   # on node2
#
# Variables (defaults in brackets):
#   HOSTFILE [hostfile]           deepspeed route: the nodes and their GPU slots
#   MASTER_ADDR [first hostfile host; required for torchrun]  the address every node reaches the first on
#   MASTER_PORT [29500]           a free TCP port on MASTER_ADDR
#   NNODES, NODE_RANK [1, 0]      torchrun route: the number of nodes and this node's index (0 on MASTER_ADDR)
#   NPROC_PER_NODE [GPUs here]    torchrun route: processes (GPUs) per node
#   NCCL_SOCKET_IFNAME            the network interface NCCL's sockets and bootstrap use (e.g. eth0, ib0,
#                                 ^lo,docker): set it when nodes have several and the first is unreachable
#   NCCL_IB_DISABLE [NCCL: 0]     1 turns InfiniBand/RoCE off (TCP sockets only)
#   NCCL_IB_HCA                   which InfiniBand adapters to use (e.g. mlx5_0,mlx5_1)
#   NCCL_IB_GID_INDEX             RoCE: the GID index of the routable address (often 3)
#   NCCL_DEBUG [WARN]             INFO prints the chosen interfaces and transports: the first thing to look at
#   MODEL_CONFIG, TOKENIZER, DATA, DS_CONFIG, OUTPUT_DIR, BATCH, GRAD_ACC   as in scripts/pretrain.sh
#   DRY_RUN=1                     print the launch command and exit
# The NCCL_* variables set here reach every node: DeepSpeed's launcher forwards NCCL_* over ssh, and with
# torchrun each node's command sets its own. Extra arguments pass through to pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER=${LAUNCHER:-deepspeed}
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
MODEL_CONFIG=${MODEL_CONFIG:-qwen2.5-1.5b}
TOKENIZER=${TOKENIZER:-outputs/tokenizer}
DATA=${DATA:-data/prepared}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain-${MODEL_CONFIG}-multinode}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
for name in NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_IB_HCA NCCL_IB_GID_INDEX; do
  if [[ -n "${!name:-}" ]]; then export "${name?}"; fi
done

TRAIN_ARGS=(pretrain.py --deepspeed "$DS_CONFIG" --bf16 --gradient_checkpointing
  --config_name "$MODEL_CONFIG" --tokenizer_name "$TOKENIZER" --dataset_path "$DATA"
  --per_device_train_batch_size "${BATCH:-8}" --gradient_accumulation_steps "${GRAD_ACC:-1}"
  --learning_rate 3e-4 --warmup_steps 1000 --max_steps 100000
  --logging_steps 10 --save_steps 1000 --save_total_limit 3 --save_on_each_node false
  --report_to swanlab --output_dir "$OUTPUT_DIR" "$@")

case "$LAUNCHER" in
  deepspeed)
    if [[ ! -f "$HOSTFILE" ]]; then
      echo "error: HOSTFILE=$HOSTFILE does not exist; write one line per node, e.g. 'node1 slots=8'" >&2; exit 2
    fi
    # Checked here, before ssh starts anything: DeepSpeed's own parser fails later with a traceback.
    read -r NNODES GPUS SLOTS < <(awk '
      { sub(/#.*/, "") } NF == 0 { next }
      NF != 2 || $2 !~ /^slots=[0-9]+$/ { printf "bad %d\n", NR; exit }
      { split($2, s, "="); nodes++; gpus += s[2]; seen[s[2]] = 1 }
      END { if (nodes) { n = 0; for (k in seen) n++; print nodes, gpus, (n == 1 ? "same" : "differ") } }' "$HOSTFILE") \
      || true  # no output (no node): read fails at the end of input, reported below
    if [[ "${NNODES:-}" == bad ]]; then
      echo "error: $HOSTFILE:$GPUS: expected 'HOST slots=N' (one node per line)" >&2; exit 2
    fi
    if [[ -z "${NNODES:-}" ]]; then echo "error: $HOSTFILE lists no node" >&2; exit 2; fi
    if [[ "$SLOTS" != same ]]; then
      echo "error: $HOSTFILE: the nodes have different slot counts; give every node the same number of GPUs" >&2
      exit 2
    fi
    MASTER_ADDR=${MASTER_ADDR:-$(awk '{ sub(/#.*/, "") } NF { print $1; exit }' "$HOSTFILE")}
    echo "deepspeed: $NNODES node(s), $GPUS GPU(s) in all, master $MASTER_ADDR:$MASTER_PORT" >&2
    COMMAND=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
             "${TRAIN_ARGS[@]}")
    ;;
  torchrun)
    MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK 0}
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
    if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
      echo "error: NODE_RANK=$NODE_RANK is outside 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2; exit 2
    fi
    echo "torchrun: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es) here, master $MASTER_ADDR:$MASTER_PORT" >&2
    COMMAND=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
             --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${TRAIN_ARGS[@]}")
    ;;
  *)
    echo "error: LAUNCHER=$LAUNCHER: use deepspeed or torchrun" >&2; exit 2
    ;;
esac

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  env | grep '^NCCL_' | sort >&2 || true
  printf '%q ' "${COMMAND[@]}"; echo
  exit 0
fi
exec "${COMMAND[@]}"
