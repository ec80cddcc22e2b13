"""GPU kinds the planner knows, and the runs this project measured on them: the MFU a plan assumes by default
comes from these rows, and docs/PLANNER.md checks the memory model against their peaks.

To add a measured run: append a MeasuredRun with its source (file and date). MFU is not typed in: it is
computed from the tokens/s with lmtrain.model.flops.flops_per_token, the formula of the training log."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass

from lmtrain.errors import UserError
from lmtrain.model.flops import PEAK_TFLOPS, flops_per_token

# Memory per device as sold (vendor datasheets), GiB. The peak TFLOP/s come from lmtrain.model.flops.PEAK_TFLOPS,
# matched by the same substring rule as the training log's MFU.
GPU_MEMORY_GIB = {"H100": 80, "H800": 80, "H200": 141, "B200": 180, "A100-80GB": 80, "A100-40GB": 40,
                  "A800": 80, "L40S": 48, "4090": 24}
GPU_ALIASES = {"A100": "A100-80GB", "H100-80GB": "H100", "RTX4090": "4090", "RTX-4090": "4090"}


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_gib: float
    peak_tflops: float


def gpu_kind(name: str) -> GPUKind:
    """A GPU by name (case and dashes forgiven): H100, H200, A100-40GB, A100-80GB, 4090, ..."""
    key = name.strip().upper().replace("_", "-")
    key = GPU_ALIASES.get(key, key)
    if key not in GPU_MEMORY_GIB:
        near = difflib.get_close_matches(key, list(GPU_MEMORY_GIB) + list(GPU_ALIASES), n=1, cutoff=0.4)
        raise UserError(f"--gpu {name}: not a GPU kind the planner knows" + (f" (did you mean {near[0]}?)" if near
                        else "") + f"; choose one of {', '.join(GPU_MEMORY_GIB)}, or give --gpu_memory_gib and "
                        "--peak_tflops for another")
    peak = next(value for sub, value in PEAK_TFLOPS.items() if sub in key)
    return GPUKind(key, GPU_MEMORY_GIB[key], peak)


def kind_of_device_name(device_name: str) -> str | None:
    """The planner's kind for torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" -> "H100")."""
    upper = device_name.upper()
    if "A100" in upper:
        return "A100-40GB" if "40GB" in upper else "A100-80GB"
    return next((kind for kind in GPU_MEMORY_GIB if kind in upper), None)


@dataclass(frozen=True)
class MeasuredRun:
    """One run measured on a GPU, as recorded in the cited file."""
    gpu: str
    recipe: str               # "lmtrain" (pretrain.py / sft.py) or "seed" (the classic-recipe reference)
    config: str               # a configs/ name
    vocab_size: int
    seq_length: int
    micro_batch: int
    gradient_checkpointing: bool
    strategy: str             # none, zero2, zero3
    num_gpus: int
    tokens_per_second: float  # per GPU, steady state
    peak_memory_gib: float | None
    attention_mask: bool      # SDPA on lmtrain's packed rows gets a mask and repeats k/v heads; the seed's not
    fused_adam: bool          # the DeepSpeed config has an optimizer section (FusedAdam)
    liger: bool               # Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)
    source: str
    config_overrides: str | None = None
    # False: never a plan's default MFU (a 27M-parameter model's step is bound by per-step overhead, not by
    # its matmuls: its MFU of 1-3% says nothing about the models people plan)
    mfu_reference: bool = True
    # k/v heads repeated before the attention kernel (None: as attention_mask; a varlen row whose PyTorch kernel
    # has no enable_gqa repeats them without a mask)
    repeat_kv: bool | None = None

    def setup(self):
        """The run as a memory-model TrainingSetup."""
        from lmtrain.planning.memory import TrainingSetup

        return TrainingSetup(self.micro_batch, self.seq_length, strategy=self.strategy, num_gpus=self.num_gpus,
                             gradient_checkpointing=self.gradient_checkpointing, fused_cross_entropy=self.liger,
                             liger=self.liger, attention_mask=self.attention_mask,
                             repeat_kv=self.attention_mask if self.repeat_kv is None else self.repeat_kv,
                             fused_adam=self.fused_adam)

    def shape(self):
        return run_shape(self)

    def mfu(self, peak_tflops: float) -> float:
        shape = self.shape()
        flops = flops_per_token(shape.parameters(), shape.num_layers, shape.hidden_size, self.seq_length)
        return self.tokens_per_second * flops / (peak_tflops * 1e12)


