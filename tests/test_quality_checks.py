"""Mistakes in the quality-filter options of prepare_pretrain.py (lmtrain/data/quality.py, its flags in
lmtrain/arguments.py, per-source options in lmtrain/data/sources.py): each is one `error:` message naming the
flag, file or source, found before any document is read, never a traceback or a filter that silently does
nothing. The models are tiny random ones saved here; nothing comes from the hub."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data import pipeline
from lmtrain.data.quality import check_reference_model, load_reference_model
from lmtrain.locations import looks_local
from lmtrain.data.sources import DataError, SourceSpec
from lmtrain.errors import UserError

TEXT = "The committee met on Tuesday to discuss the new library and the timetable of the trains. "


def _bert_config(tokenizer):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """name -> directory: a usable tiny Qwen2 with its tokenizer, and the mistakes a user makes."""
    import torch
    from transformers import AutoModelForCausalLM, BertForMaskedLM, BertModel, Qwen2Config

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("reference_models")
    dirs = {name: root / name for name in ("good", "empty", "tokenizer_only", "no_tokenizer", "config_only", "bert",
                                           "bert_mlm", "bert_as_causal")}
    for path in dirs.values():
        path.mkdir()
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    qwen = AutoModelForCausalLM.from_config(config)
    qwen.save_pretrained(dirs["good"])
    tiny_tokenizer.save_pretrained(dirs["good"])
    qwen.save_pretrained(dirs["no_tokenizer"])
    config.save_pretrained(dirs["config_only"])
    tiny_tokenizer.save_pretrained(dirs["config_only"])
    tiny_tokenizer.save_pretrained(dirs["tokenizer_only"])
    for name, model in (("bert", BertModel(_bert_config(tiny_tokenizer))),
                        ("bert_mlm", BertForMaskedLM(_bert_config(tiny_tokenizer))),
                        ("bert_as_causal", BertModel(_bert_config(tiny_tokenizer)))):
        model.save_pretrained(dirs[name])
        tiny_tokenizer.save_pretrained(dirs[name])
    # A BertModel checkpoint whose config claims the causal head: the architecture check passes, and loading
    # finds the head's weights missing (transformers would initialise them at random).
    config_file = dirs["bert_as_causal"] / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "architectures": ["BertLMHeadModel"], "is_decoder": True}))
    return dirs


@pytest.mark.parametrize("name, message", [
    ("empty", r"empty: the directory holds nothing \(no config.json\)"),
    ("tokenizer_only", r"tokenizer_only: the directory holds a tokenizer but no model \(no config.json\)"),
    ("no_tokenizer", r"no_tokenizer: its tokenizer turns text into no tokens"),
    ("config_only", r"config_only: the directory holds a config.json but no weights \(model.safetensors\)"),
    ("bert", r"bert: config.json's architectures is BertModel, not a causal LM"),
    ("bert_mlm", r"bert_mlm: config.json's architectures is BertForMaskedLM, not a causal LM"),
])
def test_unusable_reference_model_directories_are_one_message(model_dirs, name, message):
    with pytest.raises(DataError, match=message) as error:
        check_reference_model(str(model_dirs[name]))
    assert str(error.value).startswith("--perplexity_model ")
    with pytest.raises(DataError, match=message):
        load_reference_model(str(model_dirs[name]))


def test_a_checkpoint_missing_weights_of_the_model_is_refused(model_dirs):
    check_reference_model(str(model_dirs["bert_as_causal"]))  # config and tokenizer are fine
    with pytest.raises(DataError, match=r"lacks weights of BertLMHeadModel \(cls\.predictions"):
        load_reference_model(str(model_dirs["bert_as_causal"]))
    model, tokenizer = load_reference_model(str(model_dirs["good"]))
    assert not model.training and len(tokenizer) <= model.config.vocab_size


def test_a_truncated_weights_file_is_one_message(model_dirs, tmp_path):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(model_dirs["good"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])   # an interrupted copy: safetensors' own error type
    with pytest.raises(DataError, match="its weights cannot be loaded"):
        load_reference_model(str(truncated))


def test_missing_paths_are_no_such_directory_and_hub_names_stay_names(tmp_path):
    for path in ("/does/not/exist", "./reference_lm", "~/models/lm", "outputs/runs/reference"):
        assert looks_local(path)
        with pytest.raises(DataError, match=f"^--perplexity_model: no such directory: {path}$"):
            check_reference_model(path)
    for name in ("gpt2", "Qwen/Qwen2.5-0.5B"):
        assert not looks_local(name)
    # A hub name is looked up on the hub (offline in the tests): it fails naming the flag, not as a path.
    with pytest.raises(DataError, match="--perplexity_model nobody/no-such-model: no such directory, and no hub"):
        check_reference_model("nobody/no-such-model")
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match="model.safetensors: not a directory"):
        check_reference_model(str(a_file))


@pytest.fixture
def no_reading(monkeypatch):
    """Make reading a source fail the test: the checks under test must come first."""
    def read_files(*args, **kwargs):
        raise AssertionError("a source was read before the options were checked")

    monkeypatch.setattr(pipeline, "read_files", read_files)


@pytest.mark.parametrize("options, message", [
    (dict(languages="english"), r"^--languages: english is not a language code"),
    (dict(sources="all={path}:languages=en+klingon"), r"^source all: languages: klingon is not a language code"),
    (dict(perplexity_model="{empty}", max_perplexity=100.0), r"^--perplexity_model .*empty: the directory holds"),
    (dict(perplexity_model="{bert}", max_perplexity=100.0), r"architectures is BertModel"),
    (dict(sources="all={path}:languages=none", min_language_confidence=0.9),
     r"^--min_language_confidence 0.9 applies only with a language filter"),
    (dict(sources="all={path}:min_language_confidence=0.9"),
     r"^source all: min_language_confidence=0.9 applies only with a language filter"),
    (dict(sources="all={path}:languages=fr", clean=False),
     r"^source all: languages is a cleaning step, and --clean false turns every cleaning step off"),
])
def test_quality_options_are_checked_before_any_document_is_read(model_dirs, write_jsonl, prepare_data, no_reading,
                                                                  options, message):
    path = write_jsonl([{"text": TEXT}] * 4)
    names = {"path": path, "empty": model_dirs["empty"], "bert": model_dirs["bert"]}
    options = {k: v.format(**names) if isinstance(v, str) else v for k, v in options.items()}
    sources = [options.pop("sources", path)]
    with pytest.raises(DataError, match=message):
        prepare_data(sources, **options)


def test_the_cache_line_says_whether_the_perplexity_scores_were_reused(model_dirs, write_jsonl, prepare_data,
                                                                       tmp_path):
    path = write_jsonl([{"text": f"{TEXT} Document {i}, which differs from the others."} for i in range(6)])
    options = dict(perplexity_model=str(model_dirs["good"]), max_perplexity=1e9, perplexity_max_tokens=16,
                   dedup_near=False, cache_dir=tmp_path / "cache")
    _, first = prepare_data([path], **options)
    _, second = prepare_data([path], **options)
    assert first.cache["perplexity"] == "computed" and second.cache["perplexity"] == "reused"
    assert "perplexity=reused" in second.summary().splitlines()[-1]
    assert second.perplexity["scored"] == 6 and "perplexity" not in prepare_data([path])[1].cache


TYPES = (ModelArguments, DataArguments, TrainArguments)
BASE = ["--output_dir", "unused-out", "--report_to", "none"]


@pytest.mark.parametrize("flags, message", [
    (["--perplexity_model", "m", "--max_perplexity", "100", "--perplexity_max_tokens", "0"],
     "--perplexity_max_tokens 0: must be at least 2"),
    (["--perplexity_model", "m", "--max_perplexity", "100", "--perplexity_max_tokens", "1"],
     "--perplexity_max_tokens 1: must be at least 2"),
    (["--perplexity_model", "m", "--max_perplexity", "nan"], "--max_perplexity nan: a finite number above 1"),
    (["--perplexity_model", "m", "--max_perplexity", "inf"], "--max_perplexity inf: a finite number above 1"),
    (["--perplexity_model", "m", "--max_perplexity", "1"], "--max_perplexity 1.0: a finite number above 1"),
    (["--min_language_confidence", "0.9"], "--min_language_confidence 0.9 applies only with a language filter"),
    (["--languages", "none", "--min_language_confidence", "0.9"], "applies only with a language filter"),
    (["--min_language_confidence", "nan"], "--min_language_confidence nan: a probability in [0, 1]"),
    (["--near_dup_threshold", "nan"], "--near_dup_threshold nan: a fraction in [0, 1]"),
    (["--max_duplicate_line_fraction", "1.5"], "--max_duplicate_line_fraction 1.5: a fraction in [0, 1]"),
    (["--z_loss_coefficient", "nan"], "--z_loss_coefficient nan: must be 0 (off) or more, and finite"),
    (["--z_loss_coefficient", "inf"], "--z_loss_coefficient inf: must be 0 (off) or more, and finite"),
    (["--z_loss_coefficient", "-1"], "--z_loss_coefficient -1.0: must be 0 (off) or more, and finite"),
    (["--label_smoothing_factor", "nan"], "--label_smoothing_factor nan: must be in [0, 1)"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (["--min_lr_ratio", "nan"], "--min_lr_ratio nan: a finite number, 0 or more"),
    (["--num_train_epochs", "inf"], "--num_train_epochs inf: must be positive and finite"),
    (["--peak_tflops", "nan"], "--peak_tflops nan: a finite number above 0"),
])
def test_bad_quality_and_loss_numbers_are_one_message(flags, message):
    with pytest.raises(UserError) as error:
        parse_arguments(TYPES, BASE + flags)
    assert message in str(error.value)


def test_a_language_confidence_with_a_language_filter_is_accepted():
    for flags in (["--languages", "en", "--min_language_confidence", "0.9"],
                  ["--sources", "web=in.jsonl:languages=en", "--min_language_confidence", "0.9"],
                  ["--perplexity_model", "m", "--max_perplexity", "100", "--perplexity_max_tokens", "2"]):
        _, data, _ = parse_arguments(TYPES, BASE + flags)
    assert data.perplexity_max_tokens == 2 and math.isfinite(data.max_perplexity)


def test_dpo_numbers_must_be_finite():
    from lmtrain.arguments import DPOTrainArguments, PreferenceDataArguments

    with pytest.raises(UserError, match="--beta nan: a finite number > 0"):
        parse_arguments((ModelArguments, PreferenceDataArguments, DPOTrainArguments), BASE + ["--beta", "nan"])


@pytest.mark.parametrize("spec, message", [
    ("web=in.jsonl:min_language_confidence=5", r"min_language_confidence=5: a probability in \[0, 1\]"),
    ("web=in.jsonl:min_language_confidence=nan", r"min_language_confidence=nan: a probability in \[0, 1\]"),
    ("web=in.jsonl:max_duplicate_line_fraction=-1", r"max_duplicate_line_fraction=-1: a fraction in \[0, 1\]"),
    ("web=in.jsonl:languages=en,zh", r"join several languages with '\+': languages=en\+zh$"),
    ("web=in.jsonl@0.5:strip_html=false,languages=en,zh,ja,min_chars=3", r"languages=en\+zh\+ja$"),
    ("web=in.jsonl:strip_html=false,oops", r"per-source option 'oops' is not key=value"),
])
def test_per_source_quality_options_are_checked_like_the_flags(spec, message):
    with pytest.raises(DataError, match=message) as error:
        SourceSpec.parse(spec)
    assert str(error.value).startswith(f"source '{spec}': ")


def test_well_formed_source_specs_still_parse():
    assert SourceSpec.parse("web=in.jsonl:languages=en+zh,min_language_confidence=0.9").cleaning == {
        "languages": "en+zh", "min_language_confidence": 0.9}
    assert SourceSpec.parse("wiki=wikimedia/wikipedia:20231101.en@0.1").location == "wikimedia/wikipedia:20231101.en"
    assert SourceSpec.parse("odd=data/a:b=c,d.jsonl").location == "data/a:b=c,d.jsonl"  # not a per-source key


def test_the_sources_help_lists_every_per_source_key():
    from lmtrain.data.cleaning import PER_SOURCE_KEYS

    help_text = DataArguments.__dataclass_fields__["sources"].metadata["help"]
    assert all(key in help_text for key in PER_SOURCE_KEYS) and "languages=en+zh" in help_text


def test_the_command_prints_one_error_line(model_dirs, tiny_tokenizer_dir, write_jsonl, tmp_path, capsys):
    from lmtrain.cli.prepare import main
    from lmtrain.errors import run_entry_point

    path = write_jsonl([{"text": TEXT}] * 4)
    for model, expected in ((model_dirs["tokenizer_only"], "holds a tokenizer but no model"),
                            ("/does/not/exist", "no such directory: /does/not/exist")):
        argv = ["--tokenizer_name", str(tiny_tokenizer_dir), "--sources", path, "--output_dir", str(tmp_path / "out"),
                "--prepared_cache_dir", str(tmp_path / "cache"), "--perplexity_model", str(model),
                "--max_perplexity", "100"]
        with pytest.raises(SystemExit) as exit_code:
            run_entry_point(main, argv)
        err = capsys.readouterr().err
        assert exit_code.value.code == 2 and "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0] and "--perplexity_model" in errors[0]
    assert not (tmp_path / "out").exists()
    assert np.all([not p.name.startswith("perplexity-") for p in (tmp_path / "cache").glob("*")])
