"""Plan a run before paying for it: parameters, FLOPs, tokens, GPU memory per device by term and ZeRO stage,
the largest micro-batch that fits, step time, GPU-hours and cost. Prints a summary and writes
OUTPUT_DIR/plan.json (and OUTPUT_DIR/lengths.png for a dataset). Nothing is downloaded or built.

    # size, memory and time of a config for a token budget on 8 H100s at $2.50 per GPU-hour
    python plan.py --config_name qwen2.5-1.5b --block_size 2048 --train_tokens 30B --bf16 \
        --deepspeed ds_configs/zero2.json --gradient_checkpointing --num_gpus 8 --gpu H100 --price_per_gpu_hour 2.5

    # a compute budget: the compute-optimal size, and what it buys for this config
    python plan.py --config_name llama-1b --compute_budget 1e21 --bf16 --gpu H200

    # length statistics of SFT data (P50/P90/P95/max, lengths.png) to choose --max_length
    python plan.py --stage sft --model_name_or_path outputs/demo/pretrain --train_files data/sft_demo/train.jsonl

The formula, every flag and the check against measured runs: docs/PLANNER.md.
"""
from __future__ import annotations

import json
import logging
import math
import os

from lmtrain.arguments import ModelArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.errors import UserError
from lmtrain.planning import compute
from lmtrain.planning.arguments import PlanArguments
from lmtrain.planning.gpus import GPU_MEMORY_GIB, GPUKind, default_mfu_run, gpu_kind, micro_batch_flops
from lmtrain.planning.memory import (GIB, STRATEGIES, TrainingSetup, attention_layout, estimate_memory,
                                     largest_micro_batch, setup_from_deepspeed)
from lmtrain.planning.shape import shape_of_run

logger = logging.getLogger("plan")
# Beyond this size ratio the measured MFU is not carried over silently: the H100 demo model (27M parameters) ran at
# 1.5-3.3% MFU where the 0.5B models ran at 12-15% (docs/PLANNER.md, tokens/s validation)
SIZE_RATIO_WARNED = 4


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model_args, args = parse_arguments([ModelArguments, PlanArguments], argv)
    if not (model_args.config_name or model_args.model_name_or_path):
        raise UserError("give the model to plan: --config_name NAME_OR_FILE (e.g. qwen2.5-0.5b, a configs/ name) or "
                        "--model_name_or_path DIR")
    if model_args.attn_implementation == "eager":
        raise UserError("--attn_implementation eager saves the full attention matrix, which the planner does not "
                        "model; plan with auto (the default: varlen), varlen, sdpa, flash_attention_2 or flex_attention")
    tokenizer = load_tokenizer_if_needed(model_args, args)
    shape = shape_of_run(model_args, tokenizer)
    gpu = resolve_gpu(args)
    plan = {"model": model_section(model_args, shape)}

    seq_length = args.seq_length
    dataset_tokens = None
    if args.dataset_path or args.train_files:
        plan["dataset"], dataset_tokens, seq_length = dataset_section(args, tokenizer, seq_length)
    if args.auto_micro_batch:
        plan["auto_micro_batch"] = resolve_auto_micro_batch(args, shape, seq_length, model_args.attn_implementation,
                                                            gpu)
    setup = training_setup(args, seq_length, model_args.attn_implementation)
    flops_token = compute.training_flops_per_token(shape, seq_length)
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_gpus
    tokens_per_step = rows_per_step * seq_length
    mfu = planned_mfu(args, shape, gpu, setup)  # once: --gpu_hours and the time both use it
    plan["compute"], total_tokens = compute_section(args, shape, flops_token, tokens_per_step, dataset_tokens, gpu,
                                                    mfu)
    plan["memory"] = memory_section(shape, setup, gpu, args)
    plan["time"] = time_section(args, mfu, gpu, flops_token, tokens_per_step, total_tokens)

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "plan.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(plan, handle, indent=2)
    print(summary(plan, setup))
    print(f"\nwritten: {path}" + (f", {plan['dataset']['histogram']}" if "dataset" in plan else ""))
    return plan


