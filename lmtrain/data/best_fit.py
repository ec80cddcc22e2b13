"""Document-aware packing of pretraining blocks (`--packing_strategy best_fit`).

`group_texts` (lmtrain/data/packing.py BlockPacker) concatenates documents and cuts every `block_size` tokens,
so most documents that would fit in a block start in one block and end in the next: the second half is
trained on without its beginning. Best-fit packing (Ding et al. 2024, "Fewer Truncations Improve Language
Modeling") cuts only what cannot fit: a document longer than a block is split into `block_size` chunks as
group_texts would, its last, shorter piece and every document that fits are then placed whole by the SFT
packer's best-fit decreasing (lmtrain.data.sft_rows.pack_bins), and each block's free tail is padding,
masked in `labels` and a position segment of its own (lmtrain.data.sft_rows.rows_table). The price is that
padding: measured in report.json's `padded_tokens`.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lmtrain.data.sft_rows import pack_bins, rows_table

BLOCK_TOKENS = 4_000_000  # tokens of blocks built at once (~100 MB of NumPy buffers)


def document_pieces(doc_tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document, start, length) of every piece: each document cut into `block_size` chunks and a shorter
    last piece (a document that fits is one piece)."""
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    counts = -(-doc_tokens // block_size)  # ceil: pieces per document
    doc = np.repeat(np.arange(len(doc_tokens)), counts)
    first_piece = np.cumsum(counts) - counts
    start = (np.arange(len(doc)) - np.repeat(first_piece, counts)) * block_size
    length = np.minimum(block_size, doc_tokens[doc] - start)
    return doc, start, length


def best_fit_layout(doc_tokens: np.ndarray, block_size: int):
    """The pieces in block order and the block boundaries: (doc, start, length, block_starts), where block b
    holds pieces block_starts[b]:block_starts[b + 1]."""
    doc, start, length = document_pieces(doc_tokens, block_size)
    order, block_starts = pack_bins(length, block_size)
    return doc[order], start[order], length[order], block_starts


def block_bytes_best_fit(doc_tokens: np.ndarray, doc_bytes: np.ndarray, pieces_doc: np.ndarray,
                         pieces_length: np.ndarray, block_starts: np.ndarray) -> np.ndarray:
    """UTF-8 bytes of each block: a document's bytes spread evenly over its tokens, as block_bytes does for
    group_texts blocks, so the blocks of one document sum to its bytes."""
    piece_bytes = doc_bytes[pieces_doc] * pieces_length / np.maximum(1, doc_tokens[pieces_doc])
    block_of = np.repeat(np.arange(len(block_starts) - 1), np.diff(block_starts))
    return np.bincount(block_of, weights=piece_bytes, minlength=len(block_starts) - 1)


def write_best_fit_blocks(selected, doc_tokens: np.ndarray, doc_bytes: np.ndarray, block_size: int, pad_id: int,
                          writer, desc: str = "packing (best fit)") -> dict:
    """Write best-fit blocks of the documents of `selected` (an arrow-formatted Dataset with input_ids; row i
    has doc_tokens[i] tokens) to `writer` (an ArrowWriter). Returns blocks, padded_tokens and block_bytes."""
    doc, start, length, block_starts = best_fit_layout(doc_tokens, block_size)
    blocks = len(block_starts) - 1
    per_chunk = max(1, BLOCK_TOKENS // block_size)
    bar = tqdm(total=blocks, desc=desc, unit="block")
    for first in range(0, blocks, per_chunk):
        last = min(blocks, first + per_chunk)
        a, b = int(block_starts[first]), int(block_starts[last])
        # Each document once per chunk, however many of its pieces the chunk holds.
        needed, where = np.unique(doc[a:b], return_inverse=True)
        column = selected[needed.tolist()].column("input_ids").combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(pa.compute.list_value_length(column).to_numpy())])
        piece_start = offsets[where] + start[a:b]
        lengths = length[a:b]
        index = np.repeat(piece_start - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
        ids = flat[index]
        writer.write_table(rows_table(ids, ids, lengths, np.diff(block_starts[first:last + 1]), block_size, pad_id))
        bar.update(last - first)
    bar.close()
    return {"blocks": blocks, "padded_tokens": int(blocks * block_size - length.sum()),
            "block_bytes": block_bytes_best_fit(doc_tokens, doc_bytes, doc, length, block_starts).tolist()}
