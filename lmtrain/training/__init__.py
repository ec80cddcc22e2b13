"""Training, the same for every stage. Where things go:

- trainer.py: LMTrainer (the Trainer subclass: throughput figures, token-weighted evaluation) and its
  wiring: build_trainer, run_training, why training ended, final metrics, the final save.
- checkpoints.py: checkpoint policy: which checkpoint to resume from, completion records, finished runs,
  --overwrite_output_dir, checks that a checkpoint fits the model. Requeue logic goes here too.
- callbacks.py: TrainerCallbacks that watch or steer the loop: throughput/MFU, curve plots, planned stops.
- reporting.py: where figures and samples go: SwanLab/TensorBoard set-up, sample generation and logging.
- metrics.py: evaluation figures (loss, perplexity, bits per byte, per source) from per-token statistics.
- run.py: the start and end of a run shared by pretrain.py and sft.py (finished-run check, preflight,
  resume, seed, resolved config; how training ended, final metrics, final save, completion record).
- guards.py: non-finite steps (skipped, counted, a stop after K in a row), loss spikes, grad-norm
  explosion/vanishing.
- signals.py: SIGTERM/SIGINT: a checkpoint at the next step, the same step on every rank.
- preflight.py: configuration checks before any download or data preparation.

Batches come from lmtrain/data/ (load_training_data: datasets and collator); formulas that a planner also
needs (FLOPs per token, peak TFLOP/s) are in lmtrain/model/flops.py.
"""
