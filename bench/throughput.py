r"""Pretraining speed of the real pretrain.py path (lmtrain.cli.pretrain.main, not a copy) on synthetic tokens.

Prints one line "RESULT {json}": steady-state tokens/s per GPU, MFU with the reference's formula
(6 x parameters + 12 x layers x hidden x sequence, over 989 TFLOP/s unless --peak_tflops), seconds per step
and peak GPU memory. Every option this script does not know goes to pretrain.py unchanged, so each
optimization is switched there: --use_liger_kernel false, --attn_implementation sdpa, --gradient_checkpointing,
--torch_compile, --deepspeed ds_configs/zero2.json, ...

    # one H200, the Qwen2.5-1.5B shape with its 151,936-token vocabulary, sequence 2048, ZeRO-2
    deepspeed --num_gpus 1 bench/throughput.py --config qwen2.5-1.5b --seq 2048 --batch 8 \
        --deepspeed ds_configs/zero2.json --bf16
    # the reference, in the same command (report ours as a ratio to it)
    deepspeed --num_gpus 1 .whl/seed_recipe.py --arch 1.5b --bs 4 --gc
    # a CPU smoke run (what CI keeps working)
    python bench/throughput.py --config qwen2-tiny --seq 64 --batch 2 --steps 12 --skip_steps 4 --logging_steps 4 \
        --vocab 0

The tokens are random ids (the speed of a step does not depend on which ids it reads). --doc_length 0 gives
one document per block, as the reference's data has; --doc_length N cuts blocks into documents of
exponentially distributed lengths with mean N, so document masking (position_ids restarting per document)
is exercised as real corpora exercise it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.model.flops import count_parameters  # noqa: E402

REFERENCE_PEAK_TFLOPS = 989.0  # the reference's denominator (H100/H200 dense bf16), kept for a like-for-like ratio


def markov_tokens(count: int, vocab: int, rows: int, rng, successors: int = 4) -> np.ndarray:
    """Tokens from a random sparse Markov chain (each token has `successors` likely next tokens): a stream a
    model can learn (the loss falls from ln(vocab) toward the chain's entropy), so two paths' loss curves can
    be compared over hundreds of steps. Generated `rows` streams at a time."""
    table = rng.integers(0, vocab, (vocab, successors))
    length = -(-count // rows)
    out = np.empty((rows, length), dtype=np.int32)
    out[:, 0] = rng.integers(0, vocab, rows)
    for i in range(1, length):
        out[:, i] = table[out[:, i - 1], rng.integers(0, successors, rows)]
    return out.reshape(-1)[:count]


def synthetic_blocks(rows: int, seq: int, vocab: int, doc_length: int, data: str = "random", seed: int = 0):
    """Token blocks with position_ids restarting at each synthetic document (as BlockPacker writes)."""
    import datasets

    from lmtrain.data.packing import BlockPacker, blocks_to_arrow

    rng = np.random.default_rng(seed)
    tokens = (markov_tokens(rows * seq, vocab, rows, rng) if data == "markov"
              else rng.integers(0, vocab, rows * seq, dtype=np.int32))
    if doc_length > 0:
        lengths = np.maximum(1, rng.exponential(doc_length, size=rows * seq // max(doc_length // 4, 1))).astype(np.int64)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), rows * seq) + 1]
        lengths[-1] -= lengths.sum() - rows * seq
    else:
        lengths = np.full(rows, seq, dtype=np.int64)
    packer = BlockPacker(seq, pad_id=0, drop_remainder=True)
    tables = [blocks_to_arrow(blocks) for blocks in packer.add(tokens, lengths)]
    import pyarrow as pa

    return datasets.Dataset(pa.concat_tables(tables))


def synthetic_conversations(path: Path, count: int, median_tokens: int, max_tokens: int, seed: int = 0):
    """SFT records with a skewed (log-normal) length distribution, as real chat sets have: most replies short,
    a long tail up to max_tokens. Words of the synthetic tokenizer's alphabet, ~2 tokens each."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = np.clip(rng.lognormal(np.log(median_tokens), 1.0, count), 8, max_tokens * 0.95).astype(int)
    with open(path, "w", encoding="utf-8") as handle:
        for tokens in lengths:
            words = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(max(2, tokens // 2))]
            prompt_words = max(1, len(words) // 4)
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(words[:prompt_words])},
                {"role": "assistant", "content": " ".join(words[prompt_words:])}]}) + "\n")


