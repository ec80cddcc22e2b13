"""What the data benchmarks share: a synthetic jsonl corpus of any size and a 32k-vocabulary tokenizer,
both built from the demo corpus and cached under a work directory (never inside the repository).

The corpus is the demo corpus's documents (Shakespeare scenes, about 8.8 KB each) with their lines shuffled,
a fresh permutation per document copy: the documents keep a realistic size and vocabulary, but no two are
identical, so the text is not simply the same bytes repeated.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lmtrain.data.demo_corpus import ensure_demo_corpus

DEFAULT_WORK_DIR = "/tmp/lmtrain_bench"


def demo_documents() -> list[str]:
    with open(ensure_demo_corpus(), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def build_tokenizer(vocab_size: int, work_dir: str) -> str:
    """Directory of a byte-level BPE with `vocab_size` entries trained on the demo corpus (built once)."""
    from lmtrain.tokenizer import train_bpe_tokenizer

    out_dir = Path(work_dir) / f"tokenizer-{vocab_size}"
    if not (out_dir / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(demo_documents(), vocab_size, show_progress=False)
        tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def write_corpus(total_mb: float, num_files: int, work_dir: str, seed: int = 0) -> tuple[str, int]:
    """`num_files` jsonl files holding about `total_mb` MB (10**6 bytes) of shuffled-line documents.

    Returns the directory and its size in bytes. Built once per (size, files, seed); a `.complete` marker
    tells a finished corpus from one a crash left half-written.
    """
    out_dir = Path(work_dir) / f"corpus-{total_mb:g}mb-{num_files}files-seed{seed}"
    marker = out_dir / ".complete"
    if not marker.exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        documents = [doc.split("\n") for doc in demo_documents()]
        rng = np.random.default_rng(seed)
        per_file = total_mb * 1e6 / num_files
        for index in range(num_files):
            written = 0
            with open(out_dir / f"part-{index:05d}.jsonl", "w", encoding="utf-8") as handle:
                while written < per_file:
                    lines = documents[rng.integers(len(documents))]
                    text = "\n".join(lines[i] for i in rng.permutation(len(lines)))
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    handle.write(line)
                    written += len(line.encode("utf-8"))
        marker.write_text("ok\n")
    size = sum(os.path.getsize(p) for p in out_dir.glob("*.jsonl"))
    return str(out_dir), size
