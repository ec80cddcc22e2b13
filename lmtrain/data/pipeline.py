"""The pretraining data pipeline: load -> clean -> deduplicate -> split -> tokenize -> mix -> pack.

`prepare_pretrain_data` is the one entry point: data_prep/prepare_pretrain.py saves its result to disk,
pretrain.py calls it when handed raw files. Each heavy step is a cached `datasets` operation (a second run
with the same inputs and settings reuses it and says so); intermediate results live in Arrow files on
disk, so corpora larger than RAM only cost disk.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from lmtrain.arguments import DataArguments
from lmtrain.data.cleaning import CleaningConfig, clean_batch, cleaning_config, exact_duplicates, near_duplicates
from lmtrain.data.packing import BLOCK_COLUMNS, BlockPacker, blocks_to_arrow
from lmtrain.data.sources import (DataError, ReadStats, SourceSpec, read_file, read_hub_dataset,
                                  resolve_source_files)

logger = logging.getLogger(__name__)
READ_FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string"),
                                   "drop": datasets.Value("string")})
BLOCK_FEATURES = datasets.Features.from_arrow_schema(pa.schema({name: pa.list_(pa.int32()) for name in BLOCK_COLUMNS}))


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
    padded_tokens: int = 0
    dropped_remainder_tokens: int = 0
    doc_chars: dict = field(default_factory=dict)
    doc_tokens: dict = field(default_factory=dict)
    bytes_per_token: float = 0.0
    bytes_per_token_by_split: dict = field(default_factory=dict)
    # Validation blocks per source (each block holds one source's documents): blocks, tokens, bytes per token.
    validation_sources: dict = field(default_factory=dict)
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
        lines.append(f"tokens: {self.tokens}   blocks of {self.block_size}: {self.blocks}")
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
        lines.append("cache: " + ", ".join(f"{step}={state}" for step, state in self.cache.items()))
        return "\n".join(lines)


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    p50, p90, p95 = np.percentile(values, [50, 90, 95])
    return {"p50": int(p50), "p90": int(p90), "p95": int(p95), "max": int(values.max())}


def _generate_records(files: list[str], source: str, text_field: str, txt_unit: str, strict: bool,
                      stamps: list[str]):
    """Generator for `Dataset.from_generator`. Dropped records become rows with a reason, so their counts
    survive caching and multiprocessing. `stamps` (size, mtime) only make the cache key change with files."""
    del stamps
    for path in files:
        stats = ReadStats()
        if path.startswith("hub://"):
            records = read_hub_dataset(path[len("hub://"):], text_field, "train", stats, strict)
        else:
            records = read_file(path, text_field, txt_unit, stats, strict)
        for text in records:
            for reason in stats.dropped.elements():
                yield {"text": "", "source": source, "drop": reason}
            stats.dropped.clear()
            yield {"text": text, "source": source, "drop": ""}
        for reason in stats.dropped.elements():
            yield {"text": "", "source": source, "drop": reason}
        for empty in stats.empty_files:
            yield {"text": empty, "source": source, "drop": "empty_file"}


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
        cause = err.__cause__ or err.__context__
        while cause is not None:
            if isinstance(cause, DataError):
                raise DataError(str(cause)) from err
            # From worker processes (num_proc > 1) the original exception survives only as traceback text.
            text = str(cause)
            if "DataError: " in text:
                raise DataError(text.rsplit("DataError: ", 1)[1].strip().splitlines()[0]) from err
            cause = cause.__cause__ or cause.__context__
        raise


def _source_files(spec: SourceSpec) -> list[str]:
    """Local files of a source, or one `hub://NAME` entry for a hub dataset."""
    files = resolve_source_files(spec)
    return files if files is not None else [f"hub://{spec.location}"]


def read_files(files: list[str], source: str, args: DataArguments, cache_dir: str | None) -> datasets.Dataset:
    """Records of `files`, tagged with `source`, as a cached Arrow dataset (one worker per file at most)."""
    num_proc = min(args.preprocessing_num_workers or 1, len(files))
    return _records_dataset(
        cache_dir=cache_dir, num_proc=num_proc if num_proc > 1 else None,
        gen_kwargs={"files": files, "source": source, "text_field": args.text_field, "txt_unit": args.txt_unit,
                    "strict": not args.lenient, "stamps": [_stamp(f) for f in files]},
    )


# Memory per step is bounded in characters / tokens, not documents, so book-length documents cannot blow it
# up (measured in docs/PERFORMANCE.md: 5.8 GB -> 1.3 GB peak on 430 KB documents).
ENCODE_CHARS = 8_000_000  # ~2M tokens of Rust Encodings and Python id lists alive at once
PACK_TOKENS = 4_000_000   # ~250 MB of packer arrays at once


def _slices_by_chars(char_counts: np.ndarray, limit: int):
    """(start, stop) row ranges of at most `limit` characters each (a longer document goes alone)."""
    start, total = 0, 0
    for row, count in enumerate(char_counts):
        if row > start and total + count > limit:
            yield start, row
            start, total = row, 0
        total += int(count)
    if start < len(char_counts):
        yield start, len(char_counts)


def tokenize_table(table: pa.Table, tokenizer) -> pa.Table:
    """Arrow batch -> per-document `input_ids` (ending in EOS), `num_tokens`, `num_bytes`, `num_chars`, `source`.

    Calls the Rust tokenizer directly on slices of the batch (parallel inside) and builds Arrow arrays from
    flat NumPy buffers: this keeps the step close to raw `tokenizers` speed (docs/PERFORMANCE.md).
    """
    text = table.column("text").combine_chunks()
    num_chars = pa.compute.utf8_length(text).cast(pa.int64())
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    eos = tokenizer.eos_token_id
    flats, lengths = [], []
    # Special-token strings inside a document ("<|endoftext|>" in a web page about LLMs) are plain text:
    # encoded as special tokens they would put an EOS, or a chat marker, in the middle of a document.
    previous, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        for start, stop in _slices_by_chars(num_chars.to_numpy(zero_copy_only=False), ENCODE_CHARS):
            ids = [encoding.ids for encoding in encode(text.slice(start, stop - start).to_pylist(),
                                                       add_special_tokens=True)]
            for doc in ids:
                if not doc or doc[-1] != eos:
                    doc.append(eos)
            counts = [len(doc) for doc in ids]
            lengths.extend(counts)
            flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(counts)))
            del ids  # free this slice's Python int lists before encoding the next
    finally:
        backend.encode_special_tokens = previous
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "num_tokens": pa.array(lengths),
        "num_bytes": pa.compute.binary_length(text.cast(pa.binary())).cast(pa.int64()),
        "num_chars": num_chars,
        "source": table.column("source"),
    })


def tokenizer_fingerprint(tokenizer) -> dict:
    """What makes prepared ids mean the same text to another tokenizer: the whole vocabulary (added and
    special tokens included), the end-of-text id, and the ids the pipeline gives a probe text (which catches
    a different normalizer or split rule over the same vocabulary). Saved in report.json."""
    from lmtrain.tokenizer import RELOAD_PROBE

    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    probe = RELOAD_PROBE + " " + (tokenizer.eos_token or "")
    probe_ids = tokenize_table(pa.table({"text": [probe], "source": ["probe"]}), tokenizer)["input_ids"][0].as_py()
    name = tokenizer.name_or_path
    return {"name_or_path": os.path.abspath(name) if name and os.path.isdir(name) else name,
            "vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocabulary).hexdigest(),
            "eos_token_id": tokenizer.eos_token_id, "probe_ids": probe_ids}


def _reused(dataset: datasets.Dataset, started: float) -> str:
    """'reused' when the step's output came from the datasets cache rather than being computed now."""
    files = dataset.cache_files
    if files and all(os.path.getmtime(f["filename"]) < started for f in files):
        return "reused"
    return "computed"


