"""SFT preparation on disk: rows identical to the per-sample reference (batched encoding, array packing),
the cache reused for the same inputs and never for a changed template, tokenizer or file, the report's
figures, and data_prep/prepare_sft.py -> sft.py --dataset_path end to end."""
from __future__ import annotations

import bisect
import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmtrain.arguments import SFTDataArguments
from lmtrain.data.sft import SFTStats, build_rows, encode_sample
from lmtrain.data.sft_prepare import prepare_sft_files
from lmtrain.data.sft_rows import pack_bins
from lmtrain.errors import UserError
from lmtrain.tokenizer import IM_END, train_bpe_tokenizer

WORDS = "the king is dead long live the queen what is two plus three five answer briefly 0 1 2 3 4 5 +".split()
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def make_tokenizer(seed: int, vocab_size: int = 330):
    rng = random.Random(seed)
    return train_bpe_tokenizer([" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(300)],
                               vocab_size=vocab_size, show_progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(0)


def conversation(rng: random.Random, i: int) -> dict:
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    messages = [{"role": "system", "content": say(3)}] if i % 3 == 0 else []
    for _ in range(1 + i % 3):
        messages += [{"role": "user", "content": say(rng.randint(1, 40))},
                     {"role": "assistant", "content": say(rng.randint(1, 40))}]
    if i % 7 == 0:  # a special-token string as content: encoded as text (the per-sample path)
        messages[-1]["content"] += f" {IM_END} is how a turn ends"
    return {"messages": messages}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rng = random.Random(1)
    return [conversation(rng, i) for i in range(120)]


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def args(files, cache, **overrides) -> SFTDataArguments:
    return SFTDataArguments(**{"train_files": [str(f) for f in files], "max_length": 96,
                               "validation_split_percentage": 0.0, "prepared_cache_dir": str(cache), **overrides})


def old_pack_samples(lengths: list[int], capacity: int) -> list[list[int]]:
    """pack_samples as it was before the array packer (commit 13112b5), the reference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            space, index = capacity - lengths[i], len(bins) - 1
        else:
            space, index = free.pop(slot)
            bins[index].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, index))
    return bins


def test_array_packing_equals_the_list_packer():
    rng = np.random.default_rng(0)
    for trial in range(300):
        capacity = int(rng.integers(4, 300))
        lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 400)))
        if trial % 3 == 0:  # many ties
            lengths = rng.choice([1, 3, capacity // 2, capacity], len(lengths))
        order, starts = pack_bins(lengths, capacity)
        bins = [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
        assert bins == old_pack_samples(lengths.tolist(), capacity), trial


@pytest.mark.parametrize("packing,train_on_prompt", [(True, False), (False, False), (True, True)])
def test_rows_equal_the_per_sample_reference(tokenizer, records, tmp_path, packing, train_on_prompt):
    path = write(tmp_path / "chat.jsonl", records)
    data, report = prepare_sft_files(args([path], tmp_path / "cache", packing=packing,
                                          train_on_prompt=train_on_prompt, preprocessing_num_workers=2), tokenizer)
    stats = SFTStats()
    samples = [encode_sample(tokenizer, r["messages"], 96, train_on_prompt, stats) for r in records]
    assert stats.truncated > 0 and all(s is not None for s in samples)
    bins = old_pack_samples([len(ids) for ids, _ in samples], 96)
    expected = build_rows(samples, 96, pack=False, pad_id=tokenizer.pad_token_id)
    if packing:  # the old packer's rows, by hand: samples concatenated, padding a segment of its own
        expected = {"input_ids": [], "labels": [], "position_ids": []}
        for b in bins:
            ids, labels = sum((samples[i][0] for i in b), []), sum((samples[i][1] for i in b), [])
            pad = 96 - len(ids)
            expected["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
            expected["labels"].append(labels + [-100] * pad)
            expected["position_ids"].append([p for i in b for p in range(len(samples[i][0]))] + list(range(pad)))
    for column in ("input_ids", "labels", "position_ids"):
        assert data["train"][column] == expected[column], column
    lengths = np.array([len(ids) for ids, _ in samples])
    assert report["samples"] == len(records) and report["dropped"] == {}
    assert report["truncated"] == stats.truncated and report["tokens"] == stats.tokens == lengths.sum()
    assert report["trainable_tokens"] == stats.trainable_tokens
    assert report["rows"] == {"train": len(bins) if packing else len(records)}
    p50, p90, p95 = np.percentile(lengths, [50, 90, 95])
    assert report["sample_tokens"] == {"p50": int(p50), "p90": int(p90), "p95": int(p95), "max": 96}


def _prepare(path, cache, tokenizer, **overrides):
    return prepare_sft_files(args([path], cache, validation_split_percentage=10.0, **overrides), tokenizer)


def test_a_rerun_reuses_the_cache_and_changed_inputs_never_do(tokenizer, records, tmp_path):
    path, cache = write(tmp_path / "chat.jsonl", records[:40]), tmp_path / "cache"
    first, report = _prepare(path, cache, tokenizer)
    assert set(report["cache"].values()) == {"computed"}
    again, report = _prepare(path, cache, tokenizer)
    assert set(report["cache"].values()) == {"reused"}
    assert again["train"]["input_ids"] == first["train"]["input_ids"]

    other_template = copy.deepcopy(tokenizer)  # same vocabulary, another rendering of each turn
    other_template.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed, report = _prepare(path, cache, other_template)
    assert report["cache"]["read"] == "reused" and report["cache"]["encode"] == "computed"
    assert changed["train"]["input_ids"] != first["train"]["input_ids"]

    other_vocabulary = make_tokenizer(5, vocab_size=300)
    changed, report = _prepare(path, cache, other_vocabulary)
    assert report["cache"]["encode"] == "computed"
    assert changed["train"]["input_ids"] != first["train"]["input_ids"]

    for setting in ({"max_length": 64}, {"train_on_prompt": True}, {"packing": False}, {"prepare_seed": 7}):
        _, report = _prepare(path, cache, tokenizer, **setting)
        assert "computed" in report["cache"].values(), setting

    write(path, records[:39])  # the file changed: read again
    changed, report = _prepare(path, cache, tokenizer)
    assert report["cache"]["read"] == "computed" and report["samples"] == 39


def test_prepared_directory_trains_with_dataset_path(tokenizer, records, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import sft
    from data_prep import prepare_sft
    from lmtrain.model.config import resolve_config

    tokenizer_dir, model_dir = tmp_path / "tokenizer", tmp_path / "model"
    tokenizer.save_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(resolve_config("qwen2-tiny", TINY + f",vocab_size={len(tokenizer)}")
                                     ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = write(tmp_path / "chat.jsonl", records[:60])
    prepared = tmp_path / "prepared"
    dataset, report = prepare_sft.main(["--tokenizer_name", str(tokenizer_dir), "--train_files", str(path),
                                        "--max_length", "96", "--validation_split_percentage", "10",
                                        "--prepared_cache_dir", str(tmp_path / "cache"),
                                        "--output_dir", str(prepared)])
    saved = json.loads((prepared / "report.json").read_text())
    assert saved["samples"] == 60 and saved["rows"] == {k: len(v) for k, v in dataset.items()}
    assert (prepared / "tokenizer" / "tokenizer.json").exists()

    common = ["--model_name_or_path", str(model_dir), "--dataset_path", str(prepared), "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
              "--dataloader_num_workers", "0", "--plot_curves", "false", "--eval_strategy", "steps",
              "--eval_steps", "2"]
    trainer, _ = sft.main(common + ["--output_dir", str(tmp_path / "out")])
    assert trainer.train_dataset["input_ids"] == dataset["train"]["input_ids"]
    assert any("eval_loss" in row for row in trainer.state.log_history)

    other = make_tokenizer(5, vocab_size=len(tokenizer))  # same size, other ids
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="prepared with another tokenizer.*data_prep/prepare_sft.py"):
        sft.main(common + ["--tokenizer_name", str(tmp_path / "other"), "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(UserError, match="--dataset_path is already prepared SFT data"):
        sft.main(common + ["--train_files", str(path), "--output_dir", str(tmp_path / "o3")])
    # An explicit --max_length the data was not prepared with is refused, as pretraining refuses --block_size.
    with pytest.raises(UserError, match="--max_length 256, but --dataset_path .* prepared with --max_length 96"):
        sft.main(common + ["--max_length", "256", "--output_dir", str(tmp_path / "o4")])
