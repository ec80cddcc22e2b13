"""Seams between the parts (issue 11.5): training from a prepared --dataset_path, the token-range check of
prepared data, legacy flags mapped to their current names, padding-free batches, and the FLOPs-per-token
and MFU figures against a hand count."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

import pretrain
from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.loading import load_training_data
from lmtrain.data.sources import DataError
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
PRETRAIN = [ModelArguments, DataArguments, TrainArguments]


def pretrain_args(tokenizer_dir, output_dir, *extra) -> list[str]:
    return ["--tokenizer_name", str(tokenizer_dir), "--config_name", "qwen2-tiny", "--config_overrides", TINY,
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--report_to", "none", "--plot_curves",
            "false", "--dataloader_num_workers", "0", "--output_dir", str(output_dir), *extra]


# ------------------------------------------------------------------------------ training from --dataset_path

def test_pretraining_from_a_prepared_dataset_path_trains_on_exactly_its_blocks(tiny_tokenizer_dir, demo_corpus_path,
                                                                               tmp_path):
    from lmtrain.cli.prepare import main as prepare_main

    prepared = tmp_path / "prepared"
    prepare_main(["--tokenizer_name", str(tiny_tokenizer_dir), "--sources", str(demo_corpus_path), "--block_size", "32",
                  "--mixture_tokens", "4000", "--validation_split_percentage", "2", "--output_dir", str(prepared),
                  "--prepared_cache_dir", str(tmp_path / "cache")])
    on_disk = datasets.load_from_disk(str(prepared))
    trainer, metrics = pretrain.main(pretrain_args(tiny_tokenizer_dir, tmp_path / "run", "--dataset_path", str(prepared),
                                                   "--eval_strategy", "steps", "--eval_steps", "2"))
    # The trainer's datasets are the directory's splits, rows and ids unchanged (memory-mapped, not re-prepared).
    assert trainer.train_dataset["input_ids"] == on_disk["train"]["input_ids"]
    assert trainer.eval_dataset["input_ids"] == on_disk["validation"]["input_ids"]
    assert trainer.train_dataset.cache_files and all(str(prepared) in f["filename"]
                                                     for f in trainer.train_dataset.cache_files)
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    report = json.loads((prepared / "report.json").read_text())
    assert json.loads((tmp_path / "run" / "data_report.json").read_text()) == report
    # bits per byte of the evaluated blocks: their stored bytes, not another split's average
    assert metrics["eval_bytes_per_token"] == pytest.approx(
        sum(on_disk["validation"]["num_bytes"]) / sum(sum(1 for t in row if t != -100)
                                                      for row in on_disk["validation"]["labels"]))


# ------------------------------------------------------------------------------------------- token-range check

def _bare_directory(path: Path, ids: list[list[int]]) -> Path:
    """Blocks written by hand, without report.json or a tokenizer copy (so only the id range can catch them)."""
    rows = {"input_ids": ids, "labels": ids, "position_ids": [list(range(len(row))) for row in ids]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


def test_prepared_ids_past_the_tokenizer_are_refused_with_both_numbers(tiny_tokenizer, tmp_path):
    vocabulary = len(tiny_tokenizer)
    good = _bare_directory(tmp_path / "good", [[5] * 16, [vocabulary - 1] * 16])
    data = load_training_data("pretrain", DataArguments(dataset_path=str(good)), tiny_tokenizer, None, 4096)
    assert len(data.train) == 2 and data.tokens_per_row == 16  # the highest valid id passes
    bad = _bare_directory(tmp_path / "bad", [[5] * 16, [5] * 15 + [vocabulary]])
    with pytest.raises(DataError, match=rf"token id {vocabulary} but the tokenizer has {vocabulary} tokens"):
        load_training_data("pretrain", DataArguments(dataset_path=str(bad)), tiny_tokenizer, None, 4096)


def test_token_range_error_is_one_message_from_the_script(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    bad = _bare_directory(tmp_path / "bad", [[len(tiny_tokenizer) + 7] * 16] * 2)
    run = subprocess.run([sys.executable, str(REPO / "pretrain.py"),
                          *pretrain_args(tiny_tokenizer_dir, tmp_path / "run", "--dataset_path", str(bad))],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert f"error: the data holds token id {len(tiny_tokenizer) + 7}" in run.stderr


# ------------------------------------------------------------------------------------------------ legacy flags

def test_legacy_flags_set_the_fields_of_their_new_names(tmp_path):
    model, data, training = parse_arguments(PRETRAIN, [
        "--evaluation_strategy", "steps", "--eval_steps", "7", "--per_gpu_train_batch_size", "3",
        "--per_gpu_eval_batch_size", "5", "--no_cuda", "--keep_linebreaks", "true", "--block_size", "77",
        "--use_fast_tokenizer", "false", "--save_safetensors", "--report_to", "tensorboard",
        "--output_dir", str(tmp_path)])
    assert training.eval_strategy == "steps" and training.eval_steps == 7
    assert training.per_device_train_batch_size == 3 and training.per_device_eval_batch_size == 5
    assert training.use_cpu is True
    # An ignored legacy flag takes its value with it, and only its value: the next flag still applies.
    assert data.block_size == 77
    assert training.report_to == ["tensorboard"]  # after a value-less ignored flag
    # the defaults, for contrast: none of these fields is at its default by accident
    _, _, default = parse_arguments(PRETRAIN, ["--output_dir", str(tmp_path)])
    assert (default.eval_strategy, default.per_device_train_batch_size, default.use_cpu) == ("no", 8, False)


def test_legacy_flags_with_equals_and_in_a_config_file(tmp_path):
    _, _, training = parse_arguments(PRETRAIN, ["--evaluation_strategy=epoch", "--per_gpu_train_batch_size=4",
                                                "--output_dir", str(tmp_path)])
    assert training.eval_strategy == "epoch" and training.per_device_train_batch_size == 4
    config = tmp_path / "legacy.yaml"
    config.write_text("evaluation_strategy: steps\neval_steps: 3\nper_gpu_train_batch_size: 6\nno_cuda: true\n"
                      "keep_linebreaks: true\n", encoding="utf-8")
    _, _, training = parse_arguments(PRETRAIN, [str(config), "--output_dir", str(tmp_path)])
    assert training.eval_strategy == "steps" and training.eval_steps == 3
    assert training.per_device_train_batch_size == 6 and training.use_cpu is True


# ------------------------------------------------------------------------------------------------ padding_free

def _samples(tokenizer, texts):
    """SFT rows as the SFT pipeline makes them: the first label never trained (nothing predicts it)."""
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        labels = [-100] + ids[1:]
        rows.append({"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))})
    return rows


def test_padding_free_batch_is_one_row_with_restarting_positions_and_the_padded_loss(tiny_tokenizer):
    from lmtrain.data.collators import PadToLongestCollator
    from lmtrain.model.building import build_model

    rows = _samples(tiny_tokenizer, ["ROMEO. But soft, what light", "JULIET. Ay me!",
                                     "KING. Now, lords, for France; the enterprise whereof shall be to your honours"])
    lengths = [len(row["input_ids"]) for row in rows]
    assert len(set(lengths)) == 3  # different lengths: padding has something to do
    pad_id = tiny_tokenizer.pad_token_id
    free = PadToLongestCollator(pad_id, padding_free=True)(rows)
    padded = PadToLongestCollator(pad_id)(rows)
    assert free["input_ids"].shape == (1, sum(lengths))
    assert free["input_ids"][0].tolist() == [t for row in rows for t in row["input_ids"]]
    assert free["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert (free["input_ids"] == pad_id).sum() == 0 and padded["input_ids"].shape == (3, max(lengths))

    # The model as training builds it: its settings (no KV cache) are what let position_ids keep samples apart.
    torch.manual_seed(0)
    model = build_model(ModelArguments(config_name="qwen2-tiny", config_overrides=TINY), tiny_tokenizer).eval()
    with torch.no_grad():
        loss_free = model(**free).loss
        loss_padded = model(**padded).loss
        # Independent reference: each sample alone, its token losses summed, over all trained tokens.
        total, count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            count += int((targets != -100).sum())
    assert loss_free.item() == pytest.approx(total.item() / count, rel=1e-4)
    assert loss_padded.item() == pytest.approx(total.item() / count, rel=1e-4)


# ------------------------------------------------------------------------------------- FLOPs per token and MFU

def hand_count_parameters(h: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int, tied: bool) -> int:
    """Qwen2 from its shapes: q/k/v projections with biases, o without; SwiGLU MLP (gate, up, down); two
    RMSNorms per layer and a final one; embeddings, and an output head unless tied to them."""
    head_dim = h // heads
    attention = (h * h + h) + 2 * (h * kv_heads * head_dim + kv_heads * head_dim) + h * h
    per_layer = attention + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h + (0 if tied else vocab * h)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_and_mfu_against_a_hand_count(tied, monkeypatch):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    import lmtrain.training.callbacks as callbacks
    from lmtrain.model.config import resolve_config
    from lmtrain.model.flops import count_parameters, flops_per_token
    from lmtrain.training.callbacks import ThroughputCallback

    h, layers, heads, kv, inter, vocab = 32, 2, 4, 2, 48, 256
    config = resolve_config("qwen2-tiny", f"hidden_size={h},num_hidden_layers={layers},num_attention_heads={heads},"
                                          f"num_key_value_heads={kv},intermediate_size={inter},vocab_size={vocab},"
                                          f"tie_word_embeddings={str(tied).lower()}")
    model = AutoModelForCausalLM.from_config(config)
    parameters = hand_count_parameters(h, layers, heads, kv, inter, vocab, tied)
    assert count_parameters(model) == parameters
    assert parameters == (23_840 if tied else 32_032)  # the hand count's own arithmetic, written out
    # PaLM: 6 N + 12 L H S
    assert flops_per_token(parameters, layers, h, 64) == 6 * parameters + 12 * layers * h * 64

    # One logging window: 2 steps of 0.5 s each, 900 real tokens in 4 rows of 256 positions (row length 256).
    now = [100.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    peak = 0.002  # TFLOP/s, so that the figure is far from 0 and 1
    callback = ThroughputCallback(model, peak_tflops=peak)
    for tokens in (400, 500):
        callback.add_batches(tokens, positions=512, rows=2, load_seconds=0.0)
        callback.on_step_begin(None, None, None)
        now[0] += 0.5
        callback.on_step_end(None, None, None)
    figures = callback.metrics(None)
    tokens_per_second = 900 / 1.0
    expected = tokens_per_second * (6 * parameters + 12 * layers * h * 256) / (peak * 1e12)
    assert figures["tokens_per_second_per_device"] == pytest.approx(tokens_per_second)
    assert figures["step_seconds"] == pytest.approx(0.5)
    assert figures["mfu"] == pytest.approx(expected, abs=1e-4) and 0.05 < expected < 1


# ------------------------------------------------------------------------------------------- the lmtrain command

def test_lmtrain_command_lists_every_command_and_runs_the_scripts_code(tmp_path, capsys):
    import importlib

    from lmtrain.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name, (module, script, _) in COMMANDS.items():
        assert f"  {name} " in listed and script in listed
        # the top-level script it stands for; a tool without one is listed as "-m lmtrain.cli.<module>"
        assert (REPO / script).is_file() or script == f"-m lmtrain.cli.{module}"
        assert callable(importlib.import_module(f"lmtrain.cli.{module}").main)
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]}))
    assert main(["plot", str(state), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert main(["pretrian"]) == 2 and "did you mean pretrain?" in capsys.readouterr().err


def test_console_script_and_scripts_from_another_directory(tmp_path):
    command = Path(sys.executable).parent / "lmtrain"
    if not command.exists():
        pytest.skip("the lmtrain console script is not installed (pip install -r requirements.txt installs it)")
    listed = subprocess.run([str(command), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert listed.returncode == 0 and "prepare-sft" in listed.stdout
    # A data_prep script: its directory, not the repository, is on sys.path (pretrain.py from another
    # directory: test_token_range_error_is_one_message_from_the_script).
    run = subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare_pretrain.py"), "--help"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and "--output_dir" in run.stdout, run.stderr[-2000:]
