#!/usr/bin/env bash
# `vllm serve` on a model trained here, queried through its OpenAI-compatible API (chat and completions).
#   bash scripts/check_vllm_serve.sh outputs/demo/sft
set -euo pipefail
MODEL=${1:-outputs/demo/sft}
PORT=${PORT:-8011}
LOG=${LOG:-/tmp/vllm_serve.log}
vllm serve "$MODEL" --port "$PORT" --gpu-memory-utilization 0.3 --max-model-len 1024 > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  curl -sf "localhost:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2> /dev/null || { tail -30 "$LOG"; echo "vllm serve exited"; exit 1; }
  sleep 1
done
curl -sf "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What number comes after 41?\"}], \"temperature\": 0, \"max_tokens\": 16}"
echo
curl -sf "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\",
  \"prompt\": \"ROMEO.\", \"temperature\": 0, \"max_tokens\": 24}"
echo
