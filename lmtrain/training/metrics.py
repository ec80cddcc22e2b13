"""Evaluation figures of packed blocks, weighted by tokens: loss, perplexity and bits per byte, overall and
per source.

The Trainer's own eval loss averages batch means, so a batch holding a padded block (one per source at
the end of the validation split) weighs as much as a full one; and a bits per byte computed from the
whole split's bytes per token is wrong for any subset of a mixture (English at ~4 bytes per token,
Chinese at ~1.5). Here every block contributes its summed token loss, its token counts and (when the
prepared data stores them) its UTF-8 bytes, so the figures are those of exactly the blocks evaluated.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.data.packing import IGNORE_INDEX

# Columns of TokenStats rows.
NATS, PREDICTED, REAL = 0, 1, 2


@torch.no_grad()
def token_loss_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: [summed next-token loss in nats, tokens predicted, real (non-padding) tokens], float32.

    The same shift as transformers' causal-LM loss (logits at t predict labels at t+1). One row at a time:
    the float32 copy of a whole batch's logits (batch x length x vocabulary) would not fit beside the model."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        targets = row_labels[1:]
        nats = F.cross_entropy(row_logits[:-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        rows.append(torch.stack([nats, (targets != IGNORE_INDEX).sum().float(),
                                 (row_labels != IGNORE_INDEX).sum().float()]))
    return torch.stack(rows)


def _figures(stats: np.ndarray, num_bytes: np.ndarray | None, bytes_per_token: float | None) -> dict:
    predicted = stats[:, PREDICTED].sum()
    if predicted == 0:
        return {}
    loss = float(stats[:, NATS].sum() / predicted)
    figures = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if num_bytes is not None and stats[:, REAL].sum() > 0:
        bytes_per_token = float(num_bytes.sum() / stats[:, REAL].sum())
    if bytes_per_token:
        # Mean loss per token, in bits, over the bytes each token stands for.
        figures["bits_per_byte"] = loss / math.log(2) / bytes_per_token
        figures["bytes_per_token"] = bytes_per_token
    return figures


def eval_figures(stats: np.ndarray, sources: list[str] | None, num_bytes: np.ndarray | None,
                 fallback_bytes_per_token: float | None, prefix: str = "eval") -> dict:
    """`{prefix}_loss`, `_perplexity`, `_bits_per_byte` (and `_bytes_per_token`) over all rows of `stats`,
    and `{prefix}_{source}_loss` / `_bits_per_byte` per source when the rows come from several sources.

    `sources` / `num_bytes`: per row, from the evaluated dataset's columns (None for data without them, then
    bits per byte uses `fallback_bytes_per_token`, the whole split's average)."""
    if num_bytes is not None and len(num_bytes) != len(stats):
        num_bytes = sources = None  # not the rows evaluated (another dataset): trust no column
    figures = {f"{prefix}_{k}": v for k, v in _figures(stats, num_bytes, fallback_bytes_per_token).items()}
    if sources is not None and len(sources) == len(stats) and len(set(sources)) > 1:
        names = np.asarray(sources, dtype=object)
        for name in dict.fromkeys(sources):
            rows = names == name
            part = _figures(stats[rows], None if num_bytes is None else num_bytes[rows], None)
            figures.update({f"{prefix}_{name}_{k}": part[k] for k in ("loss", "bits_per_byte") if k in part})
    return figures
