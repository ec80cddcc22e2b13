"""Checks that refuse a configuration that cannot work before any heavy work (model download, data
preparation, DeepSpeed start-up), each with a message saying what to change. Called by the training entry
points right after the arguments are parsed:

- the row length (--block_size for pretraining, --max_length for SFT) above the model's max_position_embeddings
  (read from the config alone; the data loader checks it again against the built model);
- --fp16 without a CUDA GPU, --bf16 on a GPU without bf16 (before Ampere);
- a DeepSpeed config whose explicit numbers disagree with the flags (batch sizes, gradient accumulation,
  learning rate, ... : transformers collects these at parse time and raises them only once the model and
  the data are ready), optimizer offload without an optimizer DeepSpeed can run on the CPU, parameter offload
  below ZeRO-3, and --save_only_model with --load_best_model_at_end under DeepSpeed;
- an --output_dir that cannot be written;
- a disk without room for one checkpoint (refused) or for two (warned), from the estimate below.

Checkpoint size estimate (bytes), from the parameter count N of the config (T: trainable, = N unless LoRA):
  without DeepSpeed: the weights in their dtype (4 bytes fp32, 2 with --torch_dtype bfloat16) and AdamW's two
    moments in the same dtype: (N + 2T) x dtype bytes;
  DeepSpeed with bf16/fp16: 2N (16-bit weights) + 12T (fp32 master weights and two fp32 moments);
  DeepSpeed in fp32: 4N + 12T (the optimizer keeps its own fp32 partition of the weights);
  LoRA: the final merged model (N x dtype bytes) dominates; the adapter's checkpoints are small.
Scheduler, RNG and tokenizer files are a few MB and left out.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)


def preflight(model_args, training_args, row_length: int | None, row_flag: str, use_lora: bool = False):
    """All checks of this module; raises UserError at the first configuration that cannot work. row_length:
    the --block_size / --max_length the data will be prepared at (None for --dataset_path: fixed by the data,
    checked when it is opened)."""
    from lmtrain.data.loading import check_positions

    check_precision(training_args)
    check_deepspeed(training_args)
    check_output_dir(training_args.output_dir)
    config = model_config(model_args)
    if row_length is not None:
        what = "the training blocks" if row_flag == "--block_size" else "the training sequences"
        check_positions(row_length, getattr(config, "max_position_embeddings", None), f"{row_flag}: {what}", "Pass",
                        row_flag)
    check_disk_space(training_args, config, use_lora, getattr(model_args, "torch_dtype", None))


def model_config(model_args):
    """The model's config without its weights (a small file; from the hub only when the weights are)."""
    from lmtrain.model.config import apply_overrides, resolve_config

    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
           "trust_remote_code": model_args.trust_remote_code}
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        from lmtrain.locations import load_from

        config = load_from(AutoConfig.from_pretrained, model_args.model_name_or_path, "--model_name_or_path", **hub)
        return apply_overrides(config, model_args.config_overrides)
    return resolve_config(model_args.config_name or "qwen2-tiny", model_args.config_overrides, **hub)


def check_precision(args):
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU and this machine has none (fp16 mixed precision with its loss "
                        "scaler does not run on the CPU): pass --bf16 instead (bf16 autocast on the CPU) or neither")
    if args.bf16 and torch.cuda.is_available() and not args.use_cpu and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        raise UserError(f"--bf16: the GPU {name} (compute capability {major}.{minor}) has no bfloat16 support (it "
                        "needs 8.0, Ampere, or newer): pass --fp16 instead")


def _ds_config(args) -> tuple[dict, str] | None:
    hf = getattr(args, "hf_deepspeed_config", None)
    if not args.deepspeed or hf is None:
        return None
    where = args.deepspeed if isinstance(args.deepspeed, str) else "the --deepspeed config"
    return hf.config, where