@functools.lru_cache(maxsize=None)
def run_shape(run: MeasuredRun):
    from lmtrain.model.config import resolve_config
    from lmtrain.planning.shape import shape_of

    return dataclasses.replace(shape_of(resolve_config(run.config, run.config_overrides)), vocab_size=run.vocab_size)


GPU_RUNS = "docs/GPU_RUNS.md (2026-11-22, one H100 80GB HBM3)"
SHARED_README = "../shared/gpu/README.md (2026-11, classic recipe)"
DEMO_LOG = "docs/gpu_logs/demo_gpu.log (2026-11-22, one H100, scripts/demo.sh; tokens/s: median of the logged windows)"
_DEMO = dict(config="qwen2-tiny", vocab_size=4096, micro_batch=32, gradient_checkpointing=False, strategy="zero2",
             num_gpus=1, attention_mask=True, fused_adam=False, liger=False, mfu_reference=False,
             config_overrides="hidden_size=512,intermediate_size=1536,num_hidden_layers=8,num_attention_heads=8,"
                              "num_key_value_heads=4")
_0_5B = dict(config="qwen2.5-0.5b", seq_length=2048)
_1_5B = dict(config="qwen2.5-1.5b", seq_length=2048, vocab_size=151936, micro_batch=4, recipe="seed",
             attention_mask=False,
             fused_adam=True, peak_memory_gib=None)
H200_CALL1 = "docs/gpu_logs/h200-2026-12-02/call1-results.jsonl (2026-12-02, one H200 141 GB, torch 2.11)"
H200_CALL2 = "docs/gpu_logs/h200-2026-12-02/call2-results.jsonl (2026-12-02, one H200 141 GB, torch 2.11)"
# bench/throughput.py rows (bench/gpu_perf.sh): pretrain.py's path, ZeRO-2 without an optimizer section (torch
# fused AdamW), bf16, sequence 2048, the 151,936-token vocabulary. varlen attention: no mask; torch 2.11's
# varlen_attn signature was not recorded on that machine, so whether it took enable_gqa is not known; these rows
# assume the k/v heads were repeated (lmtrain/model/attention.py without enable_gqa) and docs/PLANNER.md gives
# the grouped-heads estimate beside it.
_H200_FAST = dict(vocab_size=151936, seq_length=2048, gradient_checkpointing=False, strategy="zero2", num_gpus=1,
                  attention_mask=False, repeat_kv=True, fused_adam=False, liger=True)
_H200_SEED = dict(vocab_size=151936, seq_length=2048, gradient_checkpointing=True, strategy="zero2", num_gpus=1,
                  attention_mask=False, fused_adam=True, liger=False)
H200_MEMORY = "docs/gpu_logs/h200-2026-12-02b/call-memory-results.jsonl (2026-12-02, one H200 141 GB, torch 2.11)"
_Q3B = "hidden_size=2048,intermediate_size=11008,num_hidden_layers=36,num_attention_heads=16,num_key_value_heads=2"
_Q7B = ("hidden_size=3584,intermediate_size=18944,num_hidden_layers=28,num_attention_heads=28,num_key_value_heads=4,"
        "tie_word_embeddings=false")
