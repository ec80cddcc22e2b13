"""Tokenizing documents for pretraining, on Arrow batches with the Rust tokenizer, and the tokenizer
fingerprint that prepared data records (training with another tokenizer is refused)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (makes pa.compute available)


# Memory per step is bounded in characters / tokens, not documents, so book-length documents cannot blow it
# up (measured in docs/PERFORMANCE.md: 5.8 GB -> 1.3 GB peak on 430 KB documents).
ENCODE_CHARS = 8_000_000  # ~2M tokens of Rust Encodings and Python id lists alive at once


def _slices_by_chars(char_counts: np.ndarray, limit: int):
    """(start, stop) row ranges of at most `limit` characters each (a longer document goes alone)."""
    start, total = 0, 0
    for row, count in enumerate(char_counts):
        if row > start and total + count > limit:
            yield start, row
            start, total = row, 0
        total += int(count)
    if start < len(char_counts):
        yield start, len(char_counts)


def tokenize_table(table: pa.Table, tokenizer) -> pa.Table:
    """Arrow batch -> per-document `input_ids` (ending in EOS), `num_tokens`, `num_bytes`, `num_chars`, `source`.

    Calls the Rust tokenizer directly on slices of the batch (parallel inside) and builds Arrow arrays from
    flat NumPy buffers: this keeps the step close to raw `tokenizers` speed (docs/PERFORMANCE.md).
    """
    text = table.column("text").combine_chunks()
    num_chars = pa.compute.utf8_length(text).cast(pa.int64())
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    eos = tokenizer.eos_token_id
    flats, lengths = [], []
    # Special-token strings inside a document ("<|endoftext|>" in a web page about LLMs) are plain text:
    # encoded as special tokens they would put an EOS, or a chat marker, in the middle of a document.
    previous, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        for start, stop in _slices_by_chars(num_chars.to_numpy(zero_copy_only=False), ENCODE_CHARS):
            ids = [encoding.ids for encoding in encode(text.slice(start, stop - start).to_pylist(),
                                                       add_special_tokens=True)]
            for doc in ids:
                if not doc or doc[-1] != eos:
                    doc.append(eos)
            counts = [len(doc) for doc in ids]
            lengths.extend(counts)
            flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(counts)))
            del ids  # free this slice's Python int lists before encoding the next
    finally:
        backend.encode_special_tokens = previous
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "num_tokens": pa.array(lengths),
        "num_bytes": pa.compute.binary_length(text.cast(pa.binary())).cast(pa.int64()),
        "num_chars": num_chars,
        "source": table.column("source"),
    })


def tokenizer_fingerprint(tokenizer) -> dict:
    """What makes prepared ids mean the same text to another tokenizer: the whole vocabulary (added and
    special tokens included), the end-of-text id, and the ids the pipeline gives a probe text (which catches
    a different normalizer or split rule over the same vocabulary). Saved in report.json."""
    from lmtrain.tokenizer import RELOAD_PROBE

    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    probe = RELOAD_PROBE + " " + (tokenizer.eos_token or "")
    probe_ids = tokenize_table(pa.table({"text": [probe], "source": ["probe"]}), tokenizer)["input_ids"][0].as_py()
    name = tokenizer.name_or_path
    return {"name_or_path": os.path.abspath(name) if name and os.path.isdir(name) else name,
            "vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocabulary).hexdigest(),
            "eos_token_id": tokenizer.eos_token_id, "probe_ids": probe_ids}
