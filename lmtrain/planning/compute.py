"""Tokens, FLOPs, time and cost of a run. FLOPs per token are lmtrain.model.flops.flops_per_token, the formula
the training log's MFU uses, so a plan's MFU and a run's logged MFU are the same quantity."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lmtrain.errors import UserError
from lmtrain.model.flops import flops_per_token
from lmtrain.planning.shape import ModelShape

# Hoffmann et al. 2022 (Chinchilla): the compute-optimal model sees about 20 training tokens per parameter,
# with training compute C = 6 * N * D. Both are the paper's approximations, not this project's measurements.
CHINCHILLA_TOKENS_PER_PARAMETER = 20
SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_amount(text: str | float | None, flag: str) -> float | None:
    """'20B', '1.5e21', '300M', 7e9 -> a positive float; a clear UserError otherwise."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([KMBGT]?)\s*", str(text), flags=re.IGNORECASE)
    value = None
    if match:
        try:
            value = float(match.group(1)) * SUFFIXES.get(match.group(2).upper(), 1)
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} {text}: expected a positive number, optionally with K, M, B or T "
                        f"(e.g. {flag} 20B or {flag} 1e21)")
    return value


def training_flops_per_token(shape: ModelShape, seq_length: int) -> float:
    return flops_per_token(shape.parameters(), shape.num_layers, shape.hidden_size, seq_length)


def chinchilla_tokens(parameters: int) -> float:
    return CHINCHILLA_TOKENS_PER_PARAMETER * parameters


def compute_optimal(compute_flops: float) -> dict:
    """The Chinchilla-optimal size for a compute budget: C = 6 N D with D = 20 N gives N = sqrt(C / 120)."""
    parameters = math.sqrt(compute_flops / (6 * CHINCHILLA_TOKENS_PER_PARAMETER))
    return {"compute_flops": compute_flops, "parameters": parameters,
            "tokens": CHINCHILLA_TOKENS_PER_PARAMETER * parameters}


@dataclass(frozen=True)
class Throughput:
    tokens_per_second_per_gpu: float
    step_seconds: float
    gpu_hours: float
    wall_hours: float
    cost: float | None

    def to_dict(self) -> dict:
        return {key: (round(value, 4) if isinstance(value, float) else value)
                for key, value in self.__dict__.items()}


def throughput(flops_token: float, mfu: float, peak_tflops: float, num_gpus: int, tokens_per_step: float,
               total_tokens: float, price_per_gpu_hour: float | None) -> Throughput:
    """At a given MFU: tokens/s per GPU = MFU x peak / FLOPs per token, and the rest follows from the counts."""
    per_gpu = mfu * peak_tflops * 1e12 / flops_token
    gpu_hours = total_tokens / per_gpu / 3600
    return Throughput(tokens_per_second_per_gpu=per_gpu, step_seconds=tokens_per_step / (per_gpu * num_gpus),
                      gpu_hours=gpu_hours, wall_hours=gpu_hours / num_gpus,
                      cost=None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour)
