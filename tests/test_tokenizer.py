"""The project's byte-level BPE tokenizer: exact round trips, what a saved directory holds, the ChatML
template and its assistant mask, and data_prep/train_tokenizer.py."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmtrain.tokenizer import (CHATML_TEMPLATE, END_OF_TEXT, IM_END, IM_START, PAD, end_of_turn_token_id,
                               load_tokenizer, train_bpe_tokenizer)

REPO_ROOT = Path(__file__).resolve().parents[1]

ROUND_TRIP_TEXTS = [
    "Plain English, with punctuation: don't stop -- ever!",
    "中文文本：你好，世界。混合 English 和中文。",
    "Emoji 🎉👍🏽 and a family 👨‍👩‍👧 (zero-width joiners) and flags 🇫🇷.",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}  # tabs\n\r\n    spaces   \n\n",
    "  leading and trailing spaces  ",
    "Accents é (composed) and e\u0301 (decomposed), ß, Ωμέγα, кириллица, عربى.",
    "Control \x00\x07 bytes and a lone \u200b zero-width space.",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "user", "content": "And goodbye?"},
    {"role": "assistant", "content": "Goodbye.\nSee you."},
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_exact(tiny_tokenizer, text):
    """Exact for NFC text (what the cleaning step writes); other text comes back in its NFC form, because
    the tokenizer normalizes to NFC as transformers' Qwen2Tokenizer does on every reload."""
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    nfc = unicodedata.normalize("NFC", text)
    assert tiny_tokenizer.decode(tiny_tokenizer(nfc, add_special_tokens=False)["input_ids"]) == nfc
    assert tiny_tokenizer.unk_token_id is None or tiny_tokenizer.unk_token_id not in ids


def test_saved_directory_loads_with_auto_tokenizer(tiny_tokenizer_dir, tiny_tokenizer):
    loaded = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(loaded) == 1024
    text = " ".join(ROUND_TRIP_TEXTS)
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.eos_token == END_OF_TEXT and loaded.pad_token == PAD
    assert loaded.pad_token_id != loaded.eos_token_id
    assert {IM_START, IM_END} <= set(loaded.all_special_tokens)
    for token in (END_OF_TEXT, IM_START, IM_END, PAD):  # each special token is one id, never split
        assert len(loaded(token, add_special_tokens=False)["input_ids"]) == 1
    assert loaded.chat_template == CHATML_TEMPLATE


def test_chat_template_renders_chatml(tiny_tokenizer):
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                        "<|im_start|>user\nSay hello.<|im_end|>\n"
                        "<|im_start|>assistant\nHello! 你好<|im_end|>\n"
                        "<|im_start|>user\nAnd goodbye?<|im_end|>\n"
                        "<|im_start|>assistant\nGoodbye.\nSee you.<|im_end|>\n")
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Contiguous runs of masked tokens: one per assistant message, each exactly its content + <|im_end|>.
    runs, current = [], []
    for token, masked in zip(ids, mask):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    expected = [m["content"] + IM_END for m in CONVERSATION if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(run) for run in runs] == expected
    im_end = tiny_tokenizer.convert_tokens_to_ids(IM_END)
    assert sum(1 for token, masked in zip(ids, mask) if token == im_end and not masked) == 3  # system, user x2
    assert end_of_turn_token_id(tiny_tokenizer) == im_end


def test_train_bpe_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(["text"], vocab_size=200)


def test_load_tokenizer_gives_a_pad_token_without_growing_the_vocabulary(tiny_tokenizer_dir, tmp_path):
    for source in Path(tiny_tokenizer_dir).iterdir():  # a copy whose config names no pad token
        (tmp_path / source.name).write_bytes(source.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None

    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == PAD and len(tokenizer) == 1024


def test_train_tokenizer_script(write_jsonl, tmp_path):
    from conftest import load_repo_script

    script = load_repo_script("data_prep/train_tokenizer.py")
    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(200)]
    path = write_jsonl([*({"text": t} for t in texts), '{"broken json', {"text": "中文 and 🎉 too"}])
    out_dir = tmp_path / "tokenizer"

    script.main(["--sources", path, "--vocab_size", "300", "--min_frequency", "1", "--output_dir", str(out_dir)])

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    assert len(tokenizer) == 300
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer("the quick brown fox")["input_ids"]) < len("the quick brown fox")  # merges learned
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == unicodedata.normalize("NFC", text)
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False).startswith("<|im_start|>system\n")


