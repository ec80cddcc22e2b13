"""Data quality filters for web text: language identification and a reference-model perplexity filter.

Language identification (`--languages en,zh --min_language_confidence 0.9`) runs per document inside the
cleaning step (lmtrain/data/cleaning.py, so in parallel and cached). It uses py3langid, the maintained fork
of langid.py, whose naive Bayes model (140 language labels) ships inside the wheel (nothing is downloaded at run time).
A document is dropped as `wrong_language` when its most likely language is not one of --languages, and as
`low_language_confidence` when it is but with a probability below the threshold. py3langid also knows `zxx`
("no linguistic content": symbols, numbers, keyboard mash), which is never a language one asks for.

The perplexity filter (`--perplexity_model DIR --max_perplexity X`) scores each document that cleaning and
deduplication kept with a reference causal LM (any Hugging Face model directory with its tokenizer, e.g. a
small model trained by this toolkit on text you trust), on its first --perplexity_max_tokens tokens, and
drops it as `high_perplexity` above the threshold (CCNet's recipe, Wenzek et al. 2020, with a KenLM model
there). Perplexity is per token of the reference model's tokenizer, so a threshold belongs to one
reference model: look at the scores of known-good documents first (report.json: perplexity percentiles).
"""
from __future__ import annotations

import logging
import math
import re

import numpy as np

logger = logging.getLogger(__name__)

# Characters of a document the language identifier reads: enough for a confident answer, and a bound on
# the cost of very long documents (the start of a page is its language often enough).
LANGUAGE_SAMPLE_CHARS = 4096
NO_LANGUAGE = "zxx"
_IDENTIFIER = None


def parse_languages(value: str) -> tuple[str, ...]:
    """'en,zh' / 'en+zh' / 'en zh' -> ('en', 'zh'); '' or 'none' -> () (the filter is off)."""
    codes = tuple(code for code in re.split(r"[,+\s]+", (value or "").strip().lower()) if code)
    return () if codes in ((), ("none",)) else codes


def language_identifier():
    """py3langid's identifier with normalized probabilities, loaded once per process (about 2 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError as err:
            from lmtrain.data.sources import DataError

            raise DataError("--languages needs the py3langid package: pip install -r requirements.txt") from err
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def check_languages(codes: tuple[str, ...], where: str = "--languages"):
    """A code py3langid does not know would drop every document as wrong_language: refuse it up front."""
    known = set(language_identifier().nb_classes)
    unknown = [code for code in codes if code not in known]
    if unknown:
        from lmtrain.data.sources import DataError

        raise DataError(f"{where}: {', '.join(unknown)} is not a language code py3langid knows (ISO 639-1, e.g. en, "
                        f"zh, de, fr, ja, ru); known: {', '.join(sorted(known - {NO_LANGUAGE}))}")


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the document's first LANGUAGE_SAMPLE_CHARS characters."""
    language, confidence = language_identifier().classify(text[:LANGUAGE_SAMPLE_CHARS])
    return str(language), float(confidence)


def language_drop(text: str, languages: tuple[str, ...], min_confidence: float) -> str:
    """'' (kept), 'wrong_language' or 'low_language_confidence'."""
    language, confidence = identify_language(text)
    if language not in languages:
        return "wrong_language"
    return "low_language_confidence" if confidence < min_confidence else ""


# ------------------------------------------------------------------------------------------ perplexity filter

def load_reference_model(model_dir: str):
    """(model, tokenizer) of the reference LM, in evaluation mode, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def document_perplexities(texts, model, tokenizer, max_tokens: int = 512, batch_tokens: int = 16384,
                          desc: str = "perplexity filter") -> np.ndarray:
    """exp(mean next-token NLL) of each text's first `max_tokens` tokens under `model`. Documents are scored
    in batches of about `batch_tokens` tokens, sorted by length so little of a batch is padding; a document
    of one token (nothing to predict) scores nan and is kept by the filter."""
    import torch
    from tqdm.auto import tqdm

    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded])
    order = np.argsort(-lengths, kind="stable")
    scores = np.full(len(encoded), np.nan)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(encoded), desc=desc, unit="doc")
    start = 0
    with torch.no_grad():
        while start < len(order):
            width = max(1, int(lengths[order[start]]))
            stop = min(len(order), start + max(1, batch_tokens // width))
            rows = order[start:stop]
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :lengths[row]] = torch.tensor(encoded[row], dtype=torch.long)
                mask[i, :lengths[row]] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            predicted = mask[:, 1:].float()
            count = predicted.sum(dim=1)
            mean = (nll * predicted).sum(dim=1) / count.clamp(min=1)
            values = torch.where(count > 0, mean.exp(), torch.full_like(mean, math.nan))
            scores[rows] = values.cpu().numpy()
            bar.update(len(rows))
            start = stop
    bar.close()
    return scores


def perplexity_percentiles(scores: np.ndarray) -> dict:
    finite = scores[np.isfinite(scores)]
    if len(finite) == 0:
        return {}
    p10, p50, p90, p99 = np.percentile(finite, [10, 50, 90, 99])
    return {"p10": round(float(p10), 2), "p50": round(float(p50), 2), "p90": round(float(p90), 2),
            "p99": round(float(p99), 2)}
