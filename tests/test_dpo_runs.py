"""Whole dpo.py runs (issue 16): a run stopped and resumed logs the same per-step losses and rewards as the
uninterrupted run, and DeepSpeed ZeRO-2 and ZeRO-3 on the CPU (one process, no launcher) train the same
steps as plain PyTorch from the same weights, with the reference built and sharded beside the policy."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpo

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
STEPS = 4
COMPARED = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from lmtrain.model.config import resolve_config

    root = tmp_path_factory.mktemp("dpo-runs")
    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tiny_tokenizer)}")
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w") as handle:
        for _ in range(32):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            handle.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": str(a + b),
                                     "rejected": str(a + b + rng.choice([-10, -1, 1, 10]))}) + "\n")
    return root


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(root / "base"), "--train_files", str(root / "pairs.jsonl"),
            "--validation_split_percentage", "0", "--max_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_steps", str(STEPS), "--learning_rate", "5e-3",
            "--warmup_steps", "1", "--beta", "0.2", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "2", "--report_to", "none", "--seed", "7", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--plot_curves", "false", "--output_dir", str(out), *extra]


def step_rows(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [{k: row[k] for k in ("step", *COMPARED)} for row in history if "loss" in row]


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    out = inputs / "straight"
    dpo.main(run_args(inputs, out))
    return step_rows(out)


def test_resumed_run_logs_the_same_steps_as_the_uninterrupted_run(inputs, uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    trainer, _ = dpo.main(run_args(inputs, out, "--stop_after_steps", "1"))  # stops between saves: a marked save
    assert trainer.state.global_step == 1 and not (out / "lmtrain_complete.json").exists()
    trainer, _ = dpo.main(run_args(inputs, out, "--stop_after_steps", "2"))
    assert trainer.state.global_step == 3
    dpo.main(run_args(inputs, out))
    assert (out / "lmtrain_complete.json").exists() and (out / "model.safetensors").exists()
    resumed = step_rows(out)
    assert [row["step"] for row in resumed] == list(range(1, STEPS + 1))
    for straight, again in zip(uninterrupted, resumed):
        assert again == pytest.approx(straight, rel=1e-5, abs=1e-6)
    assert uninterrupted[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy is the reference
    assert dpo.main(run_args(inputs, out))[0] is None  # a finished run does nothing


@pytest.mark.slow
def test_zero2_and_zero3_on_the_cpu_train_the_same_steps(inputs, uninterrupted):
    """`python dpo.py --deepspeed ...` without a launcher; ZeRO-3 shards the policy and the reference (both
    loaded from the same weights, so unlike pretraining from scratch the runs start identical)."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    processes = {stage: subprocess.Popen(
        [sys.executable, "dpo.py", "--deepspeed", f"ds_configs/{stage}.json", *run_args(inputs, inputs / stage)],
        cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for stage in ("zero2", "zero3")}
    outputs = {stage: process.communicate(timeout=900)[0] for stage, process in processes.items()}
    for stage, process in processes.items():
        assert process.returncode == 0, f"{stage}:\n{outputs[stage][-4000:]}"
        rows = step_rows(inputs / stage)
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), stage
        for straight, sharded in zip(uninterrupted, rows):
            assert sharded == pytest.approx(straight, rel=1e-3, abs=1e-4), stage
        assert (inputs / stage / "model.safetensors").exists()


def test_precomputed_reference_log_probs_train_like_the_reference_model(inputs, uninterrupted, tmp_path):
    trainer, _ = dpo.main(run_args(inputs, tmp_path / "precomputed", "--precompute_ref_log_probs"))
    assert trainer.ref_model is None  # no second model during training
    for with_model, precomputed in zip(uninterrupted, step_rows(tmp_path / "precomputed")):
        assert precomputed == pytest.approx(with_model, rel=1e-4, abs=1e-5)
