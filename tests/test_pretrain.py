"""pretrain.py end to end on a CPU with a tiny random Qwen2: training, saving, reloading, resuming,
argument handling, and the DeepSpeed ZeRO-2/3 path (one process, DeepSpeed's CPU accelerator)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:120]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [json.loads(line)["text"] for line in lines]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512, show_progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return root, corpus, root / "tokenizer"


def base_args(root: Path, corpus: Path, tokenizer: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--tokenizer_name", str(tokenizer), "--train_files", str(corpus), "--block_size", "64",
            "--config_name", "qwen2-tiny", "--config_overrides", TINY, "--prepared_cache_dir", str(root / "cache"),
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
            "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none", "--seed", "7",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir), *extra]


def losses(trainer) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def test_loss_falls_and_saved_model_reloads_and_generates(corpus_and_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    out = tmp_path / "run"
    trainer, metrics = pretrain.main(base_args(root, corpus, tokenizer_dir, out, "--max_steps", "40",
                                               "--eval_strategy", "steps", "--eval_steps", "20"))
    curve = losses(trainer)
    first, last = sum(list(curve.values())[:3]) / 3, sum(list(curve.values())[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4)
    assert metrics["eval_bits_per_byte"] > 0
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert all("tokens_per_second_per_device" in row and "grad_norm" in row for row in logged[1:])
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert json.loads((out / "lmtrain_config.json").read_text())["data"]["block_size"] == 64

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache and model.config.vocab_size >= len(tokenizer)
    trained = trainer.model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name].to(tensor.dtype))
    prompt = tokenizer("ROMEO.", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > prompt.input_ids.shape[1]


def test_resume_after_planned_stop_reproduces_uninterrupted_losses(corpus_and_tokenizer, tmp_path):
    root, corpus, tokenizer_dir = corpus_and_tokenizer
    steps = ["--max_steps", "12"]
    reference, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, tmp_path / "straight", *steps))
    interrupted = tmp_path / "interrupted"
    first, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, interrupted, *steps, "--stop_after_steps", "5"))
    assert max(losses(first)) == 5 and (interrupted / "checkpoint-5").is_dir()
    # The same command again: resumes from checkpoint-5 without being told.
    resumed, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, interrupted, *steps))
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, 13))
    for step in range(6, 13):
        assert got[step] == expected[step], f"step {step}: resumed {got[step]} != uninterrupted {expected[step]}"


def test_resumed_run_logs_the_same_z_loss_as_an_uninterrupted_one(corpus_and_tokenizer, tmp_path):
    # z_loss is a window mean over optimizer steps: a resumed run's first window starts at the resumed step
    root, corpus, tokenizer_dir = corpus_and_tokenizer
    steps = ["--max_steps", "6", "--z_loss_coefficient", "1e-3"]
    reference, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, tmp_path / "straight", *steps))
    interrupted = tmp_path / "interrupted"
    pretrain.main(base_args(root, corpus, tokenizer_dir, interrupted, *steps, "--stop_after_steps", "3"))
    resumed, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, interrupted, *steps))
    z_of = lambda trainer: {row["step"]: row["z_loss"] for row in trainer.state.log_history if "z_loss" in row}
    expected, got = z_of(reference), z_of(resumed)
    assert sorted(expected) == list(range(1, 7)) and all(value > 0 for value in expected.values())
    for step in range(4, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"


def test_non_empty_output_dir_without_checkpoint_is_refused(corpus_and_tokenizer, tmp_path):
    root, corpus, tokenizer_dir = corpus_and_tokenizer
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's file")
    from lmtrain.errors import UserError

    with pytest.raises(UserError, match="not empty"):
        pretrain.main(base_args(root, corpus, tokenizer_dir, out, "--max_steps", "1"))
    trainer, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, out, "--max_steps", "1",
                                         "--overwrite_output_dir"))
    assert trainer.state.global_step == 1 and (out / "notes.txt").exists()


def test_config_file_is_overridden_by_flags(corpus_and_tokenizer, tmp_path):
    import yaml

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 3, "learning_rate": 1e-3, "block_size": 32,
                                      "per_device_train_batch_size": 2}))
    args = base_args(root, corpus, tokenizer_dir, tmp_path / "cfg", "--max_steps", "2")
    args = [a for a in args if a not in ("--block_size", "64")]  # leave block_size to the file
    trainer, _ = pretrain.main([str(config)] + args)
    saved = json.loads((tmp_path / "cfg" / "lmtrain_config.json").read_text())
    assert trainer.state.global_step == 2                      # flag beats file
    assert saved["training"]["learning_rate"] == 3e-3          # flag beats file
    assert saved["data"]["block_size"] == 32                   # file beats default
    assert saved["training"]["per_device_train_batch_size"] == 4  # flag (from base_args) beats file


def test_classic_run_clm_launch_flags_run_unchanged(corpus_and_tokenizer, tmp_path):
    """The flags of a typical tutorial launch script (run_clm / happy-llm style), old spellings included."""
    root, corpus, tokenizer_dir = corpus_and_tokenizer
    config_dir = tmp_path / "qwen-config"
    from lmtrain.model.config import resolve_config

    resolve_config("qwen2-tiny", TINY).save_pretrained(config_dir)
    out = tmp_path / "classic"
    trainer, _ = pretrain.main([
        "--config_name", str(config_dir), "--tokenizer_name", str(tokenizer_dir), "--train_files", str(corpus),
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--do_train",
        "--output_dir", str(out), "--evaluation_strategy", "no", "--learning_rate", "1e-4",
        "--num_train_epochs", "1", "--max_steps", "2", "--warmup_steps", "1", "--logging_dir", str(out / "logs"),
        "--logging_strategy", "steps", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "100",
        "--preprocessing_num_workers", "1", "--save_total_limit", "1", "--seed", "12", "--block_size", "64",
        "--gradient_checkpointing", "--report_to", "none", "--use_fast_tokenizer", "true", "--save_safetensors",
        "--keep_linebreaks", "true", "--low_cpu_mem_usage", "--prepared_cache_dir", str(root / "cache")])
    assert trainer.state.global_step == 2
    assert (out / "model.safetensors").exists()


def test_tokenizer_that_changes_on_reload_is_refused_before_data_preparation(corpus_and_tokenizer,
                                                                           gpt2_rule_tokenizer_dir, tmp_path):
    root, corpus, _ = corpus_and_tokenizer
    cache = tmp_path / "cache"
    args = base_args(root, corpus, gpt2_rule_tokenizer_dir, tmp_path / "refused", "--max_steps", "1")
    args[args.index("--prepared_cache_dir") + 1] = str(cache)
    with pytest.raises(ValueError, match="reloads as Qwen2Tokenizer"):
        pretrain.main(args)
    assert not cache.exists() or not any(cache.iterdir())  # nothing was tokenized


def test_vocabulary_mismatch_with_pretrained_weights_is_a_clear_error(corpus_and_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtrain.model.config import resolve_config

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    small = resolve_config("qwen2-tiny", TINY + ",vocab_size=256")
    AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "small-vocab")
    args = base_args(root, corpus, tokenizer_dir, tmp_path / "mismatch", "--max_steps", "1")
    args = [a for a in args if a not in ("--config_name", "qwen2-tiny", "--config_overrides", TINY)]
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        pretrain.main(args + ["--model_name_or_path", str(tmp_path / "small-vocab")])
    trainer, _ = pretrain.main(args + ["--model_name_or_path", str(tmp_path / "small-vocab"),
                                       "--resize_token_embeddings", "--overwrite_output_dir"])
    assert trainer.model.get_input_embeddings().weight.shape[0] >= 512


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# zero3_offload trains in tests/test_deepspeed_cpu.py (its learning rates) on every run; its save here is slow.
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json",
                                       pytest.param("zero3_offload.json", marks=pytest.mark.slow)])
def test_deepspeed_zero_trains_and_saves_loadable_weights(corpus_and_tokenizer, tmp_path, ds_config):
    """One process through DeepSpeed's CPU accelerator (two CPU processes disagree on the world size)."""
    from transformers import AutoModelForCausalLM

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    out = tmp_path / "ds"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    args = base_args(root, corpus, tokenizer_dir, out, "--max_steps", "16", "--deepspeed",
                     str(REPO / "ds_configs" / ds_config), "--stop_after_steps", "8")
    first = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args], env=env, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args[:-2]], env=env, capture_output=True,
                            text=True, timeout=900)  # resume from checkpoint-8 and finish
    assert second.returncode == 0, second.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    curve = [row["loss"] for row in history if "loss" in row]
    assert len(curve) == 16 and sum(curve[-3:]) < sum(curve[:3]), curve
    model = AutoModelForCausalLM.from_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    assert (out / "model.safetensors").stat().st_size >= parameters * 2  # gathered, not an empty ZeRO-3 shard
    assert all(p.abs().sum() > 0 for p in model.parameters())


