"""The share of each kind of document that each data quality filter drops (the figures of docs/DATA_QUALITY.md),
on the labelled corpus of tests/quality_corpus.py (clean English, six other languages, generated junk).

    python -m bench.quality_filters --tokenizer outputs/demo/tokenizer            # trains its reference LM
    python -m bench.quality_filters --tokenizer outputs/demo/tokenizer --reference_model outputs/demo/pretrain

Run from the repository root (`-m`, so tests/quality_corpus.py imports). The language filter is the one
prepare_pretrain.py applies (lmtrain.data.quality.language_drop); the perplexity filter scores with
lmtrain.data.quality.document_perplexities, and its threshold is the 95th percentile of English paragraphs
the reference model did not train on (calibration text, not in the corpus): what a user would do, look at
known-good text first.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from lmtrain.data.quality import document_perplexities, language_drop, load_reference_model
from lmtrain.tokenizer import load_tokenizer
from tests.quality_corpus import build_quality_corpus, train_reference_model


def share_table(records, dropped) -> dict:
    out = {}
    for kind in ("english", "other_language", "junk"):
        flags = [d for r, d in zip(records, dropped) if r["kind"] == kind]
        out[kind] = {"documents": len(flags), "dropped": int(sum(flags)), "share": round(float(np.mean(flags)), 3)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="Tokenizer of the reference model it trains.")
    parser.add_argument("--reference_model", help="Use this model directory instead of training one.")
    parser.add_argument("--steps", type=int, default=200, help="Training steps of the reference model.")
    parser.add_argument("--min_language_confidence", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    records, reference_texts = build_quality_corpus(seed=args.seed)
    results = {"corpus": {k: sum(r["kind"] == k for r in records) for k in ("english", "other_language", "junk")}}
    for confidence in args.min_language_confidence:
        start = time.perf_counter()
        reasons = [language_drop(r["text"], ("en",), confidence) for r in records]
        results[f"languages=en, min_language_confidence={confidence}"] = {
            **share_table(records, [bool(x) for x in reasons]),
            "reasons": {k: reasons.count(k) for k in sorted(set(reasons) - {""})},
            "seconds": round(time.perf_counter() - start, 2)}

    calibration = reference_texts[::3]  # not trained on: the threshold comes from these
    training = [t for i, t in enumerate(reference_texts) if i % 3]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.reference_model
        if model_dir is None:
            model_dir = tmp
            final_loss = train_reference_model(training, load_tokenizer(args.tokenizer), tmp, steps=args.steps,
                                               seed=args.seed)
            results["reference_model"] = {"trained_on_paragraphs": len(training), "steps": args.steps,
                                          "final_train_loss": round(final_loss, 3)}
        else:
            results["reference_model"] = {"directory": model_dir}
        model, tokenizer = load_reference_model(model_dir)
        start = time.perf_counter()
        scores = document_perplexities([r["text"] for r in records], model, tokenizer)
        seconds = time.perf_counter() - start
        threshold = float(np.percentile(document_perplexities(calibration, model, tokenizer), 95))
    medians = {k: round(float(np.median([s for r, s in zip(records, scores) if r["kind"] == k])), 1)
               for k in ("english", "other_language", "junk")}
    results[f"max_perplexity={threshold:.1f} (p95 of {len(calibration)} calibration paragraphs)"] = {
        **share_table(records, list(scores > threshold)), "median_perplexity": medians, "seconds": round(seconds, 2)}
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
