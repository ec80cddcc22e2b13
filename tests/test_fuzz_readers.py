"""Data readers fuzzed (issue 12.8): random bytes and random JSON through both stages' readers either give
records or raise DataError (a UserError: one message) naming the file (file:line, file[index]), in strict
and lenient mode; never another exception, never a hang (a deadline per example). The SFT conversion of a
read record (record_to_messages) gives checked messages or a RecordProblem (a DataError), never another
exception. Deterministic (derandomize) and bounded (max_examples) so CI always runs the same inputs."""
from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtrain.data.sft import record_to_messages
from lmtrain.data.sources import DataError, ReadStats, read_file, read_records

FUZZ = settings(max_examples=200, derandomize=True, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON values of every kind, nested, with strings that are awkward for readers (NUL, surrogates are not
# valid JSON text and so come in through the random bytes instead).
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=20)
ROLES = st.sampled_from(["user", "assistant", "system", "gpt", "human", "assitant", "", None, 3, [], {}])
# Records shaped like the three SFT formats, with values of any type where strings belong.
SFT_RECORDS = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(JSON, st.lists(st.fixed_dictionaries(
        {"role": ROLES | JSON, "content": JSON}), max_size=4))}),
    st.fixed_dictionaries({"conversations": st.one_of(JSON, st.lists(st.fixed_dictionaries(
        {"from": ROLES | JSON, "value": JSON}), max_size=4))}, optional={"system": JSON}),
    st.fixed_dictionaries({"instruction": JSON, "output": JSON}, optional={"input": JSON, "system": JSON}),
    st.dictionaries(st.text(max_size=8), JSON, max_size=4),
)
# Lines a broken exporter writes: JSON of any value, truncated JSON, deep nesting, huge numbers, raw bytes.
LINES = st.one_of(
    JSON.map(lambda value: json.dumps(value).encode()),
    JSON.map(lambda value: json.dumps(value).encode()[:-1]),
    st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 100_000).map(lambda depth: b'{"text": ' * depth + b"1" + b"}" * depth),
    st.integers(4_000, 50_000).map(lambda digits: b'{"text": "a", "n": ' + b"1" * digits + b"}"),
    st.binary(max_size=64),
)


def _file(data: bytes, suffix: str) -> str:
    handle, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return path


def _consume(read, path: str):
    """Run a reader to its end: fine, or a DataError whose message names the file."""
    try:
        for _ in read():
            pass
    except DataError as error:
        assert path in str(error), f"the message does not name the file: {error}"
    finally:
        os.unlink(path)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".jsonl", ".json"]), strict=st.booleans())
def test_random_bytes_through_the_record_reader(data, suffix, strict):
    path = _file(data, suffix)
    _consume(lambda: read_records(path, ReadStats(), strict), path)


@FUZZ
@given(lines=st.lists(LINES, min_size=1, max_size=6), suffix=st.sampled_from([".jsonl", ".json"]),
       array=st.booleans(), strict=st.booleans())
def test_random_json_through_the_record_reader(lines, suffix, array, strict):
    data = b"[" + b",".join(lines) + b"]" if array else b"\n".join(lines)
    path = _file(data, suffix)
    _consume(lambda: read_records(path, ReadStats(), strict), path)


@FUZZ
@given(lines=st.lists(LINES | JSON.map(lambda value: json.dumps({"text": value}).encode()), min_size=1,
                      max_size=6), suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
       unit=st.sampled_from(["file", "line", "paragraph"]), strict=st.booleans())
def test_random_input_through_the_pretraining_text_reader(lines, suffix, unit, strict):
    path = _file(b"\n".join(lines), suffix)
    _consume(lambda: read_file(path, "text", unit, ReadStats(), strict), path)


@FUZZ
@given(record=SFT_RECORDS | JSON)
def test_random_records_through_the_sft_conversion(record):
    try:
        messages = record_to_messages(record, "chat.jsonl:7")
    except DataError as error:  # RecordProblem: counted under its reason, or one message in strict mode
        assert getattr(error, "reason", None), error
        return
    assert messages and all(isinstance(m["content"], str) for m in messages)
    assert any(m["role"] == "assistant" for m in messages)


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b'{"text": 1' + b"0" * 5000 + b"}"],
                         ids=["nesting_100000_deep", "integer_of_5000_digits"])
def test_lines_json_cannot_parse_are_a_malformed_record_with_file_and_line(tmp_path, line):
    """The two crashes the fuzzing found: RecursionError and the int-digits ValueError from json.loads."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n' + line + b"\n")
    stats = ReadStats()
    assert [record for _, record in read_records(str(path), stats, strict=False)] == [{"text": "good"}]
    assert stats.dropped["malformed_json"] == 1
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        list(read_records(str(path), ReadStats(), strict=True))
