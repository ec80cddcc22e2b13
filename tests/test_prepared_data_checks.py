"""Prepared data checked against the run before training: the tokenizer it was made with (issue 9.1), its
block size against --block_size and the model's positions (9.10), and one rule for empty input files
whether they are a source of their own or one file of a directory source (9.17)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain
from lmtrain.arguments import DataArguments
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.data.loading import load_training_data
from lmtrain.data.sources import DataError
from lmtrain.tokenizer import load_tokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def load_script(name: str):
    from conftest import load_repo_script

    return load_repo_script(f"data_prep/{name}.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two tokenizers of the same size trained on different halves of the corpus, and data/mix prepared
    (64-token blocks) with the first."""
    root = tmp_path_factory.mktemp("checks")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:160]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines[:80]) + "\n", encoding="utf-8")
    texts = [json.loads(line)["text"] for line in lines]
    for name, part in (("tok_a", texts[:80]), ("tok_b", texts[80:])):
        train_bpe_tokenizer(part, vocab_size=512, show_progress=False).save_pretrained(root / name)
    load_script("prepare_pretrain").main([
        "--tokenizer_name", str(root / "tok_a"), "--sources", str(corpus), "--block_size", "64",
        "--validation_split_percentage", "5", "--output_dir", str(root / "mix"),
        "--prepared_cache_dir", str(root / "cache")])
    return root


