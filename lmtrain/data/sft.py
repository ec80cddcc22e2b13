"""SFT data: conversations in any common format -> token ids with assistant-only labels -> (packed) rows.

Formats, detected per record: OpenAI `messages` (role/content), ShareGPT `conversations` (from/value),
Alpaca (instruction/input/output). Rendering goes through the tokenizer's chat template; the loss mask
covers each assistant message and its end-of-turn token, nothing else. Masks are built from positions,
never by comparing token ids with the pad id, so padding can never hide a real end token.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmtrain.data.packing import IGNORE_INDEX, positions_in_segments
from lmtrain.data.chat_render import RecordProblem, has_generation_markers, render_conversation  # noqa: F401
from lmtrain.data.sft_rows import pack_bins
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


# Roles that chat templates know; anything else is a typo ("assitant") that would silently become a prompt.
KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function", "ipython"}


def check_messages(messages: list[dict]):
    """Record problems that no template or truncation can fix (each a RecordProblem with its reason)."""
    if not messages:
        raise RecordProblem("bad_format", "the conversation has no messages")
    # isinstance first: a role that is a list or an object is unhashable (found by tests/test_fuzz_readers.py).
    unknown = sorted({str(m["role"]) for m in messages
                      if not isinstance(m["role"], str) or m["role"] not in KNOWN_ROLES})
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
    return ids, labels_from_mask(ids, mask, train_on_prompt), truncated


def labels_from_mask(ids: list[int], mask: list[int], train_on_prompt: bool) -> list[int]:
    """Labels of one sample; a RecordProblem when no label is left to train on."""
    labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if not any(label != IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        raise RecordProblem("no_trainable_tokens", "no token left to train on (is the answer empty?)")
    return labels


def encode_sample(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool, stats: SFTStats,
                  where: str = "sample", lenient: bool = True):
    """encode_conversation with the accounting: (input_ids, labels), or None when dropped (lenient) and
    counted in stats.dropped by reason; strict, a record problem is a DataError naming `where`."""
    try:
        ids, labels, truncated = encode_conversation(tokenizer, messages, max_length, train_on_prompt)
    except RecordProblem as err:
        if not lenient:
            raise DataError(f"{where}: {err} (with the default --lenient true such records are dropped and counted)") from None
        stats.dropped[err.reason] += 1
        if stats.dropped[err.reason] <= 3:
            logger.warning("dropping record at %s: %s", where, err)
        return None
    stats.samples += 1
    stats.truncated += truncated
    stats.tokens += len(ids)
    stats.trainable_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    return ids, labels


def pack_samples(lengths, capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of whole samples (none is split) into bins of `capacity` tokens, as
    lists (small sets, tests). The preparation pipeline uses the array form, lmtrain.data.sft_rows.pack_bins."""
    order, starts = pack_bins(np.asarray(lengths), capacity)
    return [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


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


def limit_rows(dataset, limit: int | None, seed: int):
    """At most `limit` rows, chosen at random (seeded) and kept in their order. Packed rows come out of the
    packer longest samples first, so the first rows would be the longest samples, not a sample of the set."""
    if dataset is None or not limit or limit >= len(dataset):
        return dataset
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.select(chosen.tolist())


def prepare_sft_data(args, tokenizer, evaluate: bool = False):
    """SFTDataArguments -> (DatasetDict of rows, report dict): prepared data from --dataset_path, or the
    files prepared now (cached). See lmtrain.data.sft_prepare."""
    from lmtrain.data.sft_prepare import load_prepared_sft, prepare_sft_files

    if getattr(args, "dataset_path", None):
        return load_prepared_sft(args, tokenizer, evaluate)
    return prepare_sft_files(args, tokenizer, evaluate)
