"""GPU memory per device of one training step, by term, from first principles: which tensors exist, in which
dtype, at the three moments a step can peak. docs/PLANNER.md derives every number and checks the totals
against measured runs.

The moments (the peak is the largest; its terms add up to the reported total):
- "backward start": the forward is done, every saved activation is alive, and the loss backward allocates
  the logits' gradients; parameter gradients do not exist yet (zero_grad frees them, DeepSpeed ZeRO-1/2 sets
  its gradient buffers up at the first gradient hook);
- "layer backward" (gradient checkpointing only): the layer checkpoints, one recomputed layer and the
  gradients accumulated so far (counted whole: an upper bound);
- "optimizer step": weights, gradients, the optimizer's states and its temporaries.

Saved activations per token and layer of a LLaMA/Qwen2 decoder layer with SDPA, in bytes (H hidden, I
intermediate, q = heads x head_dim, k = the key/value width SDPA receives, n = heads):
- bf16 weights (DeepSpeed): each RMSNorm saves its fp32 upcast (4H), its fp32 rsqrt (4) and the normalised
  bf16 input of its weight multiply (2H); the q/k/v and gate/up inputs (2H each, shared); RoPE saves only
  cos/sin (per position, shared); SDPA saves q, k, v, its output (2 bytes; the output is laid out
  token-major, so o_proj reads it without a copy) and the fp32 log-sum-exp (4n); the MLP saves gate,
  silu(gate), up and their product (2I each): 16H + 8 + 4q + 4k + 4n + 8I.
- fp32 weights with bf16 autocast (no DeepSpeed): the residual stream stays fp32, so each norm saves 8H, and
  every linear saves its own bf16 cast of the norm's output (3 x 2H for q/k/v, 2 x 2H for gate/up).
- fp32: every saved tensor at 4 bytes.
- Liger's kernels (lmtrain's default on GPUs): each RMSNorm saves its input and rstd only (2H + 4 under bf16
  weights), SwiGLU keeps gate and up and recomputes silu (3 x 2I with the product down_proj saves).
k is the key/value width (kv heads x head_dim) when the kernel takes grouped heads, and q when the heads are
repeated first: transformers does for SDPA whenever a mask is passed, and packed rows (lmtrain's position_ids)
make that mask, B x T x T booleans per micro-batch; the varlen kernel reads the documents from position_ids
(no mask) and repeats unless it takes enable_gqa.
Logits without a fused loss: the bf16 (or fp32) logits are upcast, log_softmax saves its fp32 output (4V per
token), and its backward holds that, the incoming gradient and its own output: 12V bytes per token. The fused
linear cross-entropy's buffers are in activation_terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmtrain.planning.shape import ModelShape

GIB = 2 ** 30
STRATEGIES = ("none", "zero1", "zero2", "zero3", "zero3_offload")
TERMS = ("weights", "gradients", "optimizer_states", "activations", "logits", "temporary_buffers")


@dataclass(frozen=True)
class TrainingSetup:
    micro_batch: int
    seq_length: int
    precision: str = "bf16"             # bf16 (mixed, fp32 master weights) or fp32
    strategy: str = "zero2"             # one of STRATEGIES
    num_gpus: int = 1                   # data-parallel ranks that ZeRO partitions over
    gradient_checkpointing: bool = False
    fused_cross_entropy: bool = False   # liger-kernel's fused linear cross-entropy: no logits tensor
    liger: bool = False                 # liger's RMSNorm, SwiGLU and RoPE kernels (save less; see below)
    attention_mask: bool = True         # SDPA on packed rows gets a B x T x T mask (and repeats k/v heads)
    repeat_kv: bool = True              # k/v heads repeated to the query heads before the kernel
    fused_adam: bool = False            # DeepSpeed's FusedAdam (an "optimizer" section): no step temporaries
    reduce_bucket_size: float | None = None   # ZeRO gradient bucket, elements (None: the ds_configs value)
    max_live_parameters: float = 1e9          # ZeRO-3 stage3_max_live_parameters
    sub_group_size: float = 1e9               # ZeRO-3 sub_group_size: the optimizer steps one sub-group at a time


@dataclass
class MemoryEstimate:
    peak_moment: str
    terms: dict                                   # bytes per term at the peak moment (TERMS)
    moments: dict = field(default_factory=dict)   # every moment's terms
    cpu_bytes: int = 0                            # host memory per process (ZeRO-3 offload)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def to_dict(self) -> dict:
        return {"peak_moment": self.peak_moment, "total_gib": round(self.total / GIB, 2),
                "terms_gib": {k: round(v / GIB, 3) for k, v in self.terms.items()},
                "moments_total_gib": {m: round(sum(t.values()) / GIB, 2) for m, t in self.moments.items()},
                "cpu_memory_gib_per_process": round(self.cpu_bytes / GIB, 2)}


def attention_layout(attention: str, kernel_has_gqa: bool | None = None) -> dict:
    """TrainingSetup's attention_mask / repeat_kv for an lmtrain run (packed rows) with this attention:
    sdpa is given a mask built from position_ids, so transformers repeats the k/v heads; varlen repeats them
    unless the kernel takes enable_gqa (unknown when planning on another machine: assumed not); flash-attn and
    flex read the documents without a dense mask and take grouped heads. "auto" is varlen, as on a GPU."""
    if attention == "sdpa":
        return {"attention_mask": True, "repeat_kv": True}
    if attention in ("varlen", "auto"):
        return {"attention_mask": False, "repeat_kv": not kernel_has_gqa}
    return {"attention_mask": False, "repeat_kv": False}


def regime(setup: TrainingSetup) -> str:
    """The dtypes activations are saved in: bf16 weights under DeepSpeed, fp32 weights + autocast without."""
    if setup.precision == "fp32":
        return "fp32"
    return "autocast" if setup.strategy == "none" else "bf16"


def layer_activation_bytes(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes saved for backward per token by one decoder layer (module docstring)."""
    h, i, q, n = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.num_heads
    k = q if setup.repeat_kv else shape.kv_dim
    kind = regime(setup)
    a = 4 if kind == "fp32" else 2                     # matmul outputs: bf16 (weights or autocast) or fp32
    # liger's RMSNorm saves its input (the residual stream) and rstd only, not an fp32 copy
    norm = residual_bytes(setup) * h + 4 if setup.liger else NORM_BYTES[kind](h)
    # q/k/v read one saved norm output, gate/up another; under autocast each linear saves its own bf16 cast
    linear_inputs = 5 * 2 * h if kind == "autocast" else 2 * a * h
    attention = a * q + 2 * a * k + a * q + 4 * n      # q, k, v and the output in the kernel's dtype, fp32 lse
    # gate, silu(gate), up and their product; liger's SwiGLU recomputes silu in the backward
    mlp = a * i * (3 if setup.liger else 4)
    return 2 * norm + linear_inputs + attention + mlp


