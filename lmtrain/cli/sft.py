"""Supervised fine-tuning on conversations: assistant-only loss, packing without cross-contamination,
full fine-tuning (optionally DeepSpeed ZeRO-2/3) or LoRA.

    # the demo: fine-tune the demo pretrained model on generated tasks with checkable answers
    python data_prep/make_sft_demo.py --output_dir data/sft_demo
    python sft.py --model_name_or_path outputs/demo/pretrain --train_files data/sft_demo/train.jsonl \
        --max_length 256 --learning_rate 1e-3 --num_train_epochs 2 --output_dir outputs/demo/sft

    # full SFT with ZeRO-2 on 8 GPUs
    deepspeed --num_gpus 8 sft.py --deepspeed ds_configs/zero2.json --bf16 --model_name_or_path Qwen/Qwen2.5-0.5B \
        --train_files data/chat/*.jsonl --max_length 2048 --per_device_train_batch_size 4 --output_dir outputs/sft

    # LoRA, merged into a full model at the end
    python sft.py --use_lora --lora_r 16 --model_name_or_path outputs/demo/pretrain --output_dir outputs/sft-lora

Rerunning the same command resumes from the newest complete checkpoint in --output_dir; once the run has
finished (OUTPUT_DIR/lmtrain_complete.json) it does nothing and exits 0. --stop_after_steps N makes N more
steps per run; --overwrite_output_dir starts fresh. OUTPUT_DIR/lmtrain_config.json repeats the run:
    python sft.py OUTPUT_DIR/lmtrain_config.json --output_dir NEW_DIR
"""
from __future__ import annotations

import logging

from transformers import set_seed

from lmtrain.arguments import LoraArguments, ModelArguments, SFTDataArguments, SFTTrainArguments
from lmtrain.cli.parsing import parse_arguments, save_resolved_config
from lmtrain.data.loading import load_training_data
from lmtrain.model.lora import apply_lora, save_lora_model
from lmtrain.model.building import build_model
from lmtrain.tokenizer import load_tokenizer
from lmtrain.training.checkpoints import completed_run, mark_run_complete, resolve_resume
from lmtrain.training.preflight import preflight
from lmtrain.training.signals import exit_after_signal
from lmtrain.training.trainer import build_trainer, end_of_training, final_metrics, run_training, save_final_model

logger = logging.getLogger("sft")


def main(argv=None):
    model_args, data_args, lora_args, training_args = parse_arguments(
        [ModelArguments, SFTDataArguments, LoraArguments, SFTTrainArguments], argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    finished = completed_run(training_args)  # a requeued finished run: change nothing
    if finished is not None:
        return None, finished.get("metrics", {})
    # Before any download or data preparation (--dataset_path: the row length is the prepared data's).
    preflight(model_args, training_args, None if data_args.dataset_path else data_args.max_length, "--max_length",
              use_lora=lora_args.use_lora)
    resume_from = resolve_resume(training_args)
    set_seed(training_args.seed)
    if training_args.process_index == 0:
        save_resolved_config(training_args.output_dir, model=model_args, data=data_args, lora=lora_args,
                             training=training_args)

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "outputs/tokenizer",
                               cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    # The model first: its checks (vocabulary size, tokenizer reload) fail in seconds, before any data is tokenized.
    model = build_model(model_args, tokenizer)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    data = load_training_data("sft", data_args, tokenizer, training_args, model.config.max_position_embeddings)

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
    if lora_args.use_lora:
        save_lora_model(trainer, training_args.output_dir, merge=lora_args.merge_lora)
    else:
        save_final_model(trainer, training_args.output_dir)
    mark_run_complete(trainer, metrics, ended)  # last: its presence means the run is done
    return trainer, metrics

