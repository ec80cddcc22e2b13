"""The pretraining data pipeline: load -> clean -> deduplicate -> split -> tokenize -> mix -> pack.

`prepare_pretrain_data` is the one entry point: data_prep/prepare_pretrain.py saves its result to disk,
pretrain.py calls it when handed raw files. Each heavy step is a cached `datasets` operation (a second run
with the same inputs and settings reuses it and says so); intermediate results live in Arrow files on
disk, so corpora larger than RAM only cost disk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from lmtrain.arguments import DataArguments
from lmtrain.data.cleaning import CleaningConfig, clean_batch, cleaning_config, exact_duplicates, near_duplicates
from lmtrain.data.mixture import check_sources_have_training_documents, empty_sources, mixture_selection
from lmtrain.data.packing import pack_documents, pack_validation, private_tmp
from lmtrain.data.sources import (reraise_data_error, DataError, ReadStats, SourceSpec, read_file, read_hub_dataset,
                                  resolve_source_files)
from lmtrain.data.quality import (check_languages, check_reference_model, document_perplexities,
                                  load_reference_model, parse_languages, perplexity_percentiles)
from lmtrain.data.splitting import group_validation_mask, read_grouped_texts, resolve_split_field
from lmtrain.data.tokenize import tokenize_table, tokenizer_fingerprint

logger = logging.getLogger(__name__)
# `group`: the --split_by value of each document ("" for a document-level split).
READ_FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string"),
                                   "drop": datasets.Value("string"), "group": datasets.Value("string")})


@dataclass
class PreparationReport:
    """What happened to the data; saved as report.json and printed as a summary."""

    sources: dict = field(default_factory=dict)
    documents_read: int = 0
    dropped: dict = field(default_factory=dict)
    documents_kept: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)
    block_size: int = 0
    packing_strategy: str = ""  # group_texts or best_fit: how the blocks were cut
    padded_tokens: int = 0
    dropped_remainder_tokens: int = 0
    doc_chars: dict = field(default_factory=dict)
    doc_tokens: dict = field(default_factory=dict)
    bytes_per_token: float = 0.0
    bytes_per_token_by_split: dict = field(default_factory=dict)
    # Validation blocks per source (each block holds one source's documents): blocks, tokens, bytes per token.
    validation_sources: dict = field(default_factory=dict)
    # How validation was held out: {"by": "document" | a --split_by field | "validation_files",
    # "validation_groups": the held-out group values}.
    split: dict = field(default_factory=dict)
    # --perplexity_model: the model, the threshold, how many documents it scored and their percentiles.
    perplexity: dict = field(default_factory=dict)
    # What training compares its tokenizer with (tokenizer_fingerprint): the data's ids mean this vocabulary.
    tokenizer: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    # The held-out documents as text (a Dataset), for save_prepared's validation.jsonl; not a figure.
    _validation_documents: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON-able figures (attributes starting with _ hold data, not figures)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def summary(self) -> str:
        lines = [f"documents read: {self.documents_read}"]
        lines += [f"  dropped ({reason}): {count}" for reason, count in sorted(self.dropped.items())]
        lines.append(f"documents kept: {self.documents_kept}")
        lines.append(f"tokens: {self.tokens}   blocks of {self.block_size} ({self.packing_strategy}): {self.blocks}")
        lines.append(f"document length, chars:  {self.doc_chars}")
        lines.append(f"document length, tokens: {self.doc_tokens}")
        lines.append(f"bytes per token: {self.bytes_per_token:.3f}")
        for name, info in self.sources.items():
            if info.get("skipped"):
                lines.append(f"source {name}: skipped ({info['skipped']}), its weight went to the other sources")
                continue
            lines.append(f"source {name}: weight share {info['target_share']:.3f}, "
                         f"achieved token share {info['achieved_share']:.3f} ({info['train_tokens']} tokens, "
                         f"x{info['epochs']:.2f} of its data)")
        if len(self.validation_sources) > 1:
            lines.append("validation blocks per source: " + ", ".join(
                f"{name} {info['blocks']} ({info['bytes_per_token']:.2f} bytes/token)"
                for name, info in self.validation_sources.items()))
        if self.perplexity:
            lines.append("perplexity under the reference model: " + ", ".join(
                f"{k} {v}" for k, v in self.perplexity.items() if k.startswith("p")))
        if self.split.get("validation_groups"):
            lines.append(f"validation split by {self.split['by']}: " + ", ".join(self.split["validation_groups"]))
        lines.append("cache: " + ", ".join(f"{step}={state}" for step, state in self.cache.items()))
        return "\n".join(lines)


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    p50, p90, p95 = np.percentile(values, [50, 90, 95])
    return {"p50": int(p50), "p90": int(p90), "p95": int(p95), "max": int(values.max())}


def _generate_records(files: list[str], source: str, text_field: str, txt_unit: str, strict: bool,
                      stamps: list[str], group_field: str | None = None):
    """Generator for `Dataset.from_generator`. Dropped records become rows with a reason, so their counts
    survive caching and multiprocessing. `stamps` (size, mtime) only make the cache key change with files.
    `group_field`: also read each document's --split_by value (lmtrain/data/splitting.py)."""
    del stamps
    for path in files:
        stats = ReadStats()
        if group_field:
            records = read_grouped_texts(path, text_field, group_field, txt_unit, stats, strict)
        elif path.startswith("hub://"):
            records = ((text, "") for text in read_hub_dataset(path[len("hub://"):], text_field, "train", stats,
                                                                strict))
        else:
            records = ((text, "") for text in read_file(path, text_field, txt_unit, stats, strict))
        for text, group in records:
            for reason in stats.dropped.elements():
                yield {"text": "", "source": source, "drop": reason, "group": ""}
            stats.dropped.clear()
            yield {"text": text, "source": source, "drop": "", "group": group}
        for reason in stats.dropped.elements():
            yield {"text": "", "source": source, "drop": reason, "group": ""}
        for empty in stats.empty_files:
            yield {"text": empty, "source": source, "drop": "empty_file", "group": ""}


