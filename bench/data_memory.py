"""Data preparation memory: prepare a multi-GB jsonl corpus and record the peak memory of the process tree.

    python bench/data_memory.py                      # 2 GB corpus, 2 processes: 18.5 min on a busy 2-core machine
    python bench/data_memory.py --corpus_gb 0.5      # 3.2 min
    python bench/data_memory.py --corpus_gb 0.2 --doc_kb 400             # book-length documents (~100k tokens)
    python bench/data_memory.py --corpus_gb 3 --num_proc 2 --vocab_size 32000 --work_dir /tmp/lmtrain_bench

The corpus (shuffled-line copies of the demo corpus's documents, see bench/corpus.py) is written once under
--work_dir, never in the repository. data_prep/prepare_pretrain.py, the real entry point, then runs in a child
process with cleaning off and a fresh cache (`--clean false --overwrite_cache true`), while this script samples
every process of its tree from /proc:
  PSS   proportional set size, summed: the tree's real footprint (a page shared by the forked workers is
        split between them instead of being counted once per process), split into anonymous memory (heap,
        Python objects, Arrow and NumPy buffers: what must fit in RAM) and file-backed pages (imported
        libraries and memory-mapped Arrow files, which the kernel drops and reads again when RAM runs short);
  RSS   resident set size summed over the processes (counts shared pages once per process: an upper bound),
        and the largest single process's RSS.
The last line of output is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from corpus import (DEFAULT_WORK_DIR, build_tokenizer, code_version, machine_description,
                          write_corpus)

REPO = Path(__file__).resolve().parents[1]
# Progress-bar labels on the child's stderr, in the order the steps run: they tell which step a peak is in.
PHASES = ("Generating train split", "tokenizing", "packing train", "packing validation", "Saving the dataset")


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine have used since boot, summed over the cores."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def process_memory(pid: int) -> dict | None:
    """kB figures of one process from /proc (None when it has exited meanwhile)."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    figures[key] = int(value.split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_File"):
                    figures[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return figures if "VmRSS" in figures else None


class TreeSampler:
    """Samples the memory of a process and all its descendants every `interval` seconds, keeping peaks."""

    FIGURES = ("pss", "pss_anon", "pss_file", "rss", "rss_anon", "rss_file", "rss_largest_process")

    def __init__(self, pid: int, interval: float):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.phase = "start (imports, tokenizer)"
        self.peak = {name: {"kB": 0, "at_s": 0.0, "phase": "", "processes": 0} for name in self.FIGURES}
        self.samples = 0
        self.started = time.perf_counter()

    def sample(self):
        try:
            pids = [self.root.pid] + [child.pid for child in self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        per_process = [m for m in map(process_memory, pids) if m]
        if not per_process:
            return
        now = {"pss": sum(m.get("Pss", 0) for m in per_process),
               "pss_anon": sum(m.get("Pss_Anon", 0) for m in per_process),
               "pss_file": sum(m.get("Pss_File", 0) for m in per_process), "rss": sum(m["VmRSS"] for m in per_process),
               "rss_anon": sum(m.get("RssAnon", 0) for m in per_process),
               "rss_file": sum(m.get("RssFile", 0) for m in per_process),
               "rss_largest_process": max(m["VmRSS"] for m in per_process)}
        self.samples += 1
        for name, value in now.items():
            if value > self.peak[name]["kB"]:
                self.peak[name] = {"kB": value, "at_s": round(time.perf_counter() - self.started, 1),
                                   "phase": self.phase, "processes": len(per_process)}

    def run_until_exit(self, process: subprocess.Popen):
        while process.poll() is None:
            self.sample()
            time.sleep(self.interval)


def follow_stderr(stream, log, sampler: TreeSampler):
    """Copy the child's stderr to the log and note the step whose progress bar appeared last."""
    while chunk := stream.read1(65536):
        log.write(chunk)
        text = chunk.decode("utf-8", "replace")
        for label in PHASES:
            if label in text:
                sampler.phase = label


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_gb", type=float, default=2.0, help="Corpus size in GB (10**9 bytes).")
    parser.add_argument("--doc_kb", type=float, default=0,
                        help="Join scenes into documents of at least this many KB (0: one ~9 KB scene each).")
    parser.add_argument("--num_files", type=int, default=32, help="jsonl files the corpus is split into.")
    parser.add_argument("--num_proc", type=int, default=2, help="--preprocessing_num_workers of the prepare step.")
    parser.add_argument("--vocab_size", type=int, default=32000, help="BPE vocabulary of the tokenizer.")
    parser.add_argument("--block_size", type=int, default=1024, help="Packed block size.")
    parser.add_argument("--interval", type=float, default=0.25, help="Seconds between memory samples.")
    parser.add_argument("--work_dir", default=DEFAULT_WORK_DIR, help="Corpus, tokenizer and scratch space.")
    parser.add_argument("--keep_output", action="store_true",
                        help="Keep the prepared dataset and caches (else deleted; the corpus is always kept).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    tokenizer_dir = build_tokenizer(args.vocab_size, args.work_dir)
    generated = time.perf_counter()
    corpus_dir, corpus_bytes = write_corpus(args.corpus_gb * 1000, args.num_files, args.work_dir, doc_kb=args.doc_kb)
    print(f"lmtrain {code_version()}; corpus: {corpus_dir}: {corpus_bytes / 1e9:.2f} GB in {args.num_files} files "
          f"(ready in {time.perf_counter() - generated:.0f} s)", flush=True)

    run_dir = Path(tempfile.mkdtemp(prefix="memory-", dir=args.work_dir))
    script = REPO / "data_prep" / "prepare_pretrain.py"
    command = [sys.executable, str(script),
               "--tokenizer_name", tokenizer_dir, "--sources", f"bench={corpus_dir}/*.jsonl",
               "--clean", "false", "--overwrite_cache", "true",
               "--preprocessing_num_workers", str(args.num_proc), "--block_size", str(args.block_size),
               "--prepared_cache_dir", str(run_dir / "cache"), "--output_dir", str(run_dir / "prepared")]
    print("running:", " ".join(command), flush=True)
    log_path = run_dir / "prepare.log"
    with open(log_path, "wb") as log:
        busy_started = machine_busy_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, cwd=REPO)
        sampler = TreeSampler(process.pid, args.interval)
        reader = threading.Thread(target=follow_stderr, args=(process.stderr, log, sampler), daemon=True)
        reader.start()
        sampler.run_until_exit(process)
        wall = time.perf_counter() - started
        reader.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the prepare step and its workers, all reaped now
    own_cpu = usage.ru_utime + usage.ru_stime
    others_share = max(0.0, machine_busy_seconds() - busy_started - own_cpu) / (wall * os.cpu_count())
    if process.returncode != 0:
        print(log_path.read_text(errors="replace")[-4000:])
        raise SystemExit(f"prepare_pretrain.py failed (exit code {process.returncode}); log: {log_path}")

    report = json.loads((run_dir / "prepared" / "report.json").read_text())
    disk = {name: sum(f.stat().st_size for f in (run_dir / name).rglob("*") if f.is_file())
            for name in ("cache", "prepared")}
    tokens = sum(report["tokens"].values())
    peak = {name: {**value, "GB": round(value["kB"] * 1024 / 1e9, 3)} for name, value in sampler.peak.items()}
    print(f"corpus size: {corpus_bytes / 1e9:.2f} GB ({report['documents_read']:,} documents)")
    print(f"tokens: {tokens:,}   wall time: {wall:.0f} s ({tokens / wall:,.0f} tokens/s, {own_cpu:.0f} CPU s; "
          f"other processes used {others_share:.0%} of the machine meanwhile)   steps, s: {report['seconds']}")
    for name in TreeSampler.FIGURES:
        share = peak[name]["GB"] * 1e9 / corpus_bytes
        print(f"peak {name:<20} {peak[name]['GB']:6.2f} GB  ({share:.2f} x the corpus; at {peak[name]['at_s']} s, "
              f"during '{peak[name]['phase']}', {peak[name]['processes']} processes)")
    print(f"on disk: caches {disk['cache'] / 1e9:.2f} GB, prepared dataset {disk['prepared'] / 1e9:.2f} GB; "
          f"{sampler.samples} memory samples")
    result = {"benchmark": "data_memory", "code": code_version(),
              "doc_kb": args.doc_kb, "num_proc": args.num_proc, "machine": machine_description(),
              "corpus_bytes": corpus_bytes, "documents": report["documents_read"], "tokens": tokens,
              "wall_seconds": round(wall, 1), "cpu_seconds": round(own_cpu, 1),
              "others_cpu_share": round(others_share, 3), "step_seconds": report["seconds"], "peak": peak,
              "disk_bytes": disk, "samples": sampler.samples, "vocab_size": args.vocab_size,
              "block_size": args.block_size}
    if not args.keep_output:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