# What one RMSNorm saves per token: the fp32 input of its variance (4H: the upcast copy, or the fp32 input
# itself), the fp32 rsqrt (4), and the input of its weight multiply (bf16 2H under bf16 weights, else fp32 4H).
NORM_BYTES = {"bf16": lambda h: 4 * h + 4 + 2 * h, "autocast": lambda h: 8 * h + 4, "fp32": lambda h: 8 * h + 4}


def residual_bytes(setup: TrainingSetup) -> int:
    """Bytes per hidden element of the residual stream: a checkpoint stores the layer input in this dtype."""
    return 2 if regime(setup) == "bf16" else 4


def activation_terms(shape: ModelShape, setup: TrainingSetup) -> tuple[float, float, float]:
    """(saved activations at backward start, logits peak, one recomputed layer's working set), bytes."""
    tokens = setup.micro_batch * setup.seq_length
    h, v = shape.hidden_size, shape.vocab_size
    res = residual_bytes(setup)
    kind = regime(setup)
    final_norm = res * h + 4 if setup.liger else NORM_BYTES[kind](h)
    # the LM head's saved input (a fused cross-entropy keeps the input's gradient instead, counted in logits)
    head_input = 0 if setup.fused_cross_entropy else (4 * h if kind == "fp32" else 2 * h)
    # RoPE's cos and sin, one pair per position shared by the rows and the layers (in the residual dtype)
    rope = setup.seq_length * 2 * shape.head_dim * res
    inputs = 3 * 8  # input_ids, labels, position_ids: int64
    per_layer = layer_activation_bytes(shape, setup)
    layers = shape.num_layers * (res * h if setup.gradient_checkpointing else per_layer)
    mask = setup.micro_batch * setup.seq_length ** 2 if setup.attention_mask else 0
    saved = tokens * (layers + final_norm + head_input + inputs) + mask + rope
    if setup.fused_cross_entropy:
        # liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py) runs the head in
        # chunks inside the forward and keeps what the backward needs: the input's gradient (tokens x H, the
        # head's input is then not saved) and the weight's (V x H, the weights' dtype), an fp32 loss per token,
        # and one chunk of logits: next_pow2(ceil(tokens / ceil(V / H))) rows (at most tokens) of V.
        chunk = min(tokens, 1 << max(0, math.ceil(math.log2(math.ceil(tokens / math.ceil(v / h))))))
        weight_bytes = 4 if setup.strategy == "none" or kind == "fp32" else 2
        logits = tokens * (res * h + 4) + chunk * v * res + v * h * weight_bytes
    else:
        logits = tokens * 12 * v
    working = tokens * (per_layer + 2 * res * h) if setup.gradient_checkpointing else 0
    return saved, logits, working


