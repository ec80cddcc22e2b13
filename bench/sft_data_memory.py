"""Peak memory of SFT data preparation on a large generated set, versus the set's size as Python objects
(what the list-based path held: every record as parsed JSON plus every sample's id and label lists).

    python bench/sft_data_memory.py --conversations 1000000 --workers 2 --work_dir /tmp/sft-memory

Preparation runs in a subprocess (data_prep/prepare_sft.py); the total RSS of its process tree (main
process plus datasets.map workers) (RSS, PSS and anonymous PSS) is sampled every 0.5 s. The
Python-object size is measured with tracemalloc on --object_sample conversations and scaled linearly.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the a king queen is was long live what how many two three five answer briefly please explain why "
         "because water fire earth air light dark day night city river road house tree stone one four six").split()


def generate(path: Path, conversations: int, seed: int = 0) -> None:
    """Short conversations (a question of 8-30 words, an answer of 8-40): about 70 tokens each."""
    rng = random.Random(seed)
    say = lambda n: " ".join(rng.choices(WORDS, k=n))  # noqa: E731
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(conversations):
            handle.write(json.dumps({"messages": [{"role": "user", "content": say(rng.randint(8, 30)) + "?"},
                                                  {"role": "assistant", "content": say(rng.randint(8, 40)) + "."}]})
                         + "\n")


def python_object_bytes(path: Path, tokenizer_dir: Path, sample: int, max_length: int) -> int:
    """Bytes the list-based path held per `sample` conversations at once: parsed records, (ids, labels) lists
    and the rows built from them (build_rows, before Dataset.from_dict copied them into Arrow)."""
    from lmtrain.data.sft import SFTStats, build_rows, encode_sample
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    records, samples = [], []
    with open(path, encoding="utf-8") as handle:
        for line, _ in zip(handle, range(sample)):
            records.append(json.loads(line))
            samples.append(encode_sample(tokenizer, records[-1]["messages"], max_length, False, SFTStats()))
    rows = build_rows(samples, max_length, True, tokenizer.pad_token_id)  # noqa: F841 - held, measured
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return size


def _rollup(pid: int) -> dict:
    """/proc/PID/smaps_rollup in bytes (Pss, Pss_Anon, Pss_File, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--object_sample", type=int, default=50_000)
    parser.add_argument("--work_dir", default="/tmp/sft-memory")
    options = parser.parse_args()
    work = Path(options.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data, tokenizer_dir = work / "chat.jsonl", work / "tokenizer"
    if not data.exists():
        generate(data, options.conversations)
    if not tokenizer_dir.exists():
        from lmtrain.tokenizer import train_bpe_tokenizer

        rng = random.Random(1)
        train_bpe_tokenizer([" ".join(rng.choices(WORDS, k=50)) for _ in range(2000)], vocab_size=512,
                            show_progress=False).save_pretrained(str(tokenizer_dir))
    print(f"{options.conversations} conversations, {data.stat().st_size / 1e6:.0f} MB of JSON lines", flush=True)

    command = [sys.executable, str(REPO / "data_prep" / "prepare_sft.py"), "--tokenizer_name", str(tokenizer_dir),
               "--train_files", str(data), "--max_length", str(options.max_length),
               "--preprocessing_num_workers", str(options.workers), "--prepared_cache_dir", str(work / "cache"),
               "--output_dir", str(work / "prepared")]
    shutil.rmtree(work / "cache", ignore_errors=True)  # every step computed, none reused
    started = time.time()
    process = psutil.Popen(command, stdout=open(work / "prepare.log", "w"), stderr=subprocess.STDOUT)
    peak_tree = peak_pss = peak_anon = 0
    while process.poll() is None:
        try:
            tree = [process] + process.children(recursive=True)
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree))
            # PSS splits pages shared by the forked workers, so the sum is what the tree really occupies;
            # its anonymous part leaves out the memory-mapped Arrow files (page cache the kernel can drop).
            rollups = [_rollup(p.pid) for p in tree]
            peak_pss = max(peak_pss, sum(r.get("Pss", 0) for r in rollups))
            peak_anon = max(peak_anon, sum(r.get("Pss_Anon", 0) for r in rollups))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.5)
    seconds = time.time() - started
    if process.returncode:
        raise SystemExit(f"prepare_sft.py failed (rc {process.returncode}); see {work / 'prepare.log'}")
    report = json.loads((work / "prepared" / "report.json").read_text())

    sample = min(options.object_sample, options.conversations)
    per_sample = python_object_bytes(data, tokenizer_dir, sample, options.max_length) / sample
    objects = per_sample * options.conversations
    print(f"prepared in {seconds:.0f} s: {report['samples']} samples, {report['tokens']} tokens "
          f"({report['tokens'] / max(1, report['samples']):.0f} per sample), rows {report['rows']}")
    print(f"peak of the preparation process tree (sampled every 0.5 s): RSS summed {peak_tree / 2**30:.2f} GiB, "
          f"PSS summed {peak_pss / 2**30:.2f} GiB, anonymous PSS summed {peak_anon / 2**30:.2f} GiB")
    print(f"the set as Python objects (records + id/label lists; tracemalloc on {sample} conversations, "
          f"{per_sample:.0f} B each, scaled): {objects / 2**30:.2f} GiB")
    print(f"Python objects / peak RSS summed: {objects / max(1, peak_tree):.1f}x")


if __name__ == "__main__":
    main()
