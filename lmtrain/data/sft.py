"""SFT data: conversations in any common format -> token ids with assistant-only labels -> (packed) rows.

Formats, detected per record: OpenAI `messages` (role/content), ShareGPT `conversations` (from/value),
Alpaca (instruction/input/output). Rendering goes through the tokenizer's chat template; the loss mask
covers each assistant message and its end-of-turn token, nothing else. Masks are built from positions,
never by comparing token ids with the pad id, so padding can never hide a real end token.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmtrain.data.packing import IGNORE_INDEX, positions_in_segments
from lmtrain.data.chat_render import RecordProblem, has_generation_markers, render_conversation  # noqa: F401
from lmtrain.data.sources import DataError
from lmtrain.errors import UserError

logger = logging.getLogger(__name__)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def to_messages(record: dict, where: str) -> list[dict]:
    """One record in any supported format -> a list of {"role", "content"}."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "conversations" in record:
        turns = record["conversations"]
        messages = [{"role": SHAREGPT_ROLES.get(str(t.get("from", "")).lower()), "content": t.get("value")}
                    for t in turns if isinstance(t, dict)]
        unknown = [t.get("from") for t, m in zip(turns, messages) if m["role"] is None]
        if unknown or len(messages) != len(turns):
            raise DataError(f"{where}: ShareGPT turns need 'from' in {sorted(SHAREGPT_ROLES)} and 'value'; "
                            f"got {unknown}")
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    raise DataError(f"{where}: unknown SFT format; expected 'messages', 'conversations' or "
                    f"'instruction'+'output', found fields {sorted(record)}")


# Roles that chat templates know; anything else is a typo ("assitant") that would silently become a prompt.
KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function", "ipython"}


def check_messages(messages: list[dict]):
    """Record problems that no template or truncation can fix (each a RecordProblem with its reason)."""
    if not messages:
        raise RecordProblem("bad_format", "the conversation has no messages")
    unknown = sorted({str(m["role"]) for m in messages if m["role"] not in KNOWN_ROLES})
    if unknown:
        raise RecordProblem("unknown_role", f"unknown role(s) {unknown}; expected one of {sorted(KNOWN_ROLES)}")
    bad = [m["role"] for m in messages if not isinstance(m["content"], str)]
    if bad:
        raise RecordProblem("non_string_content", f"message content must be a string (roles {bad})")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem("no_assistant_turn", "the conversation has no assistant message to train on")


@dataclass
class SFTStats:
    samples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    trainable_tokens: int = 0
    tokens: int = 0


