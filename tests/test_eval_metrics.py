"""Evaluation figures of a mixture (issue 10.1): validation blocks hold one source each and carry their
UTF-8 bytes; --max_eval_samples takes a seeded sample across sources; eval loss is token-weighted and bits
per byte uses the bytes of exactly the evaluated blocks, overall and per source. Checked against a forward
pass by hand and byte counts from the documents' text."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrain
from lmtrain.data.loading import select_eval_blocks
from lmtrain.data.packing import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def chinese_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(chr(rng.randint(0x4E00, 0x4FFF)) if rng.random() > 0.08 else "，" for _ in range(rng.randint(80, 200)))
            + "。" for _ in range(count)]


@pytest.fixture(scope="module")
def mix(tmp_path_factory, demo_texts, tiny_tokenizer_dir):
    """An English + Chinese mix prepared with the tiny (English) tokenizer: ~4 vs ~1 bytes per token."""
    root = tmp_path_factory.mktemp("mix")
    english = [text[:1500].strip() for text in demo_texts[:40]]  # as cleaning leaves them
    chinese = chinese_documents(60, seed=3)
    for name, texts in (("en", english), ("zh", chinese)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                            encoding="utf-8")
    from conftest import load_repo_script

    script = load_repo_script("data_prep/prepare_pretrain.py")
    script.main(["--tokenizer_name", str(tiny_tokenizer_dir), "--sources", f"en={root / 'en.jsonl'}",
                 f"zh={root / 'zh.jsonl'}", "--block_size", "64", "--validation_split_percentage", "30",
                 "--output_dir", str(root / "data"), "--prepared_cache_dir", str(root / "cache")])
    return root, {"en": english, "zh": chinese}


def test_validation_blocks_hold_one_source_and_its_bytes(mix, tiny_tokenizer):
    root, texts = mix
    validation = datasets.load_from_disk(str(root / "data"))["validation"]
    held_out = [json.loads(line) for line in (root / "data" / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["source"] for r in held_out} == {"en", "zh"}
    sources = validation["source"]
    for name in ("en", "zh"):
        rows = [i for i, s in enumerate(sources) if s == name]
        blocks = validation.select(rows).with_format("numpy")
        ids, labels = np.asarray(blocks["input_ids"]).reshape(-1), np.asarray(blocks["labels"]).reshape(-1)
        stream = ids[labels != IGNORE_INDEX]
        # Each source's blocks decode to exactly that source's held-out documents: no block mixes sources.
        documents = [tiny_tokenizer.decode(piece[:-1]) for piece in
                     np.split(stream, np.flatnonzero(stream == tiny_tokenizer.eos_token_id) + 1) if len(piece)]
        expected = [r["text"] for r in held_out if r["source"] == name]
        assert documents == expected and set(expected) <= set(texts[name])
        # Their bytes add up to the documents' UTF-8 bytes.
        assert sum(blocks["num_bytes"]) == pytest.approx(sum(len(t.encode("utf-8")) for t in expected), rel=1e-9)


def test_eval_subset_is_seeded_and_spans_every_source(mix):
    root, _ = mix
    validation = datasets.load_from_disk(str(root / "data"))["validation"]
    counts = Counter(validation["source"])
    assert set(validation.select(range(16))["source"]) == {"en"}  # the first blocks: one source only
    chosen = select_eval_blocks(validation, 16, seed=5)
    again = select_eval_blocks(validation, 16, seed=5)
    assert len(chosen) == 16 and chosen["input_ids"] == again["input_ids"]
    got = Counter(chosen["source"])
    for name, total in counts.items():
        assert abs(got[name] - 16 * total / len(validation)) <= 1
    assert select_eval_blocks(validation, 16, seed=6)["input_ids"] != chosen["input_ids"]
    assert len(select_eval_blocks(validation, 10_000, seed=5)) == len(validation)


@torch.no_grad()
def figures_by_hand(model, blocks) -> dict:
    """Token-weighted loss and bits per byte per source, one block at a time, from the model's logits."""
    model.eval()
    totals = {}
    for row in blocks:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(row["labels"])
        logits = model(input_ids=ids, position_ids=torch.tensor([row["position_ids"]])).logits[0].float()
        keep = labels[1:] != IGNORE_INDEX
        nats = F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum").item()
        for key in ("all", row["source"]):
            t = totals.setdefault(key, [0.0, 0, 0, 0.0])
            t[0] += nats
            t[1] += int(keep.sum())
            t[2] += int((labels != IGNORE_INDEX).sum())
            t[3] += row["num_bytes"]
    return {key: {"loss": n / p, "bits_per_byte": n / p / math.log(2) / (b / r)} for key, (n, p, r, b) in totals.items()}