def _pack(tokenized: datasets.Dataset, indices: np.ndarray, block_size: int, pad_id: int, drop_remainder: bool,
          cache_dir: Path, overwrite: bool, desc: str) -> tuple[datasets.Dataset, dict]:
    """Pack the selected documents, in order, into blocks written straight to an Arrow file (cached)."""
    key = hashlib.sha256(json.dumps([tokenized._fingerprint, block_size, pad_id, drop_remainder]).encode()
                         + indices.tobytes()).hexdigest()[:24]
    path = cache_dir / f"packed-{key}.arrow"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and not overwrite:
        return datasets.Dataset.from_file(str(path)), {**json.loads(meta_path.read_text()), "cache": "reused"}
    packer = BlockPacker(block_size, pad_id, drop_remainder)
    tmp = path.with_suffix(".tmp")
    selected = tokenized.select(indices).with_format("arrow")
    mean_tokens = pa.compute.mean(selected["num_tokens"]).as_py() or 1
    batch_docs = int(min(4096, max(1, PACK_TOKENS // mean_tokens)))
    blocks = 0
    # Explicit features: a split too small for one block (drop_remainder) still writes a valid, empty file.
    with ArrowWriter(path=str(tmp), features=BLOCK_FEATURES) as writer, \
            tqdm(total=len(indices), desc=desc, unit="doc") as bar:
        for table in selected.iter(batch_size=batch_docs):
            column = table.column("input_ids").combine_chunks()
            # flatten() honours slicing (`.values` would return the whole underlying buffer)
            flat = column.flatten().to_numpy(zero_copy_only=False)
            lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            for block in packer.add(flat, lengths):
                writer.write_table(blocks_to_arrow(block))
                blocks += len(block["input_ids"])
            bar.update(len(table))
        for block in packer.finish():
            writer.write_table(blocks_to_arrow(block))
            blocks += 1
        writer.finalize()
    tmp.replace(path)
    meta = {"blocks": blocks, "padded_tokens": packer.padded_tokens, "dropped_tokens": packer.dropped_tokens}
    meta_path.write_text(json.dumps(meta))
    return datasets.Dataset.from_file(str(path)), {**meta, "cache": "computed"}


def block_bytes(doc_tokens: np.ndarray, doc_bytes: np.ndarray, block_size: int, blocks: int) -> np.ndarray:
    """UTF-8 bytes of each block of documents packed in this order: a document's bytes are spread evenly
    over its tokens (EOS included), so a block holding whole documents gets exactly their bytes and the
    blocks of one document sum to its bytes."""
    cum_tokens = np.concatenate([[0], np.cumsum(doc_tokens)])
    cum_bytes = np.concatenate([[0], np.cumsum(doc_bytes)]).astype(np.float64)
    bounds = np.minimum(np.arange(blocks + 1) * block_size, cum_tokens[-1])
    return np.diff(np.interp(bounds, cum_tokens, cum_bytes))


def _pack_validation(tokenized: datasets.Dataset, rows: np.ndarray, sources: np.ndarray, num_tokens: np.ndarray,
                     num_bytes: np.ndarray, args: DataArguments, pad_id: int, cache_dir: Path):
    """Validation blocks packed per source, so each block holds one source's documents, with columns
    `source` and `num_bytes`: evaluation can sample every source and compute bits per byte from exactly
    the blocks it evaluated (the split's average bytes per token is wrong for a subset of a mixture)."""
    parts, per_source = [], {}
    total = {"blocks": 0, "padded_tokens": 0, "dropped_tokens": 0, "cache": "reused"}
    for name in dict.fromkeys(sources[rows]):  # sources in order of first appearance
        chosen = rows[sources[rows] == name]
        packed, info = _pack(tokenized, chosen, args.block_size, pad_id, args.drop_remainder, cache_dir,
                             args.overwrite_cache, desc=f"packing validation ({name})")
        for key in ("blocks", "padded_tokens", "dropped_tokens"):
            total[key] += info[key]
        if info["cache"] == "computed":
            total["cache"] = "computed"
        tokens = int(num_tokens[chosen].sum())
        per_source[name] = {"blocks": info["blocks"], "tokens": tokens,
                            "bytes_per_token": float(num_bytes[chosen].sum() / max(1, tokens))}
        if info["blocks"]:
            sizes = block_bytes(num_tokens[chosen], num_bytes[chosen], args.block_size, info["blocks"])
            parts.append(packed.add_column("source", [name] * info["blocks"])
                         .add_column("num_bytes", sizes.tolist()))
    if not parts:
        return packed, total, per_source  # no block at all: the caller reports an empty validation split
    return datasets.concatenate_datasets(parts), total, per_source


def mixture_selection(sources: np.ndarray, num_tokens: np.ndarray, candidates: np.ndarray,
                      weights: dict[str, float], total_tokens: int, rng: np.random.Generator):
    """Document indices whose token counts meet each source's weight share of `total_tokens`.

    A source with too few tokens is repeated (whole passes, then a random subset); one with too many is
    subsampled. Returns the selected indices (shuffled together when there are several sources) and, per
    source, the tokens it holds and the tokens selected.
    """
    weight_sum = sum(weights.values())
    selected, per_source = [], {}
    for name, weight in weights.items():
        rows = candidates[sources[candidates] == name]
        held = int(num_tokens[rows].sum())
        target = total_tokens * weight / weight_sum
        if held == 0:
            raise DataError(f"source '{name}' has no documents left after cleaning and splitting")
        passes = int(target // held)
        chosen = [rows] * passes
        order = rng.permutation(rows)
        cumulative = np.cumsum(num_tokens[order])
        chosen.append(order[: int(np.searchsorted(cumulative, target - passes * held))])
        picked = np.concatenate(chosen) if chosen else rows[:0]
        per_source[name] = {"weight": weight, "target_share": weight / weight_sum, "held_tokens": held,
                            "train_tokens": int(num_tokens[picked].sum()), "epochs": int(num_tokens[picked].sum()) / held}
        selected.append(picked)
    indices = np.concatenate(selected)
    if len(weights) > 1:
        indices = rng.permutation(indices)  # interleave sources so every block sees the mixture
    total = sum(s["train_tokens"] for s in per_source.values()) or 1
    for info in per_source.values():
        info["achieved_share"] = info["train_tokens"] / total
    return indices, per_source


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
    tmp = path.with_name(path.stem + ".tmp.npz")
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


def _empty_sources(row_sources: np.ndarray, drops: np.ndarray, specs: list[SourceSpec]) -> list[str]:
    """Sources whose every file is empty. One rule whether the empty file is a source of its own or one file
    of a directory source: it is skipped and counted as `empty_file`; such a source's weight goes to the
    others (the mixture has nothing to sample from it). Warned about, and listed in the report."""
    empty = []
    for spec in specs:
        rows = drops[row_sources == spec.name]
        if len(rows) and (rows == "empty_file").all():
            logger.warning("source '%s' (%s): every file is empty; skipped, its weight %g goes to the other "
                           "sources", spec.name, spec.location, spec.weight)
            empty.append(spec.name)
    return empty


def prepare_pretrain_data(args: DataArguments, tokenizer, cache_dir: str | None = None):
    """Raw sources -> DatasetDict(train, validation) of packed blocks, and a PreparationReport."""
    report = PreparationReport(block_size=args.block_size)
    cache_root = Path(cache_dir or args.prepared_cache_dir or Path.home() / ".cache" / "lmtrain" / "prepared")
    cache_root.mkdir(parents=True, exist_ok=True)
    datasets_cache = str(cache_root / "datasets")
    num_proc = args.preprocessing_num_workers if (args.preprocessing_num_workers or 1) > 1 else None
    load_from_cache = not args.overwrite_cache
    clock = time.perf_counter

    specs = [SourceSpec.parse(s) for s in args.source_specs]
    if len({s.name for s in specs}) != len(specs):
        raise DataError("two sources have the same name; name them: NAME=PATH@WEIGHT")
    started, t0 = time.time(), clock()
    parts = [read_files(_source_files(spec), spec.name, args, datasets_cache) for spec in specs]
    if args.validation_files:
        validation_files = [f for spec in args.validation_files for f in _source_files(SourceSpec.parse(spec))]
        parts.append(read_files(validation_files, "__validation__", args, datasets_cache))
    raw = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    report.cache["read"] = "computed" if any(_reused(p, started) == "computed" for p in parts) else "reused"
    report.seconds["read"] = round(clock() - t0, 2)

    config = cleaning_config(args)
    # Per-source overrides (NAME=PATH@WEIGHT:strip_html=false); validation files use the global settings.
    source_configs = {s.name: s.cleaning_config(config) for s in specs if s.cleaning}
    for spec in args.validation_files or []:
        if SourceSpec.parse(spec).cleaning:
            raise DataError(f"--validation_files '{spec}': per-source cleaning options apply to --sources only; "
                            "validation files are cleaned with the global flags (e.g. --strip_html false)")
    started, t0 = time.time(), clock()
    if any([c.unicode_normalization.lower() != "none" or c.remove_control_chars or c.strip_html or c.min_chars
            or c.max_chars or c.dedup_exact or c.dedup_near for c in [config, *source_configs.values()]]):
        cleaned = raw.map(clean_batch, batched=True, batch_size=512, num_proc=num_proc,
                          fn_kwargs={"config": config, "source_configs": source_configs},
                          load_from_cache_file=load_from_cache, desc="cleaning")
        report.cache["clean"] = _reused(cleaned, started)
        drops = _deduplicate(cleaned, config, cache_root, args.overwrite_cache)
        text_source = cleaned.remove_columns([c for c in cleaned.column_names if c not in ("text", "source")])
    else:
        drops = np.array(raw.with_format("arrow")["drop"].to_pylist(), dtype=object)
        text_source = raw.remove_columns(["drop"])
    report.seconds["clean_dedup"] = round(clock() - t0, 2)
    report.dropped = dict(Counter(d for d in drops if d))
    report.documents_read = int(sum(1 for d in drops if d not in ("empty_file",)))
    empty = _empty_sources(np.array(raw.with_format("arrow")["source"].to_pylist(), dtype=object), drops, specs)

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
    else:
        # Split whole documents before packing: no document can straddle train and validation.
        is_validation = rng.random(len(sources)) < args.validation_split_percentage / 100
        if args.validation_split_percentage > 0 and not is_validation.any() and len(sources) > 1:
            is_validation[rng.integers(len(sources))] = True
    train_rows = np.flatnonzero(~is_validation)
    validation_rows = np.flatnonzero(is_validation)
    weights = {s.name: s.weight for s in specs if s.name not in empty}
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
            packed, info = _pack(tokenized, indices, args.block_size, pad_id, args.drop_remainder, cache_root,
                                 args.overwrite_cache, desc=f"packing {split}")
        else:
            packed, info, report.validation_sources = _pack_validation(
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


def save_prepared(dataset: datasets.DatasetDict, report: PreparationReport, output_dir: str, tokenizer):
    """The prepared directory: the DatasetDict, report.json, the tokenizer it was made with, and
    validation.jsonl (the held-out documents' text; removed when there are none, so a re-prepared
    directory never keeps an old one)."""
    dataset.save_to_disk(output_dir)
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=2)
    held_out = report._validation_documents
    held_out_path = os.path.join(output_dir, "validation.jsonl")
    if held_out is not None and len(held_out):
        held_out.select_columns(["text", "source"]).to_json(held_out_path, force_ascii=False)
    elif os.path.exists(held_out_path):
        os.remove(held_out_path)
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))


def load_prepared(path: str) -> datasets.DatasetDict:
    if not os.path.exists(os.path.join(path, "dataset_dict.json")):
        raise DataError(f"'{path}' is not a prepared dataset directory (no dataset_dict.json); "
                        "create one with data_prep/prepare_pretrain.py")
    return datasets.load_from_disk(path)