def estimate_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    n = shape.parameters()
    g = setup.num_gpus
    w = 4 if setup.precision == "fp32" else 2       # bytes of the weights the forward reads
    saved, logits, working = activation_terms(shape, setup)
    step_temp = 0 if setup.fused_adam else 4 * n / g  # torch AdamW (foreach) allocates one fp32 temp per state
    bucket = setup.reduce_bucket_size
    moments = {}
    if setup.strategy == "none":
        weights, optimizer = 4 * n, 8 * n              # fp32 weights (autocast casts on the fly), AdamW m and v
        ddp = 4 * n if g > 1 else 0                    # DDP's gradient buckets (gradient_as_bucket_view off)
        # autocast keeps bf16 copies of the weights each linear saved: all of them without checkpointing,
        # the LM head's (outside the checkpoints) and one layer's with it
        head = shape.vocab_size * shape.hidden_size
        casts = 0 if setup.precision == "fp32" else 2 * (head + (0 if setup.gradient_checkpointing
                                                                 else shape.num_layers * shape.layer_parameters()))
        moments["backward start"] = _terms(weights, 0, optimizer, saved, logits, ddp + casts)
        if setup.gradient_checkpointing:
            layer_casts = 0 if setup.precision == "fp32" else 2 * shape.layer_parameters()
            moments["layer backward"] = _terms(weights, 4 * n, optimizer, saved + working, 0, ddp + layer_casts)
        moments["optimizer step"] = _terms(weights, 4 * n, optimizer, 0, 0, ddp + 4 * n)
        return _peak(moments)
    optimizer = 12 * n / g                             # fp32 master weights + Adam m, v: partitioned
    if setup.strategy in ("zero1", "zero2"):
        bucket = 2e8 if bucket is None else bucket     # ds_configs/zero2.json reduce_bucket_size
        ipg = 2 * bucket * w                           # two buckets with overlap_comm
        grads = w * n if setup.strategy == "zero1" else w * n / g
        moments["backward start"] = _terms(w * n, 0, optimizer, saved, logits, 0)
        if setup.gradient_checkpointing:
            moments["layer backward"] = _terms(w * n, grads, optimizer, saved + working, 0, ipg)
        # step: the 16-bit gradient partition is converted to an fp32 one, then freed before the update
        moments["optimizer step"] = _terms(w * n, grads + 4 * n / g, optimizer, 0, 0,
                                           max(0, step_temp - grads))
        return _peak(moments)
    bucket = shape.hidden_size ** 2 if bucket is None else bucket   # "auto" in ds_configs/zero3*.json
    gathered = w * min(setup.max_live_parameters, shape.largest_module_parameters())
    if setup.strategy == "zero3":
        # parameter and gradient partitions (the flat gradient buffer exists from the start), plus the module
        # being computed gathered whole
        moments["backward start"] = _terms(w * n / g + gathered, w * n / g, optimizer, saved, logits, 0)
        if setup.gradient_checkpointing:
            moments["layer backward"] = _terms(w * n / g + gathered, w * n / g, optimizer, saved + working, 0,
                                               w * bucket)
        # ZeRO-3 steps the optimizer one sub-group at a time: the fp32 gradient copy (and a non-fused AdamW's
        # temporary) exists for one sub-group only. Measured on one H200 (docs/PLANNER.md): Qwen2.5-7B 119.3 GiB,
        # 3B 51.7 GiB, where a whole-partition fp32 gradient would predict 170 and 69.
        sub_group = min(setup.sub_group_size, n / g)
        moments["optimizer step"] = _terms(w * n / g, w * n / g + 4 * sub_group, optimizer, 0, 0,
                                           0 if setup.fused_adam else 4 * sub_group)
        return _peak(moments)
    # ZeRO-3 with parameters and optimizer on the CPU: the GPU keeps the gathered module and the activations
    moments["backward start"] = _terms(gathered, 0, 0, saved, logits, 0)
    if setup.gradient_checkpointing:
        moments["layer backward"] = _terms(gathered, 0, 0, saved + working, 0, w * bucket)
    estimate = _peak(moments)
    estimate.cpu_bytes = int(w * n / g + optimizer + w * n / g + 4 * n / g)
    return estimate


