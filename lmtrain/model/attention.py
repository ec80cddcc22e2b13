"""The attention implementation: names transformers accepts, checked at argument parsing, and the one a
run can actually use on this machine. Every choice keeps packed documents apart (position_ids without an
attention mask).

"varlen" is registered here: PyTorch's own FlashAttention-2 variable-length kernel
(torch.nn.attention.varlen, CUDA), fed the document boundaries read from position_ids. It keeps packed
documents apart at the speed of unmasked causal attention, where SDPA must be given a materialized
(batch, 1, seq, seq) mask that rules out its flash kernel, and flex_attention rebuilds a block mask every
forward. "auto" (the default) is varlen on a GPU that has it, else sdpa."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import logging

import torch

logger = logging.getLogger(__name__)
VARLEN = "varlen"
AUTO = "auto"


def varlen_kernel():
    """torch.nn.attention.varlen.varlen_attn where it can run (PyTorch >= 2.10 with CUDA), else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (int32, the kernel's cu_seqlens over the flattened batch) and the longest
    document, from positions that restart at 0 (or jump) where a document begins; every row starts one."""
    rows, length = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([rows * length])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())  # the one host synchronization of a forward


class _BoundaryCache:
    """All layers of one forward (and its recomputation under checkpointing) see the same position_ids
    tensor: its boundaries are computed once. The cached tensor is held, so no later tensor can share its
    identity; an in-place change bumps its version."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, position_ids: torch.Tensor):
        if self.key is None or self.key[0] is not position_ids or self.key[1] != position_ids._version:
            self.key, self.value = (position_ids, position_ids._version), document_boundaries(position_ids)
        return self.value


_boundaries = _BoundaryCache()


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers' attention-function interface: query (batch, heads, seq, dim), key/value (batch,
    kv_heads, seq, dim) -> (batch, seq, heads, dim). Training and evaluation forwards (no mask, no cache)
    take the varlen kernel; generation (a padding mask or a KV cache) goes to SDPA with the mask that
    varlen_attention_mask made for it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    plan = None
    if attention_mask is None and key.shape[2] == length and not dropout:
        plan = _varlen_plan(kwargs.get("position_ids"), batch, length, query.device)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    kernel, options, bounds, longest = plan
    if torch.compiler.is_compiling():
        # The kernel needs only an upper bound on the longest document; the batch's own value, a Python int,
        # would make Dynamo compile the layer again for every new value.
        longest = length
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    if k.shape[1] != heads and "enable_gqa" not in options:
        k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    elif k.shape[1] != heads:
        options["enable_gqa"] = True
    out = kernel(q, k, v, bounds, bounds, longest, longest, scale=scaling, **options)
    return out.reshape(batch, length, heads, dim), None


@torch.compiler.disable  # runs eagerly under --compile_layers: a host read and signature inspection, not graphable
def _varlen_plan(position_ids, batch: int, length: int, device):
    """(kernel, its options, cu_seqlens, longest document) for a full forward, or None where no varlen kernel
    can run (SDPA then)."""
    kernel = varlen_kernel()
    if kernel is None:
        return None
    if position_ids is None or position_ids.shape != (batch, length):
        position_ids = torch.arange(length, device=device).expand(batch, length)
    return (kernel, dict(_kernel_options(kernel)), *_boundaries.get(position_ids))  # a copy: the caller edits it


@functools.cache
def _kernel_options(kernel) -> dict:
    # PyTorch 2.10 spells causal as is_causal=True; later versions as a window of (-1, 0) and add enable_gqa.
    parameters = inspect.signature(kernel).parameters
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "enable_gqa" in parameters:
        options["enable_gqa"] = False
    return options


def varlen_attention_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, **kwargs):
    """No mask for full forwards (varlen reads the documents from position_ids); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, **kwargs)


def register_varlen_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_attention_mask)


register_varlen_attention()


# Names transformers accepts for attn_implementation ("eager" is built in; the rest are registered kernels).
def attention_implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return [AUTO, "eager", *(name for name in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in name)]


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
    if requested == AUTO:
        return VARLEN if varlen_kernel() is not None else "sdpa"
    if requested == VARLEN and varlen_kernel() is None:
        logger.warning("varlen attention needs a CUDA GPU and PyTorch >= 2.10 (torch.nn.attention.varlen); "
                       "using sdpa instead, which keeps packed documents apart just the same")
        return "sdpa"
    if requested == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        logger.warning("flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa instead")
        return "sdpa"
    if requested == "flex_attention" and not torch.cuda.is_available():
        # PyTorch's FlexAttention has no backward pass on the CPU: training would crash at the first step.
        logger.warning("flex_attention cannot train on a CPU (PyTorch's FlexAttention has no CPU backward pass); "
                       "using sdpa instead, which keeps packed documents apart just the same")
        return "sdpa"
    return requested

