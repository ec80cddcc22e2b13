"""Test-only instrumentation of LMTrainer for the resume tests (not a test module).

install(log_path, kill_at=None) patches LMTrainer so that
- every optimizer step appends one JSON line {"step": N, "rows": [...], "read": R, "time": T} to log_path:
  the samples that step trained on (a row's hash: SHA-1 of its input_ids), R the number of dataset rows
  read since this training built its dataloader (datasets' __getitem__/__getitems__), so a test can check
  that resuming does not read the rows of skipped batches, and T the wall-clock time its batches were ready;
- with kill_at=(STEP, MICRO) the process SIGKILLs itself during micro-batch MICRO (0-based) of optimizer
  step STEP: an interruption in the middle of gradient accumulation, the gradients of the earlier
  micro-batches already accumulated.

Run as a script for a subprocess (DeepSpeed runs, kills):
    python tests/resume_probe.py pretrain|sft LOG_PATH [STEP:MICRO|-] ARGS...
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

ROWS_READ = [0]


def row_hash(ids) -> str:
    return hashlib.sha1(ids.to("cpu").contiguous().numpy().astype("int64").tobytes()).hexdigest()[:12]


def install(log_path, kill_at: tuple[int, int] | None = None):
    """Patch LMTrainer and datasets.Dataset; returns a function that undoes it."""
    from datasets import Dataset

    from lmtrain.training.trainer import LMTrainer

    original_batches, original_step = LMTrainer.get_batch_samples, LMTrainer.training_step
    original_loader = LMTrainer.get_train_dataloader
    original_item, original_items = Dataset.__getitem__, getattr(Dataset, "__getitems__", None)
    micro = {"step": None, "index": 0}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = original_batches(self, epoch_iterator, num_batches, device)
        if batches:
            rows = [row_hash(row) for batch in batches for row in batch["input_ids"]]
            with open(log_path, "a") as handle:
                handle.write(json.dumps({"step": self.state.global_step + 1, "rows": rows,
                                         "read": ROWS_READ[0], "time": time.time()}) + "\n")
        return batches, num_items

    def training_step(self, *args, **kwargs):
        step = self.state.global_step + 1
        if micro["step"] != step:
            micro.update(step=step, index=0)
        if kill_at is not None and (step, micro["index"]) == tuple(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        micro["index"] += 1
        return original_step(self, *args, **kwargs)

    def get_train_dataloader(self):
        ROWS_READ[0] = 0  # rows read from here on: by this training, skipped batches included
        return original_loader(self)

    def getitem(self, key):
        ROWS_READ[0] += 1 if isinstance(key, int) else 0
        return original_item(self, key)

    def getitems(self, keys):
        ROWS_READ[0] += len(keys)
        return original_items(self, keys)

    LMTrainer.get_batch_samples, LMTrainer.training_step = get_batch_samples, training_step
    LMTrainer.get_train_dataloader = get_train_dataloader
    Dataset.__getitem__ = getitem
    if original_items is not None:
        Dataset.__getitems__ = getitems

    def uninstall():
        LMTrainer.get_batch_samples, LMTrainer.training_step = original_batches, original_step
        LMTrainer.get_train_dataloader = original_loader
        Dataset.__getitem__ = original_item
        if original_items is not None:
            Dataset.__getitems__ = original_items

    return uninstall


def read_log(log_path) -> dict[int, dict]:
    """Step -> its record; a step recorded twice (trained, killed or stopped, trained again after the
    resume) keeps its last record: what the finished curve's step trained on."""
    records = {}
    if os.path.exists(log_path):
        for line in open(log_path):
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return records


if __name__ == "__main__":
    stage, log, kill = sys.argv[1], sys.argv[2], sys.argv[3]
    install(log, None if kill == "-" else tuple(int(x) for x in kill.split(":")))
    if stage == "pretrain":
        from lmtrain.cli.pretrain import main
    else:
        from lmtrain.cli.sft import main
    from lmtrain.errors import run_entry_point

    sys.argv = [sys.argv[0], *sys.argv[4:]]
    run_entry_point(main)