def check_deepspeed(args):
    found = _ds_config(args)
    if found is None:
        return
    config, where = found
    mismatches = list(getattr(args.hf_deepspeed_config, "mismatches", []))
    if mismatches:
        listed = "; ".join(line.lstrip("- ") for line in mismatches)
        raise UserError(f"--deepspeed {where}: its values disagree with the flags ({listed}; 'hf' is the flag, "
                        f"with train_batch_size = per_device_train_batch_size x gradient_accumulation_steps x "
                        f"{args.world_size} processes). Set those entries to \"auto\" in {where} so the flags decide, "
                        "or change the flags to match")
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    if offload_optimizer in ("cpu", "nvme") and "optimizer" not in config \
            and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise UserError(f"--deepspeed {where}: zero_optimization.offload_optimizer runs the optimizer on the CPU, "
                        "which DeepSpeed does only with its own CPU Adam; this config has no \"optimizer\" section, so "
                        "the Trainer's torch optimizer would be used and DeepSpeed refuses it. Add an optimizer "
                        "section "
                        "as in ds_configs/zero3_offload.json, or remove offload_optimizer")
    if offload_param in ("cpu", "nvme") and stage != 3:
        raise UserError(f"--deepspeed {where}: zero_optimization.offload_param needs ZeRO stage 3 (this config has "
                        f"stage {stage}): set \"stage\": 3, or remove offload_param")
    if args.save_only_model and args.load_best_model_at_end:
        raise UserError("--save_only_model with --load_best_model_at_end (or --early_stopping_patience) does not "
                        "work under DeepSpeed: the best checkpoint could not be loaded without its optimizer "
                        "states. Drop --save_only_model")


def check_output_dir(output_dir: str):
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lmtrain-write-check-"):
            pass
    except OSError as error:
        raise UserError(f"--output_dir {path} cannot be written ({error.strerror or error}): give a directory you "
                        "can write, or fix its permissions") from error


def count_parameters_of(config) -> int:
    """Parameters of the model this config builds, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def weights_bytes(parameters: int, half: bool) -> int:
    """A saved model's weights alone (a final save, a merged LoRA model)."""
    return parameters * (2 if half else 4)


def checkpoint_bytes(args, parameters: int, use_lora: bool = False, torch_dtype: str | None = None) -> int:
    """The estimate of the module docstring."""
    half = args.bf16 or args.fp16
    if use_lora:
        return weights_bytes(parameters, torch_dtype in ("bfloat16", "float16"))
    if args.deepspeed:
        return parameters * (2 if half else 4) + 12 * parameters
    dtype_bytes = 2 if torch_dtype in ("bfloat16", "float16") else 4
    return 3 * parameters * dtype_bytes


def check_disk_space(args, config, use_lora: bool = False, torch_dtype: str | None = None):
    if not args.should_save:
        return
    try:
        parameters = count_parameters_of(config)
    except Exception as error:  # e.g. remote code the meta-device build cannot run: no estimate, no refusal
        logger.info("no checkpoint size estimate (%s: %s); disk space not checked", type(error).__name__, error)
        return
    needed = checkpoint_bytes(args, parameters, use_lora, torch_dtype)
    free = shutil.disk_usage(args.output_dir).free
    size = f"about {_readable(needed)} per checkpoint (weights and optimizer state)"
    if str(args.save_strategy) in ("no", "SaveStrategy.NO"):
        # No periodic checkpoints: only the final model (weights alone) must fit. A SIGTERM still saves a
        # full checkpoint, so a disk too small for one is a warning, not a refusal.
        final = weights_bytes(parameters, args.bf16 or args.fp16 or torch_dtype in ("bfloat16", "float16"))
        if free < final:
            raise UserError(f"--output_dir {args.output_dir}: {_readable(free)} free on its disk and the final model "
                            f"needs about {_readable(final)}. Free space, or pick an --output_dir on a larger disk")
        if free < needed:
            logger.warning("--output_dir %s: %s free: room for the final model, not for the checkpoint a SIGTERM "
                           "would save (%s)", args.output_dir, _readable(free), size)
        return
    if free < needed:
        raise UserError(f"--output_dir {args.output_dir}: {_readable(free)} free on its disk and one checkpoint "
                        f"needs {size}. Free space, or pick an --output_dir on a larger disk")
    if free < 2 * needed:
        logger.warning("--output_dir %s: %s free, room for one checkpoint only (%s): the second save will not fit, "
                       "since the previous checkpoint is deleted only once the new one is complete",
                       args.output_dir, _readable(free), size)
    else:
        logger.info("checkpoint size estimate: %s; %s free in %s", size, _readable(free), args.output_dir)


def _readable(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
