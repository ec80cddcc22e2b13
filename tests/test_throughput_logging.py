"""Throughput in the logs (issue 10.9): tokens/s counts the real (non-padding) tokens of training batches
for every collator, and the time of evaluations between steps is not training time."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sft
from lmtrain.model.config import resolve_config

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
WORDS = "the king is dead long live the queen to be or not that is question answer".split()


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_tokenizer, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("throughput-model")
    AutoModelForCausalLM.from_config(resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tiny_tokenizer)}")
                                     ).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def chat_file(path: Path, count: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(count):
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "say something"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_sft(model_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = chat_file(tmp_path / "chat.jsonl", 48)
    trainer, _ = sft.main(["--model_name_or_path", str(model_dir), "--train_files", str(data), "--max_length", "96",
                           "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                           "--save_strategy", "no", "--report_to", "none", "--seed", "3", "--learning_rate", "1e-3",
                           "--dataloader_num_workers", "0", "--plot_curves", "false",
                           "--output_dir", str(tmp_path / "out"), *extra])
    return trainer, [row for row in trainer.state.log_history if "loss" in row]


def logged_tokens(rows) -> float:
    """tokens/s * seconds per step * steps of the window, summed over windows (logging_steps 1: one step)."""
    return sum(row["tokens_per_second_per_device"] * row["step_seconds"] for row in rows)


def test_packed_sft_counts_real_tokens_and_leaves_evaluation_time_out(tiny_chat_model, tmp_path, monkeypatch):
    import lmtrain.training.callbacks
    import lmtrain.training.trainer
    from lmtrain.training.trainer import LMTrainer

    # A clock that an evaluation moves 1000 s forward: an evaluation far slower than any step, without the
    # wait (and without the noise of a busy machine's real pauses).
    offset = [0.0]
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + offset[0])})
    monkeypatch.setattr(lmtrain.training.callbacks, "time", clock)
    monkeypatch.setattr(lmtrain.training.trainer, "time", clock)
    original = LMTrainer.evaluate

    def slow_evaluate(self, *args, **kwargs):
        offset[0] += 1000.0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LMTrainer, "evaluate", slow_evaluate)
    trainer, rows = run_sft(tiny_chat_model, tmp_path, "--validation_split_percentage", "10",
                            "--eval_strategy", "steps", "--eval_steps", "2")
    assert offset[0] >= 3000  # evaluated at steps 2, 4 and 6
    pad_id = trainer.processing_class.pad_token_id
    ids = np.asarray(trainer.train_dataset["input_ids"])
    assert (ids == pad_id).any()  # packed rows carry padding here, which must not count
    real = int((ids != pad_id).sum())  # the tiny tokenizer's pad token is used for padding only
    assert all(row["tokens_per_second_per_device"] > 0 for row in rows)
    assert logged_tokens(rows) == pytest.approx(real, rel=0.01)
    # Every window, those right after an evaluation included, holds training time only.
    assert len(rows) == 7 and max(row["step_seconds"] for row in rows) < 100, rows


def test_unpacked_sft_logs_tokens_per_second_of_real_tokens(tiny_chat_model, tmp_path):
    for name, extra in {"padded": [], "padding_free": ["--padding_free", "true"]}.items():
        trainer, rows = run_sft(tiny_chat_model, tmp_path / name, "--validation_split_percentage", "0",
                                "--packing", "false", *extra)
        real = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        assert rows and all("tokens_per_second_per_device" in row for row in rows), name
        assert logged_tokens(rows) == pytest.approx(real, rel=0.01), name


def test_real_token_count_of_packed_pretraining_blocks(prepare_data, demo_texts, write_jsonl):
    from lmtrain.data.collators import CountingCollator, PadToLongestCollator, collate_packed_blocks

    path = write_jsonl([{"text": t} for t in demo_texts[:7]])
    data, _ = prepare_data([path], block_size=64)
    rows = [data["train"][i] for i in range(len(data["train"]))]
    labels = np.asarray([row["labels"] for row in rows])
    assert (labels[-1] == -100).any()  # the last partial block is padded
    # Pretraining labels are the inputs themselves, so the untrained positions are exactly the padding.
    batch = CountingCollator(collate_packed_blocks)(rows)
    assert batch["num_real_tokens"] == int((labels != -100).sum())
    # Unpacked rows: the real tokens are the rows' own lengths, whatever the padding to the longest.
    short = [{"input_ids": [5] * n, "labels": [-100] * (n - 2) + [5, 5], "position_ids": list(range(n))}
             for n in (3, 9, 4)]
    assert CountingCollator(PadToLongestCollator(pad_id=0))(short)["num_real_tokens"] == 16
