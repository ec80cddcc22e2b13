"""The data quality filters of prepare_pretrain.py (lmtrain/data/quality.py): language identification with a
confidence threshold and the reference-model perplexity filter, on a labelled corpus built here
(tests/quality_corpus.py: clean English, six other languages, generated junk); drops counted per reason."""
from __future__ import annotations

import numpy as np
import pytest

from lmtrain.arguments import DataArguments
from lmtrain.data.quality import document_perplexities, language_drop, load_reference_model, parse_languages
from lmtrain.data.sources import DataError
from quality_corpus import build_quality_corpus, train_reference_model


@pytest.fixture(scope="module")
def corpus():
    return build_quality_corpus(seed=0)


def shares(records, dropped) -> dict:
    kinds = sorted({r["kind"] for r in records})
    return {k: np.mean([d for r, d in zip(records, dropped) if r["kind"] == k]) for k in kinds}


def test_parse_languages():
    assert parse_languages("en,zh") == ("en", "zh") == parse_languages(" EN+zh ")
    assert parse_languages("") == () == parse_languages("none")


def test_language_filter_keeps_english_and_drops_the_rest(corpus):
    records, _ = corpus
    reasons = [language_drop(r["text"], ("en",), 0.9) for r in records]
    share = shares(records, [bool(x) for x in reasons])
    assert share["english"] == 0.0
    assert share["other_language"] == 1.0
    assert share["junk"] >= 0.95
    # Asking for a language keeps it: Chinese and Japanese documents pass a zh,ja filter, English does not.
    cjk = [r for r in records if r["detail"] in ("zh", "ja")]
    assert all(language_drop(r["text"], ("zh", "ja"), 0.9) == "" for r in cjk)
    assert language_drop(records[0]["text"], ("zh",), 0.9) in ("wrong_language", "")


def test_language_filter_in_the_pipeline_counts_each_reason(corpus, write_jsonl, prepare_data):
    records, _ = corpus
    path = write_jsonl([{"text": r["text"]} for r in records])
    _, report = prepare_data([path], languages="en", min_language_confidence=0.9)
    language_drops = report.dropped.get("wrong_language", 0) + report.dropped.get("low_language_confidence", 0)
    other = sum(r["kind"] == "other_language" for r in records)
    assert report.dropped.get("wrong_language", 0) >= other
    assert sum(report.dropped.values()) >= other + 0.95 * sum(r["kind"] == "junk" for r in records)
    assert report.documents_kept["train"] <= sum(r["kind"] == "english" for r in records)
    assert language_drops > 0
    # A source can opt out (a code source, say): nothing of it is language-filtered.
    _, exempt = prepare_data([f"all={path}:languages=none"], languages="en", min_language_confidence=0.9)
    assert "wrong_language" not in exempt.dropped and "low_language_confidence" not in exempt.dropped


def test_unknown_language_code_and_conflicts_are_refused(write_jsonl, prepare_data):
    path = write_jsonl([{"text": "Some English text that is long enough to keep."}])
    with pytest.raises(DataError, match="english is not a language code"):
        prepare_data([path], languages="english")
    with pytest.raises(ValueError, match="--clean false"):
        DataArguments(languages="en", clean=False)
    with pytest.raises(ValueError, match="go together"):
        DataArguments(perplexity_model="some/dir")


@pytest.fixture(scope="module")
def reference_model_dir(corpus, tiny_tokenizer, tmp_path_factory):
    _, reference_texts = corpus
    out = tmp_path_factory.mktemp("reference_lm")
    train_reference_model(reference_texts, tiny_tokenizer, str(out), steps=60)
    return out


def test_batched_scores_equal_one_document_at_a_time(corpus, reference_model_dir):
    records, _ = corpus
    texts = [r["text"] for r in records[:16]] + ["a"]
    model, tokenizer = load_reference_model(str(reference_model_dir))
    batched = document_perplexities(texts, model, tokenizer, max_tokens=96, batch_tokens=2048)
    single = document_perplexities(texts, model, tokenizer, max_tokens=96, batch_tokens=1)
    np.testing.assert_allclose(batched[:-1], single[:-1], rtol=1e-4)
    assert np.isnan(batched[-1]) or len(tokenizer("a", add_special_tokens=False)["input_ids"]) > 1


def test_perplexity_filter_drops_above_the_threshold(corpus, reference_model_dir, write_jsonl, prepare_data):
    records = corpus[0][:120]  # half the corpus, first 128 tokens of each: a few seconds of scoring
    model, tokenizer = load_reference_model(str(reference_model_dir))
    scores = document_perplexities([r["text"] for r in records], model, tokenizer, max_tokens=128)
    by_kind = {k: np.median([s for r, s in zip(records, scores) if r["kind"] == k]) for k in ("english", "junk")}
    assert by_kind["junk"] > 2 * by_kind["english"]  # even a seconds-old reference model tells them apart
    threshold = float(np.percentile([s for r, s in zip(records, scores) if r["kind"] == "english"], 95))
    path = write_jsonl([{"text": r["text"]} for r in records])
    # Cleaning off except the filter, so the pipeline scores exactly these texts.
    options = dict(unicode_normalization="none", remove_control_chars=False, strip_html=False, min_chars=0,
                   max_duplicate_line_fraction=1.0, min_unique_word_fraction=0.0, dedup_exact=False, dedup_near=False)
    _, report = prepare_data([path], perplexity_model=str(reference_model_dir), max_perplexity=threshold,
                             perplexity_max_tokens=128, **options)
    assert report.dropped == {"high_perplexity": int((scores > threshold).sum())}
    assert report.perplexity["scored"] == len(records) and report.perplexity["p50"] > 1
    dropped = shares(records, scores > threshold)
    assert dropped["english"] <= 0.1 and dropped["junk"] >= 0.5
