"""Test-only instrumentation of a torchrun worker for tests/test_scale_out_cpu.py (not a test module).

    torchrun --nproc_per_node 2 tests/scale_out_probe.py RECORD_DIR pretrain.py-ARGS...

Each rank appends to RECORD_DIR/rank{R}.jsonl one line per optimizer step: the rows it trained on (a row's
hash: SHA-1 of its input_ids) and the loss of each of its micro-batches. At the first training dataloader
rank 0 also writes RECORD_DIR/dataset.json, the hash of every training row. At exit each rank writes
RECORD_DIR/writes{R}.json: every file under --output_dir it opened for writing through Python's open/io.open
(json dumps, TensorBoard's event writer, tempfile) or wrote with torch.save or safetensors' save_file (those
write through C++/Rust, not through open).
"""
from __future__ import annotations

import atexit
import builtins
import hashlib
import io
import json
import os
import sys
from pathlib import Path


def row_hash(ids) -> str:
    return hashlib.sha1(ids.to("cpu").contiguous().numpy().astype("int64").tobytes()).hexdigest()[:16]


def main():
    record, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    output = Path(os.path.abspath(argv[argv.index("--output_dir") + 1]))
    writes, original_open = set(), builtins.open

    def note(file):
        if isinstance(file, (str, os.PathLike)):
            path = Path(os.path.abspath(file))
            if output == path or output in path.parents:
                writes.add(str(path.relative_to(output)))

    def audited_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(flag in mode for flag in "wax+"):
            path = Path(os.path.abspath(file))
            if output == path or output in path.parents:
                writes.add(str(path.relative_to(output)))
        return original_open(file, mode, *args, **kwargs)

    builtins.open = io.open = audited_open
    import safetensors.torch
    import torch
    import transformers.modeling_utils

    def audited_save(save):  # torch.save and safetensors write through C++/Rust, not Python's open
        def saving(obj, file, *args, **kwargs):
            note(file)
            return save(obj, file, *args, **kwargs)
        return saving

    torch.save = audited_save(torch.save)
    safetensors.torch.save_file = transformers.modeling_utils.safe_save_file = audited_save(safetensors.torch.save_file)
    atexit.register(lambda: (record / f"writes{rank}.json").write_text(json.dumps(sorted(writes))))

    from lmtrain.training.trainer import LMTrainer

    batches_of, step_of = LMTrainer.get_batch_samples, LMTrainer.training_step
    loader_of = LMTrainer.get_train_dataloader
    current = {"rows": [], "losses": [], "micro_batches": 0}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = batches_of(self, epoch_iterator, num_batches, device)
        if batches:  # an epoch's last step may hold fewer micro-batches than the accumulation
            current.update(rows=[row_hash(row) for batch in batches for row in batch["input_ids"]],
                           micro_batches=len(batches))
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = step_of(self, model, inputs, num_items_in_batch)
        current["losses"].append(float(loss.detach()))
        if len(current["losses"]) == current["micro_batches"]:  # the step's last micro-batch
            with original_open(record / f"rank{rank}.jsonl", "a") as handle:
                handle.write(json.dumps({"step": self.state.global_step + 1, **current}) + "\n")
            current.update(rows=[], losses=[])
        return loss

    def get_train_dataloader(self):
        if rank == 0:
            import torch

            rows = [row_hash(torch.tensor(ids)) for ids in self.train_dataset["input_ids"]]
            (record / "dataset.json").write_text(json.dumps(rows))
        return loader_of(self)

    LMTrainer.get_batch_samples, LMTrainer.training_step = get_batch_samples, training_step
    LMTrainer.get_train_dataloader = get_train_dataloader

    from lmtrain.cli.pretrain import main as pretrain_main
    from lmtrain.errors import run_entry_point

    run_entry_point(pretrain_main, argv)


if __name__ == "__main__":
    main()