MEASURED_RUNS = (
    # Steps 20-30 of the ZeRO-2 run: 50.4k-52.3k tokens/s, the midpoint here.
    MeasuredRun("H100", "lmtrain", vocab_size=32000, micro_batch=8, gradient_checkpointing=True, strategy="zero2",
                num_gpus=1, tokens_per_second=51350, peak_memory_gib=11.77, attention_mask=True, fused_adam=False,
                liger=False, source=GPU_RUNS, **_0_5B),
    MeasuredRun("H100", "lmtrain", vocab_size=32000, micro_batch=8, gradient_checkpointing=True, strategy="zero3",
                num_gpus=1, tokens_per_second=25350, peak_memory_gib=12.49, attention_mask=True, fused_adam=False,
                liger=False, source=GPU_RUNS + ", ZeRO-3: 23.6k-27.1k tokens/s", **_0_5B),
    MeasuredRun("H100", "lmtrain", config="qwen2.5-0.5b", vocab_size=32000, seq_length=512, micro_batch=16,
                gradient_checkpointing=False, strategy="zero2", num_gpus=1, tokens_per_second=47500,
                peak_memory_gib=19.35, attention_mask=True, fused_adam=False, liger=False,
                source=GPU_RUNS + ", full SFT: 41k-54k row-tokens/s"),
    MeasuredRun("H100", "lmtrain", seq_length=512, tokens_per_second=170300, peak_memory_gib=4.49,
                source=DEMO_LOG + ", pretraining", **_DEMO),
    MeasuredRun("H100", "lmtrain", seq_length=256, tokens_per_second=86865, peak_memory_gib=2.8,
                source=DEMO_LOG + ", SFT", **_DEMO),
    MeasuredRun("H100", "seed", vocab_size=151936, micro_batch=8, gradient_checkpointing=True, strategy="zero2",
                num_gpus=1, tokens_per_second=49764, peak_memory_gib=35.1, attention_mask=False, fused_adam=True,
                liger=False, source=GPU_RUNS + ", reference run", **_0_5B),
    MeasuredRun("H100", gradient_checkpointing=True, strategy="zero2", num_gpus=1, tokens_per_second=20400,
                liger=False, source=SHARED_README, **_1_5B),
    MeasuredRun("H100", gradient_checkpointing=False, strategy="zero2", num_gpus=1, tokens_per_second=26100,
                liger=True, source=SHARED_README + ", Liger kernels", **_1_5B),
    MeasuredRun("H200", gradient_checkpointing=True, strategy="zero2", num_gpus=1, tokens_per_second=23200,
                liger=False, source=SHARED_README, **_1_5B),
    MeasuredRun("H200", gradient_checkpointing=True, strategy="zero2", num_gpus=2, tokens_per_second=25500,
                liger=False, source=SHARED_README, **_1_5B),
    MeasuredRun("H200", gradient_checkpointing=True, strategy="zero3", num_gpus=2, tokens_per_second=12900,
                liger=False, source=SHARED_README, **_1_5B),
    MeasuredRun("H200", "seed", vocab_size=151936, micro_batch=8, gradient_checkpointing=True, strategy="zero2",
                num_gpus=2, tokens_per_second=57200, peak_memory_gib=None, attention_mask=False, fused_adam=True,
                liger=False, source=SHARED_README, **_0_5B),
    # This session's H200 runs: tokens/s and peak as the result line records them (tok_s_gpu, peak_mem_GiB).
    MeasuredRun("H200", "lmtrain", "qwen2.5-1.5b", micro_batch=8, tokens_per_second=38633, peak_memory_gib=55.22,
                source=H200_CALL1 + ", fast-1.5b-bs8", **_H200_FAST),
    MeasuredRun("H200", "lmtrain", "qwen2.5-1.5b", micro_batch=16, tokens_per_second=47442, peak_memory_gib=89.04,
                source=H200_CALL1 + ", fast-1.5b-bs16", **_H200_FAST),
    MeasuredRun("H200", "lmtrain", "qwen2.5-0.5b", micro_batch=16, tokens_per_second=96942, peak_memory_gib=39.8,
                source=H200_CALL1 + ", fast-0.5b-bs16", **_H200_FAST),
    MeasuredRun("H200", "lmtrain", "qwen2.5-0.5b", micro_batch=32, tokens_per_second=116517, peak_memory_gib=72.08,
                source=H200_CALL1 + ", fast-0.5b-bs32", **_H200_FAST),
    # Documents of mean length 512 (--data markov --doc_length 512): varlen needs no mask; the plain path's SDPA
    # gets transformers' B x T x T document mask and repeated k/v heads.
    MeasuredRun("H200", "lmtrain", "qwen2.5-0.5b", micro_batch=8, tokens_per_second=60839, peak_memory_gib=23.65,
                source=H200_CALL2 + ", loss-fast-0.5b", **_H200_FAST),
    MeasuredRun("H200", "lmtrain", "qwen2.5-0.5b", micro_batch=8, tokens_per_second=45524, peak_memory_gib=35.13,
                source=H200_CALL2 + ", loss-plain-0.5b (sdpa with the document mask, no Liger, checkpointing)",
                **{**_H200_FAST, "gradient_checkpointing": True, "attention_mask": True, "liger": False}),
    # SFT packed into rows of 2048 (sft.py): tokens/s counts non-padding tokens only, so no default MFU.
    MeasuredRun("H200", "lmtrain", "qwen2.5-0.5b", micro_batch=8, tokens_per_second=63137, peak_memory_gib=23.65,
                source=H200_CALL2 + ", sft-packed", mfu_reference=False, **_H200_FAST),
    # Memory rows (bench/gpu_perf.sh PHASE=memory2): micro-batch 1 with checkpointing, so their MFU says little.
    MeasuredRun("H200", "lmtrain", "qwen2.5-1.5b", micro_batch=1, tokens_per_second=3140, peak_memory_gib=63.3,
                source=H200_MEMORY + ", mem-qwen2.5-3b-zero2", config_overrides=_Q3B, mfu_reference=False,
                **{**_H200_FAST, "gradient_checkpointing": True}),
    MeasuredRun("H200", "lmtrain", "qwen2.5-1.5b", micro_batch=1, tokens_per_second=1691, peak_memory_gib=51.67,
                source=H200_MEMORY + ", mem-qwen2.5-3b-zero3", config_overrides=_Q3B, mfu_reference=False,
                **{**_H200_FAST, "gradient_checkpointing": True, "strategy": "zero3"}),
    MeasuredRun("H200", "lmtrain", "qwen2.5-1.5b", micro_batch=1, tokens_per_second=2017, peak_memory_gib=119.34,
                source=H200_MEMORY + ", mem-qwen2.5-7b-zero3", config_overrides=_Q7B, mfu_reference=False,
                **{**_H200_FAST, "gradient_checkpointing": True, "strategy": "zero3", "vocab_size": 152064}),
    MeasuredRun("H200", "seed", "qwen2.5-1.5b", micro_batch=4, tokens_per_second=22562, peak_memory_gib=34.9,
                source=H200_CALL1 + ", seed-1.5b-bs4-gc (reference)", **_H200_SEED),
    MeasuredRun("H200", "seed", "qwen2.5-0.5b", micro_batch=8, tokens_per_second=49160, peak_memory_gib=35.1,
                source=H200_CALL1 + ", seed-0.5b-bs8-gc (reference)", **_H200_SEED),
)