def _answer_start(mask: list[int]) -> int:
    """Index of the first token of the last trained run (the last answer)."""
    start = max((i for i, m in enumerate(mask) if m), default=0)
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def encode_conversation(tokenizer, messages: list[dict], max_length: int,
                        train_on_prompt: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one conversation; raises RecordProblem for a record that cannot
    train. Pure: safe to run in datasets.map workers.

    Truncation policy, in order, until the sample fits in max_length:
    1. drop the oldest user/assistant rounds (the system prompt and the last round stay);
    2. cut tokens from the start (the prompt) when the last answer then still fits whole;
    3. otherwise keep the prompt's last min(P, max_length // 2) tokens (P: the prompt's length) and fill the
       rest with the answer's head (its tail is cut; such a sample no longer teaches stopping).
    Truncation is policy, never an error; a sample left without any trainable token (an empty answer with a
    template that writes no end-of-turn token) is a RecordProblem("no_trainable_tokens").
    """
    check_messages(messages)
    ids, mask = render_conversation(tokenizer, messages)
    truncated = len(ids) > max_length
    if truncated:
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        while len(ids) > max_length and sum(m["role"] == "assistant" for m in rest) > 1:
            cut = next(i for i, m in enumerate(rest) if m["role"] == "assistant") + 1
            rest = rest[cut:]
            ids, mask = render_conversation(tokenizer, system + rest)
        if len(ids) > max_length:
            prompt = _answer_start(mask)
            keep = prompt - (len(ids) - max_length)  # prompt tokens left when the answer stays whole
            if keep < 0:
                keep = min(prompt, max_length // 2)
            ids, mask = ids[prompt - keep:prompt - keep + max_length], mask[prompt - keep:prompt - keep + max_length]
    labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if not any(label != IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        raise RecordProblem("no_trainable_tokens", "no token left to train on (is the answer empty?)")
    return ids, labels, truncated


def encode_sample(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool, stats: SFTStats,
                  where: str = "sample", lenient: bool = True):
    """encode_conversation with the accounting: (input_ids, labels), or None when dropped (lenient) and
    counted in stats.dropped by reason; strict, a record problem is a DataError naming `where`."""
    try:
        ids, labels, truncated = encode_conversation(tokenizer, messages, max_length, train_on_prompt)
    except RecordProblem as err:
        if not lenient:
            raise DataError(f"{where}: {err} (with --lenient true such records are dropped and counted)") from None
        stats.dropped[err.reason] += 1
        if stats.dropped[err.reason] <= 3:
            logger.warning("dropping record at %s: %s", where, err)
        return None
    stats.samples += 1
    stats.truncated += truncated
    stats.tokens += len(ids)
    stats.trainable_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    return ids, labels


def pack_samples(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of whole samples (none is split) into bins of `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            space, index = capacity - lengths[i], len(bins) - 1
        else:
            space, index = free.pop(slot)
            bins[index].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, index))
    return bins


def build_rows(samples: list[tuple[list[int], list[int]]], max_length: int, pack: bool, pad_id: int) -> dict:
    """Rows of input_ids / labels / position_ids. Packed: several samples per row, positions restarting at
    each sample, the row padded to max_length (its padding a masked segment of its own). Unpacked: one
    sample per row (the collator pads the batch)."""
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    groups = pack_samples([len(ids) for ids, _ in samples], max_length) if pack else [[i] for i in range(len(samples))]
    for group in groups:
        ids = [t for i in group for t in samples[i][0]]
        labels = [t for i in group for t in samples[i][1]]
        lengths = [len(samples[i][0]) for i in group]
        if pack and len(ids) < max_length:
            pad = max_length - len(ids)
            ids, labels, lengths = ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, lengths + [pad]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions_in_segments(np.array(lengths)).tolist())
    return rows


def read_sft_records(path: str, lenient: bool, stats: SFTStats):
    """(where, record) pairs from a jsonl / json / parquet SFT file, decoded by the pretraining reader's rules
    (lmtrain.data.sources.read_jsonl): a UTF-8 byte-order mark is accepted, empty files are skipped, a bad
    line is a drop counted by reason or (strict) a DataError naming file:line."""
    from lmtrain.data.sources import ReadStats

    read_stats = ReadStats()
    if os.path.getsize(path) == 0:
        logger.warning("%s is empty: skipped", path)
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {index}", record
        return
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        try:
            records = json.loads(open(path, encoding="utf-8-sig").read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a valid JSON array ({err})") from None
        for index, record in enumerate(records):
            yield f"{path}[{index}]", record
        return
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                # utf-8-sig on the first line: files saved by Windows tools start with a byte-order mark.
                record = json.loads(raw.decode("utf-8-sig" if line_number == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                read_stats.drop("malformed_record", where, not lenient, f"not a UTF-8 JSON object ({err})")
                stats.dropped["malformed_record"] += 1
                continue
            yield where, record


def iter_sft_records(location: str, lenient: bool, stats: SFTStats):
    from lmtrain.data.sources import expand_location

    files = expand_location(location)
    if files is None:  # a hub dataset or a save_to_disk directory
        import datasets

        dataset = (datasets.load_from_disk(location) if os.path.isdir(location)
                   else datasets.load_dataset(location, split="train"))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        for index, record in enumerate(dataset):
            yield f"{location}[{index}]", record
        return
    for path in files:
        yield from read_sft_records(path, lenient, stats)


def record_to_messages(record, where: str) -> list[dict]:
    """A read record -> checked messages; every problem is a RecordProblem (a record problem, not policy)."""
    if not isinstance(record, dict):
        raise RecordProblem("bad_format", f"expected a JSON object, got {type(record).__name__}")
    try:
        messages = to_messages(record, where)
    except RecordProblem:
        raise
    except DataError as err:
        raise RecordProblem("bad_format", str(err).removeprefix(f"{where}: ")) from None
    except (TypeError, AttributeError) as err:  # e.g. 'conversations' that is not a list
        raise RecordProblem("bad_format", f"unreadable conversation ({err})") from None
    check_messages(messages)
    return messages


def encode_records(locations: list[str], tokenizer, max_length: int, train_on_prompt: bool, lenient: bool,
                   stats: SFTStats) -> list[tuple[list[int], list[int]]]:
    """Every record of `locations` as (input_ids, labels). Lenient: a record problem (bad format, unknown
    role, non-string content, no assistant turn, a turn order the template rejects, nothing trainable) is
    dropped and counted by reason. Strict (--lenient false): it is a DataError naming file:line. Truncation is
    policy, not a problem: counted in `truncated`, in both modes."""
    samples = []
    for location in locations:
        for where, record in iter_sft_records(location, lenient, stats):
            try:
                messages = record_to_messages(record, where)
            except RecordProblem as err:
                if not lenient:
                    raise DataError(f"{where}: {err} (with --lenient true such records are dropped and "
                                    f"counted)") from None
                stats.dropped[err.reason] += 1
                if stats.dropped[err.reason] <= 3:
                    logger.warning("dropping record at %s: %s", where, err)
                continue
            sample = encode_sample(tokenizer, messages, max_length, train_on_prompt, stats, where, lenient)
            if sample is not None:
                samples.append(sample)
    return samples


def limit_rows(dataset, limit: int | None, seed: int):
    """At most `limit` rows, chosen at random (seeded) and kept in their order. Packed rows come out of the
    packer longest samples first, so the first rows would be the longest samples, not a sample of the set."""
    if dataset is None or not limit or limit >= len(dataset):
        return dataset
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.select(chosen.tolist())


def split_validation(samples: list, percentage: float, seed: int, evaluate: bool) -> tuple[list, list]:
    """(train, validation) by a seeded per-sample draw, before packing so no sample is in both splits.
    When evaluation is requested and the draw holds out nothing (2% of 20 samples), one sample is held out
    (and logged); with --validation_split_percentage 0 evaluation has nothing to run on: refused."""
    held_out = np.random.default_rng(seed).random(len(samples)) < percentage / 100
    if evaluate and not held_out.any():
        if percentage <= 0 or len(samples) < 2:
            raise UserError(f"evaluation is requested (--eval_strategy) but no validation sample is left "
                            f"({len(samples)} samples, --validation_split_percentage {percentage:g}); pass "
                            f"--validation_files, raise --validation_split_percentage, or set --eval_strategy no")
        held_out[np.random.default_rng(seed).integers(len(samples))] = True
        logger.warning("--validation_split_percentage %g of %d samples holds out none: holding out 1 sample "
                       "for evaluation", percentage, len(samples))
    return ([s for s, h in zip(samples, held_out) if not h], [s for s, h in zip(samples, held_out) if h])


def prepare_sft_data(args, tokenizer, evaluate: bool = False):
    """SFTDataArguments -> (DatasetDict of rows, report dict). `evaluate`: the run evaluates, so a
    validation split must exist (see split_validation)."""
    import datasets

    stats = SFTStats()
    samples = encode_records(args.train_files, tokenizer, args.max_length, args.train_on_prompt, args.lenient, stats)
    if args.validation_files:
        validation = encode_records(args.validation_files, tokenizer, args.max_length, args.train_on_prompt,
                                    args.lenient, stats)
        if evaluate and not validation:
            raise DataError(f"evaluation is requested but --validation_files {' '.join(args.validation_files)} "
                            f"give no sample (dropped: {dict(stats.dropped)}); check those files")
    else:
        samples, validation = split_validation(samples, args.validation_split_percentage, args.prepare_seed,
                                               evaluate and bool(samples))
    if not samples:
        raise DataError(f"no SFT sample left to train on (dropped: {dict(stats.dropped)}); check the files, "
                        f"their format and --max_length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = {"train": datasets.Dataset.from_dict(build_rows(samples, args.max_length, args.packing, pad_id))}
    if validation:
        splits["validation"] = datasets.Dataset.from_dict(build_rows(validation, args.max_length, args.packing, pad_id))
    report = {"samples": stats.samples, "train_samples": len(samples), "validation_samples": len(validation),
              "truncated": stats.truncated, "dropped": dict(stats.dropped), "tokens": stats.tokens,
              "trainable_tokens": stats.trainable_tokens, "rows": {k: len(v) for k, v in splits.items()},
              "packing": args.packing}
    logger.info("SFT data: %d samples (%d train, %d validation), %d truncated, dropped %s, %d of %d tokens "
                "trainable, rows %s", stats.samples, len(samples), len(validation), stats.truncated,
                dict(stats.dropped) or "none", stats.trainable_tokens, stats.tokens, report["rows"])
    return datasets.DatasetDict(splits), report
