"""Bad configurations stop before any heavy work (issue 12.6): the model is not built and no data is read
when the row length exceeds the model's positions, --fp16 has no GPU, --bf16 has a GPU without bf16, a
DeepSpeed config disagrees with the flags or cannot work, the output directory cannot be written, or the disk
has no room for one checkpoint (estimated from the parameter count)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lmtrain.cli.pretrain as pretrain_cli
import lmtrain.cli.sft as sft_cli
from lmtrain.errors import UserError
from lmtrain.training import preflight

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Building the model or reading data is the heavy work these checks must come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the configuration was checked")
    for module in (pretrain_cli, sft_cli):
        monkeypatch.setattr(module, "build_model", forbidden)
        monkeypatch.setattr(module, "load_training_data", forbidden)
        monkeypatch.setattr(module, "load_tokenizer", forbidden)


def pretrain_args(tmp_path, *extra):
    return ["--config_name", "qwen2-tiny", "--config_overrides", TINY + ",max_position_embeddings=128",
            "--train_files", str(tmp_path / "missing.jsonl"), "--block_size", "64", "--report_to", "none",
            "--max_steps", "2", "--output_dir", str(tmp_path / "out"), *extra]


def test_row_length_above_the_model_positions_is_refused_before_the_model_is_built(tmp_path, no_heavy_work):
    with pytest.raises(UserError, match="--block_size: the training blocks are 256 tokens long but the model has "
                                        "max_position_embeddings=128.*--block_size 128 or less"):
        pretrain_cli.main(pretrain_args(tmp_path, "--block_size", "256"))
    sft = ["--config_name", "qwen2-tiny", "--config_overrides", TINY + ",max_position_embeddings=128",
           "--train_files", str(tmp_path / "missing.jsonl"), "--max_length", "512", "--report_to", "none",
           "--output_dir", str(tmp_path / "sft")]
    with pytest.raises(UserError, match="--max_length: the training sequences are 512 tokens long .*=128.*--max_length 128"):
        sft_cli.main(sft)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_fp16_without_a_gpu_is_one_message_before_any_work(tmp_path, no_heavy_work):
    with pytest.raises(UserError, match="--fp16 needs a CUDA GPU .* pass --bf16"):
        pretrain_cli.main(pretrain_args(tmp_path, "--fp16"))


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    with pytest.raises(UserError, match=r"--bf16: the GPU Tesla V100-SXM2-32GB \(compute capability 7.0\).*--fp16"):
        preflight.check_precision(SimpleNamespace(fp16=False, bf16=True, use_cpu=False))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    preflight.check_precision(SimpleNamespace(fp16=False, bf16=True, use_cpu=False))  # Ampere: fine


def test_deepspeed_batch_numbers_that_disagree_with_the_flags_are_one_message(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    (tmp_path / "ds.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                                                             "WORLD_SIZE")}
    command = pretrain_args(tmp_path, "--deepspeed", str(tmp_path / "ds.json"), "--per_device_train_batch_size", "4")
    run = subprocess.run([sys.executable, "pretrain.py", *command],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, run.stderr[-3000:]
    assert "train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=4" in error[0], error[0]
    assert "gradient_accumulation_steps=2 vs hf gradient_accumulation_steps=1" in error[0]
    assert "\"auto\"" in error[0] and "missing.jsonl" not in run.stderr  # refused before the data was looked at


def deepspeed_args(config: dict, **flags):
    values = {"deepspeed": "ds.json", "save_only_model": False, "load_best_model_at_end": False, "world_size": 1,
              **flags}
    return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config, mismatches=[]), **values)


def test_deepspeed_options_that_cannot_work_are_refused():
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(UserError, match="offload_optimizer .* no \"optimizer\" section"):
        preflight.check_deepspeed(deepspeed_args(offload))
    preflight.check_deepspeed(deepspeed_args({**offload, "optimizer": {"type": "AdamW"}}))  # DeepSpeed's CPU Adam
    preflight.check_deepspeed(deepspeed_args({**offload, "zero_force_ds_cpu_optimizer": False}))
    with pytest.raises(UserError, match="offload_param needs ZeRO stage 3 .*stage 2"):
        preflight.check_deepspeed(deepspeed_args({"zero_optimization": {"stage": 2,
                                                                        "offload_param": {"device": "cpu"}}}))
    with pytest.raises(UserError, match="--save_only_model with --load_best_model_at_end"):
        preflight.check_deepspeed(deepspeed_args({"zero_optimization": {"stage": 3}}, save_only_model=True,
                                                 load_best_model_at_end=True))
    preflight.check_deepspeed(deepspeed_args({"zero_optimization": {"stage": 3}}))


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, no_heavy_work):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="--output_dir .*a_file/run cannot be written"):
        pretrain_cli.main(pretrain_args(tmp_path, "--output_dir", str(tmp_path / "a_file" / "run")))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot be written"):
            pretrain_cli.main(pretrain_args(tmp_path, "--output_dir", str(locked)))


def test_checkpoint_size_estimate_and_the_disk_space_check(tmp_path, monkeypatch, no_heavy_work):
    from transformers import AutoModelForCausalLM

    from lmtrain.arguments import TrainArguments
    from lmtrain.model.config import resolve_config

    config = resolve_config("qwen2-tiny", TINY)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    args = TrainArguments(output_dir=str(tmp_path), report_to="none")
    # fp32 weights and AdamW's two fp32 moments
    assert preflight.checkpoint_bytes(args, preflight.count_parameters_of(config)) == 12 * parameters
    needed = 12 * parameters
    usage = SimpleNamespace(total=10**12, used=0, free=needed - 1)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(UserError, match="free on its disk and one checkpoint needs about .* Free space"):
        pretrain_cli.main(pretrain_args(tmp_path))
    usage.free = needed + needed // 2
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("lmtrain").addHandler(handler)  # main() reset the root logger's handlers (caplog's too)
    try:
        preflight.check_disk_space(args, config)
    finally:
        logging.getLogger("lmtrain").removeHandler(handler)
    assert any("room for one checkpoint only" in line for line in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of --bf16 applies only without a GPU")
def test_bf16_without_a_gpu_trains_in_bf16_on_the_cpu(tmp_path):
    """transformers refuses --bf16 without a GPU unless use_cpu is set; the --fp16 refusal recommends
    --bf16, so --bf16 alone must work on a CPU."""
    from lmtrain.arguments import TrainArguments

    args = TrainArguments(output_dir=str(tmp_path), bf16=True)
    assert args.bf16 and args.use_cpu


@pytest.mark.parametrize("text, reason", [('{"hidden_size": 3', "not a valid JSON"),
                                          ('{"hidden_size": 32}', "model_type")])
def test_unreadable_config_file_is_one_user_error(tmp_path, text, reason):
    from lmtrain.errors import UserError
    from lmtrain.model.config import resolve_config

    path = tmp_path / "model.json"
    path.write_text(text)
    with pytest.raises(UserError, match=f"--config_name {path}: not a model config.*{reason}"):
        resolve_config(str(path))


def test_logging_dir_is_set_per_run_not_once_per_process(tmp_path):
    from lmtrain.arguments import TrainArguments

    TrainArguments(output_dir=str(tmp_path / "a"), report_to="none", logging_dir=str(tmp_path / "a-logs"))
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "a-logs")
    TrainArguments(output_dir=str(tmp_path / "b"), report_to="none", logging_dir=str(tmp_path / "b-logs"))
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "b-logs")  # not the first run's
    TrainArguments(output_dir=str(tmp_path / "c"), report_to="none")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # the default (OUTPUT_DIR/runs) again


def test_disk_check_without_checkpoints_needs_room_for_the_final_model_only(tmp_path, monkeypatch):
    """--save_strategy no saves no optimizer state (only the final weights, or a SIGTERM checkpoint): a disk
    with room for the weights but not for a checkpoint trains, with a warning; one without room for the
    weights is refused."""
    from transformers import AutoModelForCausalLM

    from lmtrain.arguments import TrainArguments
    from lmtrain.model.config import resolve_config

    config = resolve_config("qwen2-tiny", TINY)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no")
    usage = SimpleNamespace(total=10**12, used=0, free=4 * parameters + 1)  # fp32 weights fit, a checkpoint not
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("lmtrain").addHandler(handler)
    try:
        preflight.check_disk_space(args, config)
    finally:
        logging.getLogger("lmtrain").removeHandler(handler)
    assert any("not for the checkpoint a SIGTERM would save" in line for line in records)
    usage.free = 4 * parameters - 1
    with pytest.raises(UserError, match="the final model needs about"):
        preflight.check_disk_space(args, config)
