"""Preference tuning after SFT (DPO and the loss variants of TRL's DPOTrainer): prompt tokens never trained,
the reference a frozen copy of the starting model, or none (LoRA: the adapter switched off; or
--precompute_ref_log_probs), full fine-tuning (optionally DeepSpeed ZeRO-2/3) or LoRA.

    # the demo: prefer the right answers of the SFT demo tasks over plausible wrong ones
    python data_prep/make_sft_demo.py --output_dir data/sft_demo   # also writes preference_{train,eval}.jsonl
    # (scripts/demo.sh step 8 on the CPU; docs/DPO.md has its measured gain)
    python dpo.py --model_name_or_path outputs/demo/sft --train_files data/sft_demo/preference_train.jsonl \
        --validation_files data/sft_demo/preference_eval.jsonl --max_length 128 --loss_type sigmoid sft --beta 0.1 \
        --per_device_train_batch_size 16 --learning_rate 3e-4 --warmup_steps 5 --max_steps 120 \
        --eval_strategy steps --eval_steps 120 --output_dir outputs/demo/dpo

    # full DPO with ZeRO-3 on 8 GPUs, reference log-probs computed once (no second model in memory)
    deepspeed --num_gpus 8 dpo.py --deepspeed ds_configs/zero3.json --bf16 --model_name_or_path outputs/sft \
        --train_files data/prefs/*.jsonl --max_length 2048 --precompute_ref_log_probs --output_dir outputs/dpo

    # LoRA (the reference is the base: no second copy), IPO loss, merged into a full model at the end
    python dpo.py --use_lora --lora_r 16 --loss_type ipo --beta 0.5 --model_name_or_path outputs/sft \
        --train_files data/prefs.jsonl --output_dir outputs/dpo-lora

Records: {"prompt", "chosen", "rejected"} (strings or message lists) or {"chosen", "rejected"} as two whole
conversations sharing their prompt; see lmtrain/data/preference.py. Rerunning the same command resumes
from the newest complete checkpoint in --output_dir; once the run has finished it does nothing and exits 0;
--stop_after_steps N makes N more steps per run; --overwrite_output_dir starts fresh.
"""
from __future__ import annotations

import logging

from lmtrain.arguments import DPOTrainArguments, LoraArguments, ModelArguments, PreferenceDataArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.loading import load_training_data
from lmtrain.errors import UserError
from lmtrain.model.building import build_model
from lmtrain.model.lora import apply_lora, final_save
from lmtrain.tokenizer import load_tokenizer
from lmtrain.training.preference import build_preference_trainer, build_reference_model
from lmtrain.training.run import start_run, train_and_finish
from lmtrain.training.trainer import save_final_model

logger = logging.getLogger("dpo")


def warn_unused_validation(data_args, training_args) -> bool:
    """--validation_files without --eval_strategy: DPOTrainer never scores those pairs, and a run that shows no
    eval_ figures looks like one whose evaluation failed. Said once at the start; True when said."""
    if not data_args.validation_files or training_args.eval_strategy != "no":
        return False
    logger.warning("--validation_files %s: not evaluated, since --eval_strategy is no; pass --eval_strategy steps "
                   "--eval_steps N (or epoch) for held-out loss, reward accuracy and margin",
                   " ".join(data_args.validation_files))
    return True


def main(argv=None):
    model_args, data_args, lora_args, training_args = parse_arguments(
        [ModelArguments, PreferenceDataArguments, LoraArguments, DPOTrainArguments], argv)
    if not model_args.model_name_or_path:
        raise UserError("dpo.py tunes a trained model: pass --model_name_or_path (the SFT model, e.g. "
                        "outputs/demo/sft); a model from --config_name has no preferences to start from")
    run = start_run(model_args, training_args, data_args.max_length, "--max_length", use_lora=lora_args.use_lora,
                    data=data_args, lora=lora_args, training=training_args)
    if run.finished_metrics is not None:
        return None, run.finished_metrics
    warn_unused_validation(data_args, training_args)

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path,
                               cache_dir=model_args.cache_dir, revision=model_args.model_revision)
    model = build_model(model_args, tokenizer)
    if lora_args.use_lora:
        model = apply_lora(model, lora_args)
    reference = build_reference_model(model_args, tokenizer, training_args, lora_args.use_lora)
    data = load_training_data("dpo", data_args, tokenizer, training_args, model.config.max_position_embeddings)

    trainer = build_preference_trainer(model, reference, tokenizer, training_args, data.train, data.validation)
    evaluate = data.validation is not None and training_args.eval_strategy != "no"
    save_final = final_save(trainer, training_args.output_dir, lora_args, save_final_model)
    metrics = train_and_finish(trainer, run.resume_from, evaluate, save_final)
    return trainer, metrics
