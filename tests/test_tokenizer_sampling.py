"""Tokenizer training samples every source by its weight share, across all of its documents, within
--sample_chars for every file format, and reports what it took from each source (issue 10.5)."""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from lmtrain.tokenizer import sample_pieces, sample_sources, sample_texts, split_text, train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


def load_script():
    from conftest import load_repo_script

    return load_repo_script("data_prep/train_tokenizer.py")


def chinese_documents(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["".join(rng.sample(HANZI, 2)) for _ in range(120)]
    docs = ["".join("".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "。" for _ in range(20))
            for _ in range(count)]
    return docs, words


def english_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    return [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(100, 300))) + "."
            for i in range(count)]


def test_every_source_gets_its_weight_share_from_across_its_documents():
    english = english_documents(300)
    chinese, _ = chinese_documents(200)
    texts, report = sample_sources([("en", 3.0, iter(english)), ("zh", 1.0, iter(chinese))], 40_000, seed=7)
    en_chars = sum(len(t) for t in texts if not CJK.search(t))
    zh_chars = sum(len(t) for t in texts if CJK.search(t))
    assert (en_chars, zh_chars) == (30_000, 10_000)  # the shares, to the character
    assert report["sources"]["en"]["chars_sampled"] == en_chars and report["sources"]["zh"]["chars_sampled"] == zh_chars
    assert report["sources"]["en"]["chars_seen"] == sum(map(len, english))
    assert report["chars_sampled"] == 40_000
    # Spread across the source, not its first documents: sampled documents come from every third of it.
    indices = [int(m.group(1)) for t in texts for m in [re.match(r"Document (\d+):", t)] if m]
    assert {i * 3 // len(english) for i in indices} == {0, 1, 2}
    # Every piece is text of its source (at most one cut, the share's last piece).
    corpus = "\n".join(english + chinese)
    assert all(t in corpus for t in texts)
    again, _ = sample_sources([("en", 3.0, iter(english)), ("zh", 1.0, iter(chinese))], 40_000, seed=7)
    assert again == texts  # seeded


def test_a_source_smaller_than_its_share_gives_all_it_has(caplog):
    texts, report = sample_sources([("big", 1.0, ["x " * 5000]), ("small", 1.0, ["short text"])], 4_000)
    assert report["sources"]["small"] == {**report["sources"]["small"], "chars_sampled": 10, "target_chars": 2000}
    assert report["sources"]["big"]["chars_sampled"] == 2000
    assert "small holds only 10 of the 2000 characters" in caplog.text
    assert sample_sources([("a", 1.0, ["abc", "de"])], 0)[0] == ["abc", "de"]  # 0: everything


def test_long_documents_are_cut_into_pieces():
    text = ("a line of text\n" * 3000) + "x" * 45_000
    pieces = list(split_text(text, 20_000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 20_000
    assert pieces[0].endswith("\n")  # cut after a line break where there is one
    pieces, stats = sample_pieces([text], 12_345, random.Random(0))
    assert sum(map(len, pieces)) == 12_345 and stats["documents_seen"] == 1


def test_chinese_listed_second_is_learned(write_jsonl, tmp_path):
    """--sample_chars below the first source's size: in order, the Chinese source was never seen."""
    english = english_documents(400, seed=1)
    chinese, words = chinese_documents(150, seed=2)
    en_path = write_jsonl(({"text": t} for t in english), name="en.jsonl")
    zh_path = write_jsonl(({"text": t} for t in chinese), name="zh.jsonl")
    sample_chars = 120_000
    assert sum(map(len, english)) > sample_chars
    out_dir = tmp_path / "tokenizer"
    tokenizer = load_script().main(["--sources", f"en={en_path}", f"zh={zh_path}", "--vocab_size", "800",
                                    "--sample_chars", str(sample_chars), "--output_dir", str(out_dir)])
    in_order = train_bpe_tokenizer(sample_texts(itertools.chain(english, chinese), sample_chars), 800,
                                   show_progress=False)
    probe = "".join(random.Random(3).choice(words) for _ in range(12)) + "。"
    sampled_tokens = len(tokenizer(probe, add_special_tokens=False)["input_ids"])
    in_order_tokens = len(in_order(probe, add_special_tokens=False)["input_ids"])
    assert sampled_tokens * 3 < in_order_tokens, (sampled_tokens, in_order_tokens)

    report = json.loads((out_dir / "sample_report.json").read_text())
    assert {name: info["chars_sampled"] for name, info in report["sources"].items()} == {"en": 60_000, "zh": 60_000}
    assert report["sources"]["zh"]["chars_seen"] == sum(map(len, chinese))
    assert report["sources"]["en"]["documents_seen"] == len(english)


@pytest.mark.parametrize("txt_unit", ["paragraph", "file"])
def test_the_limit_holds_for_a_txt_file(tmp_path, txt_unit):
    """A .txt source used to be one document, taken whole whatever --sample_chars said."""
    rng = random.Random(0)
    paragraphs = [f"Paragraph {i}. " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(60))
                  for i in range(400)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    out_dir = tmp_path / "tokenizer"
    load_script().main(["--sources", str(path), "--vocab_size", "300", "--sample_chars", "30000",
                        "--txt_unit", txt_unit, "--output_dir", str(out_dir)])
    info = json.loads((out_dir / "sample_report.json").read_text())["sources"]["book"]
    # Paragraphs are read without the blank lines between them.
    seen = sum(map(len, paragraphs)) if txt_unit == "paragraph" else len(path.read_text(encoding="utf-8"))
    assert info["chars_sampled"] == 30_000 and info["chars_seen"] == seen
    assert info["pieces_sampled"] > 1


def test_scan_factor_stops_reading_a_source_after_that_many_times_its_share():
    """A huge source is not read to its end: with --sample_scan_factor F, reading stops once F x its share
    has been seen, and the sample still holds exactly the share, drawn across what was read."""
    read = []

    def source(count):
        for index, text in enumerate(english_documents(count)):
            read.append(index)
            yield text

    documents = english_documents(400)
    share = sum(map(len, documents[:10]))
    texts, report = sample_sources([("web", 1.0, source(400))], share, seed=3, scan_factor=4)
    seen = report["sources"]["web"]["chars_seen"]
    assert sum(map(len, texts)) == share
    assert 4 * share <= seen < 4 * share + max(map(len, documents)) + 1
    assert len(read) < 400  # stopped early
    assert len(read) >= 35  # but saw far more documents than the share holds (10)
    everything, full = sample_sources([("web", 1.0, source(400))], share, seed=3, scan_factor=0)
    assert full["sources"]["web"]["documents_seen"] == 400