def load_tokenizer_if_needed(model_args, args):
    """The tokenizer, when the plan needs one: to tokenize raw files, or to size a from-scratch vocabulary."""
    name = model_args.tokenizer_name or (model_args.model_name_or_path if args.train_files else None)
    if args.train_files and not name:
        raise UserError("--train_files are tokenized as training would: give --tokenizer_name (or "
                        "--model_name_or_path, whose tokenizer is used)")
    if not name:
        return None
    from lmtrain.tokenizer import load_tokenizer

    return load_tokenizer(name, cache_dir=model_args.cache_dir, revision=model_args.model_revision)


def resolve_gpu(args) -> GPUKind:
    if args.gpu_memory_gib and args.peak_tflops:
        return GPUKind(args.gpu, args.gpu_memory_gib, args.peak_tflops)
    kind = gpu_kind(args.gpu)
    return GPUKind(kind.name, args.gpu_memory_gib or kind.memory_gib, args.peak_tflops or kind.peak_tflops)


def model_section(model_args, shape) -> dict:
    return {"config": model_args.config_name or model_args.model_name_or_path, "shape": shape.to_dict(),
            "parameters": shape.parameters(), "embedding_parameters": shape.embedding_parameters(),
            "non_embedding_parameters": shape.non_embedding_parameters()}


def dataset_section(args, tokenizer, seq_length: int):
    from lmtrain.planning import lengths as L

    if args.dataset_path:
        values, dropped = L.prepared_lengths(args.dataset_path, args.max_samples)
        path = args.dataset_path
        check_prepared_against_flags(args, L.prepared_stage(path), L.prepared_row_length(path))
        seq_length = args.seq_length
    elif args.stage == "sft":
        values, dropped = L.raw_sft_lengths(args.train_files, tokenizer, args.max_samples)
    else:
        values, dropped = L.raw_pretrain_lengths(args.train_files, tokenizer, args.text_field, args.txt_unit,
                                                 args.max_samples)
    stats = L.length_summary(values, dropped, seq_length)
    what = "sample" if args.stage == "sft" else "document"
    stats["unit"] = what
    stats["histogram"] = L.plot_lengths(values, stats, os.path.join(args.output_dir, "lengths.png"), what)
    # SFT rows hold whole samples cut to max_length; pretraining rows are packed without loss
    tokens = int(values.clip(max=seq_length).sum()) if args.stage == "sft" else int(values.sum())
    stats["tokens_per_epoch"] = tokens
    return stats, tokens, seq_length


def check_prepared_against_flags(args, stage: str, row_length: int):
    """The prepared data fixes the stage and the row length, as training reads them: a flag that says otherwise
    (given on purpose) is refused, as pretrain.py / sft.py refuse it; a default follows the data."""
    from lmtrain.cli.parsing import explicit_options

    given = explicit_options(args)
    if stage != args.stage and "stage" in given:
        raise UserError(f"--stage {args.stage}, but --dataset_path {args.dataset_path} holds {stage} data "
                        f"(prepared by data_prep/prepare_{'sft' if stage == 'sft' else 'pretrain'}.py): drop --stage")
    args.stage = stage
    flag = "block_size" if stage == "pretrain" else "max_length"
    if getattr(args, flag) != row_length and flag in given:
        raise UserError(f"--{flag} {getattr(args, flag)}, but --dataset_path {args.dataset_path} has rows of "
                        f"{row_length} tokens (fixed when it was prepared): drop --{flag} or prepare the data again")
    setattr(args, flag, row_length)


