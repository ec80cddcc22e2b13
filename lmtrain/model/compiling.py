"""--compile_layers: torch.compile each decoder layer on its own, as torchtitan compiles its blocks.

Inside a layer Inductor fuses the RMSNorms, RoPE, SwiGLU and residual adds into a few kernels. The loss stays
outside every compiled graph, so it can be Liger's fused linear + cross-entropy (never materializing the
151,936-wide logits), which the whole-model --torch_compile cannot use (Dynamo traced Liger's kernels into NaN,
docs/PERFORMANCE.md). The layers of one model share their code, so one compiled graph serves them all."""
from __future__ import annotations

import logging

import torch

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)

# Inside compiled layers Inductor fuses these itself; Liger keeps only the loss (outside the layers).
LIGER_UNDER_LAYER_COMPILE = {"rope": False, "rms_norm": False, "swiglu": False}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers marks as GradientCheckpointingLayer (Qwen2, LLaMA, ... decoder layers);
    found through any wrapper (PEFT, DeepSpeed)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer in place (state_dict keys unchanged, so checkpoints and from_pretrained are
    as without compile); returns how many."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"--compile_layers: {type(model).__name__} has no decoder layers marked as transformers' "
                         "GradientCheckpointingLayer; use --torch_compile for this model")
    # Dynamo keeps 8 compiled variants per code object by default, then silently runs eager: training and
    # evaluation, with and without grad, must all fit, whatever the layer count.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for layer in layers:
        layer.compile(backend=backend)
        layer._compiled_call_impl = _eager_when_decoding(layer._compiled_call_impl, layer._call_impl)
    logger.info("--compile_layers: %d decoder layers compiled (%s)", len(layers), backend)
    return len(layers)


def apply_layer_options(model: torch.nn.Module, args) -> None:
    """--fp8, then --compile_layers, on the model a stage trains (the float8 layers must exist before they are
    compiled). Called once the Trainer exists and before it trains: transformers applies Liger at the start of
    train(), outside the layers under --compile_layers, and builds DeepSpeed's engine after that."""
    if args.fp8:
        from lmtrain.model.fp8 import convert_decoder_linears_to_fp8  # fp8.py imports this module

        convert_decoder_linears_to_fp8(model)
    if args.compile_layers:
        compile_decoder_layers(model)


def _eager_when_decoding(compiled, eager):
    """The compiled call for full-sequence forwards (training, evaluation); the eager one for KV-cache decoding
    (--sample_prompts, generate): there Dynamo guards on each layer's layer_idx and cache state, one variant
    per layer, so a 24- or 28-layer model exhausted the recompile limit (16) during the first samples, with
    a page of warnings and seconds of compiling per layer, for no training speed."""
    def call(*args, **kwargs):
        if kwargs.get("past_key_values") is not None:
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    return call
