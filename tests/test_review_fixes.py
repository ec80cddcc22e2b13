"""Defects a new-user review found (H12): --overwrite_output_dir leaving the old run's final model behind,
SFT training samples that ignored the chat template, plot.py and make_sft_demo.py tracebacks for user
mistakes, an explicit --block_size equal to the default not checked against prepared data (and the resolved
config recording a block size the run did not use), LoRA options without --use_lora, and export.py writing
over its own --model directory. Tiny Qwen2 on the CPU."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import export
import generate
import plot
import pretrain
import sft
from lmtrain.arguments import DataArguments, LoraArguments, ModelArguments, SFTTrainArguments, TrainArguments
from lmtrain.cli.make_sft_demo import main as make_sft_demo
from lmtrain.cli.parsing import explicit_options, parse_arguments
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.data.sources import DataError
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:120]
    path = root / "plays.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pretrain_args(tokenizer_dir, corpus, out, *extra) -> list[str]:
    return ["--tokenizer_name", str(tokenizer_dir), "--train_files", str(corpus), "--block_size", "64",
            "--config_name", "qwen2-tiny", "--config_overrides", TINY, "--prepared_cache_dir",
            str(Path(corpus).parent / "cache"), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--seed", "7", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--output_dir", str(out), *extra]


def greedy_generate(model_dir, prompt: str, *flags: str) -> str:
    """What `generate.py --do_sample false` prints for the saved model."""
    (text,) = generate.main(["--model", str(model_dir), "--prompt", prompt, "--do_sample", "false",
                             "--max_new_tokens", str(NEW_TOKENS), *flags])
    return text


# ------------------------------------------------------------------ 1. --overwrite_output_dir, final output

def test_overwrite_output_dir_removes_the_earlier_runs_final_output(tiny_tokenizer_dir, corpus, tmp_path,
                                                                    log_lines):
    out = tmp_path / "run"
    pretrain.main(pretrain_args(tiny_tokenizer_dir, corpus, out, "--max_steps", "4", "--save_steps", "4",
                                "--eval_strategy", "steps", "--eval_steps", "4", "--validation_split_percentage",
                                "10", "--sample_prompts", "ROMEO.", "--sample_max_new_tokens", str(NEW_TOKENS)))
    # Pretraining samples stay raw continuations, and are what generate.py (without --chat_template) gives.
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])
    assert sample["step"] == 4 and sample["text"] == greedy_generate(out, "ROMEO.")
    (out / "adapter").mkdir()  # what an earlier LoRA run of ours leaves
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "eval_results.json").write_text("{}")  # evaluate.py's default output
    (out / "my_notes.txt").write_text("a user's file: never deleted")
    # Everything the finished run left at the top level, except what a new run rewrites before any step.
    rewritten = {"lmtrain_config.json", "data_report.json"}
    earlier = {p.name for p in out.iterdir() if not p.name.startswith("checkpoint-")} - rewritten - {"my_notes.txt"}
    assert {"model.safetensors", "config.json", "trainer_state.json", "all_results.json",
            "lmtrain_complete.json"} <= earlier
    log_lines.clear()
    trainer, _ = pretrain.main(pretrain_args(tiny_tokenizer_dir, corpus, out, "--max_steps", "20", "--save_steps",
                                             "2", "--stop_after_steps", "2", "--overwrite_output_dir",
                                             "--plot_curves", "false"))
    assert trainer.state.global_step == 2
    left = {p.name for p in out.iterdir()}
    assert "checkpoint-2" in left and "checkpoint-4" not in left
    assert not (earlier & left), f"the earlier run's files survived --overwrite_output_dir: {earlier & left}"
    assert (out / "my_notes.txt").read_text() == "a user's file: never deleted"
    message = next(line for line in log_lines if "final output" in line)
    assert "model.safetensors" in message and "adapter/" in message and "my_notes.txt" not in message


# ------------------------------------------------------------------------ 2. SFT samples and chat template

def write_chat_file(path: Path, count: int) -> Path:
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                                  {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from lmtrain.model.config import resolve_config
    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tokenizer)}")
    path = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sft_samples_are_the_greedy_chat_answers_generate_gives(tiny_model_dir, tmp_path):
    prompt = "What is 2 + 3?"
    data = write_chat_file(tmp_path / "chat.jsonl", 64)
    out = tmp_path / "sft"
    sft.main(["--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--max_length", "64",
              "--validation_split_percentage", "10", "--eval_strategy", "steps", "--eval_steps", "6",
              "--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
              "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--seed", "3",
              "--dataloader_num_workers", "0", "--plot_curves", "false", "--sample_prompts", prompt,
              "--sample_max_new_tokens", str(NEW_TOKENS), "--output_dir", str(out)])
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])
    assert sample["step"] == 6
    chat_answer = greedy_generate(out, prompt, "--chat_template")
    raw_continuation = greedy_generate(out, prompt)
    assert chat_answer != raw_continuation  # otherwise this test could not tell the two renderings apart
    assert sample["text"] == chat_answer


def test_sample_chat_template_defaults_by_stage():
    (pretraining,) = parse_arguments([TrainArguments], ["--output_dir", "x", "--report_to", "none"])
    (fine_tuning,) = parse_arguments([SFTTrainArguments], ["--output_dir", "x", "--report_to", "none"])
    (raw,) = parse_arguments([SFTTrainArguments], ["--output_dir", "x", "--report_to", "none",
                                                   "--sample_chat_template", "false"])
    assert (pretraining.sample_chat_template, fine_tuning.sample_chat_template, raw.sample_chat_template) == \
        (False, True, False)


# ------------------------------------------------------------------------------------ 3. plot.py mistakes

def test_plot_missing_run_and_run_without_state_are_one_message(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        plot.main([str(tmp_path / "nope")])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="no trainer_state.json in it"):
        plot.main([str(tmp_path / "empty_run")])
    (tmp_path / "state.json").write_text("not json")
    with pytest.raises(UserError, match="not a readable trainer_state.json"):
        plot.main([str(tmp_path / "state.json")])
    for target in (tmp_path / "nope", tmp_path / "empty_run"):
        run = subprocess.run([sys.executable, str(REPO / "plot.py"), str(target)], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr


# ----------------------------------------------------------------------- 4. make_sft_demo.py output file

def test_make_sft_demo_refuses_a_file_as_output_dir(tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        make_sft_demo(["--output_dir", str(target)])
    run = subprocess.run([sys.executable, str(REPO / "data_prep" / "make_sft_demo.py"), "--output_dir", str(target)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.startswith("error: --output_dir") and len(run.stderr.strip().splitlines()) == 1
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------- 5. explicit options and --block_size

def test_parse_arguments_records_the_options_given(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-3\nblock_size: 1024\n")
    model, data, training = parse_arguments(
        [ModelArguments, DataArguments, TrainArguments],
        [str(config), "--no_clean", "--min_chars=5", "--output_dir", "o", "--report_to", "none"])
    assert explicit_options(data) == {"block_size", "clean", "min_chars"}  # 1024 is the default: still given
    assert explicit_options(training) == {"learning_rate", "output_dir", "report_to"}
    assert explicit_options(model) == frozenset()
    assert "explicit_options" not in json.loads(training.to_json_string())
    assert explicit_options(DataArguments()) == frozenset()  # built in code: nothing given


@pytest.fixture(scope="module")
def prepared_128(tiny_tokenizer_dir, corpus):
    from lmtrain.cli.prepare import main as prepare

    out = Path(corpus).parent / "blocks128"
    prepare(["--tokenizer_name", str(tiny_tokenizer_dir), "--sources", str(corpus), "--block_size", "128",
             "--validation_split_percentage", "5", "--output_dir", str(out),
             "--prepared_cache_dir", str(Path(corpus).parent / "cache")])
    return out


def run_on_prepared(tokenizer_dir, out, *extra) -> list[str]:
    return ["--tokenizer_name", str(tokenizer_dir), "--config_name", "qwen2-tiny", "--config_overrides", TINY,
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--output_dir", str(out), *extra]


def test_explicit_block_size_equal_to_the_default_is_checked_against_prepared_data(tiny_tokenizer_dir,
                                                                                   prepared_128, tmp_path):
    with pytest.raises(DataError, match=r"--block_size 1024, but --dataset_path .* blocks of 128 tokens"):
        pretrain.main(run_on_prepared(tiny_tokenizer_dir, tmp_path / "a", "--dataset_path", str(prepared_128),
                                      "--block_size", "1024"))
    config = tmp_path / "cfg.yaml"
    config.write_text("block_size: 1024\n")
    with pytest.raises(DataError, match="blocks of 128 tokens"):
        pretrain.main([str(config), *run_on_prepared(tiny_tokenizer_dir, tmp_path / "b", "--dataset_path",
                                                     str(prepared_128))])


def test_resolved_config_of_a_prepared_data_run_repeats_it(tiny_tokenizer_dir, prepared_128, tmp_path):
    first = tmp_path / "first"
    trainer, _ = pretrain.main(run_on_prepared(tiny_tokenizer_dir, first, "--dataset_path", str(prepared_128)))
    assert len(trainer.train_dataset[0]["input_ids"]) == 128
    saved = json.loads((first / "lmtrain_config.json").read_text())
    assert saved["data"].get("block_size", 128) == 128  # never the unused default 1024
    trainer, _ = pretrain.main([str(first / "lmtrain_config.json"), "--output_dir", str(tmp_path / "again")])
    assert trainer.state.global_step == 1 and len(trainer.train_dataset[0]["input_ids"]) == 128


# ---------------------------------------------------------------------------------------------- 6. minor

def test_lora_options_without_use_lora_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        (lora,) = parse_arguments([LoraArguments], ["--lora_r", "4", "--lora_alpha", "8"])
    warnings = [r.getMessage() for r in caplog.records if "--use_lora" in r.getMessage()]
    assert len(warnings) == 1 and "--lora_alpha, --lora_r have no effect without --use_lora" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        parse_arguments([LoraArguments], ["--use_lora", "--lora_r", "4"])
        parse_arguments([LoraArguments], [])
    assert not [r for r in caplog.records if "--use_lora" in r.getMessage()]
    # Not recorded when they do not apply, so replaying lmtrain_config.json of a full fine-tune stays quiet.
    assert lora.options_not_recorded() == {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                           "merge_lora"}


def test_export_refuses_to_write_over_its_model_directory(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    for output in (str(model), str(model) + "/", str(model / ".." / "model")):
        with pytest.raises(UserError, match="is the --model directory.*Pick another --output_dir"):
            export.main(["--model", str(model), "--output_dir", output])
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before


def test_sft_samples_under_zero3_are_the_greedy_chat_answers(tiny_model_dir, tmp_path):
    """ZeRO-3 shards the weights: the samples' generate runs with synced_gpus on every rank (one here)."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prompt = "What is 2 + 3?"
    data = write_chat_file(tmp_path / "chat.jsonl", 32)
    out = tmp_path / "zero3"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "sft.py"), "--deepspeed", str(REPO / "ds_configs/zero3.json"),
                          "--model_name_or_path", str(tiny_model_dir), "--train_files", str(data), "--max_length", "64",
                          "--validation_split_percentage", "10", "--eval_strategy", "steps", "--eval_steps", "3",
                          "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                          "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
                          "--plot_curves", "false", "--sample_prompts", prompt, "--sample_max_new_tokens",
                          str(NEW_TOKENS), "--output_dir", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])
    assert sample["step"] == 3 and sample["text"] == greedy_generate(out, prompt, "--chat_template")