def _terms(weights, gradients, optimizer, activations, logits, temporary) -> dict:
    values = (weights, gradients, optimizer, activations, logits, temporary)
    return {name: int(value) for name, value in zip(TERMS, values)}


def _peak(moments: dict) -> MemoryEstimate:
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    return MemoryEstimate(moment, moments[moment], moments)


def largest_micro_batch(shape: ModelShape, setup: TrainingSetup, capacity_bytes: float, limit: int = 65536) -> int:
    """The largest micro-batch whose estimated peak fits in capacity_bytes (0: not even 1 fits). The peak grows
    with the micro-batch, so a binary search finds it."""
    from dataclasses import replace

    def fits(batch):
        return estimate_memory(shape, replace(setup, micro_batch=batch)).total <= capacity_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def setup_from_deepspeed(path: str) -> dict:
    """TrainingSetup fields a DeepSpeed config file decides: strategy, fused_adam, bucket sizes."""
    import json

    from lmtrain.errors import UserError

    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f"--deepspeed {path}: cannot be read as JSON ({error})") from error
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(zero or {}, dict):
        raise UserError(f"--deepspeed {path}: expected a DeepSpeed config, a JSON object whose zero_optimization is "
                        "an object (e.g. ds_configs/zero2.json)")
    zero = zero or {}
    stage = zero.get("stage", 0)
    offload = {(zero.get(key) or {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
    if stage not in (1, 2, 3):
        raise UserError(f"--deepspeed {path}: zero_optimization.stage {stage!r}: the planner models ZeRO stages 1, "
                        "2 and 3 (for no ZeRO, leave --deepspeed out: the Trainer's own optimizer)")
    strategy = {1: "zero1", 2: "zero2", 3: "zero3"}[stage]
    if stage == 3 and offload - {"none"}:
        strategy = "zero3_offload"
    bucket = zero.get("reduce_bucket_size")
    live = zero.get("stage3_max_live_parameters", 1e9)
    sub_group = zero.get("sub_group_size", 1e9)
    return {"strategy": strategy, "fused_adam": "optimizer" in config,
            "reduce_bucket_size": float(bucket) if isinstance(bucket, (int, float)) else None,
            "max_live_parameters": float(live) if isinstance(live, (int, float)) else 1e9,
            "sub_group_size": float(sub_group) if isinstance(sub_group, (int, float)) else 1e9}