def synthetic_tokenizer(directory: Path):
    """A small byte-level BPE trained on generated words: the run needs a tokenizer, not a good one, and the
    GPU machines have no corpus and no hub."""
    from lmtrain.tokenizer import train_bpe_tokenizer

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words, 200)) for _ in range(200)]
    train_bpe_tokenizer(texts, vocab_size=1024, show_progress=False).save_pretrained(directory)


def steady_state(log_history: list[dict], skip_steps: int) -> dict:
    """Mean figures of the logging windows that start after `skip_steps` (warm-up, allocator growth, compiles)."""
    rows = [row for row in log_history if "step_seconds" in row and row["step"] > skip_steps]
    if not rows:
        raise SystemExit(f"no logging window after step {skip_steps}: raise --steps or lower --skip_steps")
    step_seconds = float(np.mean([row["step_seconds"] for row in rows]))
    tokens = float(np.mean([row["tokens_per_second_per_device"] for row in rows]))
    memory = max((row.get("gpu_memory_peak_gib", 0.0) for row in log_history), default=0.0)
    # The callback's MFU: the reference's formula at the mean row length run (shorter for unpacked SFT rows).
    mfu = float(np.mean([row.get("mfu", 0.0) for row in rows]))
    return {"step_s": round(step_seconds, 4), "tok_s_gpu": round(tokens), "mfu": round(mfu, 4), "peak_mem_GiB": memory,
            "windows": len(rows), "losses": [row["loss"] for row in log_history if "loss" in row]}


