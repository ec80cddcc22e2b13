"""Preference pairs for DPO: records -> (prompt, chosen reply, rejected reply) -> token ids.

Formats, detected per record:
- `{"prompt", "chosen", "rejected"}`: the prompt a string (one user turn) or a message list; each reply a
  string or a list of one assistant message (TRL's explicit-prompt forms, standard and conversational);
- `{"chosen", "rejected"}` as two whole conversations: their shared first messages are the prompt, and
  each must end in one assistant message after it (TRL's implicit-prompt form, Anthropic HH style).
Strings are rendered as chat turns, not raw text: pairs come after SFT, so the policy is asked the way SFT
taught it (and the way generate.py / evaluate.py ask it).

Each side goes through the SFT renderer (lmtrain/data/chat_render.py: the tokenizer's chat template, the
same assistant spans and special-token handling as SFT), so the reply tokens are exactly the tokens SFT
trains on for that answer, end-of-turn token included, and the prompt tokens are never trained. Records
are read by lmtrain/data/sources.read_records: a bad record is a counted drop or (strict) a DataError
naming file:line, with the same wording as the other stages.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np

from lmtrain.data.chat_render import RecordProblem, render_conversation
from lmtrain.data.sft import check_messages, to_messages
from lmtrain.data.sources import DataError, ReadStats, read_hub_records, read_records, held_out_split

logger = logging.getLogger(__name__)
STRICT_HINT = "(with the default --lenient true such records are dropped and counted)"
FORMAT_CHECK_RECORDS = 100  # as sft_prepare: a file none of whose first records is a pair is the wrong file
PAIR_FIELDS = "'chosen' and 'rejected' (strings or message lists), with or without a 'prompt'"


def _reply(value, name: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise RecordProblem("bad_format", f"'{name}' must be a string or one assistant message")
    message = value[0]
    if message.get("role") != "assistant" or "content" not in message:
        raise RecordProblem("bad_format", f"'{name}' must be an assistant message, got role {message.get('role')!r}")
    return {"role": "assistant", "content": message["content"]}


def _messages(value, name: str, where: str) -> list[dict]:
    try:
        return to_messages({"messages": value}, where)
    except DataError as err:
        raise RecordProblem("bad_format", str(err).removeprefix(f"{where}: ").replace("'messages'", f"'{name}'"))


def record_to_pair(record, where: str) -> tuple[list[dict], dict, dict]:
    """A read record -> (prompt messages, chosen message, rejected message); every problem a RecordProblem."""
    if not isinstance(record, dict):
        raise RecordProblem("bad_format", f"expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise RecordProblem("bad_format", f"a preference pair needs {PAIR_FIELDS}; found fields {sorted(record)}")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, "prompt", where)
        chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    else:  # two whole conversations: the prompt is what they share
        whole = [_messages(record[name], name, where) for name in ("chosen", "rejected")]
        shared = 0
        while shared < min(map(len, whole)) and whole[0][shared] == whole[1][shared]:
            shared += 1
        if whole[0] == whole[1]:
            raise RecordProblem("identical_replies", "'chosen' and 'rejected' are the same conversation")
        tails = [w[shared:] for w in whole]
        if any(len(tail) != 1 for tail in tails):
            raise RecordProblem("bad_format", "'chosen' and 'rejected' without a 'prompt' must be two conversations "
                                "that differ only in their last message, an assistant reply")
        prompt = whole[0][:shared]
        chosen, rejected = _reply(tails[0], "chosen"), _reply(tails[1], "rejected")
    if not prompt:
        raise RecordProblem("bad_format", "the prompt has no message")
    check_messages(prompt + [chosen])
    check_messages(prompt + [rejected])
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply["content"].strip():
            raise RecordProblem("empty_reply", f"the {name} reply is empty")
    if chosen["content"] == rejected["content"]:
        raise RecordProblem("identical_replies", "'chosen' and 'rejected' are the same reply: nothing to prefer")
    return prompt, chosen, rejected


def _reply_span(mask: list[int]) -> tuple[int, int]:
    """[start, end) of the last trained run: the reply and its end-of-turn token (not the newline after)."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    if not end:
        raise RecordProblem("no_trainable_tokens", "no token left to train on (is the answer empty?)")
    start = end - 1
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def encode_pair(tokenizer, prompt: list[dict], chosen: dict, rejected: dict, max_length: int) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids", "truncated", "prompt_truncated"}: the ids TRL's
    DataCollatorForPreference concatenates (prompt + reply, the reply alone carrying loss). Pure.

    Truncation, when prompt + the longer reply exceed max_length: the prompt stays whole when it leaves the
    replies min(their length, max_length // 4) tokens, else only its last tokens up to that are kept (the
    oldest context goes); the replies are then cut from the end to fit. A pair whose replies are equal after
    the cut is a RecordProblem("identical_after_truncation")."""
    chosen_ids, chosen_mask = render_conversation(tokenizer, prompt + [chosen])
    rejected_ids, rejected_mask = render_conversation(tokenizer, prompt + [rejected])
    (chosen_start, chosen_end), (rejected_start, rejected_end) = _reply_span(chosen_mask), _reply_span(rejected_mask)
    # Both renderings start with the same generation prompt; should a token merge across the boundary, the
    # prompt is what they share (TRL's rule), so the prompt tokens are one sequence for both replies.
    shared = 0
    while shared < min(chosen_start, rejected_start) and chosen_ids[shared] == rejected_ids[shared]:
        shared += 1
    prompt_ids = chosen_ids[:shared]
    chosen_ids, rejected_ids = chosen_ids[shared:chosen_end], rejected_ids[shared:rejected_end]
    longest = max(len(chosen_ids), len(rejected_ids))
    truncated = len(prompt_ids) + longest > max_length
    prompt_truncated = False
    if truncated:
        keep = min(len(prompt_ids), max_length - min(longest, max_length // 4))
        prompt_truncated = keep < len(prompt_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        room = max_length - keep
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            raise RecordProblem("identical_after_truncation", f"the replies are the same in their first {room} "
                                f"tokens, all that --max_length {max_length} leaves them")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "truncated": truncated, "prompt_truncated": prompt_truncated}


@dataclass
class PreferenceStats:
    pairs: int = 0
    truncated: int = 0
    prompt_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    prompt_tokens: list = field(default_factory=list)
    reply_tokens: list = field(default_factory=list)


def _looks_like_pair(record: dict) -> bool:
    return "chosen" in record and "rejected" in record


def read_pairs(files: list[str], tokenizer, max_length: int, strict: bool, stats: PreferenceStats,
               held_out: bool = False) -> list[dict]:
    """Encoded pairs of `files` (local record files, or `hub://NAME`), in file order; drops counted in
    stats.dropped by reason, or (strict) a DataError naming the record. `held_out`: a hub dataset's
    validation or test split (held_out_split) instead of its train split."""
    pairs = []
    for path in files:
        read = ReadStats()
        if path.startswith("hub://"):
            name = path[len("hub://"):]
            records = read_hub_records(name, held_out_split(name) if held_out else "train", read)
        else:
            records = read_records(path, read, strict)
        objects = looking = 0
        seen: Counter = Counter()
        for where, record in records:
            objects += 1
            looking += _looks_like_pair(record)
            if not looking:
                seen.update(record.keys())
                if objects >= FORMAT_CHECK_RECORDS:
                    _raise_no_pairs(path, seen)
            try:
                pair = encode_pair(tokenizer, *record_to_pair(record, where), max_length)
            except RecordProblem as err:
                if strict:
                    raise DataError(f"{where}: {err} {STRICT_HINT}") from None
                stats.dropped[err.reason] += 1
                if stats.dropped[err.reason] <= 3:  # a few examples help; thousands would drown the log
                    logger.warning("dropping record at %s: %s", where, err)
                continue
            stats.pairs += 1
            stats.truncated += pair.pop("truncated")
            stats.prompt_truncated += pair.pop("prompt_truncated")
            stats.prompt_tokens.append(len(pair["prompt_ids"]))
            stats.reply_tokens += [len(pair["chosen_ids"]), len(pair["rejected_ids"])]
            pairs.append(pair)
        stats.dropped.update(read.dropped)  # the reader's own drops (malformed JSON, bad UTF-8, ...)
        if read.empty_files:
            stats.dropped["empty_file"] += len(read.empty_files)
        if objects > 1 and not looking:
            _raise_no_pairs(path, seen)
    return pairs


def _raise_no_pairs(path: str, fields: Counter):
    found = ", ".join(name for name, _ in fields.most_common(8))
    raise DataError(f"{path}: no record is a preference pair; expected {PAIR_FIELDS}, found fields {found}. "
                    "Convert the file to this format (SFT conversations go to sft.py)")


def _dataset(pairs: list[dict]) -> datasets.Dataset:
    features = datasets.Features({name: datasets.List(datasets.Value("int32"))
                                  for name in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return datasets.Dataset.from_dict({name: [p[name] for p in pairs] for name in features}, features=features)


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    return {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99)} | {"max": int(max(values))}


def prepare_preference_data(args, tokenizer, evaluate: bool = False) -> tuple[datasets.DatasetDict, dict]:
    """PreferenceDataArguments -> (DatasetDict with train [and validation] pairs, report dict)."""
    from lmtrain.data.sft_prepare import _files, validation_mask

    if not getattr(tokenizer, "chat_template", None):  # else transformers' ValueError, as a traceback, per pair
        raise DataError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', '')}) has no chat template: preference "
                        "pairs are rendered as chat turns through it, as in SFT. Tune the model with sft.py first (its "
                        "tokenizer is saved with the template), or pass --tokenizer_name of a tokenizer that has one")
    strict = not args.lenient
    stats = PreferenceStats()
    train = read_pairs(_files(args.train_files), tokenizer, args.max_length, strict, stats)
    if args.validation_files:
        validation = read_pairs(_files(args.validation_files), tokenizer, args.max_length, strict, stats,
                                held_out=True)
        if evaluate and not validation:
            raise DataError(f"evaluation is requested but --validation_files {' '.join(args.validation_files)} "
                            f"give no pair (dropped: {dict(stats.dropped)}); check those files")
    else:
        held_out = validation_mask(len(train), args.validation_split_percentage, args.prepare_seed,
                                   evaluate and bool(train))
        validation = [p for p, out in zip(train, held_out) if out]
        train = [p for p, out in zip(train, held_out) if not out]
    if not train:
        raise DataError(f"no preference pair left to train on (dropped: {dict(stats.dropped)}); check the files, "
                        "their format and --max_length")
    splits = {"train": _dataset(train)}
    if validation:
        splits["validation"] = _dataset(validation)
    report = {"pairs": stats.pairs, "train_pairs": len(train), "validation_pairs": len(validation),
              "truncated": stats.truncated, "prompt_truncated": stats.prompt_truncated,
              "dropped": dict(stats.dropped), "max_length": args.max_length,
              "prompt_tokens": _percentiles(stats.prompt_tokens), "reply_tokens": _percentiles(stats.reply_tokens)}
    logger.info("preference data: %d pairs (%d train, %d validation), %d truncated (%d of them in the prompt), "
                "dropped %s", stats.pairs, len(train), len(validation), stats.truncated, stats.prompt_truncated,
                dict(stats.dropped) or "none")
    return datasets.DatasetDict(splits), report
