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

    # the planner picks the micro-batch for this GPU; 256 rows per optimizer step (docs/PLANNER.md)
    deepspeed --num_gpus 8 pretrain.py --deepspeed ds_configs/zero2.json --bf16 --config_name qwen2.5-1.5b \
        --per_device_train_batch_size auto --global_batch_size 256 --dataset_path data/mix --output_dir outputs/run

    # A config file, with flags overriding it
    python pretrain.py examples/pretrain_tiny.yaml --max_steps 50

Rerunning the same command resumes from the newest complete checkpoint in --output_dir; once the run has
finished (OUTPUT_DIR/lmtrain_complete.json) it does nothing and exits 0. --stop_after_steps N makes N more
steps per run; --overwrite_output_dir starts fresh. OUTPUT_DIR/lmtrain_config.json repeats the run:
    python pretrain.py OUTPUT_DIR/lmtrain_config.json --output_dir NEW_DIR
"""
from __future__ import annotations

import logging

from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.loading import load_training_data
from lmtrain.model.building import build_model
from lmtrain.tokenizer import load_tokenizer
from lmtrain.training.run import start_run, train_and_finish
from lmtrain.training.trainer import build_trainer, save_final_model

logger = logging.getLogger("pretrain")


def main(argv=None):
    model_args, data_args, training_args = parse_arguments([ModelArguments, DataArguments, TrainArguments], argv)
    # --dataset_path: the row length is the prepared data's, checked when it is opened.
    run = start_run(model_args, training_args, None if data_args.dataset_path else data_args.block_size,
                    "--block_size", data=data_args, training=training_args)
    if run.finished_metrics is not None:
        return None, run.finished_metrics

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "outputs/tokenizer",
                               cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    # The model first: its checks (vocabulary size, tokenizer reload) fail in seconds, before any data is tokenized.
    model = build_model(model_args, tokenizer)
    data = load_training_data("pretrain", data_args, tokenizer, training_args, model.config.max_position_embeddings)
    logger.info("packed documents are kept apart through position_ids (%s attention); %d train blocks of %d tokens",
                model.config._attn_implementation, len(data.train), data.tokens_per_row)

    trainer = build_trainer(model, tokenizer, training_args, data.train, data.validation, data_collator=data.collator,
                            eval_bytes_per_token=data.validation_bytes_per_token)
    evaluate = data.validation is not None and training_args.eval_strategy != "no"
    metrics = train_and_finish(trainer, run.resume_from, evaluate,
                               save_final=lambda: save_final_model(trainer, training_args.output_dir))
    return trainer, metrics