def _stamp(path: str) -> str:
    if path.startswith("hub://"):
        return path
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _records_dataset(**kwargs) -> datasets.Dataset:
    """`Dataset.from_generator` over `_generate_records`, re-raising our DataError (which `datasets` wraps in
    a DatasetGenerationError saying only "An error occurred") so the user sees the file, line and field."""
    try:
        return datasets.Dataset.from_generator(_generate_records, features=READ_FEATURES, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        reraise_data_error(err)


def _source_files(spec: SourceSpec) -> list[str]:
    """Local files of a source, or one `hub://NAME` entry for a hub dataset."""
    files = resolve_source_files(spec)
    return files if files is not None else [f"hub://{spec.location}"]


def read_files(files: list[str], source: str, args: DataArguments, cache_dir: str | None,
               group_field: str | None = None) -> datasets.Dataset:
    """Records of `files`, tagged with `source` (and their `group_field` value), as a cached Arrow dataset
    (one worker per file at most)."""
    num_proc = min(args.preprocessing_num_workers or 1, len(files))
    return _records_dataset(
        cache_dir=cache_dir, num_proc=num_proc if num_proc > 1 else None,
        gen_kwargs={"files": files, "source": source, "text_field": args.text_field, "txt_unit": args.txt_unit,
                    "strict": not args.lenient, "stamps": [_stamp(f) for f in files], "group_field": group_field},
    )


def _reused(dataset: datasets.Dataset, started: float) -> str:
    """'reused' when the step's output came from the datasets cache rather than being computed now."""
    files = dataset.cache_files
    if files and all(os.path.getmtime(f["filename"]) < started for f in files):
        return "reused"
    return "computed"


def _drop_counts(dataset: datasets.Dataset) -> Counter:
    return Counter(r for r in dataset.with_format("arrow")["drop"].to_pylist() if r)


def _deduplicate(cleaned: datasets.Dataset, config: CleaningConfig, cache_dir: Path, overwrite: bool) -> np.ndarray:
    """Per-row drop reasons after exact and near deduplication (first occurrence kept). Cached: the LSH pass
    is sequential, and every rank of a multi-GPU job calls this after rank 0 has prepared the data."""
    key = hashlib.sha256(json.dumps([cleaned._fingerprint, config.dedup_exact, config.dedup_near,
                                     config.near_dup_threshold]).encode()).hexdigest()[:24]
    path = cache_dir / f"dedup-{key}.npz"
    if path.exists() and not overwrite:
        saved = np.load(path)
        return np.array([str(r) for r in saved["reasons"]], dtype=object)[saved["codes"]]
    drops = _find_duplicates(cleaned, config)
    reasons, codes = np.unique(drops.astype(str), return_inverse=True)  # one small code per row
    tmp = private_tmp(path).with_suffix(".npz")  # np.savez appends .npz to other names
    np.savez(tmp, reasons=reasons, codes=codes.astype(np.uint8 if len(reasons) < 256 else np.int32))
    tmp.replace(path)
    return drops


def _find_duplicates(cleaned: datasets.Dataset, config: CleaningConfig) -> np.ndarray:
    table = cleaned.with_format("arrow")
    drops = np.array(table["drop"].to_pylist(), dtype=object)
    if config.dedup_exact:
        hashes = table["hash"].to_numpy()
        duplicate = exact_duplicates(hashes, drops == "")
        drops[duplicate] = "exact_duplicate"
    if config.dedup_near:
        keep_now = drops == ""

        def batches():
            for offset in tqdm(range(0, len(cleaned), 8192), desc="near-dedup (LSH)", unit="batch"):
                chunk = table[offset: offset + 8192]["minhash"].to_pylist()
                yield offset, [v if keep_now[offset + i] else [] for i, v in enumerate(chunk)]

        drops[near_duplicates(batches(), config, len(cleaned))] = "near_duplicate"
    return drops


def _perplexities(text_source: datasets.Dataset, candidates: np.ndarray, args: DataArguments,
                  cache_dir: Path) -> tuple[np.ndarray, str]:
    """Reference-model perplexity per row (nan for rows not scored), cached: scoring is the slow step; and
    'reused' or 'computed' (the cache line of the summary)."""
    model_files = sorted(Path(args.perplexity_model).glob("*")) if os.path.isdir(args.perplexity_model) else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_files if f.is_file()]
    key = hashlib.sha256(json.dumps([text_source._fingerprint, os.path.abspath(args.perplexity_model), stamp,
                                     args.perplexity_max_tokens]).encode() + candidates.tobytes()).hexdigest()[:24]
    path = cache_dir / f"perplexity-{key}.npy"
    if path.exists() and not args.overwrite_cache:
        return np.load(path), "reused"
    model, tokenizer = load_reference_model(args.perplexity_model)  # a DataError naming the flag if unusable
    rows = np.flatnonzero(candidates)
    scores = np.full(len(candidates), np.nan)
    texts = text_source.select_columns(["text"]).with_format("arrow")
    for offset in range(0, len(rows), 8192):  # a slice of the texts in memory at a time
        chunk = rows[offset: offset + 8192]
        scores[chunk] = document_perplexities(
            texts.select(chunk)["text"].to_pylist(), model, tokenizer, args.perplexity_max_tokens,
            args.perplexity_batch_tokens, desc=f"perplexity filter ({offset + len(chunk)}/{len(rows)} docs)")
    tmp = private_tmp(path).with_suffix(".npy")  # np.save appends .npy to other names
    np.save(tmp, scores)
    tmp.replace(path)
    return scores, "computed"