def run_args(root: Path, output_dir: Path, *extra: str, tokenizer: str = "tok_a") -> list[str]:
    return ["--tokenizer_name", str(root / tokenizer), "--config_name", "qwen2-tiny", "--config_overrides", TINY,
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--output_dir", str(output_dir), *extra]


def load_prepared_data(path: Path, tokenizer, **data_args):
    """load_training_data as pretrain.py calls it (prepared data needs no training arguments)."""
    return load_training_data("pretrain", DataArguments(dataset_path=str(path), **data_args), tokenizer, None, 4096)


# ------------------------------------------------------------------------------------------ 9.1 tokenizer

def test_data_prepared_with_another_tokenizer_of_the_same_size_is_refused(prepared, tmp_path):
    import datasets

    tok_a, tok_b = load_tokenizer(str(prepared / "tok_a")), load_tokenizer(str(prepared / "tok_b"))
    assert len(tok_a) == len(tok_b)  # the case the old id-range check could not see
    train = datasets.load_from_disk(str(prepared / "mix"))["train"]
    assert max(max(row) for row in train["input_ids"]) < len(tok_b)
    sample = "ROMEO. But soft, what light through yonder window breaks?"
    assert tok_a(sample)["input_ids"] != tok_b(sample)["input_ids"]  # the same ids mean other text

    with pytest.raises(DataError) as error:
        pretrain.main(run_args(prepared, tmp_path / "b", "--dataset_path", str(prepared / "mix"), tokenizer="tok_b"))
    message = str(error.value)
    assert "prepared with another tokenizer" in message
    assert str(prepared / "tok_a") in message and str(prepared / "tok_b") in message
    assert "--tokenizer_name" in message and "prepare_pretrain.py" in message
    assert not (tmp_path / "b" / "model.safetensors").exists()

    trainer, _ = pretrain.main(run_args(prepared, tmp_path / "a", "--dataset_path", str(prepared / "mix")))
    assert trainer.state.global_step == 1
    # The copy saved in the prepared directory is the same tokenizer: accepted too.
    trainer, _ = pretrain.main(run_args(prepared, tmp_path / "copy", "--dataset_path", str(prepared / "mix"),
                                        tokenizer="mix/tokenizer"))
    assert trainer.state.global_step == 1


def test_same_vocabulary_with_another_normalizer_is_refused(prepared, tmp_path):
    """Same vocabulary, another normalizer: every id is in range and means a known token, but the text was
    turned into tokens another way."""
    changed = tmp_path / "tok_lowercase"
    shutil.copytree(prepared / "tok_a", changed)
    spec = json.loads((changed / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Lowercase"}
    (changed / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    a, b = load_tokenizer(str(prepared / "tok_a")), load_tokenizer(str(changed))
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(DataError, match="probe text encodes to other ids"):
        load_prepared_data(prepared / "mix", b)
    assert len(load_prepared_data(prepared / "mix", a).train) > 0


def test_older_prepared_directories(prepared, tmp_path, caplog):
    """No fingerprint in report.json: the tokenizer/ copy is compared; with no copy either, one warning.
    (The in-process parts first: pretrain.main reconfigures logging, which unhooks caplog.)"""
    old = tmp_path / "old_mix"
    shutil.copytree(prepared / "mix", old)
    report = json.loads((old / "report.json").read_text())
    del report["tokenizer"]
    (old / "report.json").write_text(json.dumps(report))
    bare = tmp_path / "bare_mix"
    shutil.copytree(old, bare)
    shutil.rmtree(bare / "tokenizer")
    tokenizer = load_tokenizer(str(prepared / "tok_b"))
    with caplog.at_level(logging.WARNING, logger="lmtrain.data.loading"):
        for _ in range(2):
            assert len(load_prepared_data(bare, tokenizer).train) > 0
    assert sum("records no tokenizer" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        load_prepared_data(old, tokenizer)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        pretrain.main(run_args(prepared, tmp_path / "b", "--dataset_path", str(old), tokenizer="tok_b"))


def test_refusal_is_one_message_from_the_script(prepared, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LMTRAIN_DEBUG", None)
    result = subprocess.run([sys.executable, str(REPO / "pretrain.py"),
                             *run_args(prepared, tmp_path / "b", "--dataset_path", str(prepared / "mix"),
                                       tokenizer="tok_b")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "prepared with another tokenizer" in errors[0]


# ----------------------------------------------------------------------------------- 9.10 block sizes

def test_block_size_that_disagrees_with_prepared_blocks_is_refused(prepared, tmp_path, caplog):
    # Left at its default: the prepared size is used, and the log says so.
    with caplog.at_level(logging.INFO, logger="lmtrain.data.loading"):
        data = load_prepared_data(prepared / "mix", load_tokenizer(str(prepared / "tok_a")))
    assert any("prepared blocks of 64 tokens" in r.getMessage() for r in caplog.records)
    assert data.tokens_per_row == 64 and len(data.train[0]["input_ids"]) == 64
    # Set to another size: refused, naming both.
    with pytest.raises(DataError) as error:
        pretrain.main(run_args(prepared, tmp_path / "x", "--dataset_path", str(prepared / "mix"), "--block_size", "32"))
    assert "--block_size 32" in str(error.value) and "64 tokens" in str(error.value)


def test_blocks_longer_than_the_model_positions_are_refused(prepared, tmp_path):
    with pytest.raises(DataError) as error:
        pretrain.main(run_args(prepared, tmp_path / "x", "--dataset_path", str(prepared / "mix"),
                               "--config_overrides", TINY + ",max_position_embeddings=32"))
    assert "64 tokens" in str(error.value) and "max_position_embeddings=32" in str(error.value)

    # Raw files: refused before any data is prepared (qwen2-tiny has 4096 positions).
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        pretrain.main(run_args(prepared, tmp_path / "z", "--train_files", str(prepared / "plays.jsonl"),
                               "--block_size", "8192", "--prepared_cache_dir", str(cache)))
    assert "8192" in str(error.value) and "max_position_embeddings=4096" in str(error.value)
    assert not cache.exists()


# ---------------------------------------------------------------------------------- 9.17 empty files

GOOD = [f"Document number {i} talks about apples, rivers and the {i}th mountain in detail." for i in range(12)]


def test_an_empty_file_is_skipped_whether_it_is_a_source_or_in_a_directory(write_jsonl, prepare_data, tmp_path):
    good = write_jsonl(({"text": t} for t in GOOD), name="pt/bad.jsonl")
    with open(good, "a", encoding="utf-8") as handle:
        handle.write("{broken json\n")
    (tmp_path / "pt" / "empty.jsonl").write_bytes(b"")

    _, as_sources = prepare_data([good, tmp_path / "pt" / "empty.jsonl"])
    _, as_directory = prepare_data([tmp_path / "pt"])
    for report in (as_sources, as_directory):
        assert report.dropped == {"empty_file": 1, "malformed_json": 1}
        assert report.documents_kept["train"] == len(GOOD)
    assert as_sources.tokens == as_directory.tokens
    assert as_sources.sources["empty"]["skipped"] == "every file is empty"
    assert as_sources.sources["bad"]["target_share"] == 1.0


def test_an_empty_source_gives_its_weight_to_the_others(write_jsonl, prepare_data, tmp_path):
    a = write_jsonl(({"text": t} for t in GOOD[:6]), name="a.jsonl")
    b = write_jsonl(({"text": t} for t in GOOD[6:]), name="b.jsonl")
    (tmp_path / "e.jsonl").write_bytes(b"")
    _, report = prepare_data([f"a={a}@1", f"e={tmp_path / 'e.jsonl'}@2", f"b={b}@1"], mixture_tokens=2000)
    assert report.sources["a"]["target_share"] == report.sources["b"]["target_share"] == 0.5
    assert report.sources["e"]["train_tokens"] == 0
    assert "source e: skipped" in report.summary()


def test_all_sources_empty_is_an_error(prepare_data, tmp_path):
    for name in ("x.jsonl", "y.jsonl"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match="every input file is empty"):
        prepare_data([tmp_path / "x.jsonl", tmp_path / "y.jsonl"])
