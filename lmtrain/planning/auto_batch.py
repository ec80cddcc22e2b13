"""`--per_device_train_batch_size auto` and `--global_batch_size N` for pretrain.py and sft.py, resolved while
the command line is parsed (lmtrain.cli.parsing.parse_arguments calls resolve_batch_flags), so TrainingArguments
and the DeepSpeed config's "auto" entries are built once, with the final numbers.

- auto on a CUDA GPU: the planner's largest micro-batch whose estimated peak fits in this GPU's memory less
  10% (lmtrain.planning.memory, for the run's DeepSpeed stage, precision, checkpointing and row length);
- auto without a GPU: 8, the transformers default (the planner sizes GPU memory; a CPU run has no such limit);
- auto where not even one row fits without activation checkpointing but does with it, and --gradient_checkpointing
  was not given (command line or config file): checkpointing is turned on, and the log says why; an explicit
  --gradient_checkpointing false is kept (and the run refused);
- --global_batch_size N (rows per optimizer step over all processes): gradient_accumulation_steps becomes
  N / (micro-batch x processes); with auto the micro-batch is lowered, if needed, to one that divides N.
The choice and its reason are logged when the run starts (lmtrain.training.run.start_run)."""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os

from lmtrain.errors import UserError

AUTO = "auto"
CPU_MICRO_BATCH = 8          # transformers' default per_device_train_batch_size
MEMORY_HEADROOM = 0.1        # share of GPU memory kept free: CUDA context, fragmentation, NCCL buffers
CHOICE_ATTRIBUTE = "batch_size_choice"   # set on the parsed TrainingArguments: the message start_run logs
GLOBAL_HELP = ("Rows per optimizer step over all processes: sets gradient_accumulation_steps to this / "
               "(per_device_train_batch_size x processes). With --per_device_train_batch_size auto, the largest "
               "micro-batch that fits this GPU (see docs/PLANNER.md) and divides it.")

TRAINING_FLAGS = {"per_device_train_batch_size": str, "global_batch_size": int, "gradient_accumulation_steps": int,
                  "deepspeed": str, "bf16": bool, "fp16": bool, "gradient_checkpointing": bool,
                  "use_liger_kernel": bool, "label_smoothing_factor": str, "z_loss_coefficient": str}


def training_flags(argv: list[str], config_values: dict) -> dict:
    """The few training flags the choice depends on, from the config file and then the command line."""
    from transformers.hf_argparser import string_to_bool

    from lmtrain.cli.parsing import NEGATIVE_NUMBER

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser._negative_number_matcher = NEGATIVE_NUMBER   # --z_loss_coefficient -1e-4 is a value, as in the main parser
    for name, kind in TRAINING_FLAGS.items():
        if kind is bool:
            parser.add_argument(f"--{name}", type=string_to_bool, nargs="?", const=True, default=None)
        else:
            parser.add_argument(f"--{name}", default=None)
    given, _ = parser.parse_known_args(argv)
    values = {name: config_values.get(name) for name in TRAINING_FLAGS}
    values.update({name: value for name, value in vars(given).items() if value is not None})
    return values


def _nonzero(value) -> bool:
    """A float flag given and not 0 (a value that is not a number is left to the argument checks)."""
    try:
        return value is not None and float(value) != 0
    except (TypeError, ValueError):
        return False


