"""LoRA through peft: wrapping the model, and saving the adapter plus a merged full model."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def apply_lora(model, args):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    # peft records the base as given (`outputs/demo/pretrain`); a relative path would only load the adapter
    # from the directory training ran in. Local bases are stored absolute; hub names stay as they are.
    base = model.peft_config["default"].base_model_name_or_path
    if base and Path(base).is_dir():
        model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def final_save(trainer, output_dir: str, lora_args, save_full):
    """The end-of-run save of a stage that may train LoRA (sft.py, dpo.py): the adapter, merged into a plain
    model with --merge_lora, or without LoRA save_full(trainer, output_dir) (the stage's own full save)."""
    if lora_args.use_lora:
        return lambda: save_lora_model(trainer, output_dir, merge=lora_args.merge_lora)
    return lambda: save_full(trainer, output_dir)


def save_lora_model(trainer, output_dir: str, merge: bool = True):
    """The adapter to output_dir/adapter; with merge, the merged weights as a plain HF model in output_dir.

    Under ZeRO-3 the weights in memory are partitioned (each rank holds a slice, the local tensors of the
    others are empty), so merging them in place fails; the merge then starts from the saved adapter and
    the base weights reloaded whole, in float32, on rank 0."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model = trainer.model
    adapter_dir = Path(output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))  # collective under ZeRO-3: every rank takes part in the gather
    if not merge or not trainer.is_world_process_zero():
        return
    if is_deepspeed_zero3_enabled():
        merged = _merge_from_saved_adapter(adapter_dir)
        if merged is None:
            return
        merged.generation_config = model.get_base_model().generation_config
    else:
        merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(output_dir)
    merged.generation_config.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    logger.info("saved the LoRA adapter to %s and the merged model to %s", adapter_dir, output_dir)


def _merge_from_saved_adapter(adapter_dir: Path):
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        logger.warning("LoRA under ZeRO-3 on a model built from scratch: its base weights were never saved, so "
                       "no merged model is written (the adapter is in %s)", adapter_dir)
        return None
    with _without_zero3_init():  # a whole, unpartitioned copy on this rank only
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


@contextlib.contextmanager
def _without_zero3_init():
    """While a DeepSpeed ZeRO-3 config is registered, from_pretrained partitions weights as it builds the
    model (zero.Init), which needs every rank; a rank-0-only copy must be built with it unregistered."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
