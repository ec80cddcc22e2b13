"""Batches from rows: packed blocks stacked as they are, unpacked SFT rows padded to the longest or
concatenated padding-free, and the real-token count every training batch carries for the throughput log."""
from __future__ import annotations

import torch


def collate_packed_blocks(rows: list[dict]) -> dict:
    """Stack pre-packed rows. No attention_mask on purpose: with position_ids and no mask, transformers builds
    a block-diagonal causal mask (SDPA/eager) or varlen flash-attention calls, so documents stay apart."""
    batch = {}
    for name in ("input_ids", "labels", "position_ids"):
        batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.long)
    return batch


# Added to every training batch by CountingCollator and taken out again before the model sees the batch.
REAL_TOKENS_KEY = "num_real_tokens"


def count_real_tokens(batch: dict) -> int:
    """Positions of the batch that are not padding, counted on the CPU tensors the collator just made.

    Every collator here pads the same way: a row's padding is its last position segment (position_ids
    restart at 0 where it begins) and has no trained label. A real segment always has one (a document's
    tokens are all labels; an SFT sample with no trainable token is dropped), so a last segment without any
    is padding. Rows without position_ids fall back to the attention mask, else count whole."""
    input_ids = batch["input_ids"]
    positions, labels = batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else input_ids.numel()
    length = positions.shape[-1]
    index = torch.arange(length).expand_as(positions)
    last_start = torch.where(positions == 0, index, 0).max(dim=-1).values
    tail_trained = ((labels != -100) & (index >= last_start.unsqueeze(-1))).any(dim=-1)
    padding = torch.where(tail_trained, 0, length - last_start)
    return input_ids.numel() - int(padding.sum())


class CountingCollator:
    """Wraps the training collator: adds the batch's real-token count (a plain int, which stays on the host
    when the batch moves to the device, so counting never synchronises with the GPU)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator(rows)
        batch[REAL_TOKENS_KEY] = count_real_tokens(batch)
        return batch


class PadToLongestCollator:
    """For unpacked SFT rows of different lengths. Pads on the right to the longest row; padding gets labels
    -100 and positions of its own segment, so (with no attention_mask) no real token attends to it.
    `padding_free=True` instead concatenates the batch into one row: no padding at all, the samples kept
    apart by their restarting position_ids (flash-attention varlen, or a block-diagonal SDPA mask)."""

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id = pad_id
        self.padding_free = padding_free

    def __call__(self, rows: list[dict]) -> dict:
        if self.padding_free:
            return {name: torch.tensor([[v for row in rows for v in row[name]]], dtype=torch.long)
                    for name in ("input_ids", "labels", "position_ids")}
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}