def check_quality_options(args: DataArguments, config: CleaningConfig, source_configs: dict, specs: list):
    """What the quality filters would only find out after reading (and cleaning) every document, checked
    before the first is read: language codes (a typo drops every document), a --min_language_confidence that
    no language filter would use, and the reference model's directory, config and tokenizer."""
    default_confidence = DataArguments.__dataclass_fields__["min_language_confidence"].default
    named = [("--languages", config), *((f"source {name}: languages", c) for name, c in source_configs.items())]
    for where, c in named:
        if parse_languages(c.languages):
            check_languages(parse_languages(c.languages), where)
    if not args.clean:
        for spec in specs:
            given = [key for key in ("languages", "min_language_confidence") if key in spec.cleaning]
            if given:
                raise DataError(f"source {spec.name}: {'/'.join(given)} is a cleaning step, and --clean false turns "
                                "every cleaning step off: drop one or the other")
    if args.min_language_confidence != default_confidence and not any(parse_languages(c.languages)
                                                                      for _, c in named):
        raise DataError(f"--min_language_confidence {args.min_language_confidence} applies only with a language "
                        "filter: add --languages (e.g. --languages en,zh) or leave it out")
    for spec in specs:
        own = spec.cleaning.get("min_language_confidence", default_confidence)
        if own != default_confidence and not parse_languages(spec.cleaning_config(config).languages):
            raise DataError(f"source {spec.name}: min_language_confidence={own} applies only with a language "
                            "filter for that source: add languages=en (several: languages=en+zh) to it, or "
                            "give --languages")
    if args.perplexity_model:
        check_reference_model(args.perplexity_model)