def test_a_run_on_prepared_data_records_the_data_s_packing_not_the_defaults(tiny_tokenizer_dir, corpus, tmp_path,
                                                                          caplog):
    """--dataset_path data packed best_fit: lmtrain_config.json records no preparation option (a default
    group_texts would misstate it), data_report.json says best_fit, and a preparation option given with
    --dataset_path is warned about as doing nothing."""
    from lmtrain.cli.prepare import main as prepare

    data = tmp_path / "best_fit"
    prepare(["--tokenizer_name", str(tiny_tokenizer_dir), "--sources", str(corpus), "--block_size", "128",
             "--packing_strategy", "best_fit", "--validation_split_percentage", "5", "--output_dir", str(data),
             "--prepared_cache_dir", str(tmp_path / "cache")])
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        pretrain.main(run_on_prepared(tiny_tokenizer_dir, out, "--dataset_path", str(data), "--min_chars", "5"))
    warnings = [r.getMessage() for r in caplog.records if "no effect with --dataset_path" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("--min_chars has no effect with --dataset_path")
    saved = json.loads((out / "lmtrain_config.json").read_text())["data"]
    assert "packing_strategy" not in saved and "min_chars" not in saved and saved["dataset_path"] == str(data)
    assert json.loads((out / "data_report.json").read_text())["packing_strategy"] == "best_fit"
    assert json.loads((data / "report.json").read_text())["packing_strategy"] == "best_fit"
