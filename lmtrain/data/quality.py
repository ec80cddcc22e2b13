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

import glob
import logging
import math
import os
import re

import numpy as np

from lmtrain.data.sources import DataError
from lmtrain.errors import first_line
from lmtrain.locations import hub_unreachable_for, looks_local

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

def _causal_lm_problem(config) -> str | None:
    """Why `config` is not a causal LM AutoModelForCausalLM can load whole, or None when it is one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"its model type '{config.model_type}' has no causal-LM class in transformers"
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    other = [name for name in config.architectures or []
             if name not in causal and not name.endswith(("ForCausalLM", "LMHeadModel"))]
    if other:  # e.g. BertModel (no head at all) or BertForMaskedLM (a head that sees the next token)
        return (f"config.json's architectures is {', '.join(other)}, not a causal LM (a next-token head such as "
                f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]})")
    return None


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
# The weight files save_pretrained writes (safetensors, or PyTorch's format), whole or sharded.
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def check_reference_model(name: str, flag: str = "--perplexity_model"):
    """The cheap checks of a reference model, before any document is read: the directory exists (a hub name
    is looked up), its config is a causal LM's, its tokenizer loads, encodes text and fits the vocabulary.
    Returns (config, tokenizer). The weights are checked when they are loaded (load_reference_model)."""
    config, tokenizer, _ = _checked_reference_model(name, flag)
    return config, tokenizer


def _checked_reference_model(name: str, flag: str):
    """check_reference_model's work, plus the from_pretrained options the weights are then loaded with (the
    one hub reachability check of the load)."""
    from transformers import AutoConfig, AutoTokenizer

    where = f"{flag} {name}"
    local = os.path.isdir(name)
    if not local:
        if os.path.exists(name):
            raise DataError(f"{where}: not a directory (give the directory of a causal LM saved with its "
                              "tokenizer: model.save_pretrained(DIR), tokenizer.save_pretrained(DIR))")
        if looks_local(name):
            raise DataError(f"{flag}: no such directory: {name}")
    elif not os.path.isfile(os.path.join(name, "config.json")):
        holds = "a tokenizer but no model" if os.path.isfile(os.path.join(name, "tokenizer_config.json")) else \
            ("nothing" if not os.listdir(name) else "no model")
        raise DataError(f"{where}: the directory holds {holds} (no config.json); give a causal LM directory with "
                          "its tokenizer (model.save_pretrained(DIR), tokenizer.save_pretrained(DIR))")
    # an unreachable hub: straight to the Hugging Face cache, not a minute of retries per file
    cache_only = {"local_files_only": True} if not local and hub_unreachable_for(name) else {}
    try:
        config = AutoConfig.from_pretrained(name, **cache_only)
    except (OSError, ValueError) as err:  # unreadable config.json, no model_type, offline, unknown hub name
        what = "not a causal LM directory with its tokenizer" if local else \
            "no such directory, and no hub model of that name could be loaded"
        raise DataError(f"{where}: {what} ({first_line(err)})") from err
    problem = _causal_lm_problem(config)
    if problem:
        raise DataError(f"{where}: {problem}; the perplexity filter needs a causal language model")
    if local and not any(glob.glob(os.path.join(glob.escape(name), pattern)) for pattern in WEIGHT_FILES):
        raise DataError(f"{where}: the directory holds a config.json but no weights ({WEIGHT_FILES[0]}); give "
                          "the directory the model was saved to (model.save_pretrained(DIR))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **cache_only)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{where}: its tokenizer cannot be loaded ({first_line(err)}); save it next to the "
                          "model: tokenizer.save_pretrained(DIR)") from err
    if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise DataError(f"{where}: its tokenizer turns text into no tokens (a directory without tokenizer "
                          "files?); save the model's tokenizer next to it: tokenizer.save_pretrained(DIR)")
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size and len(tokenizer) > vocab_size:
        raise DataError(f"{where}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                          f"{vocab_size} embeddings: not the tokenizer the model was trained with")
    return config, tokenizer, cache_only


def load_reference_model(model_dir: str, flag: str = "--perplexity_model"):
    """(model, tokenizer) of the reference LM, in evaluation mode, on the GPU when there is one. Refused with
    a DataError naming `flag` when it is no causal LM, or when weights of the model are not in the checkpoint
    (transformers initialises them at random: a BertModel loaded as BertLMHeadModel gets a random head, and
    every score would be about the vocabulary size)."""
    import torch
    from transformers import AutoModelForCausalLM

    _, tokenizer, cache_only = _checked_reference_model(model_dir, flag)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **cache_only)
    except Exception as err:  # no weights file, a truncated one (safetensors' own error), shapes that do not match
        raise DataError(f"{flag} {model_dir}: its weights cannot be loaded ({first_line(err)})") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise DataError(f"{flag} {model_dir}: the checkpoint lacks weights of {type(model).__name__} ({shown}), "
                          "which would be initialised at random and make every score meaningless; give a causal LM "
                          "saved with its language-model head")
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
