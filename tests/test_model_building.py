"""Building the model (issues 9.15, 9.16, 9's LoRA base path): config overrides are typed and checked
before the model is built, attention choices are checked before any data is prepared, and a LoRA adapter
loads from any working directory."""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
import sft
from lmtrain.arguments import ModelArguments
from lmtrain.errors import UserError
from lmtrain.model.building import build_model
from lmtrain.model.config import resolve_config

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def pretrain_argv(tmp_path, tokenizer_dir, *extra):
    # The training file does not exist: a check that runs before data loading is reported instead of it.
    return ["--tokenizer_name", str(tokenizer_dir), "--train_files", str(tmp_path / "missing.jsonl"),
            "--block_size", "32", "--max_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
            *extra]


def test_rope_theta_override_reaches_the_rotary_embedding(tiny_tokenizer):
    config = resolve_config("qwen2-tiny", f"{TINY},rope_theta=10000")
    assert config.rope_parameters["rope_theta"] == 10000.0
    model = build_model(ModelArguments(config_name="qwen2-tiny", config_overrides=f"{TINY},rope_theta=10000"),
                        tiny_tokenizer)
    head_dim = 32 // 2
    expected = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_head_dim_derived_from_hidden_size_follows_the_override():
    config = resolve_config("llama-1b", "hidden_size=256,num_attention_heads=4,num_key_value_heads=2")
    assert config.head_dim == 64  # 256 / 4
    config = resolve_config("llama-1b", "hidden_size=512,num_attention_heads=4,num_key_value_heads=2")
    assert config.head_dim == 128
    assert resolve_config("llama-1b", "hidden_size=512,head_dim=32").head_dim == 32  # explicit stays


@pytest.mark.parametrize("overrides, message", [
    ("hidden_size=100", r"head dimension is 25 .*hidden_size=100.*num_attention_heads=4.*even"),
    ("hidden_size=130", r"hidden_size=130 is not divisible by num_attention_heads=4"),
    ("num_key_value_heads=3", r"num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ("num_hidden_layers=0", r"num_hidden_layers=0 must be positive"),
    ("hidden_size=64.5", r"hidden_size takes a whole number"),
    ("rope_theta=fast", r"rope_theta takes a number"),
    ("hiden_size=64", r"no key 'hiden_size'.*did you mean hidden_size"),
    ("hidden_size", r"'hidden_size' is not KEY=VALUE"),
    ("a=b=c", r"'a=b=c' is not KEY=VALUE"),
])
def test_bad_overrides_are_one_clear_error_before_data_loading(tiny_tokenizer_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        pretrain.main(pretrain_argv(tmp_path, tiny_tokenizer_dir, "--config_overrides", overrides))


def test_bad_override_from_the_command_line_is_one_message(tiny_tokenizer_dir, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "pretrain.py"),
                             *pretrain_argv(tmp_path, tiny_tokenizer_dir, "--config_overrides", "hidden_size=100")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "LMTRAIN_DEBUG": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error: --config_overrides hidden_size=100: the head dimension is 25" in result.stderr


def test_unknown_attention_is_refused_before_data_loading(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match=r"flexattention.*did you mean flex_attention.*sdpa"):
        pretrain.main(pretrain_argv(tmp_path, tiny_tokenizer_dir, "--attn_implementation", "flexattention"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_flex_attention_on_cpu_falls_back_to_sdpa_and_trains(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="lmtrain.model.attention"):
        model = build_model(ModelArguments(config_name="qwen2-tiny", config_overrides=TINY,
                                           attn_implementation="flex_attention"), tiny_tokenizer)
    assert model.config._attn_implementation == "sdpa"
    assert any("flex_attention" in r.message and "CPU" in r.message for r in caplog.records)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # the step FlexAttention could not take on a CPU


def test_lora_adapter_loads_from_another_working_directory(tiny_tokenizer, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    work = tmp_path / "work"
    base_dir = work / "demo" / "pretrain"
    AutoModelForCausalLM.from_config(resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tiny_tokenizer)}")
                                     ).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    rng = random.Random(0)
    with open(work / "chat.jsonl", "w") as handle:
        for _ in range(8):
            handle.write(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": rng.choice(["yes", "no"])}]}) + "\n")
    monkeypatch.chdir(work)
    sft.main(["--model_name_or_path", "demo/pretrain", "--train_files", "chat.jsonl", "--use_lora", "--lora_r", "4",
              "--max_length", "32", "--max_steps", "2", "--learning_rate", "1e-2", "--validation_split_percentage", "0",
              "--save_strategy", "no", "--report_to", "none", "--plot_curves", "false", "--output_dir", "lora"])
    adapter = work / "lora" / "adapter"
    stored = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str(base_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    ids = torch.tensor([tiny_tokenizer("hello there").input_ids])
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