class StepProfiler:
    """A TrainerCallback (duck-typed) that torch-profiles steps FIRST..LAST and writes what the GPU did."""

    def __init__(self, first: int, last: int, report: Path):
        self.first, self.last, self.report, self.profiler = first, last, report, None

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        import time

        import torch

        if state.global_step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import time

        import torch

        if self.profiler is None or state.global_step != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.profiler.__exit__(None, None, None)
        steps = self.last - self.first
        events = self.profiler.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e6
        lines = [f"steps {self.first}..{self.last}: wall {wall / steps:.4f} s/step, GPU kernels "
                 f"{gpu / steps:.4f} s/step ({gpu / wall:.1%} busy)",
                 events.table(sort_by="self_device_time_total", row_limit=25),
                 events.table(sort_by="self_cpu_time_total", row_limit=25)]
        self.report.write_text("\n".join(lines), encoding="utf-8")
        self.profiler = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-0.5b", help="a configs/ name or config file (--config_name)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per block")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (--gradient_accumulation_steps)")
    parser.add_argument("--skip_steps", type=int, default=10, help="steps left out of the figures (warm-up)")
    parser.add_argument("--logging_steps", type=int, default=5, help="steps per measured window")
    parser.add_argument("--vocab", type=int, default=151936,
                        help="embedding rows (the reference's 151,936); 0: the synthetic tokenizer's, rounded up")
    parser.add_argument("--doc_length", type=int, default=0, help="mean document length; 0: one per block")
    parser.add_argument("--data", choices=["random", "markov"], default="random",
                        help="random ids, or a learnable Markov chain (to compare loss curves)")
    parser.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain",
                        help="sft: sft.py on synthetic conversations of skewed lengths (--sft_median_tokens), "
                             "--seq is --max_length; pass --packing false (padded batches) to compare")
    parser.add_argument("--sft_median_tokens", type=int, default=256, help="median conversation length")
    parser.add_argument("--peak_tflops", type=float, default=REFERENCE_PEAK_TFLOPS, help="MFU denominator")
    parser.add_argument("--label", default="", help="a name for this row in the RESULT line")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lmtrain-throughput"),
                        help="scratch directory, emptied first (every rank must see the same one)")
    parser.add_argument("--output_json", default=None, help="also append the RESULT to this JSON-lines file")
    parser.add_argument("--profile_steps", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                        help="torch-profile these steps; writes profile.txt next to --output_json (GPU time per "
                             "step against wall time, the top kernels and the top CPU-side operations)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    options, passthrough = parser.parse_known_args(argv)
    if options.steps - options.skip_steps < options.logging_steps:
        parser.error(f"--steps {options.steps} leaves no measured window of --logging_steps {options.logging_steps} "
                     f"after --skip_steps {options.skip_steps}")

    from lmtrain.cli import pretrain, sft

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    scratch = Path(options.workdir)
    tokenizer_dir, data_dir = scratch / "tokenizer", scratch / "data"
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        synthetic_tokenizer(tokenizer_dir)
        from lmtrain.data.prepared import save_prepared
        from lmtrain.data.pipeline import PreparationReport
        from lmtrain.data.tokenize import tokenizer_fingerprint
        from lmtrain.tokenizer import load_tokenizer
        import datasets

        tokenizer = load_tokenizer(str(tokenizer_dir))
        rows = options.batch * options.accumulation * world * (options.steps + 2)
        if options.stage == "sft":  # enough samples for packed rows too
            count = rows * max(1, 2 * options.seq // options.sft_median_tokens)
            synthetic_conversations(scratch / "chat.jsonl", count, options.sft_median_tokens, options.seq)
        else:
            train = synthetic_blocks(rows, options.seq, len(tokenizer), options.doc_length, options.data)
            report = PreparationReport(block_size=options.seq, tokenizer=tokenizer_fingerprint(tokenizer))
            save_prepared(datasets.DatasetDict({"train": train}), report, str(data_dir), tokenizer)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if os.environ.get("LOCAL_RANK") is not None else "gloo")
        dist.barrier()  # the data exists before any rank reads it
    overrides = f"vocab_size={options.vocab}" if options.vocab else None
    extra = [] if overrides is None else ["--config_overrides", overrides]
    if options.stage == "sft":
        stage, data_flags = sft, ["--train_files", str(scratch / "chat.jsonl"), "--max_length", str(options.seq),
                                  "--validation_split_percentage", "0", "--prepared_cache_dir", str(scratch / "cache"),
                                  "--preprocessing_num_workers", str(min(8, os.cpu_count() or 1))]
    else:
        stage, data_flags = pretrain, ["--dataset_path", str(data_dir)]
    argv_stage = [
        "--config_name", options.config, *extra, "--tokenizer_name", str(tokenizer_dir),
        *data_flags, "--per_device_train_batch_size", str(options.batch),
        "--gradient_accumulation_steps", str(options.accumulation),
        "--max_steps", str(options.steps), "--logging_steps", str(options.logging_steps), "--warmup_steps", "2",
        "--learning_rate", "1e-4", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--plot_curves", "false", "--disable_tqdm", "true", "--overwrite_output_dir",
        "--output_dir", str(scratch / "run"), "--peak_tflops", str(options.peak_tflops), *passthrough]
    # Everything of the stage's main runs except the final save (GBs for the larger shapes, not part of a step).
    # The module's names are patched for this call only: callers in the same process (tests) keep the real ones.
    patched = {"save_final_model": lambda trainer, output_dir: None}
    if options.profile_steps:
        report = Path(options.output_json or scratch / "x").with_name(f"profile-{options.label or 'run'}.txt")
        build = stage.build_trainer

        def build_profiled(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(StepProfiler(*options.profile_steps, report))
            return trainer
        patched["build_trainer"] = build_profiled
    originals = {name: getattr(stage, name) for name in patched}
    try:
        for name, value in patched.items():
            setattr(stage, name, value)
        trainer, _ = stage.main(argv_stage)
    finally:
        for name, value in originals.items():
            setattr(stage, name, value)
    figures = steady_state(trainer.state.log_history, options.skip_steps)
    config = trainer.model.config
    import torch

    result = {"label": options.label, "stage": options.stage, "config": options.config, "seq": options.seq,
              "batch": options.batch, "accumulation": options.accumulation, "data": options.data,
              "world": world, "doc_length": options.doc_length, "params_M": round(count_parameters(trainer.model) / 1e6, 1),
              "attention": config._attn_implementation, "liger": bool(trainer.args.use_liger_kernel),
              "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
              "torch_compile": bool(trainer.args.torch_compile), "deepspeed": trainer.args.deepspeed,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              **figures, "argv": passthrough}
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
        if options.output_json:
            with open(options.output_json, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    from lmtrain.errors import run_entry_point

    run_entry_point(main)
