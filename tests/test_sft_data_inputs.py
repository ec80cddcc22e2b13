"""SFT inputs: a byte-order mark, strict mode for every record problem, a representative validation subset
under --max_eval_samples, and sets too small for the validation split."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmtrain.arguments import SFTDataArguments
from lmtrain.data.sft import limit_rows, prepare_sft_data
from lmtrain.data.sources import DataError
from lmtrain.errors import UserError
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king is dead long live the queen what is two plus three five answer briefly 0 1 2 3 4 5 6 7 8 9 +".split()
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_bpe_tokenizer([" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(300)],
                               vocab_size=330, show_progress=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("sft-inputs-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def record(i: int, answer_words: int = 3) -> dict:
    rng = random.Random(i)
    return {"messages": [{"role": "user", "content": f"what is {i % 10} + {i % 7} ?"},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(answer_words))}]}


def write_lines(path: Path, lines: list, bom: bool = False) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8") + b"\n")
    return path


def args(files, **overrides) -> SFTDataArguments:
    values = {"train_files": [str(f) for f in files], "max_length": 64, "validation_split_percentage": 0.0,
              **overrides}
    return SFTDataArguments(**values)


def test_a_byte_order_mark_keeps_the_first_record(tokenizer, tmp_path):
    plain = write_lines(tmp_path / "plain.jsonl", [record(i) for i in range(5)])
    with_bom = write_lines(tmp_path / "bom.jsonl", [record(i) for i in range(5)], bom=True)
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([record(i) for i in range(5)]).encode())
    expected, report = prepare_sft_data(args([plain]), tokenizer)
    assert report["samples"] == 5
    for path in (with_bom, array):
        for lenient in (True, False):
            data, report = prepare_sft_data(args([path], lenient=lenient), tokenizer)
            assert report["samples"] == 5 and report["dropped"] == {}
            assert data["train"]["input_ids"] == expected["train"]["input_ids"]


BAD_RECORDS = {
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    "bad_format": ({"prompt": "hi", "completion": "there"}, "unknown SFT format"),
    "non_string_content": ({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": ["a", "list"]}]}, "must be a string"),
    "unknown_role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "x"}]},
                     "unknown role"),
    "malformed_json": ('{"messages": [', "malformed JSON"),  # the shared reader's reason and message
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_strict_mode_makes_every_record_problem_an_error_with_file_and_line(tokenizer, tmp_path, reason):
    bad, message = BAD_RECORDS[reason]
    path = write_lines(tmp_path / "chat.jsonl", [record(0), bad, record(1)])
    with pytest.raises(DataError, match=f"chat.jsonl:2: .*{message}"):
        prepare_sft_data(args([path], lenient=False), tokenizer)
    _, report = prepare_sft_data(args([path], lenient=True), tokenizer)  # lenient: dropped and counted
    assert report["dropped"] == {reason: 1} and report["samples"] == 2


def test_a_turn_order_the_template_rejects_is_a_record_problem(tokenizer, tmp_path):
    import copy

    strict_template = copy.deepcopy(tokenizer)
    strict_template.chat_template = (
        "{%- for message in messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant') }}{%- endif -%}"
        + tokenizer.chat_template.removeprefix("{%- for message in messages -%}"))
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "five"}]}
    path = write_lines(tmp_path / "chat.jsonl", [record(0), bad])
    with pytest.raises(DataError, match="chat.jsonl:2: the chat template rejects .*alternate"):
        prepare_sft_data(args([path], lenient=False), strict_template)
    _, report = prepare_sft_data(args([path]), strict_template)
    assert report["dropped"] == {"template_rejected": 1}


def test_strict_mode_error_from_the_command_line_is_one_message(tokenizer_dir, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [record(0), BAD_RECORDS["no_assistant_turn"][0]])
    result = subprocess.run([sys.executable, str(REPO / "sft.py"), "--tokenizer_name", str(tokenizer_dir),
                             "--train_files", str(path), "--lenient", "false", "--report_to", "none",
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{path}:2: the conversation has no assistant message" in result.stderr


def test_max_eval_samples_takes_a_representative_subset(tokenizer, tmp_path):
    # answer lengths from 1 to 24 words; packed rows come out of the packer longest samples first
    path = write_lines(tmp_path / "val.jsonl", [record(i, 1 + i % 24) for i in range(240)])
    data, _ = prepare_sft_data(args([path], max_length=128), tokenizer)
    rows = data["train"]

    def mean_sample_length(dataset):  # real samples of the rows (the padding segment has no label)
        lengths = []
        for positions, labels in zip(dataset["position_ids"], dataset["labels"]):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if any(x != -100 for x in labels[a:b])]
        return np.mean(lengths)

    limit = len(rows) // 4
    first_rows = rows.select(range(limit))
    chosen = limit_rows(rows, limit, seed=1234)
    overall, first, subset = mean_sample_length(rows), mean_sample_length(first_rows), mean_sample_length(chosen)
    assert first > 1.3 * overall  # what --max_eval_samples evaluated before: the longest samples
    assert abs(subset - overall) < 0.15 * overall, (subset, overall)
    assert len(chosen) == limit and limit_rows(rows, limit, seed=1234)["input_ids"] == chosen["input_ids"]
    assert limit_rows(rows, None, 0) is rows and limit_rows(rows, 10 ** 6, 0) is rows


def test_a_tiny_set_with_evaluation_holds_out_one_sample(tokenizer, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [record(i) for i in range(20)])
    data, report = prepare_sft_data(args([path], validation_split_percentage=2.0), tokenizer)
    assert "validation" not in data  # no evaluation requested: 2% of 20 holds out nothing, as before
    data, report = prepare_sft_data(args([path], validation_split_percentage=2.0), tokenizer, evaluate=True)
    assert report["validation_samples"] == 1 and report["train_samples"] == 19 and len(data["validation"]) == 1
    with pytest.raises(UserError, match="--validation_files.*--validation_split_percentage"):
        prepare_sft_data(args([path], validation_split_percentage=0.0), tokenizer, evaluate=True)


def test_sft_with_eval_steps_on_twenty_samples_evaluates(tokenizer, tmp_path):
    import sft
    import torch
    from transformers import AutoModelForCausalLM

    from lmtrain.model.config import resolve_config

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(resolve_config("qwen2-tiny", TINY + f",vocab_size={len(tokenizer)}")
                                     ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = write_lines(tmp_path / "chat.jsonl", [record(i) for i in range(20)])
    common = ["--model_name_or_path", str(model_dir), "--train_files", str(path), "--max_length", "64",
              "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no",
              "--report_to", "none", "--dataloader_num_workers", "0", "--plot_curves", "false",
              "--per_device_train_batch_size", "2"]
    trainer, _ = sft.main(common + ["--output_dir", str(tmp_path / "out")])
    assert any("eval_loss" in row for row in trainer.state.log_history)
    with pytest.raises(UserError, match="no validation sample"):
        sft.main(common + ["--validation_split_percentage", "0", "--output_dir", str(tmp_path / "out0")])
