"""SFT data preparation throughput: lmtrain's prepare (render + tokenize + label + pack + save) vs raw
`tokenizers` batch encoding of the same already-rendered text vs the list-based path it replaced, on the
same generated conversations, with 1 and 2 processes; then a rerun that reuses the cache.

    python bench/sft_data_throughput.py --conversations 20000 --base_commit 13112b5

"The list-based path" is `prepare_sft_data` of --base_commit (read into Python lists in one process,
render and tokenize per sample, build_rows, Dataset.from_dict), run from a `git archive` of that commit in
a subprocess, then saved with save_to_disk like the new path. Every figure runs in its own subprocess
(fresh caches, no warm imports shared). No hub access: the tokenizer is a byte-level BPE trained here on
the generated text, with the project's ChatML template.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def words(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "el", "or", "us", "ie", "qu", "zo", "th"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)]


def generate(path: Path, conversations: int, seed: int = 0, turn_words: int = 110) -> None:
    """Conversations of a system prompt and two user/assistant rounds, about 620 tokens each with the
    tokenizer trained by `make_tokenizer` (Zipf-distributed words, punctuation, numbers)."""
    rng = random.Random(seed)
    vocabulary = words(rng, 5000)
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]

    def sentence(n: int) -> str:
        chosen = rng.choices(vocabulary, weights, k=n)
        return " ".join(chosen).capitalize() + rng.choice([".", "?", "!", f" {rng.randint(0, 999)}."])

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(conversations):
            turn = lambda: " ".join(sentence(rng.randint(8, 20)) for _ in range(turn_words // 14))  # noqa: E731
            messages = [{"role": "system", "content": sentence(12)}]
            for _ in range(2):
                messages += [{"role": "user", "content": turn()}, {"role": "assistant", "content": turn()}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def make_tokenizer(data: Path, out: Path) -> None:
    from lmtrain.tokenizer import train_bpe_tokenizer

    texts = []
    with open(data, encoding="utf-8") as handle:
        for line, _ in zip(handle, range(2000)):
            texts += [m["content"] for m in json.loads(line)["messages"]]
    train_bpe_tokenizer(texts, vocab_size=8192, show_progress=False).save_pretrained(str(out))


def measure_new(data: str, tokenizer_dir: str, workers: int, cache: str, max_length: int) -> dict:
    from lmtrain.arguments import SFTDataArguments
    from lmtrain.data.sft_prepare import prepare_sft_files, save_prepared_sft
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    args = SFTDataArguments(train_files=[data], max_length=max_length, preprocessing_num_workers=workers,
                            prepared_cache_dir=cache)
    start = time.perf_counter()
    dataset, report = prepare_sft_files(args, tokenizer)
    save_prepared_sft(dataset, report, os.path.join(cache, "out"), tokenizer)
    return {"seconds": time.perf_counter() - start, "tokens": report["tokens"], "cache": report["cache"]}


def measure_raw(data: str, tokenizer_dir: str) -> dict:
    from lmtrain.data.chat_render import render_text
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    with open(data, encoding="utf-8") as handle:
        texts = [render_text(tokenizer, json.loads(line)["messages"])[0] for line in handle]
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    tokens = 0
    for offset in range(0, len(texts), 1000):  # batches, as a preparation loop would feed it
        tokens += sum(len(e.ids) for e in backend.encode_batch(texts[offset:offset + 1000], add_special_tokens=False))
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def measure_old(data: str, tokenizer_dir: str, cache: str, max_length: int) -> dict:
    # imported from the git archive of --base_commit (PYTHONPATH set by the parent)
    from lmtrain.arguments import SFTDataArguments
    from lmtrain.data.sft import prepare_sft_data
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    dataset, report = prepare_sft_data(SFTDataArguments(train_files=[data], max_length=max_length), tokenizer)
    dataset.save_to_disk(os.path.join(cache, "out"))
    return {"seconds": time.perf_counter() - start, "tokens": report["tokens"]}


def run(measure: str, *extra: str, pythonpath: str | None = None, threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--measure", measure, *extra], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--base_commit", default="13112b5", help="commit whose list-based path is 'today's'")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--args", nargs="*", default=[], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        data, tokenizer_dir, *rest = options.args
        result = {"new": lambda: measure_new(data, tokenizer_dir, int(rest[0]), rest[1], options.max_length),
                  "raw": lambda: measure_raw(data, tokenizer_dir),
                  "old": lambda: measure_old(data, tokenizer_dir, rest[0], options.max_length)}[options.measure]()
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data, tokenizer_dir = work / "chat.jsonl", work / "tokenizer"
    generate(data, options.conversations)
    make_tokenizer(data, tokenizer_dir)
    base = work / "base"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", options.base_commit, "lmtrain"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    common = ["--max_length", str(options.max_length), "--args", str(data), str(tokenizer_dir)]
    results = {}
    for procs in (1, 2):
        results[f"raw, {procs} thread(s)"] = run("raw", *common, threads=procs)
    results["list-based path (1 process)"] = run("old", *common, str(work / "old"), pythonpath=str(base))
    for procs in (1, 2):
        results[f"lmtrain prepare, {procs} process(es)"] = run("new", *common, str(procs), str(work / f"new{procs}"))
    results["lmtrain prepare rerun (cache), 2 processes"] = run("new", *common, "2", str(work / "new2"))

    print(f"{options.conversations} conversations, {results['raw, 1 thread(s)']['tokens']} tokens "
          f"({results['raw, 1 thread(s)']['tokens'] / options.conversations:.0f} per conversation), "
          f"max_length {options.max_length}, {os.cpu_count()} CPUs")
    for name, result in results.items():
        rate = result["tokens"] / result["seconds"]
        result["tokens_per_s"] = rate
        print(f"  {name:45s} {result['seconds']:8.2f} s  {rate / 1e3:9.1f}k tokens/s"
              + (f"  cache {result['cache']}" if "cache" in result else ""))
    new2 = results["lmtrain prepare, 2 process(es)"]["tokens_per_s"]
    print(f"  prepare (2 procs) / raw encoding (2 threads): {new2 / results['raw, 2 thread(s)']['tokens_per_s']:.2f}")
    print(f"  prepare (1 proc) / raw encoding (1 thread):   "
          f"{results['lmtrain prepare, 1 process(es)']['tokens_per_s'] / results['raw, 1 thread(s)']['tokens_per_s']:.2f}")
    print(f"  prepare (2 procs) / list-based path:          "
          f"{new2 / results['list-based path (1 process)']['tokens_per_s']:.2f}")
    print(f"  rerun with the same inputs: {results['lmtrain prepare rerun (cache), 2 processes']['seconds']:.2f} s")
    print(json.dumps({k: round(v["tokens_per_s"]) for k, v in results.items()}))


if __name__ == "__main__":
    main()