@pytest.mark.parametrize("config_name", ["qwen2-tiny", "llama-1b"])
def test_tokenizer_survives_reload_next_to_a_model_config(tiny_tokenizer, config_name):
    """transformers loads a qwen2 directory as Qwen2Tokenizer, which rebuilds the normalizer and split rule;
    the tokenizer trained here must come back splitting text exactly as it did for the training data."""
    from lmtrain.model.config import resolve_config
    from lmtrain.tokenizer import check_reload_consistency

    check_reload_consistency(tiny_tokenizer, resolve_config(config_name))


def test_tokenizer_with_another_split_rule_is_refused_for_qwen2(gpt2_rule_tokenizer_dir):
    """A GPT-2-rule tokenizer (ByteLevel's built-in regex) would be silently re-split on reload."""
    from lmtrain.model.config import resolve_config
    from lmtrain.tokenizer import check_reload_consistency

    gpt2_rule = AutoTokenizer.from_pretrained(str(gpt2_rule_tokenizer_dir))
    with pytest.raises(ValueError, match="reloads as Qwen2Tokenizer and tokenizes differently"):
        check_reload_consistency(gpt2_rule, resolve_config("qwen2-tiny"))
    check_reload_consistency(gpt2_rule, resolve_config("llama-1b"))  # llama keeps tokenizer.json as it is


def _grouped_corpus(write_jsonl):
    """Two groups whose words never overlap: 'kept' trains, 'held' holds the only occurrences of one word."""
    kept = [{"text": f"Scene {i}: the quick brown fox jumps over the lazy dog.", "play": "kept"} for i in range(150)]
    held = [{"text": "zanzibarquux " * 20, "play": "held"} for _ in range(50)]
    return write_jsonl(kept + held)


def test_train_tokenizer_leaves_the_validation_groups_out(write_jsonl, tmp_path):
    """--validation_groups (the groups prepare_pretrain.py holds out) are not in the tokenizer's text: a word
    that only the held-out group has gets no merge, the report counts what was left out; without the option
    that word is one of the most frequent and becomes a single token."""
    from conftest import load_repo_script

    script = load_repo_script("data_prep/train_tokenizer.py")
    path = _grouped_corpus(write_jsonl)
    common = ["--sources", path, "--vocab_size", "320", "--min_frequency", "2"]
    script.main(common + ["--output_dir", str(tmp_path / "all")])
    script.main(common + ["--split_by", "play", "--validation_groups", "held", "--output_dir", str(tmp_path / "clean")])

    every = AutoTokenizer.from_pretrained(str(tmp_path / "all"))
    clean = AutoTokenizer.from_pretrained(str(tmp_path / "clean"))
    assert len(every(" zanzibarquux", add_special_tokens=False)["input_ids"]) <= 2
    assert len(clean(" zanzibarquux", add_special_tokens=False)["input_ids"]) >= 6  # (almost) byte by byte
    assert len(clean(" quick brown", add_special_tokens=False)["input_ids"]) <= 2  # the kept group was learned
    held_out = json.loads((tmp_path / "clean" / "sample_report.json").read_text())["held_out"]
    assert held_out == {"split_by": "play", "validation_groups": ["held"], "documents": 50,
                        "chars": 50 * len("zanzibarquux " * 20)}


@pytest.mark.parametrize("extra, message", [
    (["--split_by", "play", "--validation_groups", "helld"], "--validation_groups helld: no document has that play"),
    (["--validation_groups", "held"], "pass --split_by FIELD"),
])
def test_train_tokenizer_refuses_validation_groups_it_cannot_hold_out(write_jsonl, tmp_path, extra, message):
    """A misspelt group (which would leave the held-out text in silently) or no field to group by is an error."""
    from conftest import load_repo_script

    from lmtrain.errors import UserError

    script = load_repo_script("data_prep/train_tokenizer.py")
    with pytest.raises(UserError, match=message):
        script.main(["--sources", _grouped_corpus(write_jsonl), "--vocab_size", "300", *extra,
                     "--output_dir", str(tmp_path / "tok")])


def test_train_tokenizer_accepts_validation_groups_a_stopped_scan_never_reached(write_jsonl, tmp_path, caplog):
    """With --sample_scan_factor the scan may stop before a held-out group's documents (here at the file's end):
    nothing of them is trained on, so that is a warning, not the misspelt-group error."""
    from conftest import load_repo_script

    script = load_repo_script("data_prep/train_tokenizer.py")
    script.main(["--sources", _grouped_corpus(write_jsonl), "--vocab_size", "300", "--sample_chars", "1000",
                 "--sample_scan_factor", "2", "--split_by", "play", "--validation_groups", "held",
                 "--output_dir", str(tmp_path / "tok")])
    assert "not among the documents read" in caplog.text
    assert json.loads((tmp_path / "tok" / "sample_report.json").read_text())["held_out"]["documents"] == 0
