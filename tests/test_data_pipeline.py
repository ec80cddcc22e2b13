"""The pretraining data pipeline: packing against the classic `group_texts`, document boundaries (EOS and
position ids), the document-level train/validation split, cleaning, deduplication, caching, mixtures, the
prepare_pretrain.py script, and the demo corpus."""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from lmtrain.data.cleaning import CleaningConfig, clean_text
from lmtrain.data.demo_corpus import build_demo_corpus, cache_root, strip_gutenberg
from lmtrain.data.packing import IGNORE_INDEX, BlockPacker, blocks_to_arrow, positions_in_segments
from lmtrain.data.sources import DataError, SourceSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
EOS, PAD = 0, 3  # the ids packing tests use; real runs take them from the tokenizer


def load_script(name: str):
    """A data_prep/ script as a module, so tests call its main(argv) in-process."""
    from conftest import load_repo_script

    return load_repo_script(f"data_prep/{name}.py")


def synthetic_words(count: int, seed: int) -> list[str]:
    """Distinct made-up words (letters only, so the word regex of the cleaning filters sees each whole)."""
    rng = random.Random(seed)
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4))))
    return sorted(words)


def prose(rng: random.Random, vocabulary: list[str], words: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "."


def decode(tokenizer, document: list[int]) -> str:
    """The text of a packed document, without its closing EOS."""
    assert document[-1] == tokenizer.eos_token_id
    return tokenizer.decode(document[:-1])


# --------------------------------------------------------------------------------------------------- packing

def group_texts_reference(documents: list[list[int]], block_size: int) -> dict:
    """The classic run_clm `group_texts`: concatenate everything, cut every `block_size` tokens, drop the rest."""
    concatenated = [token for document in documents for token in document]
    total = len(concatenated) // block_size * block_size
    blocks = [concatenated[i: i + block_size] for i in range(0, total, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def reference_positions(documents: list[list[int]], block_size: int) -> list[int]:
    """Position of every stream token: tokens since the later of its document's start and its block's start."""
    in_document = [position for document in documents for position in range(len(document))]
    return [min(position, index % block_size) for index, position in enumerate(in_document)]


def random_documents(rng: np.random.Generator, count: int) -> list[list[int]]:
    """Documents ending in EOS, from 1 token (a bare EOS) to several blocks long."""
    lengths = rng.choice([1, 2, 3, 7, 15, 16, 17, 40, 100, 250], size=count)
    return [rng.integers(4, 1000, size=length - 1).tolist() + [EOS] for length in lengths]


def pack_in_chunks(packer: BlockPacker, documents: list[list[int]], rng: np.random.Generator) -> dict:
    """Feed documents through several `add` calls of random sizes (an empty call included), then `finish`."""
    blocks = list(packer.add(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)))
    start = 0
    while start < len(documents):
        chunk = documents[start: start + int(rng.integers(1, 6))]
        start += len(chunk)
        flat = np.array([token for document in chunk for token in document], dtype=np.int32)
        blocks += packer.add(flat, np.array([len(document) for document in chunk]))
    blocks += packer.finish()
    return {name: np.concatenate([block[name] for block in blocks]) for name in ("input_ids", "labels", "position_ids")}


@pytest.mark.parametrize("block_size", [2, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_block_packer_matches_group_texts(block_size, seed):
    rng = np.random.default_rng(seed)
    documents = random_documents(rng, 60)
    packed = pack_in_chunks(BlockPacker(block_size, PAD, drop_remainder=True), documents, rng)

    reference = group_texts_reference(documents, block_size)
    assert len(reference["input_ids"]) > 3
    assert packed["input_ids"].tolist() == reference["input_ids"]
    assert packed["labels"].tolist() == reference["labels"]
    positions = reference_positions(documents, block_size)
    assert packed["position_ids"].reshape(-1).tolist() == positions[: packed["position_ids"].size]


@pytest.mark.parametrize("block_size", [16, 64])
def test_block_packer_pads_and_masks_the_last_block(block_size):
    rng = np.random.default_rng(2)
    documents = random_documents(rng, 50)
    total = sum(len(document) for document in documents)
    remainder = total % block_size
    assert remainder, "pick documents whose total is not a multiple of block_size"

    dropping = BlockPacker(block_size, PAD, drop_remainder=True)
    dropped = pack_in_chunks(dropping, documents, np.random.default_rng(3))
    padding = BlockPacker(block_size, PAD, drop_remainder=False)
    padded = pack_in_chunks(padding, documents, np.random.default_rng(4))

    assert dropping.dropped_tokens == remainder and dropping.padded_tokens == 0
    assert padding.padded_tokens == block_size - remainder and padding.dropped_tokens == 0
    assert len(padded["input_ids"]) == len(dropped["input_ids"]) + 1
    for name in ("input_ids", "labels", "position_ids"):  # full blocks do not depend on the tail policy
        assert (padded[name][:-1] == dropped[name]).all()

    stream = [token for document in documents for token in document]
    last_ids, last_labels, last_positions = (padded[name][-1] for name in ("input_ids", "labels", "position_ids"))
    assert last_ids[:remainder].tolist() == stream[-remainder:]
    assert last_labels[:remainder].tolist() == stream[-remainder:]
    assert (last_ids[remainder:] == PAD).all()
    assert (last_labels[remainder:] == IGNORE_INDEX).all()
    assert last_positions[:remainder].tolist() == reference_positions(documents, block_size)[-remainder:]
    # Padding is a segment of its own: positions restart at 0 where it begins.
    assert last_positions[remainder:].tolist() == list(range(block_size - remainder))


def test_block_packer_exact_multiple_has_no_padded_block():
    documents = [[5, 6, 7, EOS], [8, 9, 10, EOS]]
    packer = BlockPacker(4, PAD, drop_remainder=False)
    packed = pack_in_chunks(packer, documents, np.random.default_rng(0))
    assert packed["input_ids"].tolist() == [[5, 6, 7, EOS], [8, 9, 10, EOS]]
    assert packer.padded_tokens == 0 and packer.dropped_tokens == 0


def test_positions_and_arrow_conversion():
    assert positions_in_segments(np.array([3, 2, 1])).tolist() == [0, 1, 2, 0, 1, 0]
    blocks = {"input_ids": np.array([[1, 2], [3, 4]]), "labels": np.array([[1, -100], [3, 4]]),
              "position_ids": np.array([[0, 1], [0, 0]])}
    table = blocks_to_arrow(blocks)
    for name, array in blocks.items():
        assert table.column(name).to_pylist() == array.tolist()


# ------------------------------------------------------------------------------------- documents and blocks

def distinct_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocabulary = synthetic_words(400, seed)
    return [f"Document {i}: " + prose(rng, vocabulary, rng.randint(5, 60)) for i in range(count)]


def test_prepared_documents_end_in_eos_and_decode_to_their_text(write_jsonl, prepare_data, packed_documents,
                                                                   tiny_tokenizer):
    texts = distinct_documents(40)
    texts[:2] = ["A short first document.", "A short second document."]  # both fit in the first block
    # Special-token strings inside a document are text, not an EOS or a chat marker in mid-document.
    texts[5] = "A page about language models: they end text with <|endoftext|> and chat with <|im_start|>."
    texts[6] = "Unicode survives packing: naïve café, 中文文本, emoji 🎉, tabs\tand\nnewlines."
    dataset, report = prepare_data([write_jsonl({"text": t} for t in texts)])

    documents = packed_documents(dataset["train"])
    eos = tiny_tokenizer.eos_token_id
    assert len(documents) == len(texts) == report.documents_kept["train"]
    assert all(document.count(eos) == 1 and document[-1] == eos for document in documents)
    assert [decode(tiny_tokenizer, document) for document in documents] == texts
    assert sum(map(len, documents)) == report.tokens["train"]

    # A block decodes to the documents' texts with the end-of-text token between them.
    first_block = tiny_tokenizer.decode(dataset["train"][0]["input_ids"])
    assert first_block.startswith(texts[0] + "<|endoftext|>" + texts[1][:5])


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_position_ids_restart_at_document_and_block_starts(write_jsonl, prepare_data, tiny_tokenizer,
                                                          drop_remainder):
    texts = distinct_documents(80, seed=1)
    dataset, report = prepare_data([write_jsonl({"text": t} for t in texts)], block_size=32,
                                   drop_remainder=drop_remainder)
    blocks = dataset["train"].with_format("numpy")
    input_ids, labels, positions = (np.asarray(blocks[name]) for name in ("input_ids", "labels", "position_ids"))
    assert input_ids.shape == labels.shape == positions.shape == (report.blocks["train"], 32)
    eos = tiny_tokenizer.eos_token_id

    pads = 0
    for ids, block_labels, block_positions in zip(input_ids, labels, positions):
        real = int((block_labels != IGNORE_INDEX).sum())
        assert (block_labels[:real] == ids[:real]).all()
        assert block_positions[0] == 0
        for t in range(1, real):
            expected = 0 if ids[t - 1] == eos else block_positions[t - 1] + 1
            assert block_positions[t] == expected, f"position {t} of block {ids.tolist()}"
        assert block_positions[real:].tolist() == list(range(32 - real))  # padding: its own segment
        assert (block_labels[real:] == IGNORE_INDEX).all()
        assert (ids[real:] == tiny_tokenizer.pad_token_id).all()
        pads += 32 - real
    assert pads == report.padded_tokens
    if drop_remainder:
        assert pads == 0 and report.dropped_remainder_tokens == report.tokens["train"] % 32
    else:
        assert 0 < pads < 32 and report.blocks["train"] == -(-report.tokens["train"] // 32)


def test_no_document_in_both_train_and_validation(write_jsonl, prepare_data, packed_documents, tiny_tokenizer):
    texts = [f"marker{i:04d} " + text for i, text in enumerate(distinct_documents(200, seed=2))]
    dataset, report = prepare_data([write_jsonl({"text": t} for t in texts)], validation_split_percentage=20)

    markers = {}
    for split in ("train", "validation"):
        documents = [decode(tiny_tokenizer, d) for d in packed_documents(dataset[split])]
        assert len(documents) == report.documents_kept[split] > 0
        assert set(documents) <= set(texts)  # whole documents: none was cut by the split
        markers[split] = [re.match(r"marker(\d{4}) ", document).group(1) for document in documents]
        assert len(set(markers[split])) == len(markers[split])
    assert not set(markers["train"]) & set(markers["validation"])
    assert len(markers["train"]) + len(markers["validation"]) == len(texts)
    assert 0.1 < len(markers["validation"]) / len(texts) < 0.3


# ------------------------------------------------------------------------------------ cleaning and dedup

def test_exact_and_near_duplicates_removed_distinct_documents_kept(write_jsonl, prepare_data, packed_documents,
                                                                   tiny_tokenizer):
    rng = random.Random(3)
    vocabulary = synthetic_words(2000, 3)
    originals = [prose(rng, vocabulary, 300) for _ in range(6)]
    words = originals[1].split(" ")
    words[100], words[200] = "changedword", "alteredword"  # two words of 300: a near duplicate
    near_copy_two_words = " ".join(words)
    near_copy_one_word = "Different " + originals[2].split(" ", 1)[1]
    path = write_jsonl({"text": t} for t in [*originals, originals[0], near_copy_two_words, near_copy_one_word])

    dataset, report = prepare_data([path])
    assert report.dropped == {"exact_duplicate": 1, "near_duplicate": 2}
    assert [decode(tiny_tokenizer, d) for d in packed_documents(dataset["train"])] == originals

    _, report = prepare_data([path], dedup_near=False)
    assert report.dropped == {"exact_duplicate": 1}
    _, report = prepare_data([path], dedup_exact=False, dedup_near=False)
    assert report.dropped == {} and report.documents_kept["train"] == 9


CLEANING_INPUTS = {
    "html": "<html><body><p class=\"intro\">Hello <b>world</b>, this is a page &amp; more.</p>"
            "<script>alert('x')</script><!-- comment --></body></html>",
    "control": "A bell\x07, a null\x00 and a zero\u200bwidth space in this sentence.",
    "short": "hi there",
    "code": "template <typename T> std::vector<int> f(T a, T b) { if (a<b && b>a) return {}; }",
    "plain": "An ordinary sentence that needs no cleaning at all, long enough.",
}
CLEANED = {
    "html": "Hello world, this is a page & more.",
    "control": "A bell, a null and a zerowidth space in this sentence.",
    "code": CLEANING_INPUTS["code"],  # code and maths are not HTML: `<int>` and `a<b && b>a` stay
    "plain": CLEANING_INPUTS["plain"],
}


@pytest.mark.parametrize("switch_off, kept_verbatim", [
    (None, None), ({"strip_html": False}, "html"), ({"remove_control_chars": False}, "control"),
    ({"min_chars": 0}, "short"),
])
def test_cleaning_steps_and_their_switches(write_jsonl, prepare_data, packed_documents, tiny_tokenizer,
                                           switch_off, kept_verbatim):
    path = write_jsonl({"text": text} for text in CLEANING_INPUTS.values())
    dataset, report = prepare_data([path], **(switch_off or {}))
    expected = {**CLEANED, **({kept_verbatim: CLEANING_INPUTS[kept_verbatim]} if kept_verbatim else {})}
    expected_texts = [expected[name] for name in CLEANING_INPUTS if name in expected]
    assert [decode(tiny_tokenizer, d) for d in packed_documents(dataset["train"])] == expected_texts
    assert report.dropped == ({} if kept_verbatim == "short" else {"too_short": 1})


def test_clean_text_filters():
    config = CleaningConfig()
    # Leading blank lines and trailing whitespace go; the first line's indentation stays (code, verse).
    assert clean_text("\n \n  padded text that is long enough  \n", config) == ("  padded text that is long enough", "")
    assert clean_text("tiny", config)[1] == "too_short"
    assert clean_text("x" * 50, CleaningConfig(max_chars=40))[1] == "too_long"
    assert clean_text("the same line again\n" * 10, config)[1] == "repetitive_lines"
    assert clean_text("buy cheap pills now " * 100, config)[1] == "repetitive_words"
    assert clean_text("e\u0301t\u00e9 is an NFC test sentence here", config)[0].startswith("\u00e9t\u00e9")


def test_long_natural_documents_are_not_repetitive(demo_texts):
    """Over a whole book the share of distinct words falls far below 0.1 (about 0.05 for 1 MB of Shakespeare);
    the repetition filter must measure repetition, not length."""
    book = "\n\n".join(demo_texts[:150])
    assert len(book) > 1_000_000
    assert clean_text(book, CleaningConfig()) == (book.strip(), "")
    spam = "\n".join(f"Buy cheap pills now, offer {i % 3}! " * 20 for i in range(200))
    assert clean_text(spam, CleaningConfig(max_duplicate_line_fraction=1.0))[1] == "repetitive_words"


# ------------------------------------------------------------------------------------- caching and mixtures

def test_second_run_reuses_every_step_and_block_size_repacks_only(write_jsonl, prepare_data):
    path = write_jsonl({"text": t} for t in distinct_documents(120, seed=4))
    first, report = prepare_data([path], validation_split_percentage=10)
    assert set(report.cache.values()) == {"computed"}
    assert set(report.cache) == {"read", "clean", "tokenize", "pack_train", "pack_validation"}

    second, report = prepare_data([path], validation_split_percentage=10)
    assert set(report.cache.values()) == {"reused"}, report.cache
    for split in ("train", "validation"):
        assert list(second[split]["input_ids"]) == list(first[split]["input_ids"])

    repacked, report = prepare_data([path], validation_split_percentage=10, block_size=32)
    assert report.cache == {"read": "reused", "clean": "reused", "tokenize": "reused",
                            "pack_train": "computed", "pack_validation": "computed"}
    assert len(repacked["train"][0]["input_ids"]) == 32


def test_changed_input_file_is_read_again(write_jsonl, prepare_data):
    unchanged = write_jsonl(({"text": t} for t in distinct_documents(30, seed=5)), name="a.jsonl")
    changing = write_jsonl(({"text": t} for t in distinct_documents(30, seed=6)), name="b.jsonl")
    prepare_data([f"a={unchanged}", f"b={changing}"])
    write_jsonl(({"text": t} for t in distinct_documents(31, seed=6)), name="b.jsonl")
    _, report = prepare_data([f"a={unchanged}", f"b={changing}"])
    assert report.cache["read"] == "computed"  # one of two sources changed: the read step is not "reused"
    assert report.documents_kept["train"] == 61


def test_source_spec_parsing():
    assert SourceSpec.parse("web=data/web/*.jsonl@0.6") == SourceSpec("web", "data/web/*.jsonl", 0.6)
    assert SourceSpec.parse("data/books.jsonl") == SourceSpec("books", "data/books.jsonl", 1.0)
    assert SourceSpec.parse("data/code/@2") == SourceSpec("code", "data/code/", 2.0)
    with pytest.raises(DataError, match="not a number"):
        SourceSpec.parse("a=x.jsonl@heavy")
    with pytest.raises(DataError, match="> 0"):
        SourceSpec.parse("a=x.jsonl@0")


def test_mixture_weights_give_the_token_shares(write_jsonl, prepare_data, packed_documents, tiny_tokenizer):
    # Source a holds about as many tokens as b; the weights ask for three times as many.
    a = write_jsonl(({"text": "alphasource " + t} for t in distinct_documents(150, seed=7)), name="a.jsonl")
    b = write_jsonl(({"text": "betasource " + t} for t in distinct_documents(150, seed=8)), name="b.jsonl")
    dataset, report = prepare_data([f"a={a}@0.75", f"b={b}@0.25"])

    assert report.sources["a"]["target_share"] == pytest.approx(0.75)
    for name, share in (("a", 0.75), ("b", 0.25)):
        assert report.sources[name]["achieved_share"] == pytest.approx(share, abs=0.05)
    tokens = {"a": 0, "b": 0}
    for document in packed_documents(dataset["train"]):
        tokens["a" if decode(tiny_tokenizer, document).startswith("alphasource ") else "b"] += len(document)
    assert tokens["a"] / sum(tokens.values()) == pytest.approx(0.75, abs=0.05)
    assert report.sources["a"]["epochs"] > 1 > report.sources["b"]["epochs"]  # a repeated, b subsampled


# ------------------------------------------------------------------------------------------ scripts, demo

def test_prepare_pretrain_script_writes_a_loadable_dataset(write_jsonl, tiny_tokenizer_dir, tmp_path):
    texts = distinct_documents(100, seed=9)
    path = write_jsonl({"text": t} for t in texts)
    out_dir = tmp_path / "prepared_out"
    load_script("prepare_pretrain").main([
        "--tokenizer_name", str(tiny_tokenizer_dir), "--sources", path, "--output_dir", str(out_dir),
        "--block_size", "32", "--validation_split_percentage", "20", "--prepared_cache_dir", str(tmp_path / "c")])

    dataset = datasets.load_from_disk(str(out_dir))
    assert set(dataset) == {"train", "validation"}
    assert dataset["train"].column_names == ["input_ids", "labels", "position_ids"]
    assert len(dataset["train"][0]["input_ids"]) == 32
    report = json.loads((out_dir / "report.json").read_text())
    assert report["documents_read"] == 100
    assert report["blocks"] == {"train": len(dataset["train"]), "validation": len(dataset["validation"])}
    assert (out_dir / "tokenizer" / "tokenizer.json").exists()
    # validation.jsonl holds exactly the held-out documents, for evaluate.py / lm-eval
    held_out = [json.loads(line) for line in (out_dir / "validation.jsonl").read_text().splitlines()]
    assert len(held_out) == report["documents_kept"]["validation"] > 0
    assert {r["text"] for r in held_out} <= set(texts) and all(r["source"] for r in held_out)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    held_out_tokens = sum(len(tokenizer(r["text"])["input_ids"]) + 1 for r in held_out)  # + EOS
    assert held_out_tokens == report["tokens"]["validation"]


GUTENBERG_BOOK = """The Project Gutenberg EBook of A Test Play, by Nobody

This eBook is for the use of anyone anywhere at no cost. You may copy it under the terms of the
Project Gutenberg License included with this eBook or online at www.gutenberg.org

*** START OF THE PROJECT GUTENBERG EBOOK A TEST PLAY ***

ACT I. SCENE 1. A room.

FIRST SPEAKER. To be tested, or not to be tested.

SECOND SPEAKER. That is the question.

*** END OF THE PROJECT GUTENBERG EBOOK A TEST PLAY ***

Updated editions will replace the previous one. This and all associated files are covered by the
Project Gutenberg License: please read it before you distribute this work.
"""
LEGACY_ETEXT = """This etext was prepared by volunteers. Project Gutenberg etexts are public domain.

SONNET 1

From fairest creatures we desire increase.

End of the Project Gutenberg etext of the Sonnets
Licence terms of Project Gutenberg follow here.
"""


def test_strip_gutenberg_removes_header_footer_and_licence():
    assert strip_gutenberg(GUTENBERG_BOOK) == ("ACT I. SCENE 1. A room.\n\nFIRST SPEAKER. To be tested, or not to be "
                                               "tested.\n\nSECOND SPEAKER. That is the question.")
    assert strip_gutenberg(LEGACY_ETEXT) == "SONNET 1\n\nFrom fairest creatures we desire increase."


def test_demo_corpus_is_built_without_gutenberg_text(demo_corpus_path, tmp_path):
    archive = next((cache_root() / "demo").glob("shakespeare-*.tar.gz"), None)
    assert archive is not None, "ensure_demo_corpus keeps the downloaded archive next to the corpus"
    out_file = tmp_path / "shakespeare.jsonl"
    documents = build_demo_corpus(archive, out_file)
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert documents == len(records) > 1000
    assert all(record["text"].strip() and record["play_file"] for record in records)
    offending = [line for record in records for line in record["text"].splitlines() if "gutenberg" in line.lower()]
    assert offending == []


def test_two_jobs_preparing_into_one_cache_at_once_both_succeed(write_jsonl, tiny_tokenizer_dir, tmp_path):
    """Separate jobs sharing --prepared_cache_dir used to rename each other's half-written packed-*.tmp
    (FileNotFoundError); each process now writes its own temporary file."""
    import subprocess

    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(300)]
    source = write_jsonl({"text": " ".join(rng.choice(words, 200))} for _ in range(400))
    cache = tmp_path / "shared-cache"
    script = Path(__file__).resolve().parents[1] / "data_prep" / "prepare_pretrain.py"
    jobs = [subprocess.Popen([sys.executable, str(script), "--tokenizer_name", str(tiny_tokenizer_dir),
                              "--sources", source, "--block_size", "64", "--prepared_cache_dir", str(cache),
                              "--output_dir", str(tmp_path / f"out{i}")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    first, second = (datasets.load_from_disk(str(tmp_path / f"out{i}")) for i in range(2))
    assert first["train"]["input_ids"] == second["train"]["input_ids"]
    assert not list(cache.glob("*.tmp"))


def test_a_source_the_mixture_cannot_serve_is_warned_about(caplog):
    """Only whole documents are taken: a source whose one document is larger than its share gets no tokens,
    and a tiny source is repeated many times; both are said, not left to the report."""
    import logging

    import numpy as np

    from lmtrain.data.mixture import mixture_selection

    sources = np.array(["web"] * 100 + ["books"] + ["zh"])
    num_tokens = np.array([100] * 100 + [5000] + [10])
    with caplog.at_level(logging.WARNING, logger="lmtrain.data.mixture"):
        _, per_source = mixture_selection(sources, num_tokens, np.arange(len(sources)),
                                          {"web": 0.8, "books": 0.15, "zh": 0.05}, 10_000, np.random.default_rng(0))
    assert per_source["books"]["train_tokens"] == 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("source 'books': weight share 0.150 but token share 0.000" in m for m in messages)
    assert any("source 'zh': repeated 50.0 times" in m for m in messages)
    assert not any("'web'" in m for m in messages)


def test_a_source_the_filters_empty_says_where_its_documents_went(write_jsonl, prepare_data):
    """Every document of one source dropped (here: too short): the error names the source and its own
    per-reason counts, not only the whole run's."""
    good = write_jsonl(({"text": t} for t in distinct_documents(40, seed=3)), name="good.jsonl")
    short = write_jsonl(({"text": f"tiny {i}"} for i in range(7)), name="short.jsonl")
    with pytest.raises(DataError) as raised:
        prepare_data([f"web={good}", f"notes={short}"])
    message = str(raised.value)
    assert "source 'notes' has no training documents left: 7 read; dropped: 7 too_short; 0 held out" in message
    assert "'web'" not in message
