"""The attention implementation: names transformers accepts, checked at argument parsing, and the one a
run can actually use on this machine. Every choice keeps packed documents apart (position_ids without an
attention mask). Document masks and fused attention kernels go here."""
from __future__ import annotations

import difflib
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)


# Names transformers accepts for attn_implementation ("eager" is built in; the rest are registered kernels).
def attention_implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(name for name in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in name)]


def check_attention_name(name: str):
    """An unknown --attn_implementation is refused at argument parsing, before any data is prepared."""
    valid = attention_implementations()
    if name not in valid:
        near = difflib.get_close_matches(name, valid, n=1)
        raise ValueError(f"--attn_implementation {name}: not an attention implementation"
                         + (f" (did you mean {near[0]}?)" if near else "") + f"; choose one of {', '.join(valid)}")


def choose_attention(requested: str) -> str:
    """The implementation to build with: the requested one, or sdpa where it cannot run here."""
    check_attention_name(requested)
    if requested == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        logger.warning("flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa instead")
        return "sdpa"
    if requested == "flex_attention" and not torch.cuda.is_available():
        # PyTorch's FlexAttention has no backward pass on the CPU: training would crash at the first step.
        logger.warning("flex_attention cannot train on a CPU (PyTorch's FlexAttention has no CPU backward pass); "
                       "using sdpa instead, which keeps packed documents apart just the same")
        return "sdpa"
    return requested