def resolve_auto_micro_batch(args, shape, seq_length: int, attention: str, gpu: GPUKind) -> str:
    """--per_device_train_batch_size auto: the largest micro-batch whose estimate fits --gpu less the headroom,
    lowered to divide --global_batch_size, with checkpointing turned on only when one row needs it (and
    --gradient_checkpointing was not given), as lmtrain.planning.auto_batch decides for a training run."""
    from dataclasses import replace

    from lmtrain.cli.parsing import explicit_options

    args.per_device_train_batch_size = 1
    setup = training_setup(args, seq_length, attention)
    usable = gpu.memory_gib * GIB * (1 - args.memory_headroom)
    fit, why = largest_micro_batch(shape, setup, usable), ""
    if fit == 0 and not args.gradient_checkpointing and "gradient_checkpointing" not in explicit_options(args):
        fit = largest_micro_batch(shape, replace(setup, gradient_checkpointing=True), usable)
        if fit:
            args.gradient_checkpointing = True
            why = "gradient checkpointing turned on (one row does not fit without it); "
    if fit == 0:
        advice = "" if args.gradient_checkpointing else "--gradient_checkpointing, "
        raise UserError(f"--per_device_train_batch_size auto: not even a micro-batch of 1 fits {gpu.name} "
                        f"({estimate_memory(shape, setup).total / GIB:.1f} GiB estimated, {usable / GIB:.1f} usable, "
                        f"{setup.strategy}). To fit: {advice}a higher ZeRO stage (--deepspeed ds_configs/zero3.json), "
                        "more GPUs (--num_gpus) or shorter rows; a number instead of auto shows the memory by term")
    micro = fit
    if args.global_batch_size is not None:
        per_gpu = args.global_batch_size // args.num_gpus if args.global_batch_size % args.num_gpus == 0 else 0
        micro = max((b for b in range(1, fit + 1) if per_gpu % b == 0), default=0) if per_gpu else 0
        if not micro:
            raise UserError(f"--global_batch_size {args.global_batch_size} is not a multiple of --num_gpus "
                            f"{args.num_gpus}")
    args.per_device_train_batch_size = micro
    args.resolve_accumulation()
    where = f"the largest that fits {gpu.name} ({usable / GIB:.1f} GiB usable)"
    if micro < fit:
        return f"{why}micro-batch {micro} ({where} is {fit}, lowered to divide --global_batch_size)"
    return f"{why}micro-batch {micro}, {where}"


def training_setup(args, seq_length: int, attention: str) -> TrainingSetup:
    liger = args.use_liger_kernel
    fields = setup_from_deepspeed(args.deepspeed) if args.deepspeed else {"strategy": "none"}
    if args.strategy and args.deepspeed and args.strategy != fields["strategy"]:
        raise UserError(f"--strategy {args.strategy} and --deepspeed {args.deepspeed} ({fields['strategy']}) disagree: "
                        "give one of them (--deepspeed plans that very config; --strategy stands in for it)")
    if args.strategy:
        fields["strategy"] = args.strategy
    fused = liger if args.fused_cross_entropy is None else args.fused_cross_entropy
    return TrainingSetup(micro_batch=args.per_device_train_batch_size, seq_length=seq_length,
                         precision=args.precision, num_gpus=args.num_gpus,
                         gradient_checkpointing=args.gradient_checkpointing, fused_cross_entropy=fused, liger=liger,
                         **attention_layout(attention), **fields)


def compute_section(args, shape, flops_token, tokens_per_step, dataset_tokens, gpu, mfu):
    section = {"flops_per_token": flops_token, "chinchilla_optimal_tokens": compute.chinchilla_tokens(
        shape.parameters()), "tokens_per_step": tokens_per_step}
    budget = compute.parse_amount(args.compute_budget, "--compute_budget")
    if args.gpu_hours:
        if mfu[0] is None:
            raise UserError(f"--gpu_hours needs an MFU to turn hours into FLOPs: {mfu[1]}")
        budget = args.gpu_hours * 3600 * gpu.peak_tflops * 1e12 * mfu[0]
    if budget:
        section["compute_optimal"] = compute.compute_optimal(budget)
        section["tokens_the_budget_buys"] = budget / flops_token
    if args.train_tokens:
        tokens, source = compute.parse_amount(args.train_tokens, "--train_tokens"), "--train_tokens"
    elif args.max_steps:
        tokens, source = args.max_steps * tokens_per_step, "--max_steps x tokens per step"
    elif dataset_tokens is not None:
        tokens, source = dataset_tokens * args.num_train_epochs, "the dataset x --num_train_epochs"
    elif budget:
        tokens, source = budget / flops_token, "the compute budget"
    else:
        tokens, source = section["chinchilla_optimal_tokens"], "Chinchilla-optimal (20 per parameter)"
    section.update(train_tokens=tokens, train_tokens_from=source, training_flops=tokens * flops_token,
                   optimizer_steps=math.ceil(tokens / tokens_per_step))
    return section, tokens


