"""--fp8: the decoder layers' linear layers compute in float8 through torchao's float8 training.

Tensorwise dynamic scaling (torchao's default recipe): inputs and weights cast to e4m3, output gradients to
e5m2, one scale per tensor per step, matmuls on the H100/H200's FP8 tensor cores with bf16 outputs. Weights,
gradients and optimizer states stay as they are (DeepSpeed sees ordinary parameters; checkpoints keep their
keys). The LM head stays in bf16: Liger's fused loss reads its weight directly, and its logits feed the loss.
torchao's casts are only fast inside compiled graphs, hence --compile_layers with it on a GPU."""
from __future__ import annotations

import importlib.util
import logging

import torch

from lmtrain.errors import UserError
from lmtrain.model.compiling import decoder_layers

logger = logging.getLogger(__name__)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


def check_fp8_possible(use_cpu: bool):
    """A clear message instead of an import error or a kernel failure in the first step."""
    if importlib.util.find_spec("torchao") is None:
        raise UserError("--fp8 needs torchao (pip install torchao==0.18.0)")
    if torch.cuda.is_available() and not use_cpu:
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise UserError(f"--fp8: this GPU ({torch.cuda.get_device_name()}, compute capability "
                            f"{capability[0]}.{capability[1]}) has no FP8 tensor cores; they start at 8.9 (H100, L4)")
    else:
        logger.warning("--fp8 without a GPU: torchao emulates the float8 matmuls (slower than without --fp8)")


def convert_decoder_linears_to_fp8(model: torch.nn.Module) -> int:
    """Swap every nn.Linear inside the decoder layers for torchao's Float8Linear in place; returns how many.
    FP8 matmuls need both dimensions divisible by 16; a layer that is not stays in bf16 (counted, logged), and
    so do LoRA adapters (_adapter_linears)."""
    from torchao.float8 import convert_to_float8_training

    layers = decoder_layers(model)
    adapters = _adapter_linears(layers)
    inside = {id(module) for layer in layers for module in layer.modules()
              if isinstance(module, torch.nn.Linear) and id(module) not in adapters}
    skipped = []

    def in_decoder_layer(module: torch.nn.Module, name: str) -> bool:
        if id(module) not in inside:
            return False
        if module.in_features % 16 or module.out_features % 16:
            skipped.append(name)
            return False
        return True

    convert_to_float8_training(model, module_filter_fn=in_decoder_layer)
    converted = len(inside) - len(skipped)
    if not inside:
        raise UserError(f"--fp8: {type(model).__name__} has no linear layers inside decoder layers to convert")
    if not converted:
        raise UserError(f"--fp8: none of the {len(inside)} linear layers inside {type(model).__name__}'s decoder "
                        f"layers has both dimensions divisible by 16, as float8 matmuls need (e.g. {skipped[0]})")
    logger.info("--fp8: %d linear layers compute in float8%s%s", converted,
                f"; {len(skipped)} stay in bf16 (a dimension not divisible by 16): {skipped[:4]}" if skipped else "",
                f"; the {len(adapters)} LoRA adapter linears stay in bf16" if adapters else "")
    return converted


def _adapter_linears(layers: list[torch.nn.Module]) -> set[int]:
    """ids of the linear layers of PEFT adapters (LoRA's A and B) inside the decoder layers: they stay in bf16.
    Their matmuls are rank-thin (no FP8 speed-up, only the casts' cost) and they are all that trains, so their
    gradients keep bf16's precision; the frozen base layers they wrap are converted."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    return {id(linear) for layer in layers for tuner in layer.modules() if isinstance(tuner, BaseTunerLayer)
            for name, child in tuner.named_children() if name != "base_layer"
            for linear in child.modules() if isinstance(linear, torch.nn.Linear)}
