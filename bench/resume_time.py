"""Resume time against the number of steps already done (issue 12.2): a tiny model is trained 5 and 500
steps (two output directories), then each is resumed for one more step. Measured: from trainer.train being
called to the first resumed batch being ready (checkpoint loading + skipping the batches already trained),
and the dataset rows read meanwhile. The Trainer skips through accelerate's SkipBatchSampler, which draws
the skipped batches' indices from the sampler without reading or collating their rows.

    python bench/resume_time.py [--steps 5 500] [--repeats 3] [--workdir /tmp/lmtrain-resume-bench]

Then the skipping alone: the first batch after 5 ... 99,000 skipped batches of a 200,000-row dataset.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import resume_probe  # noqa: E402
from lmtrain.cli import pretrain  # noqa: E402
from lmtrain.data.demo_corpus import ensure_demo_corpus  # noqa: E402
from lmtrain.tokenizer import train_bpe_tokenizer  # noqa: E402

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 500],
                        help="steps trained before each resume (default: 5 500)")
    parser.add_argument("--workdir", default="/tmp/lmtrain-resume-bench", help="where the runs are written")
    parser.add_argument("--repeats", type=int, default=3, help="resumes per step count (one step each)")
    options = parser.parse_args()
    root = Path(options.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:40]
    (root / "plays.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                        show_progress=False).save_pretrained(root / "tokenizer")

    def argv(out, *extra):
        return ["--tokenizer_name", str(root / "tokenizer"), "--train_files", str(root / "plays.jsonl"),
                "--block_size", "32", "--config_name", "qwen2-tiny", "--config_overrides", TINY,
                "--prepared_cache_dir", str(root / "cache"), "--validation_split_percentage", "0",
                "--per_device_train_batch_size", "2", "--max_steps", "100000", "--save_steps", "100000",
                "--logging_steps", "50", "--report_to", "none", "--dataloader_num_workers", "0",
                "--disable_tqdm", "true", "--plot_curves", "false", "--output_dir", str(out), *extra]

    timings = {}
    real_run_training = pretrain.run_training
    for steps in options.steps:
        out = root / f"after-{steps}"
        pretrain.main(argv(out, "--stop_after_steps", str(steps)))
        seconds, read = [], []
        for attempt in range(options.repeats):  # each resume makes one more step: after steps, steps+1, ...
            marks = {}
            log = root / f"resume-{steps}-{attempt}.jsonl"

            def timed(trainer, resume_from):
                marks["start"] = time.time()
                return real_run_training(trainer, resume_from)

            pretrain.run_training = timed
            uninstall = resume_probe.install(log)
            try:
                pretrain.main(argv(out, "--stop_after_steps", "1"))
            finally:
                uninstall()
                pretrain.run_training = real_run_training
            first = resume_probe.read_log(log)[steps + attempt + 1]
            seconds.append(round(first["time"] - marks["start"], 3))
            read.append(first["read"])
        timings[f"resume after {steps} steps"] = {"seconds_to_first_resumed_batch": seconds,
                                                  "rows_read_before_it": read}
        print(steps, timings[f"resume after {steps} steps"], flush=True)
    timings.update(skip_only())
    print(json.dumps(timings, indent=2))


def skip_only() -> dict:
    """The skipping alone, without checkpoint loading: seconds until the first batch after N skipped ones,
    over a 200,000-row Arrow dataset read through a shuffling DataLoader (as the Trainer builds it)."""
    import datasets
    import numpy as np
    import torch
    from accelerate import skip_first_batches

    rows = datasets.Dataset.from_dict({"input_ids": np.zeros((200_000, 32), dtype=np.int64)}).with_format("torch")
    loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    result = {}
    for skipped in (5, 500, 50_000, 99_000):
        start = time.perf_counter()
        next(iter(skip_first_batches(loader, skipped)))
        result[f"skip {skipped} batches"] = {"seconds_to_first_batch": round(time.perf_counter() - start, 4)}
        print(skipped, result[f"skip {skipped} batches"], flush=True)
    return result


if __name__ == "__main__":
    main()
