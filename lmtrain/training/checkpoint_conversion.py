"""Checkpoints across world sizes and out of DeepSpeed: a ZeRO checkpoint turned into a DeepSpeed universal
checkpoint (resumable on any number of processes), the check that a resume can load what it finds, and a
ZeRO checkpoint gathered into a Hugging Face model through DeepSpeed's zero_to_fp32.

The conversions are DeepSpeed's own (deepspeed.checkpoint.ds_to_universal, deepspeed.utils.zero_to_fp32),
called with the arguments our checkpoints need; nothing here re-implements them.

    lmtrain convert-checkpoint OUT/checkpoint-1000 --to universal     # then rerun the training command
    lmtrain convert-checkpoint OUT/checkpoint-1000 --to hf --output_dir exports/step-1000
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lmtrain.distributed import global_batch_rows, log_global_batch
from lmtrain.errors import UserError
from lmtrain.training.checkpoints import checkpoint_problem, read_checkpoint_marker, write_checkpoint_marker

logger = logging.getLogger(__name__)

# DeepSpeed's names: `latest` holds the tag (global_stepN) of the ZeRO states, ds_to_universal writes the
# universal copy into a folder of our choosing and its tag into `latest_universal`, last, once it is done.
LATEST, LATEST_UNIVERSAL, UNIVERSAL_SUFFIX = "latest", "latest_universal", "_universal"


def _tag(checkpoint: Path, name: str) -> str | None:
    try:
        tag = (checkpoint / name).read_text().strip()
    except OSError:
        return None
    return tag if tag and (checkpoint / tag).is_dir() else None


def universal_tag(checkpoint) -> str | None:
    """The folder of a finished universal conversion inside `checkpoint`, or None."""
    return _tag(Path(checkpoint), LATEST_UNIVERSAL)


def convert_to_universal(checkpoint, workers: int = 1) -> Path:
    """Write CHECKPOINT/global_stepN_universal next to the ZeRO states (deepspeed.checkpoint.ds_to_universal)
    and list it in the completion marker, so resuming from CHECKPOINT loads it on any world size."""
    from deepspeed.checkpoint import ds_to_universal

    checkpoint = Path(checkpoint)
    problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "not a directory"
    if problem is not None:
        raise UserError(f"{checkpoint}: not a complete checkpoint ({problem}); give a checkpoint-N directory "
                        "that has lmtrain_checkpoint.json")
    tag = _tag(checkpoint, LATEST)
    if tag is None:
        raise UserError(f"{checkpoint} holds no DeepSpeed ZeRO states (no '{LATEST}' file naming a global_step "
                        "folder): only runs with --deepspeed write them. A checkpoint without DeepSpeed resumes "
                        "on any number of processes as it is")
    output = checkpoint / f"{tag}{UNIVERSAL_SUFFIX}"
    if universal_tag(checkpoint) == output.name:
        logger.info("%s already holds a universal checkpoint (%s)", checkpoint, output.name)
        return output
    # inject_missing_state: DeepSpeed's converter expects the universal_checkpoint_info that Megatron-DeepSpeed
    # writes; the HF Trainer's checkpoints lack it, and for data parallel (no tensor/pipeline slicing) the
    # version key it injects is all the loader reads.
    options = argparse.Namespace(input_folder=str(checkpoint / tag), output_folder=str(output),
                                 num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                                 strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(options)
    except (AssertionError, ValueError, NotImplementedError, RuntimeError) as error:
        raise UserError(f"{checkpoint}: DeepSpeed could not convert it to a universal checkpoint ({error})") from error
    record = read_checkpoint_marker(checkpoint) or {}
    write_checkpoint_marker(checkpoint, record.get("step", -1), record.get("world_size"), record.get("zero_stage"),
                            extra={key: value for key, value in record.items()
                                   if key not in ("step", "world_size", "zero_stage", "saved_at", "files")}
                            | {"universal": output.name})
    logger.info("wrote the universal checkpoint %s; resuming from %s now loads it on any number of processes",
                output, checkpoint)
    return output


def load_universal_on_resume(args):
    """Make the DeepSpeed engine load `latest_universal` instead of `latest` (its "checkpoint": {"load_universal":
    true} option). The Trainer builds the engine from args.hf_deepspeed_config later, so setting it here, before
    the Trainer exists, is enough."""
    for config in {id(c): c for c in (getattr(args.hf_deepspeed_config, "config", None),
                                      getattr(getattr(args, "deepspeed_plugin", None), "deepspeed_config", None))
                   if isinstance(c, dict)}.values():
        config.setdefault("checkpoint", {})["load_universal"] = True


def check_resume_world(args, checkpoint: str | None):
    """Before anything is loaded: this run's global batch (logged once), and whether `checkpoint` can be resumed
    with this world size. A ZeRO checkpoint holds one optimizer partition per process, loadable only by the
    same number of processes; its universal copy (convert_to_universal) loads on any number, and is used
    whenever it is there. A different global batch would make the resumed steps skip a different number of
    rows than were trained, so it is refused too."""
    log_global_batch(args)
    if checkpoint is None:
        return
    record = read_checkpoint_marker(Path(checkpoint)) or {}
    saved_world, zero_stage = record.get("world_size"), record.get("zero_stage")
    saved_batch = record.get("global_batch")
    if saved_batch and saved_batch != global_batch_rows(args):
        raise UserError(
            f"{checkpoint} was trained with a global batch of {saved_batch} rows per step and this run's is "
            f"{global_batch_rows(args)} ({args.per_device_train_batch_size} per device x "
            f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes): the resumed run would "
            f"skip the wrong rows. Keep the global batch: pass --global_batch_size {saved_batch} (or set "
            "--gradient_accumulation_steps to match); to change it, start a new run from its weights")
    universal = universal_tag(checkpoint)
    if universal:
        if not args.deepspeed:
            raise UserError(f"{checkpoint} holds a universal checkpoint ({universal}), which DeepSpeed loads: add "
                            "--deepspeed ds_configs/zero2.json (or zero3.json) to resume from it")
        load_universal_on_resume(args)
        if args.process_index == 0:
            logger.info("resuming from the universal checkpoint %s/%s (written by %s process(es), loaded by %d)",
                        checkpoint, universal, saved_world, args.world_size)
            if zero_stage == 3:
                logger.warning("%s: a ZeRO-3 universal checkpoint: DeepSpeed (0.19.8) loads every optimizer "
                               "parameter group with the first parameter group's hyperparameters, so weight decay "
                               "%s now also applies to norms and biases; the weights and the step come back "
                               "exactly, the following losses differ slightly (docs/MULTI_GPU.md)", checkpoint,
                               getattr(args, "weight_decay", "?"))
        return
    if zero_stage and saved_world not in (None, args.world_size):
        raise UserError(
            f"{checkpoint} was written by {saved_world} processes under ZeRO-{zero_stage} and this run has "
            f"{args.world_size}: DeepSpeed loads its partitioned optimizer states only on {saved_world}. Convert it "
            f"once, then rerun this command:\n    lmtrain convert-checkpoint --checkpoint {checkpoint} --to universal")
    if zero_stage and not args.deepspeed:
        raise UserError(f"{checkpoint} holds DeepSpeed ZeRO-{zero_stage} states and this run has no --deepspeed: "
                        "its optimizer state would be dropped. Resume with the --deepspeed config that wrote it")


def export_zero_checkpoint(checkpoint, output_dir, dtype="float32") -> Path:
    """A Hugging Face model directory from a checkpoint's ZeRO states, gathered by DeepSpeed's zero_to_fp32:
    the fp32 master weights of every partition (under bf16 training they are finer than the 16-bit
    model.safetensors the Trainer writes, and a ZeRO-3 run saved without stage3_gather_16bit_weights_on_model_save
    has no model.safetensors at all). Tied embeddings stay tied: zero_to_fp32 restores the shared parameter
    under both names, and the model built from the checkpoint's config ties them again before saving."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from lmtrain.locations import check_output_directory, parse_dtype

    checkpoint = Path(checkpoint)
    if _tag(checkpoint, LATEST) is None:
        raise UserError(f"{checkpoint} holds no DeepSpeed ZeRO states (no '{LATEST}' file naming a global_step "
                        "folder); a checkpoint without DeepSpeed is already a Hugging Face model: python export.py "
                        f"--model {checkpoint} --output_dir DIR")
    check_output_directory(str(output_dir))
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"{checkpoint}: the ZeRO states do not fit the model of its config.json (missing "
                        f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    chosen = parse_dtype(dtype)
    if chosen != "auto":
        model = model.to(chosen)
    model.config.use_cache = True
    if (checkpoint / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    model.save_pretrained(output_dir)
    try:
        from lmtrain.tokenizer import load_tokenizer

        load_tokenizer(str(checkpoint)).save_pretrained(output_dir)
    except Exception as error:  # a checkpoint saved without its tokenizer still exports its weights
        logger.warning("%s: no tokenizer copied (%s)", checkpoint, error)
    logger.info("exported %.2fM parameters from the ZeRO states of %s to %s",
                sum(p.numel() for p in model.parameters()) / 1e6, checkpoint, output_dir)
    return Path(output_dir)
