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
import subprocess
from pathlib import Path

import numpy as np

from lmtrain.data.demo_corpus import ensure_demo_corpus

DEFAULT_WORK_DIR = "/tmp/lmtrain_bench"
REPO = Path(__file__).resolve().parents[1]


def demo_documents() -> list[str]:
    with open(ensure_demo_corpus(), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def build_tokenizer(vocab_size: int, work_dir: str) -> str:
    """Directory of a byte-level BPE with `vocab_size` entries trained on the demo corpus (built once per
    version of the training rules: a tokenizer cached under older rules would measure something else)."""
    import hashlib

    import lmtrain.tokenizer
    from lmtrain.tokenizer import train_bpe_tokenizer

    rules = hashlib.sha256(Path(lmtrain.tokenizer.__file__).read_bytes()).hexdigest()[:8]
    out_dir = Path(work_dir) / f"tokenizer-{vocab_size}-{rules}"
    if not (out_dir / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(demo_documents(), vocab_size, show_progress=False)
        tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def write_corpus(total_mb: float, num_files: int, work_dir: str, seed: int = 0, doc_kb: float = 0) -> tuple[str, int]:
    """`num_files` jsonl files holding about `total_mb` MB (10**6 bytes) of shuffled-line documents.

    `doc_kb` > 0 joins shuffled scenes into documents of at least that many KB (book-length documents);
    0 keeps one scene per document. Returns the directory and its size in bytes. Built once per setting; a
    `.complete` marker tells a finished corpus from one a crash left half-written.
    """
    name = f"corpus-{total_mb:g}mb-{num_files}files-seed{seed}" + (f"-doc{doc_kb:g}kb" if doc_kb else "")
    out_dir = Path(work_dir) / name
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
                    scenes, chars = [], 0
                    while not scenes or chars < doc_kb * 1000:
                        lines = documents[rng.integers(len(documents))]
                        scenes.append("\n".join(lines[i] for i in rng.permutation(len(lines))))
                        chars += len(scenes[-1])
                    line = json.dumps({"text": "\n\n".join(scenes)}, ensure_ascii=False) + "\n"
                    handle.write(line)
                    written += len(line.encode("utf-8"))
        marker.write_text("ok\n")
    size = sum(os.path.getsize(p) for p in out_dir.glob("*.jsonl"))
    return str(out_dir), size


def code_version() -> str:
    """The commit measured, with "+modified" when lmtrain/ or data_prep/ differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+modified" if git("status", "--porcelain", "--", "lmtrain", "data_prep") else "")


def machine_description() -> str:
    """CPU model, logical CPUs and RAM, for the record next to the figures."""
    import psutil

    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
