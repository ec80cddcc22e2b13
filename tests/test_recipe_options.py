"""Recipe options of pretraining: the group-aware validation split (whole plays held out of the demo corpus,
both editions), document-aware packing, label smoothing and z-loss against hand computations."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from lmtrain.arguments import DataArguments
from lmtrain.data.demo_corpus import PLAY_FIELD, play_key
from lmtrain.data.sources import DataError
from lmtrain.data.splitting import resolve_split_field

# Small plays of the demo corpus, each in two editions (one with a Folio spelling of its file name).
SUBSET_PLAYS = ("comedy_of_errors", "midsummer_nights_dream", "tempest", "hamlet", "romeo_and_juliet",
                "much_ado_about_nothing")


@pytest.fixture(scope="module")
def demo_records(demo_corpus_path) -> list[dict]:
    with open(demo_corpus_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def plays_subset(demo_records, tmp_path_factory):
    """A jsonl of SUBSET_PLAYS' scenes (both editions), and those records."""
    records = [r for r in demo_records if r[PLAY_FIELD] in SUBSET_PLAYS]
    path = tmp_path_factory.mktemp("subset") / "plays.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path, records


def test_every_folio_play_has_its_modern_edition_in_the_same_group(demo_records):
    editions = defaultdict(set)
    for record in demo_records:
        assert record[PLAY_FIELD] == play_key(record["play_file"])
        editions[record[PLAY_FIELD]].add(record["play_file"].endswith("_f"))
    folio_only = [play for play, kinds in editions.items() if kinds == {True}]
    assert folio_only == [], f"Folio plays without a modern partner (add them to _FOLIO_SPELLINGS): {folio_only}"
    assert sum(kinds == {True, False} for kinds in editions.values()) == 35
    assert all(len(editions[play]) == 2 for play in SUBSET_PLAYS)


def test_auto_split_is_by_play_for_the_demo_corpus_only():
    assert resolve_split_field("auto", ["shakespeare"]) == PLAY_FIELD
    assert resolve_split_field("auto", ["shakespeare", "data/web.jsonl"]) is None
    assert resolve_split_field("document", ["shakespeare"]) is None
    assert resolve_split_field("book_id", ["data/web.jsonl"]) == "book_id"


def _texts(tokenizer, documents):
    return [tokenizer.decode(doc[:-1]) for doc in documents]


def test_held_out_plays_are_absent_from_training_in_both_editions(plays_subset, prepare_data, tiny_tokenizer,
                                                                  packed_documents):
    path, records = plays_subset
    # clean=False: documents come back out of the blocks byte for byte, so "absent" is checked exactly.
    data, report = prepare_data([path], split_by=PLAY_FIELD, validation_split_percentage=30, clean=False)
    held = set(report.split["validation_groups"])
    assert report.split["by"] == PLAY_FIELD and 0 < len(held) < len(SUBSET_PLAYS)
    held_texts = {r["text"] for r in records if r[PLAY_FIELD] in held}
    train_texts = _texts(tiny_tokenizer, packed_documents(data["train"]))
    validation_texts = _texts(tiny_tokenizer, packed_documents(data["validation"]))
    assert set(validation_texts) == held_texts  # every scene of both editions, and nothing else
    assert not held_texts & set(train_texts)
    assert {r["text"] for r in records} - held_texts == set(train_texts)
    # Both editions of every held-out play are there (no play held out in one edition only).
    files = {r["play_file"] for r in records if r[PLAY_FIELD] in held}
    assert len(files) == 2 * len(held)
    # The share is counted in tokens, whole plays at a time: at least the 30% asked for.
    assert report.tokens["validation"] / (report.tokens["validation"] + report.tokens["train"]) >= 0.3


def test_named_validation_groups_and_cleaning(plays_subset, prepare_data):
    path, records = plays_subset
    data, report = prepare_data([path], split_by=PLAY_FIELD, validation_groups=["hamlet", "tempest"])
    assert report.split["validation_groups"] == ["hamlet", "tempest"]
    held = [r for r in records if r[PLAY_FIELD] in ("hamlet", "tempest")]
    dropped = sum(report.dropped.values())
    assert report.documents_kept["validation"] <= len(held)
    assert report.documents_kept["validation"] + report.documents_kept["train"] + dropped == len(records)
    with pytest.raises(DataError, match="no document has that group value"):
        prepare_data([path], split_by=PLAY_FIELD, validation_groups=["hamlet", "othello"])


def test_split_by_a_missing_field_is_counted_or_named(write_jsonl, prepare_data):
    words = " ".join(f"word{i}" for i in range(40))
    path = write_jsonl([{"text": f"{words} {i}", "site": f"s{i % 3}"} for i in range(12)] + [{"text": words + " x"}])
    _, report = prepare_data([path], split_by="site", validation_split_percentage=20, clean=False)
    assert report.dropped == {"missing_split_field": 1}
    assert len(report.split["validation_groups"]) >= 1
    with pytest.raises(DataError, match=r"data.jsonl:13.*no field 'site'"):
        prepare_data([path], split_by="site", validation_split_percentage=20, clean=False, lenient=False)


def test_split_by_file_keeps_each_txt_file_on_one_side(tmp_path, prepare_data, tiny_tokenizer, packed_documents):
    for name in "abcd":
        paragraphs = [f"Paragraph {i} of file {name}: " + " ".join(f"{name}{j}" for j in range(30)) for i in range(5)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    data, report = prepare_data([tmp_path / "*.txt"], split_by="file", txt_unit="paragraph",
                                validation_split_percentage=10, clean=False)
    held = report.split["validation_groups"]
    assert len(held) == 1 and held[0].endswith(".txt")
    held_name = held[0][-5]
    validation = _texts(tiny_tokenizer, packed_documents(data["validation"]))
    train = _texts(tiny_tokenizer, packed_documents(data["train"]))
    assert len(validation) == 5 and all(f"of file {held_name}:" in t for t in validation)
    assert len(train) == 15 and not any(f"of file {held_name}:" in t for t in train)


def test_split_options_are_checked():
    with pytest.raises(ValueError, match="--validation_files is the validation split"):
        DataArguments(validation_files=["v.jsonl"], split_by="play")


def test_every_group_held_out_is_refused(write_jsonl, prepare_data):
    path = write_jsonl([{"text": "a sentence long enough to be kept " * 3, "site": "one"}] * 1)
    with pytest.raises(DataError, match="would hold every group"):
        prepare_data([path], split_by="site", validation_split_percentage=10, clean=False)
