#!/usr/bin/env bash
# Resuming a pretraining run after a crash, preemption or planned stop.
#
# 1. Automatic: rerun the original command with the same --output_dir. The newest *complete* checkpoint
#    (one whose trainer_state.json and weights were fully written) is picked up; model, optimizer,
#    scheduler, RNG states and the position in the data are restored, so the loss curve continues exactly.
#      bash scripts/pretrain.sh                      # interrupted ... then the same command again
# 2. A specific checkpoint:
#      CKPT=outputs/pretrain-qwen2.5-0.5b/checkpoint-3000 bash scripts/resume.sh
# 3. Planned stops for time-boxed jobs: --stop_after_steps N makes N steps (counted from where the run
#    resumed), saves a checkpoint and exits 0 without writing the final model; every submission of the same
#    command makes N more steps, and the one that reaches max_steps writes the final model.
#      bash scripts/pretrain.sh --stop_after_steps 5000
# 4. A finished run (OUTPUT_DIR/lmtrain_complete.json) is not trained again: rerunning its command (a
#    requeue) logs "run complete" and exits 0. --overwrite_output_dir starts fresh and deletes the old
#    checkpoints instead of resuming from them.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:?set CKPT to a checkpoint directory, e.g. outputs/run/checkpoint-3000}
OUTPUT_DIR=${OUTPUT_DIR:-$(dirname "$CKPT")}
OUTPUT_DIR="$OUTPUT_DIR" bash scripts/pretrain.sh --resume_from_checkpoint "$CKPT" "$@"
