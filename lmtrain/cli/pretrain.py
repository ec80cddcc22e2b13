"""Pretrain (from scratch) or continue pretraining a Qwen2/LLaMA-style causal LM.

    # CPU toy run on the built-in Shakespeare corpus (tokenizer from data_prep/train_tokenizer.py)
    python pretrain.py --tokenizer_name outputs/tokenizer --config_name qwen2-tiny --block_size 256 \
        --max_steps 200 --output_dir outputs/pretrain-tiny

    # One node, DeepSpeed ZeRO-2, bf16, prepared data
    deepspeed --num_gpus 8 pretrain.py --deepspeed ds_configs/zero2.json --bf16 \
        --config_name qwen2.5-0.5b --tokenizer_name Qwen/Qwen2.5-0.5B --dataset_path data/mix \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --learning_rate 3e-4 \
        --warmup_steps 500 --max_steps 20000 --save_steps 1000 --eval_strategy steps --eval_steps 1000 \
        --gradient_checkpointing --report_to swanlab --output_dir outputs/qwen-0.5b

    # A config file, with flags overriding it
    python pretrain.py examples/pretrain_tiny.yaml --max_steps 50

Rerunning the same command resumes from the newest complete checkpoint in --output_dir; once the run has
finished (OUTPUT_DIR/lmtrain_complete.json) it does nothing and exits 0. --stop_after_steps N makes N more
steps per run; --overwrite_output_dir starts fresh. OUTPUT_DIR/lmtrain_config.json repeats the run:
    python pretrain.py OUTPUT_DIR/lmtrain_config.json --output_dir NEW_DIR
"""
from __future__ import annotations

import logging

from transformers import set_seed

from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
from lmtrain.cli.parsing import parse_arguments, save_resolved_config
from lmtrain.data.loading import load_training_data
from lmtrain.model.building import build_model
from lmtrain.tokenizer import load_tokenizer
from lmtrain.training.checkpoints import completed_run, mark_run_complete, resolve_resume
from lmtrain.training.preflight import preflight
from lmtrain.training.signals import exit_after_signal
from lmtrain.training.trainer import build_trainer, end_of_training, final_metrics, run_training, save_final_model

logger = logging.getLogger("pretrain")


def main(argv=None):
    model_args, data_args, training_args = parse_arguments([ModelArguments, DataArguments, TrainArguments], argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    finished = completed_run(training_args)  # a requeued finished run: change nothing
    if finished is not None:
        return None, finished.get("metrics", {})
    # Before any download or data preparation (--dataset_path: the row length is the prepared data's).
    preflight(model_args, training_args, None if data_args.dataset_path else data_args.block_size, "--block_size")
    resume_from = resolve_resume(training_args)
    set_seed(training_args.seed)  # before the model is built: its random init must repeat across runs
    if training_args.process_index == 0:
        save_resolved_config(training_args.output_dir, model=model_args, data=data_args, training=training_args)

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "outputs/tokenizer",
                               cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    # The model first: its checks (vocabulary size, tokenizer reload) fail in seconds, before any data is tokenized.
    model = build_model(model_args, tokenizer)
    data = load_training_data("pretrain", data_args, tokenizer, training_args, model.config.max_position_embeddings)
    logger.info("packed documents are kept apart through position_ids (%s attention); %d train blocks of %d tokens",
                model.config._attn_implementation, len(data.train), data.tokens_per_row)

    trainer = build_trainer(model, tokenizer, training_args, data.train, data.validation, data_collator=data.collator,
                            eval_bytes_per_token=data.validation_bytes_per_token)
    result = run_training(trainer, resume_from)
    ended = end_of_training(trainer)
    if ended == "interrupted":  # SIGTERM/SIGINT: a checkpoint, no final model, exit 128 + N
        exit_after_signal(trainer)
    if ended == "stopped":  # planned stop: a checkpoint, no final model
        return trainer, dict(result.metrics)
    metrics = final_metrics(trainer, result, data.validation is not None and training_args.eval_strategy != "no")
    trainer.save_state()
    save_final_model(trainer, training_args.output_dir)
    mark_run_complete(trainer, metrics, ended)  # last: its presence means the run is done
    return trainer, metrics

