"""The planner against the runs this project measured (lmtrain.planning.gpus.MEASURED_RUNS): predicted peak memory
for every run with a recorded peak, and predicted tokens/s for every run from the MFU of the run the planner would
pick without it (leave one out, so no run predicts itself). Prints the Markdown tables of docs/PLANNER.md:

    python -m lmtrain.planning.validation
"""
from __future__ import annotations

from lmtrain.planning.compute import training_flops_per_token
from lmtrain.planning.gpus import MEASURED_RUNS, MeasuredRun, default_mfu_run, gpu_kind, micro_batch_flops
from lmtrain.planning.memory import GIB, estimate_memory


def describe(run: MeasuredRun) -> str:
    options = [run.strategy, f"{run.micro_batch}x{run.seq_length}",
               "checkpointing" if run.gradient_checkpointing else "no checkpointing"]
    if run.liger:
        options.append("Liger")
    if run.num_gpus > 1:
        options.append(f"{run.num_gpus} GPUs")
    name = run.config if not run.config_overrides else \
        f"{run.config} reshaped to {run.shape().parameters() / 1e9:.2f}B parameters"
    return f"{run.gpu} {run.recipe} {name} (vocab {run.vocab_size:,}), {', '.join(options)}"


def memory_rows() -> list[tuple[MeasuredRun, float]]:
    return [(run, estimate_memory(run.shape(), run.setup()).total / GIB)
            for run in MEASURED_RUNS if run.peak_memory_gib is not None]


def throughput_rows() -> list[tuple[MeasuredRun, MeasuredRun | None, float | None]]:
    rows = []
    for run in MEASURED_RUNS:
        peak = gpu_kind(run.gpu).peak_tflops
        source = default_mfu_run(run.gpu, run.strategy, run.gradient_checkpointing, run.shape().parameters(),
                                 run.liger, exclude=run,
                                 flops_per_micro_batch=micro_batch_flops(run.shape(), run.micro_batch, run.seq_length))
        predicted = None if source is None else \
            source.mfu(peak) * peak * 1e12 / training_flops_per_token(run.shape(), run.seq_length)
        rows.append((run, source, predicted))
    return rows


def main():
    print("| run | measured peak GiB | predicted GiB | error | source |\n| --- | --- | --- | --- | --- |")
    for run, predicted in memory_rows():
        print(f"| {describe(run)} | {run.peak_memory_gib:.2f} | {predicted:.2f} | "
              f"{predicted / run.peak_memory_gib - 1:+.1%} | {run.source} |")
    print("\n| run | measured tokens/s | MFU taken from | predicted tokens/s | error |\n"
          "| --- | --- | --- | --- | --- |")
    for run, source, predicted in throughput_rows():
        if source is None:
            print(f"| {describe(run)} | {run.tokens_per_second:,.0f} | nothing else measured on {run.gpu} | - | - |")
            continue
        print(f"| {describe(run)} | {run.tokens_per_second:,.0f} | {describe(source)}, MFU "
              f"{source.mfu(gpu_kind(source.gpu).peak_tflops):.1%} | {predicted:,.0f} | "
              f"{predicted / run.tokens_per_second - 1:+.1%} |")


if __name__ == "__main__":
    main()