def memory_section(shape, setup, gpu, args) -> dict:
    from dataclasses import replace

    usable = gpu.memory_gib * GIB * (1 - args.memory_headroom)
    section = {"gpu": gpu.name, "gpu_memory_gib": gpu.memory_gib, "usable_gib": round(usable / GIB, 2),
               "run_strategy": setup.strategy, "strategies": {}}
    for strategy in STRATEGIES:
        variant = replace(setup, strategy=strategy)
        estimate = estimate_memory(shape, variant).to_dict()
        estimate["fits"] = estimate["total_gib"] * GIB <= usable
        estimate["largest_micro_batch"] = largest_micro_batch(shape, variant, usable)
        section["strategies"][strategy] = estimate
    section["largest_micro_batch_by_gpu"] = {
        kind: largest_micro_batch(shape, setup, memory * GIB * (1 - args.memory_headroom))
        for kind, memory in GPU_MEMORY_GIB.items()}
    return section


def planned_mfu(args, shape, gpu, setup: TrainingSetup):
    """(MFU, where it came from, how that run differs from this plan): --mfu, else the measured run that
    default_mfu_run picks on this GPU kind; (None, why not, []) without one."""
    if args.mfu:
        return args.mfu, "--mfu", []
    if setup.precision == "fp32":
        return None, "the measured MFUs are of bf16 runs; for fp32 pass --mfu (or plan with --bf16)", []
    strategy, liger = setup.strategy, setup.liger
    run = default_mfu_run(gpu.name, strategy, args.gradient_checkpointing, shape.parameters(), liger,
                          flops_per_micro_batch=micro_batch_flops(shape, setup.micro_batch, setup.seq_length))
    if run is None:
        return None, f"nothing measured on {gpu.name}: pass --mfu", []
    differences = [f"{what} {theirs} there, {ours} here" for what, theirs, ours in (
        ("ZeRO", run.strategy, strategy), ("checkpointing", run.gradient_checkpointing, args.gradient_checkpointing),
        ("Liger", run.liger, liger), ("GPUs", run.num_gpus, args.num_gpus))
        if theirs != ours and not (what == "ZeRO" and ours.startswith(theirs))]
    theirs, ours = run.shape().parameters(), shape.parameters()
    if max(theirs, ours) > SIZE_RATIO_WARNED * min(theirs, ours):  # a small model's step is mostly fixed overhead
        differences.append(f"model size {theirs / 1e6:,.0f}M there, {ours / 1e6:,.1f}M here")
    if differences:  # the MFU carries over badly across these (docs/PLANNER.md, validation)
        logger.warning("the default MFU comes from a run that differs from this plan (%s): pass --mfu for a "
                       "better figure", "; ".join(differences))
    source = (f"{run.recipe} {run.config} (vocab {run.vocab_size}), {run.strategy}, micro-batch {run.micro_batch} x "
              f"{run.seq_length}, checkpointing {'on' if run.gradient_checkpointing else 'off'}, {run.num_gpus} "
              f"GPU(s), {run.tokens_per_second:,.0f} tokens/s: {run.source}")
    return run.mfu(gpu.peak_tflops), source, differences


def time_section(args, planned, gpu, flops_token, tokens_per_step, total_tokens) -> dict:
    mfu, source, differences = planned
    if mfu is None:
        return {"skipped": source}
    result = compute.throughput(flops_token, mfu, gpu.peak_tflops, args.num_gpus, tokens_per_step, total_tokens,
                                args.price_per_gpu_hour)
    return {"mfu": round(mfu, 4), "mfu_from": source, "mfu_run_differs": differences,
            "peak_tflops": gpu.peak_tflops, "num_gpus": args.num_gpus,
            **result.to_dict()}


