"""Supervised fine-tuning on conversations: assistant-only loss, packing without cross-contamination,
full fine-tuning (optionally DeepSpeed ZeRO-2/3) or LoRA.

    # the demo: fine-tune the demo pretrained model on generated tasks with checkable answers
    python data_prep/make_sft_demo.py --output_dir data/sft_demo
    python sft.py --model_name_or_path outputs/demo/pretrain --train_files data/sft_demo/train.jsonl \
        --max_length 256 --learning_rate 1e-3 --num_train_epochs 2 --output_dir outputs/demo/sft

    # full SFT with ZeRO-2 on 8 GPUs
    deepspeed --num_gpus 8 sft.py --deepspeed ds_configs/zero2.json --bf16 --model_name_or_path Qwen/Qwen2.5-0.5B \
        --train_files data/chat/*.jsonl --max_length 2048 --per_device_train_batch_size 4 --output_dir outputs/sft

    # the planner picks the micro-batch for this GPU; 256 rows per optimizer step (docs/PLANNER.md)
    deepspeed --num_gpus 8 sft.py --deepspeed ds_configs/zero2.json --bf16 --model_name_or_path Qwen/Qwen2.5-0.5B \
        --train_files data/chat/*.jsonl --max_length 2048 --per_device_train_batch_size auto --global_batch_size 256 \
        --output_dir outputs/sft

    # LoRA, merged into a full model at the end
    python sft.py --use_lora --lora_r 16 --model_name_or_path outputs/demo/pretrain --output_dir outputs/sft-lora

Rerunning the same command resumes from the newest complete checkpoint in --output_dir; once the run has
finished (OUTPUT_DIR/lmtrain_complete.json) it does nothing and exits 0. --stop_after_steps N makes N more
steps per run; --overwrite_output_dir starts fresh. OUTPUT_DIR/lmtrain_config.json repeats the run:
    python sft.py OUTPUT_DIR/lmtrain_config.json --output_dir NEW_DIR
"""
from __future__ import annotations

import logging

from lmtrain.arguments import LoraArguments, ModelArguments, SFTDataArguments, SFTTrainArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.loading import load_training_data
from lmtrain.model.building import build_model
from lmtrain.model.lora import apply_lora, final_save
from lmtrain.tokenizer import load_tokenizer
from lmtrain.training.run import start_run, train_and_finish
from lmtrain.training.trainer import build_trainer, save_final_model

logger = logging.getLogger("sft")


def main(argv=None):
    model_args, data_args, lora_args, training_args = parse_arguments(
        [ModelArguments, SFTDataArguments, LoraArguments, SFTTrainArguments], argv)
    # --dataset_path: the row length is the prepared data's, checked when it is opened.
    run = start_run(model_args, training_args, None if data_args.dataset_path else data_args.max_length,
                    "--max_length", use_lora=lora_args.use_lora, data=data_args, lora=lora_args, training=training_args)
    if run.finished_metrics is not None:
        return None, run.finished_metrics

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "outputs/tokenizer",
                               cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    # The model first: its checks (vocabulary size, tokenizer reload) fail in seconds, before any data is tokenized.
    model = build_model(model_args, tokenizer)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    data = load_training_data("sft", data_args, tokenizer, training_args, model.config.max_position_embeddings)

    trainer = build_trainer(model, tokenizer, training_args, data.train, data.validation, data_collator=data.collator,
                            eval_bytes_per_token=data.validation_bytes_per_token)
    evaluate = data.validation is not None and training_args.eval_strategy != "no"
    save_final = final_save(trainer, training_args.output_dir, lora_args, save_final_model)
    metrics = train_and_finish(trainer, run.resume_from, evaluate, save_final)
    return trainer, metrics