def test_early_stopping_keeps_the_best_checkpoint_and_logs_samples(corpus_and_tokenizer, tmp_path, monkeypatch):
    """A flat validation loss (learning rate 0) stops training after `patience` evaluations without
    improvement; the best checkpoint survives save_total_limit=1; samples and SwanLab logs are written
    offline with no account."""
    root, corpus, tokenizer_dir = corpus_and_tokenizer
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    out = tmp_path / "early"
    trainer, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, out, "--max_steps", "100",
                                         "--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps", "5",
                                         "--save_steps", "5", "--save_total_limit", "1",
                                         "--early_stopping_patience", "2", "--sample_prompts", "ROMEO.",
                                         "--sample_max_new_tokens", "4", "--report_to", "swanlab", "tensorboard"))
    assert trainer.state.global_step == 15
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-5")
    assert (out / "checkpoint-5").is_dir()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [5, 10, 15, 15] and samples[0]["prompt"] == "ROMEO."
    assert any((tmp_path / "swanlog").rglob("*.swanlab"))


def test_resume_after_kill_minus_9_reproduces_uninterrupted_losses(corpus_and_tokenizer, tmp_path):
    """A real crash: SIGKILL the training process once a checkpoint exists, rerun the same command."""
    import signal
    import time

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    args = ["--max_steps", "150", "--save_steps", "20", "--save_total_limit", "2", "--disable_tqdm", "true"]
    straight, _ = pretrain.main(base_args(root, corpus, tokenizer_dir, tmp_path / "straight", *args))
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "pretrain.py"), *base_args(root, corpus, tokenizer_dir, out, *args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-20" / "lmtrain_checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "trainer_state.json").exists(), "training finished before it could be killed"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    got = {row["step"]: row["loss"] for row in history if "loss" in row}
    expected = losses(straight)
    assert sorted(got) == sorted(expected)
    assert all(got[step] == expected[step] for step in expected), "resumed losses differ"