def micro_batch_flops(shape, micro_batch: int, seq_length: int) -> float:
    """Training FLOPs of one micro-batch (the MFU formula's, per token, times its tokens)."""
    return micro_batch * seq_length * flops_per_token(shape.parameters(), shape.num_layers, shape.hidden_size,
                                                      seq_length)


def default_mfu_run(gpu: str, strategy: str, gradient_checkpointing: bool, parameters: int, liger: bool = False,
                    exclude: MeasuredRun | None = None, flops_per_micro_batch: float | None = None
                    ) -> MeasuredRun | None:
    """The measured run a plan takes its MFU from: the same GPU kind, then, in this order of preference, the same
    ZeRO stage (ZeRO-3 on one or two GPUs ran at half the speed), lmtrain's own scripts over the reference recipe
    (a plan is for an lmtrain run), the same checkpointing choice (its recomputed forward is work the MFU formula
    does not count) and Liger choice, then the nearest FLOPs per micro-batch when given, else the nearest model
    size. Why FLOPs per micro-batch: a step carries a fixed cost (DeepSpeed's per-parameter Python work, ~0.11-0.16
    s on the H200, docs/PERFORMANCE.md), so MFU rises with the work of each forward/backward, and the H200 runs of
    2026-12-02 order by it (0.5B x 16 rows 34%, 1.5B x 8 40%, 0.5B x 32 41%, 1.5B x 16 49%).
    None: nothing measured on this kind."""
    candidates = [run for run in MEASURED_RUNS if run.gpu == gpu and run.mfu_reference and run is not exclude]
    if not candidates:
        return None
    stage = "zero3" if strategy.startswith("zero3") else strategy

    def preference(run: MeasuredRun):
        size = abs(math.log(run.shape().parameters() / max(parameters, 1)))
        work = size if flops_per_micro_batch is None else abs(math.log(
            micro_batch_flops(run.shape(), run.micro_batch, run.seq_length) / max(flops_per_micro_batch, 1.0)))
        return (run.strategy != stage, run.recipe != "lmtrain", run.gradient_checkpointing != gradient_checkpointing,
                run.liger != liger, work, size)
    return min(candidates, key=preference)
