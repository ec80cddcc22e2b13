"""Bad input through the whole preparation pipeline. Lenient mode (the default) drops and counts bad
records under a reason; strict mode (`lenient=False`) stops at the first one with its file and line. A
missing file and a wrong text field are errors in both modes: dropping a whole input silently is never
what a user wants."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtrain.data.sources import DataError

GOOD = [f"Good document number {i}, long enough to pass every cleaning filter." for i in range(4)]

# name -> (the bad line, written between GOOD[1] and GOOD[2], i.e. as line 3; the reason lenient mode counts)
BAD_LINES = {
    "malformed_json": ('{"text": "an unterminated string}', "malformed_json"),
    "not_utf8": (b'{"text": "caf\xe9 au lait, encoded as Latin-1 by some tool"}', "invalid_utf8"),
    "missing_text_field": ({"title": "a record without text"}, "missing_text"),
    "null_text": ({"text": None}, "missing_text"),
    "non_string_text": ({"text": 12345}, "non_string_text"),
    "list_text": ({"text": ["a", "list"]}, "non_string_text"),
    "not_an_object": ('["a", "json", "array", "line"]', "not_an_object"),
    "empty_text": ({"text": ""}, "empty_text"),
    "whitespace_text": ({"text": " \n\t  "}, "empty_text"),
}
BAD_LINE_NUMBER = 3
# Empty texts are an ordinary sight in scraped data: counted in both modes, never fatal.
NEVER_FATAL = {"empty_text"}


def with_bad_line(bad):
    return [{"text": GOOD[0]}, {"text": GOOD[1]}, bad, {"text": GOOD[2]}, {"text": GOOD[3]}]


def kept_texts(dataset, packed_documents, tokenizer) -> list[str]:
    return [tokenizer.decode(document[:-1]) for document in packed_documents(dataset["train"])]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_lenient_mode_drops_and_counts_bad_records(case, write_jsonl, prepare_data, packed_documents,
                                                   tiny_tokenizer):
    bad, reason = BAD_LINES[case]
    dataset, report = prepare_data([write_jsonl(with_bad_line(bad))])
    assert report.dropped == {reason: 1}
    assert report.documents_read == len(GOOD) + 1
    assert kept_texts(dataset, packed_documents, tiny_tokenizer) == GOOD


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_strict_mode_names_file_and_line(case, write_jsonl, prepare_data):
    bad, reason = BAD_LINES[case]
    path = write_jsonl(with_bad_line(bad))
    if reason in NEVER_FATAL:
        _, report = prepare_data([path], lenient=False)
        assert report.dropped == {reason: 1}
        return
    with pytest.raises(DataError) as error:
        prepare_data([path], lenient=False)
    assert f"{path}:{BAD_LINE_NUMBER}" in str(error.value)


def test_strict_mode_on_a_clean_file_drops_nothing(write_jsonl, prepare_data):
    _, report = prepare_data([write_jsonl({"text": t} for t in GOOD)], lenient=False)
    assert report.dropped == {} and report.documents_kept["train"] == len(GOOD)


def test_utf8_byte_order_mark_does_not_lose_the_first_record(write_jsonl, prepare_data, packed_documents,
                                                            tiny_tokenizer):
    path = write_jsonl([b"\xef\xbb\xbf" + b'{"text": "' + GOOD[0].encode() + b'"}', {"text": GOOD[1]}])
    dataset, report = prepare_data([path], lenient=False)
    assert kept_texts(dataset, packed_documents, tiny_tokenizer) == GOOD[:2]


@pytest.mark.parametrize("lenient", [True, False])
def test_multi_megabyte_document_goes_through(lenient, write_jsonl, prepare_data, demo_texts):
    huge = ""
    for text in demo_texts:  # natural text, not one sentence repeated (which filters rightly drop)
        huge += text + "\n\n"
        if len(huge) > 3_000_000:
            break
    huge = huge.strip()
    dataset, report = prepare_data([write_jsonl([{"text": GOOD[0]}, {"text": huge}, {"text": GOOD[1]}])],
                                   block_size=256, lenient=lenient)
    assert report.dropped == {}
    assert report.documents_kept["train"] == 3
    assert report.doc_chars["max"] == len(huge)
    # Shakespeare at a 1,024-token vocabulary: a few bytes per token, so well over 500k tokens.
    assert report.tokens["train"] > len(huge.encode()) / 8
    assert report.blocks["train"] == -(-report.tokens["train"] // 256)


def test_empty_file_is_counted_and_the_rest_proceeds(write_jsonl, prepare_data, tmp_path):
    write_jsonl(({"text": t} for t in GOOD), name="corpus/part-0.jsonl")
    (tmp_path / "corpus" / "part-1.jsonl").write_bytes(b"")
    for lenient in (True, False):
        _, report = prepare_data([tmp_path / "corpus"], lenient=lenient)
        assert report.dropped == {"empty_file": 1}
        assert report.documents_read == len(GOOD)
        assert report.documents_kept["train"] == len(GOOD)


@pytest.mark.parametrize("lenient", [True, False])
def test_missing_file_is_an_error_naming_the_path(lenient, prepare_data, tmp_path):
    missing = tmp_path / "no_such_file.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        prepare_data([missing], lenient=lenient)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nothing-*.jsonl"))):
        prepare_data([tmp_path / "nothing-*.jsonl"], lenient=lenient)


@pytest.mark.parametrize("lenient", [True, False])
def test_wrong_text_field_names_the_file_and_the_fields_found(lenient, write_jsonl, prepare_data):
    path = write_jsonl({"content": t, "id": i} for i, t in enumerate(GOOD))
    with pytest.raises(DataError) as error:
        prepare_data([path], lenient=lenient)
    message = str(error.value)
    assert path in message and "'text'" in message
    assert "content" in message and "id" in message


@pytest.mark.parametrize("lenient", [True, False])
def test_wrong_parquet_column_names_the_file_and_the_columns(lenient, prepare_data, tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": GOOD, "url": [f"https://example.com/{i}" for i in range(len(GOOD))]}), path)
    with pytest.raises(DataError) as error:
        prepare_data([path], lenient=lenient)
    message = str(error.value)
    assert str(path) in message and "'text'" in message
    assert "body" in message and "url" in message


def test_parquet_with_the_right_column_reads(prepare_data, packed_documents, tiny_tokenizer, tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [GOOD[0], None, GOOD[1]]}), path)
    dataset, report = prepare_data([path])
    assert report.dropped == {"missing_text": 1}
    assert kept_texts(dataset, packed_documents, tiny_tokenizer) == GOOD[:2]


def test_bad_records_in_a_second_worker_keep_their_message(write_jsonl, prepare_data):
    """With several reader processes the error crosses a process boundary and must keep file and line."""
    write_jsonl(({"text": t} for t in GOOD), name="corpus/part-0.jsonl")
    path = write_jsonl(with_bad_line('{"text": broken'), name="corpus/part-1.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}:{BAD_LINE_NUMBER}")):
        prepare_data([Path(path).parent], lenient=False, preprocessing_num_workers=2)


def test_nothing_left_is_an_error_that_says_why(write_jsonl, prepare_data):
    with pytest.raises(DataError, match="no documents left"):
        prepare_data([write_jsonl([{"text": "short"}, {"text": "   "}])])


def test_too_little_data_for_one_block_is_an_error(write_jsonl, prepare_data):
    with pytest.raises(DataError, match="block"):
        prepare_data([write_jsonl({"text": t} for t in GOOD)], block_size=100_000, drop_remainder=True)


def test_validation_split_too_small_for_a_block_is_left_out(write_jsonl, prepare_data):
    rng = random.Random(0)
    words = ["river", "stone", "lantern", "harbour", "meadow", "copper", "violet", "thunder", "orchard", "glass"]
    texts = [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(12)) + "." for i in range(60)]
    dataset, report = prepare_data([write_jsonl({"text": t} for t in texts)], block_size=512,
                                   drop_remainder=True, validation_split_percentage=5)
    assert report.documents_kept["validation"] > 0 and report.blocks["validation"] == 0
    assert set(dataset) == {"train"}


def test_hub_dataset_names_are_not_taken_for_missing_files(tmp_path, monkeypatch):
    """`org/name` and `org/name:config` are hub datasets (the README's wikimedia/wikipedia:20231101.en);
    something that can only be a path must exist. A hub dataset that cannot be loaded (offline here) is one
    message naming it, not a traceback."""
    from lmtrain.data.sources import ReadStats, expand_location, read_hub_records

    monkeypatch.chdir(tmp_path)
    for name in ("wikimedia/wikipedia:20231101.en", "HuggingFaceFW/fineweb-edu", "roneneldan/TinyStories"):
        assert expand_location(name) is None
    (tmp_path / "data").mkdir()
    for path in ("data/web", "./web.jsonl", str(tmp_path / "nope"), "a/b/c", "web.jsonl"):
        with pytest.raises(DataError, match="does not exist"):
            expand_location(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub dataset 'nobody/no-such-dataset:en' .*could not be loaded"):
        next(read_hub_records("nobody/no-such-dataset:en", "train", ReadStats()))


def test_an_unreachable_hub_fails_at_once_without_offline_mode(monkeypatch):
    """Without HF_HUB_OFFLINE on a machine with no hub, huggingface_hub retries for about a minute: one quick
    connection check goes straight to one message (sources) or to the cache (the perplexity model)."""
    import time

    from lmtrain import locations
    from lmtrain.data.quality import check_reference_model
    from lmtrain.data.sources import ReadStats, read_hub_records

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(locations, "_hub_unreachable", lambda timeout=3.0: "https://huggingface.co: no route")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"hub dataset 'someorg/somedata' .*cannot be reached from here"):
        next(read_hub_records("someorg/somedata", "train", ReadStats()))
    with pytest.raises(DataError, match="--perplexity_model someorg/somemodel: no such directory, and no hub"):
        check_reference_model("someorg/somemodel")
    assert time.monotonic() - start < 20
