"""Bad SFT input through the shared reader (lmtrain.data.sources) and the SFT preparation pipeline, the same
set as tests/test_bad_inputs.py for pretraining plus the SFT-specific faults. Lenient (the default) drops
and counts each bad record under its reason and keeps every good one; strict (--lenient false) stops at the
first with its file and line, from inside datasets workers too. A missing file, or a file none of whose
records is a conversation, is an error in both modes."""
from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtrain.arguments import SFTDataArguments
from lmtrain.data.sft import SFTStats, encode_sample
from lmtrain.data.sft_prepare import prepare_sft_files
from lmtrain.data.sources import DataError
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king is dead long live the queen what is two plus three five answer briefly 0 1 2 3 4 5 +".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_bpe_tokenizer([" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(300)],
                               vocab_size=330, show_progress=False)


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {i} + {i % 3} ?"},
                         {"role": "assistant", "content": f"the answer is {i + i % 3}"}]}


GOOD = [chat(i) for i in range(4)]
HUGE = {"messages": [{"role": "user", "content": "long " * 200_000}, {"role": "assistant", "content": "five"}]}
# name -> (the bad line, written as line 3 between GOOD[1] and GOOD[2]; the reason lenient mode counts it under)
BAD_LINES = {
    "malformed_json": ('{"messages": [{"role": "user", "content": "unterminated}', "malformed_json"),
    "not_utf8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
    "empty_record": ({}, "bad_format"),
    "null": ("null", "not_an_object"),
    "wrong_field": ({"prompt": "hi", "completion": "there"}, "bad_format"),
    "non_string_content": ({"messages": [{"role": "user", "content": 12345},
                                         {"role": "assistant", "content": "x"}]}, "non_string_content"),
    "list_content": ({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": ["a", "list"]}]}, "non_string_content"),
    "unknown_role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "x"}]},
                     "unknown_role"),
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    "null_messages": ({"messages": None}, "bad_format"),
}
STRICT_MESSAGES = {
    "malformed_json": "malformed JSON", "not_utf8": "not valid UTF-8", "empty_record": "unknown SFT format",
    "null": "expected a JSON object", "wrong_field": "unknown SFT format", "non_string_content": "must be a string",
    "list_content": "must be a string", "unknown_role": "unknown role", "no_assistant_turn": "no assistant message",
    "null_messages": "'messages' must be a list",
}


def write(path: Path, lines: list) -> Path:
    data = b""
    for line in lines:
        data += (line if isinstance(line, bytes) else
                 (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
    path.write_bytes(data)
    return path


def args(files, tmp_path, **overrides) -> SFTDataArguments:
    return SFTDataArguments(**{"train_files": [str(f) for f in files], "max_length": 64,
                               "validation_split_percentage": 0.0, "packing": False,
                               "prepared_cache_dir": str(tmp_path / "cache"), **overrides})


def expected_ids(tokenizer, records) -> list[list[int]]:
    """The reference: each good record encoded on its own by the per-sample function."""
    return [encode_sample(tokenizer, r["messages"], 64, False, SFTStats())[0] for r in records]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_lenient_mode_drops_and_counts_each_bad_record(case, tokenizer, tmp_path):
    bad, reason = BAD_LINES[case]
    path = write(tmp_path / "chat.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2], GOOD[3]])
    data, report = prepare_sft_files(args([path], tmp_path), tokenizer)
    assert report["dropped"] == {reason: 1}
    assert report["samples"] == 4
    assert data["train"]["input_ids"] == expected_ids(tokenizer, GOOD)


# Two workers: one reader fault (raised while reading) and one record fault (raised in a datasets.map worker).
@pytest.mark.parametrize("case,workers", [(c, 1) for c in sorted(BAD_LINES)]
                         + [("malformed_json", 2), ("unknown_role", 2)])
def test_strict_mode_names_file_and_line(case, workers, tokenizer, tmp_path):
    path = write(tmp_path / "chat.jsonl", [GOOD[0], GOOD[1], BAD_LINES[case][0], GOOD[2], GOOD[3]])
    with pytest.raises(DataError, match=f"chat.jsonl:3: .*{STRICT_MESSAGES[case]}"):
        prepare_sft_files(args([path], tmp_path, lenient=False, preprocessing_num_workers=workers), tokenizer)


def test_a_turn_order_the_template_rejects(tokenizer, tmp_path):
    strict_template = copy.deepcopy(tokenizer)
    strict_template.chat_template = (
        "{%- for message in messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant') }}{%- endif -%}"
        + tokenizer.chat_template.removeprefix("{%- for message in messages -%}"))
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "five"}]}
    path = write(tmp_path / "chat.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2]])
    _, report = prepare_sft_files(args([path], tmp_path), strict_template)
    assert report["dropped"] == {"template_rejected": 1} and report["samples"] == 3
    with pytest.raises(DataError, match="chat.jsonl:3: the chat template rejects .*alternate"):
        prepare_sft_files(args([path], tmp_path, lenient=False), strict_template)


def test_a_huge_record_is_truncated_not_dropped(tokenizer, tmp_path):
    path = write(tmp_path / "chat.jsonl", [GOOD[0], GOOD[1], HUGE, GOOD[2]])
    for lenient in (True, False):
        data, report = prepare_sft_files(args([path], tmp_path, lenient=lenient), tokenizer)
        assert report["dropped"] == {} and report["samples"] == 4 and report["truncated"] == 1
        assert max(len(ids) for ids in data["train"]["input_ids"]) == 64


def test_an_empty_file_is_skipped_and_counted(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    good = write(tmp_path / "chat.jsonl", GOOD)
    for lenient in (True, False):
        data, report = prepare_sft_files(args([empty, good], tmp_path, lenient=lenient), tokenizer)
        assert report["dropped"] == {"empty_file": 1}
        assert data["train"]["input_ids"] == expected_ids(tokenizer, GOOD)


def test_a_missing_file_is_an_error_in_both_modes(tokenizer, tmp_path):
    for lenient in (True, False):
        with pytest.raises(DataError, match="missing.jsonl' does not exist"):
            prepare_sft_files(args([tmp_path / "missing.jsonl"], tmp_path, lenient=lenient), tokenizer)


def test_a_file_of_no_conversations_is_an_error_naming_its_fields(tokenizer, tmp_path):
    path = write(tmp_path / "text.jsonl", [{"text": f"document {i}", "id": i} for i in range(5)])
    with pytest.raises(DataError, match=r"text.jsonl: no record is a conversation.*found fields text, id"):
        prepare_sft_files(args([path], tmp_path), tokenizer)


def test_json_arrays_and_parquet_name_their_records(tokenizer, tmp_path):
    bad = BAD_LINES["unknown_role"][0]
    array = tmp_path / "chat.json"
    array.write_text(json.dumps([GOOD[0], bad, GOOD[1]]))
    with pytest.raises(DataError, match=r"chat.json\[1\]: unknown role"):
        prepare_sft_files(args([array], tmp_path, lenient=False), tokenizer)
    table = pa.table({"messages": [GOOD[0]["messages"], bad["messages"], GOOD[1]["messages"]]})
    pq.write_table(table, tmp_path / "chat.parquet")
    with pytest.raises(DataError, match="chat.parquet row 1: unknown role"):
        prepare_sft_files(args([tmp_path / "chat.parquet"], tmp_path, lenient=False), tokenizer)
    data, report = prepare_sft_files(args([tmp_path / "chat.parquet", array], tmp_path), tokenizer)
    assert report["dropped"] == {"unknown_role": 2}
    assert data["train"]["input_ids"] == expected_ids(tokenizer, [GOOD[0], GOOD[1]] * 2)


def test_directories_and_globs_read_every_file(tokenizer, tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    write(folder / "a.jsonl", GOOD[:2])
    write(folder / "b.jsonl", GOOD[2:])
    (folder / "README.md").write_text("# not a conversation file: left out of a directory")
    for location in (folder, folder / "*.jsonl"):
        data, _ = prepare_sft_files(args([location], tmp_path), tokenizer)
        assert data["train"]["input_ids"] == expected_ids(tokenizer, GOOD)


def test_prepare_script_error_is_one_message(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    path = write(tmp_path / "chat.jsonl", [GOOD[0], BAD_LINES["unknown_role"][0]])
    result = subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare_sft.py"), "--tokenizer_name",
                             str(tmp_path / "tokenizer"), "--train_files", str(path), "--lenient", "false",
                             "--prepared_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{path}:2: unknown role" in result.stderr
