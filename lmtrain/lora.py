"""LoRA through peft: wrapping the model, and saving the adapter plus a merged full model."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def apply_lora(model, args):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def save_lora_model(trainer, output_dir: str, merge: bool = True):
    """The adapter to output_dir/adapter; with merge, the merged weights as a plain HF model in output_dir."""
    model = trainer.model
    adapter_dir = Path(output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    if not merge or not trainer.is_world_process_zero():
        return
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(output_dir)
    merged.generation_config.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    logger.info("saved the LoRA adapter to %s and the merged model to %s", adapter_dir, output_dir)
