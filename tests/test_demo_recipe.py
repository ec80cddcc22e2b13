"""The CPU demo's recipe (scripts/demo.sh, docs/DEMO.md): the SFT task mix changes the training
conversations only, never the held-out prompts, and the tokenizer leaves the held-out plays out."""
from __future__ import annotations

import json

import pytest

from lmtrain.cli.make_sft_demo import TASKS
from lmtrain.cli.make_sft_demo import main as make_sft_demo
from lmtrain.errors import UserError


def task_of(conversation: list[dict]) -> str:
    """Which demo task a training conversation is, from its last user turn."""
    users = [message["content"] for message in conversation if message["role"] == "user"]
    if len(users) == 2:
        return "follow_up"
    for prefix, task in (("What is", "add"), ("What number comes after", "next_number"),
                         ("Repeat after me", "repeat"), ("Which play", "which_play")):
        if users[0].startswith(prefix):
            return task
    raise AssertionError(users)


def test_task_weights_change_the_training_mix_and_nothing_held_out(tmp_path):
    common = ["--train_samples", "120", "--eval_per_task", "4", "--preference_pairs", "0"]
    make_sft_demo(common + ["--output_dir", str(tmp_path / "even")])
    make_sft_demo(common + ["--task_weights", "which_play=3", "repeat=0", "--output_dir", str(tmp_path / "mixed")])

    # The held-out prompts (what exact match means) are the same file, byte for byte.
    assert (tmp_path / "even" / "eval.jsonl").read_bytes() == (tmp_path / "mixed" / "eval.jsonl").read_bytes()
    counts = {}
    for name in ("even", "mixed"):
        lines = (tmp_path / name / "train.jsonl").read_text().splitlines()
        tasks = [task_of(json.loads(line)["messages"]) for line in lines]
        counts[name] = {task: tasks.count(task) for task in TASKS}
        held_out = {json.dumps(json.loads(line)["messages"]) for line in (tmp_path / name / "eval.jsonl").open()}
        for line in lines:  # a training conversation never holds a held-out prompt (system prompt or not)
            messages = [m for m in json.loads(line)["messages"][:-1] if m["role"] != "system"]
            assert json.dumps(messages) not in held_out
    assert counts["even"] == dict.fromkeys(TASKS, 24)
    assert counts["mixed"] == {"add": 20, "next_number": 20, "repeat": 0, "which_play": 60, "follow_up": 20}


@pytest.mark.parametrize("weights", [["which_play=x"], ["plays=2"], ["add=-1"],
                                     [f"{task}=0" for task in TASKS]])
def test_bad_task_weights_are_one_clear_error(tmp_path, weights):
    with pytest.raises(UserError, match="--task_weights"):
        make_sft_demo(["--task_weights", *weights, "--output_dir", str(tmp_path / "out")])


def test_the_demo_tokenizer_leaves_both_editions_of_macbeth_out(tmp_path):
    """scripts/demo.sh trains its tokenizer with --validation_groups macbeth, the play prepare_pretrain.py holds
    out: the tokenizer's report counts every Macbeth scene of both editions as left out."""
    from conftest import load_repo_script

    from lmtrain.data.demo_corpus import ensure_demo_corpus

    with open(ensure_demo_corpus(), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    macbeth = [r for r in records if r["play"] == "macbeth"]
    assert {r["play_file"] for r in macbeth} == {"macbeth_gut", "macbeth_gut_f"}

    script = load_repo_script("data_prep/train_tokenizer.py")
    out = tmp_path / "tokenizer"
    # --sample_scan_factor 0: read the whole corpus (Macbeth is near its end), sample 200,000 chars of it
    script.main(["--vocab_size", "300", "--sample_chars", "200000", "--sample_scan_factor", "0",
                 "--validation_groups", "macbeth", "--output_dir", str(out)])
    held_out = json.loads((out / "sample_report.json").read_text())["held_out"]
    assert held_out["split_by"] == "play" and held_out["documents"] == len(macbeth)
    assert held_out["chars"] == sum(len(r["text"]) for r in macbeth)