def prepare_pretrain_data(args: DataArguments, tokenizer, cache_dir: str | None = None):
    """Raw sources -> DatasetDict(train, validation) of packed blocks, and a PreparationReport."""
    report = PreparationReport(block_size=args.block_size, packing_strategy=args.packing_strategy)
    cache_root = Path(cache_dir or args.prepared_cache_dir or Path.home() / ".cache" / "lmtrain" / "prepared")
    cache_root.mkdir(parents=True, exist_ok=True)
    datasets_cache = str(cache_root / "datasets")
    num_proc = args.preprocessing_num_workers if (args.preprocessing_num_workers or 1) > 1 else None
    load_from_cache = not args.overwrite_cache
    clock = time.perf_counter

    specs = [SourceSpec.parse(s) for s in args.source_specs]
    if len({s.name for s in specs}) != len(specs):
        raise DataError("two sources have the same name; name them: NAME=PATH@WEIGHT")
    # With --validation_files nothing is split off the sources, so no group needs reading.
    group_field = None if args.validation_files else resolve_split_field(args.split_by, [s.location for s in specs])
    if args.validation_groups and not group_field:
        raise DataError("--validation_groups names groups of a --split_by field; pass --split_by FIELD (the demo "
                        "corpus: play) and no --validation_files")
    config = cleaning_config(args)
    # Per-source overrides (NAME=PATH@WEIGHT:strip_html=false); validation files use the global settings.
    source_configs = {s.name: s.cleaning_config(config) for s in specs if s.cleaning}
    for spec in args.validation_files or []:
        if SourceSpec.parse(spec).cleaning:
            raise DataError(f"--validation_files '{spec}': per-source cleaning options apply to --sources only; "
                            "validation files are cleaned with the global flags (e.g. --strip_html false)")
    check_quality_options(args, config, source_configs, specs)  # before reading: a mistake costs no read

    started, t0 = time.time(), clock()
    parts = [read_files(_source_files(spec), spec.name, args, datasets_cache, group_field) for spec in specs]
    if args.validation_files:
        validation_files = [f for spec in args.validation_files for f in _source_files(SourceSpec.parse(spec))]
        parts.append(read_files(validation_files, "__validation__", args, datasets_cache))
    raw = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    report.cache["read"] = "computed" if any(_reused(p, started) == "computed" for p in parts) else "reused"
    report.seconds["read"] = round(clock() - t0, 2)

    started, t0 = time.time(), clock()
    if any([c.unicode_normalization.lower() != "none" or c.remove_control_chars or c.strip_html or c.min_chars
            or c.max_chars or c.dedup_exact or c.dedup_near or parse_languages(c.languages)
            for c in [config, *source_configs.values()]]):
        cleaned = raw.map(clean_batch, batched=True, batch_size=512, num_proc=num_proc,
                          fn_kwargs={"config": config, "source_configs": source_configs},
                          load_from_cache_file=load_from_cache, desc="cleaning")
        report.cache["clean"] = _reused(cleaned, started)
        drops = _deduplicate(cleaned, config, cache_root, args.overwrite_cache)
        text_source = cleaned.remove_columns([c for c in cleaned.column_names if c not in ("text", "source", "group")])
    else:
        drops = np.array(raw.with_format("arrow")["drop"].to_pylist(), dtype=object)
        text_source = raw.remove_columns(["drop"])
    report.seconds["clean_dedup"] = round(clock() - t0, 2)
    if args.perplexity_model:
        t0 = clock()
        scores, report.cache["perplexity"] = _perplexities(text_source, drops == "", args, cache_root)
        report.perplexity = {"model": args.perplexity_model, "max_perplexity": args.max_perplexity,
                             "scored": int(np.isfinite(scores).sum()), **perplexity_percentiles(scores)}
        drops[np.nan_to_num(scores, nan=0.0) > args.max_perplexity] = "high_perplexity"
        report.seconds["perplexity"] = round(clock() - t0, 2)
    report.dropped = dict(Counter(d for d in drops if d))
    report.documents_read = int(sum(1 for d in drops if d not in ("empty_file",)))
    row_sources = np.array(raw.with_format("arrow")["source"].to_pylist(), dtype=object)
    empty = empty_sources(row_sources, drops, specs)

    kept = np.flatnonzero(drops == "")
    if len(kept) == 0:
        what = "every input file is empty" if len(empty) == len(specs) else f"read {len(drops)}"
        raise DataError(f"no documents left to train on ({what}, dropped: {report.dropped}); "
                        "check --text_field, the files, and the cleaning thresholds")
    started, t0 = time.time(), clock()
    kept_texts = text_source.select(kept)
    tokenized = kept_texts.with_format("arrow").map(
        tokenize_table, batched=True, batch_size=1000, num_proc=num_proc, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["text"], load_from_cache_file=load_from_cache, desc="tokenizing")
    report.cache["tokenize"] = _reused(tokenized, started)
    report.seconds["tokenize"] = round(clock() - t0, 2)

    meta = tokenized.with_format("arrow").select_columns(["num_tokens", "num_bytes", "num_chars", "source"])
    sources = np.array(meta["source"].to_pylist(), dtype=object)
    num_tokens = meta["num_tokens"].to_numpy()
    num_bytes = meta["num_bytes"].to_numpy()
    report.doc_chars = _percentiles(meta["num_chars"].to_numpy())
    report.doc_tokens = _percentiles(num_tokens)
    report.bytes_per_token = float(num_bytes.sum() / max(1, num_tokens.sum()))

    rng = np.random.default_rng(args.prepare_seed)
    if args.validation_files:
        is_validation = sources == "__validation__"
        report.split = {"by": "validation_files"}
    elif group_field:
        # Whole groups (plays, sites, files) on one side: no held-out document has a sibling in training.
        groups = np.array(kept_texts.with_format("arrow")["group"].to_pylist(), dtype=object)
        is_validation = group_validation_mask(groups, num_tokens, args.validation_split_percentage, rng,
                                              args.validation_groups)
        report.split = {"by": group_field, "validation_groups": sorted(set(groups[is_validation].tolist()))}
    else:
        report.split = {"by": "document"}
        # Split whole documents before packing: no document can straddle train and validation.
        is_validation = rng.random(len(sources)) < args.validation_split_percentage / 100
        if args.validation_split_percentage > 0 and not is_validation.any() and len(sources) > 1:
            is_validation[rng.integers(len(sources))] = True
    train_rows = np.flatnonzero(~is_validation)
    validation_rows = np.flatnonzero(is_validation)
    weights = {s.name: s.weight for s in specs if s.name not in empty}
    check_sources_have_training_documents(weights, sources[train_rows], sources[validation_rows], row_sources, drops)
    total = args.mixture_tokens or int(num_tokens[train_rows].sum())
    train_indices, report.sources = mixture_selection(sources, num_tokens, train_rows, weights, total, rng)
    for spec in specs:
        if spec.name in empty:
            report.sources[spec.name] = {"weight": spec.weight, "target_share": 0.0, "held_tokens": 0,
                                         "train_tokens": 0, "epochs": 0.0, "achieved_share": 0.0,
                                         "skipped": "every file is empty"}
    report.documents_kept = {"train": int(len(train_rows)), "validation": int(len(validation_rows))}
    report._validation_documents = kept_texts.select(validation_rows)

    t0 = clock()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = {}
    for split, indices in (("train", train_indices), ("validation", validation_rows)):
        if len(indices) == 0:
            continue
        if split == "train":
            packed, info = pack_documents(tokenized, indices, args.block_size, pad_id, args.drop_remainder, cache_root,
                                          args.overwrite_cache, desc=f"packing {split}",
                                          strategy=args.packing_strategy)
        else:
            packed, info, report.validation_sources = pack_validation(
                tokenized, indices, sources, num_tokens, num_bytes, args, pad_id, cache_root)
        if info["blocks"] or split == "train":  # an empty validation split would only break evaluation
            splits[split] = packed
        else:
            logger.warning("the validation split holds no block of %d tokens (%d tokens, drop_remainder): "
                           "no validation split", args.block_size, int(num_tokens[indices].sum()))
        report.blocks[split] = info["blocks"]
        report.tokens[split] = int(num_tokens[indices].sum())
        report.bytes_per_token_by_split[split] = float(num_bytes[indices].sum() / max(1, report.tokens[split]))
        report.padded_tokens += info["padded_tokens"]
        report.dropped_remainder_tokens += info["dropped_tokens"]
        report.cache[f"pack_{split}"] = info["cache"]
    report.seconds["pack"] = round(clock() - t0, 2)
    report.tokenizer = tokenizer_fingerprint(tokenizer)
    if "train" not in splits or report.blocks["train"] == 0:
        raise DataError(f"the training split holds no block of {args.block_size} tokens "
                        f"({report.tokens.get('train', 0)} tokens); lower --block_size or add data")
    return datasets.DatasetDict(splits), report
