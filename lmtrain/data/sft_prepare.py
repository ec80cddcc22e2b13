"""SFT data preparation: read -> render with the chat template -> tokenize with assistant-only labels ->
truncate -> split -> pack or not -> rows, every step on disk in the `datasets` cache.

data_prep/prepare_sft.py saves the result (`save_prepared_sft`), `sft.py --dataset_path DIR` memory-maps
it (`load_prepared_sft`), `sft.py --train_files ...` runs the same steps on the fly. Nothing holds the
whole set in Python objects: records are read by lmtrain.data.sources into an Arrow file (a bad record
becomes a row with its drop reason, counted from that column), rendering and tokenizing run in
`datasets.map` workers, and packing works on NumPy columns and writes rows a chunk at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter

from lmtrain.data.chat_render import RecordProblem, mask_from_offsets, render_text
from lmtrain.data.packing import BLOCK_FEATURES, IGNORE_INDEX, private_tmp
from lmtrain.data.pipeline import _percentiles, _reused, _stamp
from lmtrain.data.tokenize import tokenizer_fingerprint
from lmtrain.data.sft import encode_conversation, record_to_messages
from lmtrain.data.sft_rows import pack_bins, write_rows
from lmtrain.data.sources import (DataError, ReadStats, expand_location, held_out_split, read_hub_records, read_records,
                                  reraise_data_error)
from lmtrain.errors import UserError

logger = logging.getLogger(__name__)
# Bump when the rows this code makes for the same inputs change: old caches must not be reused.
SFT_FORMAT_VERSION = 1
RECORD_FEATURES = datasets.Features({"record": datasets.Value("string"), "where": datasets.Value("string"),
                                     "drop": datasets.Value("string"), "split": datasets.Value("string")})
ENCODED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "num_tokens": datasets.Value("int32"), "num_trainable": datasets.Value("int32"),
    "truncated": datasets.Value("bool"), "drop": datasets.Value("string"), "split": datasets.Value("string")})
SFT_FORMAT_FIELDS = "'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction'+'output' (Alpaca)"
_WARNED: Counter = Counter()  # drop warnings given by this process, per reason
FORMAT_CHECK_RECORDS = 100  # as sources.FIELD_CHECK_RECORDS: a file none of whose first records is a chat


def _is_conversation(record: dict) -> bool:
    return "messages" in record or "conversations" in record or ("instruction" in record and "output" in record)


def _generate_sft_records(files: list[str], split: str, strict: bool, stamps: list[str]):
    """Generator for `Dataset.from_generator`: one row per record (as JSON text, since formats differ) with
    where it came from; reader drops become rows with a reason. `stamps` only make the cache key change
    with the files (path, size, mtime)."""
    del stamps
    for path in files:
        stats = ReadStats()
        if path.startswith("hub://"):
            name = path[len("hub://"):]  # held-out files read a validation or test split, never train's
            records = read_hub_records(name, "train" if split == "train" else held_out_split(name), stats)
        else:
            records = read_records(path, stats, strict)
        objects = conversations = 0
        fields: Counter = Counter()
        for where, record in records:
            for reason in stats.dropped.elements():
                yield {"record": "", "where": "", "drop": reason, "split": split}
            stats.dropped.clear()
            objects += 1
            conversations += _is_conversation(record)
            if not conversations:
                fields.update(record.keys())
                if objects >= FORMAT_CHECK_RECORDS:
                    _raise_no_conversation(path, fields)
            yield {"record": json.dumps(record, ensure_ascii=False, default=str), "where": where, "drop": "",
                   "split": split}
        for reason in stats.dropped.elements():
            yield {"record": "", "where": "", "drop": reason, "split": split}
        for _ in stats.empty_files:
            yield {"record": "", "where": path, "drop": "empty_file", "split": split}
        if objects > 1 and not conversations:
            _raise_no_conversation(path, fields)


def _raise_no_conversation(path: str, fields: Counter):
    found = ", ".join(name for name, _ in fields.most_common(8))
    raise DataError(f"{path}: no record is a conversation; expected {SFT_FORMAT_FIELDS}, found fields {found}. "
                    "Convert the file to one of these formats")


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def _files(locations: list[str]) -> list[str]:
    """Local record files of the locations (a directory's .txt / .md files are not conversations: left out),
    or one `hub://NAME` entry per hub dataset / save_to_disk directory."""
    files = []
    for location in locations:
        local = expand_location(location)
        if local is None:
            files.append(f"hub://{location}")
            continue
        if os.path.isdir(location):
            local = [f for f in local if f.lower().endswith(RECORD_SUFFIXES)]
            if not local:
                raise DataError(f"directory '{location}' holds no {' / '.join(RECORD_SUFFIXES)} files")
        files += local
    return files


def read_sft_files(locations: list[str], split: str, strict: bool, cache_dir: str, num_proc: int | None):
    files = _files(locations)
    workers = min(num_proc or 1, len(files))
    try:
        return datasets.Dataset.from_generator(
            _generate_sft_records, features=RECORD_FEATURES, cache_dir=cache_dir,
            num_proc=workers if workers > 1 else None,
            gen_kwargs={"files": files, "split": split, "strict": strict, "stamps": [_stamp(f) for f in files]})
    except datasets.exceptions.DatasetGenerationError as err:
        reraise_data_error(err)


def tokenizer_hash(tokenizer) -> str:
    """The tokenizer's full serialized content (model, normalizer, pre-tokenizer, added tokens), its chat
    template and special tokens: what the rendered ids depend on."""
    content = json.dumps([tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template,
                          tokenizer.special_tokens_map, tokenizer.padding_side], sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


def _encode_batch(batch: dict, tokenizer, max_length: int, train_on_prompt: bool, lenient: bool) -> dict:
    """datasets.map function: records -> ids, labels, counts; a record problem is a row with its reason
    (lenient) or a DataError naming file:line (strict). Conversations that fit and hold no special-token
    string in their content are encoded in one batch call of the Rust tokenizer; the others go through
    encode_conversation. Both give the same ids (tests/test_sft_prepare.py)."""
    count = len(batch["record"])
    empty = np.zeros(0, dtype=np.int32)  # every row NumPy int32: datasets concatenates them as one type
    out = {"input_ids": [empty] * count, "labels": [empty] * count,
           "num_tokens": [0] * count, "num_trainable": [0] * count, "truncated": [False] * count,
           "drop": list(batch["drop"]), "split": batch["split"]}

    def problem(i: int, err: RecordProblem):
        if not lenient:
            raise DataError(f"{batch['where'][i]}: {err} (with the default --lenient true such records are "
                            f"dropped and counted)") from None
        out["drop"][i] = err.reason
        _WARNED[err.reason] += 1
        if _WARNED[err.reason] <= 3:  # a few examples per process help; thousands would drown the log
            logger.warning("dropping record at %s: %s", batch["where"][i], err)

    def store(i: int, ids: list[int], labels: list[int], truncated: bool):
        out["input_ids"][i] = np.asarray(ids, dtype=np.int32)
        out["labels"][i] = np.asarray(labels, dtype=np.int32)
        out["truncated"][i], out["num_tokens"][i] = truncated, len(ids)
        out["num_trainable"][i] = sum(label != IGNORE_INDEX for label in labels[1:])

    pending = []  # (row, messages, spans) rendered without literals: encoded together below
    for i in range(count):
        if out["drop"][i]:
            continue
        try:
            messages = record_to_messages(json.loads(batch["record"][i]), batch["where"][i])
            text, spans, literals = render_text(tokenizer, messages)
            if literals:
                store(i, *encode_conversation(tokenizer, messages, max_length, train_on_prompt))
            else:
                pending.append((i, messages, spans, text))
        except RecordProblem as err:
            problem(i, err)
    encodings = tokenizer.backend_tokenizer.encode_batch([p[3] for p in pending], add_special_tokens=False)
    for (i, messages, spans, _), encoding in zip(pending, encodings):
        try:
            if len(encoding.ids) > max_length:  # truncation re-renders: the per-sample policy
                store(i, *encode_conversation(tokenizer, messages, max_length, train_on_prompt))
            else:
                ids = np.asarray(encoding.ids, dtype=np.int32)
                labels = ids if train_on_prompt else np.where(mask_from_offsets(encoding.offsets, spans), ids,
                                                              IGNORE_INDEX)
                trainable = int(np.count_nonzero(labels[1:] != IGNORE_INDEX))  # the first label is never predicted
                if not trainable:
                    raise RecordProblem("no_trainable_tokens", "no token left to train on (is the answer empty?)")
                out["input_ids"][i], out["labels"][i], out["num_tokens"][i] = ids, labels, len(ids)
                out["num_trainable"][i] = trainable
        except RecordProblem as err:
            problem(i, err)
    return out


def encode_records(records: datasets.Dataset, tokenizer, args, fingerprint: str, num_proc: int | None):
    try:
        return records.map(
            _encode_batch, batched=True, batch_size=256, num_proc=num_proc, features=ENCODED_FEATURES,
            remove_columns=records.column_names, new_fingerprint=fingerprint,
            load_from_cache_file=not getattr(args, "overwrite_cache", False), desc="rendering and tokenizing",
            fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length,
                       "train_on_prompt": args.train_on_prompt, "lenient": args.lenient})
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - from num_proc workers a DataError may arrive wrapped
        reraise_data_error(err)


def validation_mask(count: int, percentage: float, seed: int, evaluate: bool) -> np.ndarray:
    """Held-out samples by a seeded per-sample draw, before packing so no sample is in both splits. When
    evaluation is requested and the draw holds out nothing (2% of 20 samples), one sample is held out (and
    logged); with --validation_split_percentage 0 evaluation has nothing to run on: refused."""
    held_out = np.random.default_rng(seed).random(count) < percentage / 100
    if evaluate and not held_out.any():
        if percentage <= 0 or count < 2:
            raise UserError(f"evaluation is requested (--eval_strategy) but no validation sample is left "
                            f"({count} samples, --validation_split_percentage {percentage:g}); pass "
                            f"--validation_files, raise --validation_split_percentage, or set --eval_strategy no")
        held_out[np.random.default_rng(seed).integers(count)] = True
        logger.warning("--validation_split_percentage %g of %d samples holds out none: holding out 1 sample "
                       "for evaluation", percentage, count)
    return held_out


def _rows(encoded: datasets.Dataset, indices: np.ndarray, lengths: np.ndarray, args, pad_id: int,
          cache_root: Path, key: str) -> tuple[datasets.Dataset, str]:
    """Rows of the selected samples, written to an Arrow file in the cache (reused when it exists)."""
    digest = hashlib.sha256(json.dumps([encoded._fingerprint, key, args.max_length, args.packing, pad_id]).encode()
                            + indices.astype(np.int64).tobytes()).hexdigest()[:24]
    path = cache_root / f"sft-rows-{digest}.arrow"
    if path.exists() and not getattr(args, "overwrite_cache", False):
        return datasets.Dataset.from_file(str(path)), "reused"
    if args.packing:
        order, starts = pack_bins(lengths, args.max_length)
    else:
        order, starts = np.arange(len(indices)), None
    tmp = private_tmp(path)
    samples = encoded.with_format("arrow").select_columns(["input_ids", "labels"])
    with ArrowWriter(path=str(tmp), features=BLOCK_FEATURES) as writer:
        write_rows(samples, indices[order], starts, lengths[order], args.max_length, pad_id, writer)
        writer.finalize()
    tmp.replace(path)
    return datasets.Dataset.from_file(str(path)), "computed"


def prepare_sft_files(args, tokenizer, evaluate: bool = False):
    """SFT files -> (DatasetDict of rows, report dict). `evaluate`: the run evaluates, so a validation split
    must exist (see validation_mask)."""
    clock, seconds, cache = time.perf_counter, {}, {}
    cache_root = Path(getattr(args, "prepared_cache_dir", None) or Path.home() / ".cache" / "lmtrain" / "prepared")
    cache_root.mkdir(parents=True, exist_ok=True)
    datasets_cache = str(cache_root / "datasets")
    workers = getattr(args, "preprocessing_num_workers", None)
    num_proc = workers if (workers or 1) > 1 else None

    started, t0 = time.time(), clock()
    parts = [read_sft_files(args.train_files, "train", not args.lenient, datasets_cache, num_proc)]
    if args.validation_files:
        parts.append(read_sft_files(args.validation_files, "validation", not args.lenient, datasets_cache, num_proc))
    cache["read"] = "computed" if any(_reused(p, started) == "computed" for p in parts) else "reused"
    records = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    seconds["read"] = round(clock() - t0, 2)

    # The map's cache key, built explicitly: datasets' own hash of the tokenizer argument is not what the ids
    # depend on (tests/test_sft_prepare.py changes the template and the vocabulary and sees a new cache).
    key = json.dumps([SFT_FORMAT_VERSION, records._fingerprint, tokenizer_hash(tokenizer), args.max_length,
                      args.train_on_prompt, args.lenient])
    started, t0 = time.time(), clock()
    encoded = encode_records(records, tokenizer, args, hashlib.sha256(key.encode()).hexdigest()[:32], num_proc)
    cache["encode"] = _reused(encoded, started)
    seconds["encode"] = round(clock() - t0, 2)

    columns = encoded.with_format("arrow").select_columns(["num_tokens", "num_trainable", "truncated", "drop", "split"])
    drop = columns["drop"]
    dropped = {item["values"]: item["counts"] for item in pc.value_counts(drop).to_pylist() if item["values"]}
    kept = pc.equal(drop, "").to_numpy(zero_copy_only=False)
    is_train = pc.equal(columns["split"], "train").to_numpy(zero_copy_only=False)
    num_tokens = columns["num_tokens"].to_numpy().astype(np.int64)
    train_rows, validation_rows = np.flatnonzero(kept & is_train), np.flatnonzero(kept & ~is_train)
    if args.validation_files:
        if evaluate and not len(validation_rows):
            raise DataError(f"evaluation is requested but --validation_files {' '.join(args.validation_files)} "
                            f"give no sample (dropped: {dropped}); check those files")
    else:
        held_out = validation_mask(len(train_rows), args.validation_split_percentage, args.prepare_seed,
                                   evaluate and bool(len(train_rows)))
        train_rows, validation_rows = train_rows[~held_out], train_rows[held_out]
    if not len(train_rows):
        raise DataError(f"no SFT sample left to train on (dropped: {dropped}); check the files, their format "
                        f"and --max_length")

    started, t0 = time.time(), clock()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = {}
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        if len(rows):
            splits[split], cache[f"rows_{split}"] = _rows(encoded, rows, num_tokens[rows], args, pad_id,
                                                          cache_root, key)
    seconds["rows"] = round(clock() - t0, 2)
    kept_rows = np.flatnonzero(kept)
    report = {
        "samples": int(kept.sum()), "train_samples": int(len(train_rows)),
        "validation_samples": int(len(validation_rows)),
        "truncated": int(columns["truncated"].to_numpy(zero_copy_only=False)[kept_rows].sum()),
        "dropped": dropped, "tokens": int(num_tokens[kept_rows].sum()),
        "trainable_tokens": int(columns["num_trainable"].to_numpy()[kept_rows].astype(np.int64).sum()),
        "rows": {k: len(v) for k, v in splits.items()}, "packing": args.packing, "max_length": args.max_length,
        "train_on_prompt": args.train_on_prompt, "sample_tokens": _percentiles(num_tokens[kept_rows]),
        "tokenizer": tokenizer_fingerprint(tokenizer), "cache": cache, "seconds": seconds,
    }
    logger.info("SFT data: %d samples (%d train, %d validation), %d truncated, dropped %s, %d of %d tokens "
                "trainable, rows %s, cache %s", report["samples"], report["train_samples"],
                report["validation_samples"], report["truncated"], dropped or "none", report["trainable_tokens"],
                report["tokens"], report["rows"], ", ".join(f"{k}={v}" for k, v in cache.items()))
    return datasets.DatasetDict(splits), report


def summary(report: dict) -> str:
    lines = [f"samples: {report['samples']} ({report['train_samples']} train, {report['validation_samples']} "
             f"validation), truncated: {report['truncated']}"]
    lines += [f"  dropped ({reason}): {count}" for reason, count in sorted(report["dropped"].items())]
    lines.append(f"tokens: {report['tokens']}, trainable: {report['trainable_tokens']}")
    lines.append(f"sample length, tokens: {report['sample_tokens']}")
    lines.append(f"rows of {report['max_length']} ({'packed' if report['packing'] else 'one sample each'}): "
                 f"{report['rows']}")
    lines.append("cache: " + ", ".join(f"{step}={state}" for step, state in report["cache"].items()))
    return "\n".join(lines)


def save_prepared_sft(dataset: datasets.DatasetDict, report: dict, output_dir: str, tokenizer):
    """The prepared directory: the DatasetDict, report.json and the tokenizer it was made with."""
    dataset.save_to_disk(output_dir)
    Path(output_dir, "report.json").write_text(json.dumps({**report, "stage": "sft"}, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))


def load_prepared_sft(args, tokenizer, evaluate: bool = False):
    """A prepared SFT directory, memory-mapped -> (DatasetDict, report). Refused when it was made with another
    tokenizer or is not SFT data; its max_length and packing replace the run's (they are fixed there)."""
    from lmtrain.data.loading import check_prepared_tokenizer

    path = args.dataset_path
    report_path = Path(path, "report.json")
    if not Path(path, "dataset_dict.json").exists() or not report_path.exists():
        raise DataError(f"--dataset_path {path} is not a prepared SFT directory (no dataset_dict.json or "
                        "report.json); create one with data_prep/prepare_sft.py")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if report.get("stage") != "sft":
        raise DataError(f"--dataset_path {path} holds pretraining blocks, not SFT rows; prepare SFT data with "
                        "data_prep/prepare_sft.py (or train on it with pretrain.py)")
    check_prepared_tokenizer(path, report, tokenizer, prepare_script="data_prep/prepare_sft.py")
    given = getattr(args, "explicit_options", frozenset())  # set by the command-line parser
    for name in ("max_length", "packing"):
        if getattr(args, name) != report[name]:
            if name in given:  # as pretraining refuses an explicit --block_size the data does not have
                raise DataError(f"--{name} {getattr(args, name)}, but --dataset_path {path} was prepared with "
                                f"--{name} {report[name]} (fixed when it was prepared). Drop --{name} to train "
                                f"with {report[name]}, or prepare the data again with data_prep/prepare_sft.py "
                                f"--{name} {getattr(args, name)}")
            logger.info("--dataset_path %s was prepared with --%s %s: training with that", path, name, report[name])
            setattr(args, name, report[name])
    dataset = datasets.load_from_disk(path)
    if evaluate and "validation" not in dataset:
        raise UserError(f"evaluation is requested (--eval_strategy) but --dataset_path {path} has no validation "
                        "split; prepare it with --validation_split_percentage > 0 or --validation_files, or set "
                        "--eval_strategy no")
    highest = pc.max(dataset["train"].with_format("arrow")[: min(256, len(dataset["train"]))]["input_ids"]
                     .combine_chunks().flatten()).as_py() or 0
    if highest >= len(tokenizer):
        raise DataError(f"--dataset_path {path} holds token id {highest} but the tokenizer has {len(tokenizer)} "
                        "tokens; prepare it again with data_prep/prepare_sft.py --tokenizer_name of this run")
    logger.info("prepared SFT data %s: rows %s", path, {k: len(v) for k, v in dataset.items()})
    return dataset, report
