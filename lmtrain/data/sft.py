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
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmtrain.data.packing import IGNORE_INDEX, positions_in_segments
from lmtrain.data.sources import DataError

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


def _has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def _render_with_offsets(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """For chat templates without {% generation %} markers: find each assistant message's character span by
    rendering the conversation prefix, then mark the tokens inside those spans. Requires (as every common
    template satisfies) that rendering a conversation starts with the rendering of each of its prefixes."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise DataError("this chat template renders prefixes inconsistently; add {% generation %} markers "
                            "around assistant messages to the template")
        segment = upto[len(prefix):]
        spans.append((len(prefix), len(prefix) + len(segment.rstrip())))  # the turn's trailing newline: no loss
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= a and b <= end for start, end in spans) and b > a)
            for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1: the token carries loss)."""
    if _has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    return _render_with_offsets(tokenizer, messages)


@dataclass
class SFTStats:
    samples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    trainable_tokens: int = 0
    tokens: int = 0


def encode_sample(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool, stats: SFTStats):
    """input_ids and labels for one conversation, truncated by the documented policy, or None (dropped).

    Truncation policy, in order, until the sample fits in max_length:
    1. drop the oldest user/assistant rounds (the system prompt and the last round stay);
    2. cut tokens from the start (the prompt) when the last answer then still fits whole;
    3. otherwise cut the end (the answer's tail; such a sample no longer teaches stopping).
    A sample left without any trainable token is dropped and counted.
    """
    if not any(m["role"] == "assistant" for m in messages):
        stats.dropped["no_assistant_turn"] += 1
        return None
    ids, mask = render_conversation(tokenizer, messages)
    if len(ids) > max_length:
        stats.truncated += 1
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        while len(ids) > max_length and sum(m["role"] == "assistant" for m in rest) > 1:
            cut = next(i for i, m in enumerate(rest) if m["role"] == "assistant") + 1
            rest = rest[cut:]
            ids, mask = render_conversation(tokenizer, system + rest)
        if len(ids) > max_length:
            last_answer_start = max(i for i, m in enumerate(mask) if m) if any(mask) else 0
            while last_answer_start > 0 and mask[last_answer_start - 1]:
                last_answer_start -= 1
            overflow = len(ids) - max_length
            if overflow <= last_answer_start:
                ids, mask = ids[overflow:], mask[overflow:]
            else:
                ids, mask = ids[:max_length], mask[:max_length]
    labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    trainable = sum(label != IGNORE_INDEX for label in labels[1:])  # the first label is never predicted
    if trainable == 0:
        stats.dropped["no_trainable_tokens"] += 1
        return None
    stats.samples += 1
    stats.tokens += len(ids)
    stats.trainable_tokens += trainable
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
    """(where, record) pairs from a jsonl / json / parquet SFT file."""
    from lmtrain.data.sources import ReadStats

    read_stats = ReadStats()
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {index}", record
        return
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        for index, record in enumerate(json.loads(open(path, encoding="utf-8").read())):
            yield f"{path}[{index}]", record
        return
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(raw.decode("utf-8"))
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

        dataset = (datasets.load_from_disk(location) if __import__("os").path.isdir(location)
                   else datasets.load_dataset(location, split="train"))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
        for index, record in enumerate(dataset):
            yield f"{location}[{index}]", record
        return
    for path in files:
        yield from read_sft_records(path, lenient, stats)


def encode_records(locations: list[str], tokenizer, max_length: int, train_on_prompt: bool, lenient: bool,
                   stats: SFTStats) -> list[tuple[list[int], list[int]]]:
    samples = []
    for location in locations:
        for where, record in iter_sft_records(location, lenient, stats):
            try:
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object")
                messages = to_messages(record, where)
                bad = [m["role"] for m in messages if not isinstance(m["content"], str)]
                if bad:
                    raise DataError(f"{where}: message content must be a string (roles {bad})")
            except DataError as err:
                if not lenient:
                    raise
                stats.dropped["bad_format"] += 1
                if stats.dropped["bad_format"] <= 3:
                    logger.warning("dropping record: %s", err)
                continue
            sample = encode_sample(tokenizer, messages, max_length, train_on_prompt, stats)
            if sample is not None:
                samples.append(sample)
    return samples


def prepare_sft_data(args, tokenizer):
    """SFTDataArguments -> (DatasetDict of rows, report dict)."""
    import datasets

    stats = SFTStats()
    samples = encode_records(args.train_files, tokenizer, args.max_length, args.train_on_prompt, args.lenient, stats)
    if args.validation_files:
        validation = encode_records(args.validation_files, tokenizer, args.max_length, args.train_on_prompt,
                                    args.lenient, stats)
    else:
        # Split samples before packing, so no sample is in both splits.
        held_out = np.random.default_rng(args.prepare_seed).random(len(samples)) < args.validation_split_percentage / 100
        validation = [s for s, h in zip(samples, held_out) if h]
        samples = [s for s, h in zip(samples, held_out) if not h]
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