def resolve_batch_flags(dataclass_types, argv: list[str], config_values: dict):
    """(argv, config values, message or None): "auto" and --global_batch_size turned into the numbers they mean."""
    flags = training_flags(argv, config_values)
    per_device, global_batch = flags["per_device_train_batch_size"], flags["global_batch_size"]
    auto = str(per_device).strip().lower() == AUTO
    if not auto and global_batch is None:
        return argv, config_values, None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = None if global_batch is None else _positive_int(global_batch, "--global_batch_size")
    checkpointing_on = False
    if auto:
        fit, why, checkpointing_on = fitting_micro_batch(dataclass_types, argv, config_values, flags, world)
    else:
        fit, why = _positive_int(per_device, "--per_device_train_batch_size"), None
    accumulation = _positive_int(flags["gradient_accumulation_steps"] or 1, "--gradient_accumulation_steps")
    micro = fit
    if global_batch is not None:
        if global_batch % world:
            raise UserError(f"--global_batch_size {global_batch} is not a multiple of the {world} processes")
        per_process = global_batch // world
        candidates = [b for b in range(min(fit, per_process), 0, -1) if per_process % b == 0] if auto else \
            ([fit] if per_process % fit == 0 else [])
        if not candidates:
            raise UserError(f"--global_batch_size {global_batch} is not a multiple of --per_device_train_batch_size "
                            f"{fit} x {world} processes: change one of them")
        micro = candidates[0]
        accumulation = per_process // micro
        given = flags["gradient_accumulation_steps"]
        if given is not None and _positive_int(given, "--gradient_accumulation_steps") != accumulation:
            raise UserError(f"--gradient_accumulation_steps {given} and "
                            f"--global_batch_size {global_batch} disagree ({global_batch} = {micro} x {accumulation} "
                            f"x {world} processes): give one of them")
    argv = _set_flag(argv, "per_device_train_batch_size", micro)
    argv = _set_flag(argv, "gradient_accumulation_steps", accumulation)
    if checkpointing_on:  # recorded in lmtrain_config.json like any flag, so a rerun from it repeats the choice
        argv = _set_flag(argv, "gradient_checkpointing", "true")
    config_values = {k: v for k, v in config_values.items()
                     if k not in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    message = (f"per_device_train_batch_size {micro}, gradient_accumulation_steps {accumulation}, {world} "
               f"process(es): {micro * accumulation * world} rows per optimizer step")
    if global_batch is not None:
        message += f" (--global_batch_size {global_batch})"
    if why:
        message += f"; auto: {why}" + (f", lowered to {micro} to divide the global batch" if micro < fit else "")
    return argv, config_values, message


def fitting_micro_batch(dataclass_types, argv, config_values, flags, world) -> tuple[int, str, bool]:
    """The largest micro-batch that fits this machine's GPU, why (or the CPU default), and whether activation
    checkpointing had to be turned on for one row to fit."""
    gpu = visible_gpu()
    if gpu is None:
        return CPU_MICRO_BATCH, (f"no CUDA GPU, so {CPU_MICRO_BATCH} (the transformers default; the planner sizes "
                                 "GPU memory only)"), False
    from lmtrain.planning.memory import GIB, TrainingSetup, estimate_memory, largest_micro_batch, setup_from_deepspeed
    from lmtrain.planning.shape import shape_of_run

    model_args, row_length = _model_and_row_length(dataclass_types, argv, config_values)
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = None if model_args.model_name_or_path else load_tokenizer(
        model_args.tokenizer_name or "outputs/tokenizer", cache_dir=model_args.cache_dir,
        revision=model_args.model_revision)
    shape = shape_of_run(model_args, tokenizer)
    fields = setup_from_deepspeed(flags["deepspeed"]) if flags["deepspeed"] else {"strategy": "none"}
    from lmtrain.model.attention import choose_attention, varlen_kernel
    from lmtrain.planning.memory import attention_layout

    # as this machine will build the model: the attention it resolves to, Liger where ModelArguments keeps it on
    attention = choose_attention(model_args.attn_implementation)
    kernel = varlen_kernel() if attention == "varlen" else None
    has_gqa = kernel is not None and "enable_gqa" in inspect.signature(kernel).parameters
    # as TrainArguments resolves --use_liger_kernel (default on) on a GPU: on where liger-kernel is installed
    liger = flags["use_liger_kernel"] is not False and importlib.util.find_spec("liger_kernel") is not None
    # label smoothing and z-loss are computed from the full logits (lmtrain/training/losses.py), so with either
    # one the logits tensor is there even where Liger is on
    fused = liger and not (_nonzero(flags["label_smoothing_factor"]) or _nonzero(flags["z_loss_coefficient"]))
    setup = TrainingSetup(micro_batch=1, seq_length=row_length, precision="bf16" if flags["bf16"] or flags["fp16"]
                          else "fp32", num_gpus=world, gradient_checkpointing=bool(flags["gradient_checkpointing"]),
                          fused_cross_entropy=fused, liger=liger, **attention_layout(attention, has_gqa), **fields)
    from dataclasses import replace

    name, total = gpu
    usable = total * (1 - MEMORY_HEADROOM)
    fit = largest_micro_batch(shape, setup, usable)
    one = estimate_memory(shape, setup).total / GIB
    turned_on, advice = "", "turn on --gradient_checkpointing, "
    if setup.gradient_checkpointing:
        advice = ""
    elif flags["gradient_checkpointing"] is False:
        advice = "turn on --gradient_checkpointing (off here as you asked), "
    elif fit == 0:
        # "checkpointing only when memory needs it": off is the faster default (no recomputed forward), so it is
        # turned on only when the user left it unset and one row fits with it but not without
        checkpointed = replace(setup, gradient_checkpointing=True)
        with_it = estimate_memory(shape, checkpointed).total / GIB
        fit = largest_micro_batch(shape, checkpointed, usable)
        if fit:
            turned_on = (f"gradient checkpointing turned on: one row needs {one:.1f} GiB without it, {with_it:.1f} "
                         "GiB with it (pass --gradient_checkpointing false to refuse instead); ")
            setup = checkpointed
        else:
            advice = f"checkpointing alone is not enough ({with_it:.1f} GiB with it), "
    where = (f"{name} {total / GIB:.1f} GiB, {usable / GIB:.1f} usable; "
             f"{setup.strategy}, {setup.precision}, rows of {row_length}, checkpointing "
             f"{'on' if setup.gradient_checkpointing else 'off'}, {attention} attention, "
             f"Liger {'on' if liger else 'off'}")
    if fit == 0:
        raise UserError(f"--per_device_train_batch_size auto: not even a micro-batch of 1 fits ({one:.1f} GiB "
                        f"estimated; {where}). To fit: {advice}use a higher ZeRO stage "
                        "(--deepspeed ds_configs/zero3.json), more GPUs, or shorter rows")
    peak = estimate_memory(shape, replace(setup, micro_batch=fit)).total / GIB
    return fit, (f"{turned_on}the largest micro-batch the planner fits on {where} (estimated peak {peak:.1f} GiB)"
                 ), bool(turned_on)


def visible_gpu() -> tuple[str, int] | None:
    """(name, total bytes) of this process's CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory


def _model_and_row_length(dataclass_types, argv, config_values):
    """ModelArguments and the row length (--block_size / --max_length, or the prepared data's), parsed from the
    same command line without the training options (their TrainingArguments is built once, afterwards)."""
    from transformers import HfArgumentParser, TrainingArguments

    types = [t for t in dataclass_types if not issubclass(t, TrainingArguments)]
    parser = HfArgumentParser(types, allow_abbrev=False)
    known = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in config_values.items() if k in known})
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)
    model_args = next((p for p in parsed if hasattr(p, "config_name")), None)
    data_args = next((p for p in parsed if hasattr(p, "dataset_path")), None)
    if model_args is None or data_args is None:  # e.g. dpo.py: a policy and a reference, not what is planned
        raise UserError("--per_device_train_batch_size auto sizes pretraining and SFT runs (pretrain.py, sft.py); "
                        "give a number for this command")
    row_length = getattr(data_args, "block_size", None) or getattr(data_args, "max_length")
    if data_args.dataset_path:
        from lmtrain.planning.lengths import prepared_row_length

        row_length = prepared_row_length(data_args.dataset_path)
    return model_args, row_length


def _positive_int(value, flag: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value}: expected a positive whole number"
                        + (" or auto" if "per_device" in flag else "")) from None
    if number <= 0:
        raise UserError(f"{flag} {value}: must be at least 1")
    return number


def _set_flag(argv: list[str], name: str, value) -> list[str]:
    """argv with --name set to value: every earlier occurrence removed, the new one appended."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == f"--{name}":
            skip = True
            continue
        if token.startswith(f"--{name}="):
            continue
        out.append(token)
    return out + [f"--{name}", str(value)]