def summary(plan: dict, setup: TrainingSetup) -> str:
    model, comp, memory, time = plan["model"], plan["compute"], plan["memory"], plan["time"]
    lines = [f"model {model['config']}: {model['parameters'] / 1e6:,.2f}M parameters "
             f"({model['embedding_parameters'] / 1e6:,.2f}M embedding, "
             f"{model['non_embedding_parameters'] / 1e6:,.2f}M non-embedding)",
             f"training FLOPs per token {comp['flops_per_token']:.4g} at sequence {setup.seq_length}; "
             f"Chinchilla-optimal tokens {comp['chinchilla_optimal_tokens']:.4g}"]
    if "compute_optimal" in comp:
        best = comp["compute_optimal"]
        lines.append(f"compute budget {best['compute_flops']:.4g} FLOPs: compute-optimal "
                     f"{best['parameters'] / 1e6:,.0f}M "
                     f"parameters on {best['tokens']:.4g} tokens; this model gets {comp['tokens_the_budget_buys']:.4g} "
                     "tokens")
    lines.append(f"tokens {comp['train_tokens']:.4g} ({comp['train_tokens_from']}), {comp['optimizer_steps']:,} steps "
                 f"of {comp['tokens_per_step']:,} tokens, {comp['training_flops']:.4g} FLOPs")
    if "auto_micro_batch" in plan:
        lines.append(f"--per_device_train_batch_size auto: {plan['auto_micro_batch']}")
    if "dataset" in plan:
        d = plan["dataset"]
        lines.append(f"dataset: {d['count']:,} {d['unit']}s, {d['tokens']:,} tokens; length P50 {d['p50']} P90 "
                     f"{d['p90']} P95 {d['p95']} P99 {d['p99']} max {d['max']}; {d['share_longer_than_row']:.1%} "
                     f"longer than the row length {d['row_length']}")
    lines.append(f"\nGPU memory per device, GiB ({setup.precision}, micro-batch {setup.micro_batch} x "
                 f"{setup.seq_length}, checkpointing {'on' if setup.gradient_checkpointing else 'off'}, "
                 f"{setup.num_gpus} GPU(s), {memory['gpu']} {memory['gpu_memory_gib']} GiB, "
                 f"{memory['usable_gib']} usable):")
    labels = ("weights", "gradients", "optimizer", "activations", "logits", "buffers")  # memory.TERMS, short
    header = f"  {'strategy':<14}" + "".join(f"{label:>12}" for label in labels)
    lines.append(header + f"{'total':>9}  peak at{'':<12}largest micro-batch")
    for name, est in memory["strategies"].items():
        mark = "*" if name == memory["run_strategy"] else " "
        lines.append(f" {mark}{name:<14}" + "".join(f"{v:>12.2f}" for v in est["terms_gib"].values())
                     + f"{est['total_gib']:>9.2f}  {est['peak_moment']:<19}{est['largest_micro_batch']}")
    offload = memory["strategies"].get("zero3_offload", {}).get("cpu_memory_gib_per_process")
    if offload:
        lines.append(f"  zero3_offload also needs {offload:,.2f} GiB of host RAM per process (fp32 master weights, Adam's "
                     "moments, bf16 parameters and gradients; a 7.6B shape ran a 125 GiB host out of memory)")
    lines.append("  largest micro-batch, run strategy: " + ", ".join(
        f"{kind} {batch}" for kind, batch in memory["largest_micro_batch_by_gpu"].items()))
    if "skipped" in time:
        lines.append(f"\ntime: not estimated ({time['skipped']})")
    else:
        cost = f", cost {time['cost']:,.0f}" if time["cost"] is not None else ""
        lines.append(f"\ntime at MFU {time['mfu']:.1%} ({time['mfu_from']}):\n  "
                     f"{time['tokens_per_second_per_gpu']:,.0f} "
                     f"tokens/s per GPU, {time['step_seconds']:.3g} s per step, {time['gpu_hours']:,.1f} GPU-hours, "
                     f"{time['wall_hours']:,.1f} h on {time['num_gpus']} GPU(s){cost}")
    return "\n".join(lines)
