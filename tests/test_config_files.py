"""Config files (YAML/JSON) for pretrain.py and sft.py: YAML types, precedence, errors naming the file, and
the resolved OUTPUT_DIR/lmtrain_config.json read back as a config that repeats the run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import pretrain
import sft
from lmtrain.arguments import (DataArguments, LoraArguments, ModelArguments, SFTDataArguments, SFTTrainArguments,
                               TrainArguments)
from lmtrain.cli.parsing import parse_arguments, save_resolved_config
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.errors import UserError
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = [ModelArguments, DataArguments, TrainArguments]
SFT = [ModelArguments, SFTDataArguments, LoraArguments, SFTTrainArguments]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def resolved(groups) -> dict:
    return {type(g).__name__: json.loads(g.to_json_string()) if hasattr(g, "to_json_string") else asdict(g)
            for g in groups}


def test_yaml_null_booleans_lists_and_numbers_keep_their_meaning(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_train_samples: null\nsave_total_limit: null\nplot_curves: false\nlenient: no\n"
                      "drop_remainder: true\nsources: [a=x.jsonl@2, b=y.jsonl]\nlearning_rate: 3e-4\n"
                      "max_steps: 7\nlogging_steps: 5\nsample_prompts: ROMEO.\nreport_to: [none]\n")
    model, data, training = parse_arguments(PRETRAIN, [str(config)])
    assert data.max_train_samples is None and training.save_total_limit is None
    assert training.plot_curves is False and data.lenient is False and data.drop_remainder is True
    assert data.sources == ["a=x.jsonl@2", "b=y.jsonl"] and training.sample_prompts == ["ROMEO."]
    assert training.learning_rate == 3e-4 and training.max_steps == 7  # "3e-4" is a string to YAML 1.1
    # A flag beats the file, also when it sets a value the file nulled.
    _, data, training = parse_arguments(PRETRAIN, ["--config", str(config), "--max_train_samples", "9",
                                                   "--plot_curves", "true"])
    assert data.max_train_samples == 9 and training.plot_curves is True


def test_resolved_config_read_back_gives_the_same_options_for_both_stages(tmp_path):
    for classes, argv, groups in (
            (PRETRAIN, ["--config_name", "qwen2-tiny", "--sources", "shakespeare", "--max_steps", "5",
                        "--eval_strategy", "steps", "--eval_steps", "5", "--early_stopping_patience", "2",
                        "--report_to", "tensorboard", "--max_train_samples", "3", "--output_dir", str(tmp_path / "p")],
             ("model", "data", "training")),
            (SFT, ["--model_name_or_path", "somewhere", "--use_lora", "--lora_target_modules", "q_proj", "v_proj",
                   "--packing", "false", "--output_dir", str(tmp_path / "s")], ("model", "data", "lora", "training"))):
        first = parse_arguments(classes, argv)
        path = save_resolved_config(str(tmp_path / groups[0] / str(len(groups))), **dict(zip(groups, first)))
        again = parse_arguments(classes, [path])
        assert resolved(again) == resolved(first)


def test_a_saved_config_repeats_the_run(tmp_path):
    root = tmp_path
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:60]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                        show_progress=False).save_pretrained(root / "tok")
    first_dir = root / "first"
    first, _ = pretrain.main(["--tokenizer_name", str(root / "tok"), "--train_files", str(corpus), "--block_size",
                              "64", "--config_overrides", TINY, "--prepared_cache_dir", str(root / "cache"),
                              "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1",
                              "--report_to", "none", "--seed", "3", "--max_train_samples", "40",
                              "--output_dir", str(first_dir)])
    saved = first_dir / "lmtrain_config.json"
    again, _ = pretrain.main([str(saved), "--output_dir", str(root / "again")])
    history = lambda t: [(r["step"], r["loss"]) for r in t.state.log_history if "loss" in r]  # noqa: E731
    assert history(again) == history(first)
    repeated = json.loads((root / "again" / "lmtrain_config.json").read_text())
    original = json.loads(saved.read_text())
    for config in (repeated, original):
        for key in ("output_dir", "run_name"):
            config["training"].pop(key)
    assert repeated == original
    # Into its own directory, the saved config names a finished run: nothing to do, exit 0.
    assert pretrain.main([str(saved)])[0] is None


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", r"bad\.yaml: expected a mapping of option names to values"),
    ("learning_rate: [1\n", r"bad\.yaml: not valid YAML .*line 1"),
    ("learning_rat: 0.1\nmax_steps: 3\n", r"bad\.yaml: unknown option\(s\): learning_rat \(did you mean learning_rate"),
    ("max_steps: many\n", r"max_steps"),
])
def test_config_file_errors_name_the_file(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_arguments(PRETRAIN, [str(config)])


def test_config_file_error_from_the_command_line_is_one_message(tmp_path):
    config = tmp_path / "typo.json"
    config.write_text('{"block_sise": 64}')
    run = subprocess.run([sys.executable, str(REPO / "sft.py"), str(config)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "typo.json: unknown option(s): block_sise" in run.stderr
    missing = subprocess.run([sys.executable, str(REPO / "pretrain.py"), str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "nope.yaml: cannot be read" in missing.stderr


def test_the_config_file_cited_by_the_docstring_exists_and_parses():
    import lmtrain.cli.pretrain
    import lmtrain.cli.sft

    cited = re.findall(r"(examples/\S+\.ya?ml)", lmtrain.cli.pretrain.__doc__ + (lmtrain.cli.sft.__doc__ or ""))
    assert cited
    for name in cited:
        model, data, training = parse_arguments(PRETRAIN, [str(REPO / name), "--max_steps", "50"])
        assert training.max_steps == 50 and model.config_name and data.source_specs


def test_resolved_config_records_machine_decided_options_as_given(tmp_path):
    """A config written on a CPU and replayed on a GPU machine must get the GPU's choices: -1 data-loader workers
    and Liger on are recorded as given, while this run uses 0 workers and no Liger."""
    argv = ["--config_name", "qwen2-tiny", "--sources", "shakespeare", "--use_cpu", "true",  # a CPU run anywhere
            "--output_dir", str(tmp_path / "p")]
    groups = parse_arguments(PRETRAIN, argv)
    training = groups[-1]
    assert training.dataloader_num_workers == 0 and training.use_liger_kernel is False
    path = save_resolved_config(str(tmp_path / "cfg"), **dict(zip(("model", "data", "training"), groups)))
    recorded = json.loads(open(path, encoding="utf-8").read())["training"]
    assert recorded["dataloader_num_workers"] == -1 and recorded["use_liger_kernel"] is True
    again = parse_arguments(PRETRAIN, [path])[-1]
    assert again.dataloader_num_workers == 0 and again.use_liger_kernel is False  # decided again, here