def run(root: Path, tokenizer_dir: Path, out: Path, *extra: str):
    return pretrain.main(["--tokenizer_name", str(tokenizer_dir), "--dataset_path", str(root), "--config_name",
                          "qwen2-tiny", "--config_overrides", TINY, "--per_device_train_batch_size", "4",
                          "--per_device_eval_batch_size", "3", "--max_steps", "4", "--learning_rate", "3e-3",
                          "--eval_strategy", "steps", "--eval_steps", "4", "--max_eval_samples", "16",
                          "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "3",
                          "--output_dir", str(out), *extra])


def test_eval_figures_are_those_of_the_evaluated_blocks(mix, tiny_tokenizer_dir, tmp_path):
    root, _ = mix
    trainer, metrics = run(root / "data", tiny_tokenizer_dir, tmp_path / "run")
    evaluated = trainer.eval_dataset
    assert len(evaluated) == 16 and set(evaluated["source"]) == {"en", "zh"}
    expected = figures_by_hand(trainer.model, evaluated)
    assert metrics["eval_loss"] == pytest.approx(expected["all"]["loss"], rel=1e-4)
    assert metrics["eval_bits_per_byte"] == pytest.approx(expected["all"]["bits_per_byte"], rel=1e-4)
    for name in ("en", "zh"):
        assert metrics[f"eval_{name}_loss"] == pytest.approx(expected[name]["loss"], rel=1e-4)
        assert metrics[f"eval_{name}_bits_per_byte"] == pytest.approx(expected[name]["bits_per_byte"], rel=1e-4)
    # The two sources differ a lot per byte: one average over the split could not be right for both.
    assert metrics["eval_en_bits_per_byte"] < 0.6 * metrics["eval_zh_bits_per_byte"] or \
        metrics["eval_zh_bits_per_byte"] < 0.6 * metrics["eval_en_bits_per_byte"]
    logged = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert logged and logged[-1]["eval_bits_per_byte"] == metrics["eval_bits_per_byte"]


def test_data_without_the_new_columns_still_evaluates(mix, tiny_tokenizer_dir, tmp_path):
    """A directory prepared before validation blocks carried `source` / `num_bytes`: it loads, samples at
    random and falls back to the split's average bytes per token."""
    root, _ = mix
    old = tmp_path / "old"
    prepared = datasets.load_from_disk(str(root / "data"))
    datasets.DatasetDict({"train": prepared["train"],
                          "validation": prepared["validation"].remove_columns(["source", "num_bytes"])}).save_to_disk(old)
    report = json.loads((root / "data" / "report.json").read_text())
    (old / "report.json").write_text(json.dumps(report))
    trainer, metrics = run(old, tiny_tokenizer_dir, tmp_path / "run")
    assert len(trainer.eval_dataset) == 16
    bytes_per_token = report["bytes_per_token_by_split"]["validation"]
    assert metrics["eval_bits_per_byte"] == pytest.approx(metrics["eval_loss"] / math.log(2) / bytes_per_token)
    assert not any(key.startswith("eval_en_") for key in metrics)
