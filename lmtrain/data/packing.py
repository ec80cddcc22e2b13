"""Packing token streams into fixed-size training blocks, the format every stage trains on.

A block row holds `input_ids`, `labels` (-100 where no loss is taken) and `position_ids`. Position ids
restart at 0 wherever a new document (or SFT sample) begins and at each block start; attention code that
reads them (flash-attention varlen, and transformers' packed-sequence masks for SDPA/eager when no
attention_mask is passed) then keeps documents from attending to each other.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

IGNORE_INDEX = -100
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


def positions_in_segments(segment_lengths: np.ndarray) -> np.ndarray:
    """[3, 2] -> [0, 1, 2, 0, 1]: positions that restart at every segment start."""
    total = int(segment_lengths.sum())
    starts = np.repeat(np.cumsum(segment_lengths) - segment_lengths, segment_lengths)
    return (np.arange(total) - starts).astype(np.int32)


class BlockPacker:
    """Streams documents (each already ending in EOS) into `block_size` blocks, exactly like the classic
    `group_texts` (concatenate everything, cut every `block_size` tokens), but without holding the corpus in
    memory and with position ids that restart at document and block starts.

    The tail that does not fill a block is dropped (`drop_remainder=True`, as `group_texts` does) or padded
    with `pad_id`, its padding masked in `labels` and given its own positions so no token attends to it.
    """

    def __init__(self, block_size: int, pad_id: int, drop_remainder: bool = False):
        if block_size < 2:
            raise ValueError("block_size must be at least 2")
        self.block_size = block_size
        self.pad_id = pad_id
        self.drop_remainder = drop_remainder
        self._tokens = np.zeros(0, dtype=np.int32)
        self._doc_starts = np.zeros(0, dtype=np.int64)  # stream index at which each buffered token's doc began
        self._stream_offset = 0  # stream index of self._tokens[0]
        self.padded_tokens = 0
        self.dropped_tokens = 0

    def add(self, flat_tokens: np.ndarray, doc_lengths: np.ndarray) -> Iterator[dict]:
        """Add documents (concatenated tokens and their lengths); yields dicts of complete block arrays."""
        if len(flat_tokens) == 0:
            return
        begin = self._stream_offset + len(self._tokens)
        starts = begin + np.cumsum(doc_lengths) - doc_lengths
        self._tokens = np.concatenate([self._tokens, flat_tokens.astype(np.int32, copy=False)])
        self._doc_starts = np.concatenate([self._doc_starts, np.repeat(starts, doc_lengths)])
        full = len(self._tokens) // self.block_size
        if full:
            cut = full * self.block_size
            yield self._blocks(self._tokens[:cut], self._doc_starts[:cut])
            self._tokens, self._doc_starts = self._tokens[cut:], self._doc_starts[cut:]
            self._stream_offset += cut

    def _blocks(self, tokens: np.ndarray, doc_starts: np.ndarray, width: int | None = None) -> dict:
        stream_index = self._stream_offset + np.arange(len(tokens))
        block_starts = stream_index - (stream_index - self._stream_offset) % self.block_size
        positions = (stream_index - np.maximum(doc_starts, block_starts)).astype(np.int32)
        shape = (-1, width or self.block_size)
        ids = tokens.reshape(shape)
        return {"input_ids": ids, "labels": ids.copy(), "position_ids": positions.reshape(shape)}

    def finish(self) -> Iterator[dict]:
        """The last, partial block (padded), unless dropped."""
        remainder = len(self._tokens)
        if remainder == 0:
            return
        if self.drop_remainder:
            self.dropped_tokens += remainder
            return
        block = self._blocks(self._tokens, self._doc_starts, width=remainder)
        pad = self.block_size - remainder
        self.padded_tokens += pad
        yield {
            "input_ids": np.concatenate([block["input_ids"][0], np.full(pad, self.pad_id, np.int32)])[None],
            "labels": np.concatenate([block["labels"][0], np.full(pad, IGNORE_INDEX, np.int32)])[None],
            # Padding gets positions 0..pad-1: a segment of its own that no real token attends to.
            "position_ids": np.concatenate([block["position_ids"][0], np.arange(pad, dtype=np.int32)])[None],
        }


def blocks_to_arrow(blocks: dict) -> pa.Table:
    """2-D block arrays -> an Arrow table of list<int32> columns (no Python lists in between)."""
    columns = {}
    for name in BLOCK_COLUMNS:
        array = np.ascontiguousarray(blocks[name], dtype=np.int32)
        rows, width = array.shape
        offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1)))
    return pa.table(columns)

