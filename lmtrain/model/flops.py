"""Sizes that the MFU log and the planner both read, in one place: parameters, FLOPs per token, peak
TFLOP/s per GPU kind. A new GPU kind or a better formula is changed here only."""
from __future__ import annotations

import torch

# Dense bf16 peak per device, TFLOP/s, for the MFU estimate (vendor datasheets, no sparsity). Matched as a
# substring of torch.cuda.get_device_name(), in this order.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0, "B200": 2250.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def count_parameters(model) -> int:
    # Under ZeRO-3 parameters are partitioned and report numel 0; ds_numel holds the real size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def flops_per_token(parameters: int, num_layers: int, hidden_size: int, sequence_length: float) -> float:
    """Training FLOPs per token, forward and backward (PaLM, appendix B): 6 * parameters for the matmuls
    with the weights (embeddings included, as PaLM counts them) + 12 * layers * hidden * sequence for the
    attention scores and their weighted sum. Taken from numbers, not a model, so a planner can use it for a
    model it has not built."""
    return 6 * parameters + 12 * num_layers * hidden_size * sequence_length


def model_flop_utilization(tokens_per_second: float, flops_per_token_: float, peak_tflops: float) -> float:
    """The share of the device's peak the training reaches: achieved FLOP/s / peak FLOP/s."""
    return tokens_per_second * flops_per_token_ / (peak_tflops * 1e12)
