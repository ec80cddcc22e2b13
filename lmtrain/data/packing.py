"""Packing token streams into fixed-size training blocks, the format every stage trains on.

A block row holds `input_ids`, `labels` (-100 where no loss is taken) and `position_ids`. Position ids
restart at 0 wherever a new document (or SFT sample) begins and at each block start; attention code that
reads them (flash-attention varlen, and transformers' packed-sequence masks for SDPA/eager when no
attention_mask is passed) then keeps documents from attending to each other.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from lmtrain.arguments import DataArguments

IGNORE_INDEX = -100
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")
BLOCK_FEATURES = datasets.Features.from_arrow_schema(pa.schema({name: pa.list_(pa.int32()) for name in BLOCK_COLUMNS}))


def private_tmp(path: Path) -> Path:
    """A temporary name for writing `path` that no other process uses: two jobs preparing into one shared
    cache at the same moment must not write or rename each other's half-written files (the last rename
    wins, and both write the same content)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


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


# Packing a tokenized datasets.Dataset into cached Arrow files of blocks (pretraining).
PACK_TOKENS = 4_000_000   # ~250 MB of packer arrays at once


PACKING_STRATEGIES = ("group_texts", "best_fit")


def pack_documents(tokenized: datasets.Dataset, indices: np.ndarray, block_size: int, pad_id: int, drop_remainder: bool,
          cache_dir: Path, overwrite: bool, desc: str, strategy: str = "group_texts",
          block_bytes_needed: bool = False) -> tuple[datasets.Dataset, dict]:
    """Pack the selected documents into blocks written straight to an Arrow file (cached): in order, cut every
    `block_size` tokens (`group_texts`), or whole where they fit (`best_fit`, lmtrain/data/best_fit.py).
    `block_bytes_needed`: best_fit's info also holds each block's UTF-8 bytes (`block_bytes`), which
    group_texts blocks get from `block_bytes` below."""
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing strategy {strategy!r}: one of {', '.join(PACKING_STRATEGIES)}")
    settings = [tokenized._fingerprint, block_size, pad_id, drop_remainder]
    if strategy != "group_texts":  # group_texts keeps the cache keys it always had
        settings += [strategy, block_bytes_needed]
    key = hashlib.sha256(json.dumps(settings).encode() + indices.tobytes()).hexdigest()[:24]
    path = cache_dir / f"packed-{key}.arrow"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and not overwrite:
        return datasets.Dataset.from_file(str(path)), {**json.loads(meta_path.read_text()), "cache": "reused"}
    tmp = private_tmp(path)
    selected = tokenized.select(indices).with_format("arrow")
    if strategy == "best_fit":
        from lmtrain.data.best_fit import write_best_fit_blocks  # it builds on sft_rows, which imports this module

        with ArrowWriter(path=str(tmp), features=BLOCK_FEATURES) as writer:
            meta = write_best_fit_blocks(selected, selected["num_tokens"].to_numpy(),
                                         selected["num_bytes"].to_numpy(), block_size, pad_id, writer, desc)
            writer.finalize()
        meta["dropped_tokens"] = 0
        if not block_bytes_needed:
            del meta["block_bytes"]
        return _finish_packed(tmp, path, meta_path, meta)
    packer = BlockPacker(block_size, pad_id, drop_remainder)
    mean_tokens = pa.compute.mean(selected["num_tokens"]).as_py() or 1
    batch_docs = int(min(4096, max(1, PACK_TOKENS // mean_tokens)))
    blocks = 0
    # Explicit features: a split too small for one block (drop_remainder) still writes a valid, empty file.
    with ArrowWriter(path=str(tmp), features=BLOCK_FEATURES) as writer, \
            tqdm(total=len(indices), desc=desc, unit="doc") as bar:
        for table in selected.iter(batch_size=batch_docs):
            column = table.column("input_ids").combine_chunks()
            # flatten() honours slicing (`.values` would return the whole underlying buffer)
            flat = column.flatten().to_numpy(zero_copy_only=False)
            lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            for block in packer.add(flat, lengths):
                writer.write_table(blocks_to_arrow(block))
                blocks += len(block["input_ids"])
            bar.update(len(table))
        for block in packer.finish():
            writer.write_table(blocks_to_arrow(block))
            blocks += 1
        writer.finalize()
    meta = {"blocks": blocks, "padded_tokens": packer.padded_tokens, "dropped_tokens": packer.dropped_tokens}
    return _finish_packed(tmp, path, meta_path, meta)


def _finish_packed(tmp: Path, path: Path, meta_path: Path, meta: dict) -> tuple[datasets.Dataset, dict]:
    tmp.replace(path)
    meta_tmp = private_tmp(meta_path)
    meta_tmp.write_text(json.dumps(meta))
    meta_tmp.replace(meta_path)
    return datasets.Dataset.from_file(str(path)), {**meta, "cache": "computed"}


def block_bytes(doc_tokens: np.ndarray, doc_bytes: np.ndarray, block_size: int, blocks: int) -> np.ndarray:
    """UTF-8 bytes of each block of documents packed in this order: a document's bytes are spread evenly
    over its tokens (EOS included), so a block holding whole documents gets exactly their bytes and the
    blocks of one document sum to its bytes."""
    cum_tokens = np.concatenate([[0], np.cumsum(doc_tokens)])
    cum_bytes = np.concatenate([[0], np.cumsum(doc_bytes)]).astype(np.float64)
    bounds = np.minimum(np.arange(blocks + 1) * block_size, cum_tokens[-1])
    return np.diff(np.interp(bounds, cum_tokens, cum_bytes))


def pack_validation(tokenized: datasets.Dataset, rows: np.ndarray, sources: np.ndarray, num_tokens: np.ndarray,
                     num_bytes: np.ndarray, args: DataArguments, pad_id: int, cache_dir: Path):
    """Validation blocks packed per source, so each block holds one source's documents, with columns
    `source` and `num_bytes`: evaluation can sample every source and compute bits per byte from exactly
    the blocks it evaluated (the split's average bytes per token is wrong for a subset of a mixture)."""
    parts, per_source = [], {}
    total = {"blocks": 0, "padded_tokens": 0, "dropped_tokens": 0, "cache": "reused"}
    for name in dict.fromkeys(sources[rows]):  # sources in order of first appearance
        chosen = rows[sources[rows] == name]
        packed, info = pack_documents(tokenized, chosen, args.block_size, pad_id, args.drop_remainder, cache_dir,
                                      args.overwrite_cache, desc=f"packing validation ({name})",
                                      strategy=args.packing_strategy, block_bytes_needed=True)
        for key in ("blocks", "padded_tokens", "dropped_tokens"):
            total[key] += info[key]
        if info["cache"] == "computed":
            total["cache"] = "computed"
        tokens = int(num_tokens[chosen].sum())
        per_source[name] = {"blocks": info["blocks"], "tokens": tokens,
                            "bytes_per_token": float(num_bytes[chosen].sum() / max(1, tokens))}
        if info["blocks"]:
            sizes = info.get("block_bytes")
            if sizes is None:  # group_texts: documents in order
                sizes = block_bytes(num_tokens[chosen], num_bytes[chosen], args.block_size, info["blocks"])
                sizes = sizes.tolist()
            parts.append(packed.add_column("source", [name] * info["blocks"])
                         .add_column("num_bytes", sizes))
    if not parts:
        return packed, total, per_source  # no block at all: the caller reports an empty validation split
    return datasets.concatenate_datasets(parts), total, per_source
