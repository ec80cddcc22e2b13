"""The train/validation split of pretraining documents, by document or by group (`--split_by`).

A document-level split holds out random documents. When documents come in families (scenes of one play,
two editions of one book, pages of one site, chapters of one file) that flatters the held-out figures: the
model has trained on the rest of the family, sometimes on a near-copy. `--split_by FIELD` holds out whole
families instead: every document whose record has the same FIELD value lands on the same side. `file` groups
by the file a document came from (any format, .txt included); the built-in demo corpus is grouped by play
(both editions of a play share a `play` value; lmtrain/data/demo_corpus.py).

`read_grouped_texts` is the reader for a grouped split: the same records, text checks and drop counts as
lmtrain/data/sources.read_file, plus each document's group value.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from lmtrain.data.sources import (FIELD_CHECK_RECORDS, DataError, ReadStats, _check_text, _raise_wrong_field,
                                  read_hub_records, read_records, read_txt)

logger = logging.getLogger(__name__)

BY_DOCUMENT, BY_FILE, AUTO = "document", "file", "auto"


def resolve_split_field(split_by: str, source_locations: list[str]) -> str | None:
    """The record field to group by (BY_FILE for the file), or None for a document-level split. `auto`:
    the demo corpus's play when every source is the demo corpus, else documents."""
    from lmtrain.data.demo_corpus import DEMO_SOURCES, PLAY_FIELD

    if split_by == AUTO:
        return PLAY_FIELD if source_locations and all(s in DEMO_SOURCES for s in source_locations) else None
    return None if split_by == BY_DOCUMENT else split_by


def read_grouped_texts(path: str, text_field: str, group_field: str, txt_unit: str, stats: ReadStats,
                       strict: bool) -> Iterator[tuple[str, str]]:
    """(text, group) per document of one file (or `hub://NAME`). A record without the group field is a
    counted drop `missing_split_field` (strict: a DataError naming file:line)."""
    hub = path.startswith("hub://")
    if not hub and os.path.getsize(path) == 0:
        logger.warning("%s is empty: skipped", path)
        stats.empty_files.append(path)
        return
    if group_field == BY_FILE and not hub and Path(path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
        for text in read_txt(path, txt_unit, stats, strict):
            yield text, path
        return
    if not hub and Path(path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: --split_by {group_field} reads a field of each record, and a "
                        f"'{Path(path).suffix}' file has no fields; use --split_by file (a group per file) or "
                        "document")
    records = read_hub_records(path[len("hub://"):], "train", stats) if hub else read_records(path, stats, strict)
    seen_fields: Counter = Counter()
    objects = with_text = 0
    for where, record in records:
        objects += 1
        seen_fields.update(record.keys())
        with_text += text_field in record
        if with_text == 0 and (strict or objects >= FIELD_CHECK_RECORDS):
            _raise_wrong_field(where if strict else path, text_field, seen_fields)
        text = _check_text(record.get(text_field), where, text_field, stats, strict)
        if text is None:
            continue
        if group_field == BY_FILE:
            yield text, path
            continue
        group = record.get(group_field)
        if group is None or isinstance(group, (dict, list)):
            stats.drop("missing_split_field", where, strict,
                       f"--split_by {group_field}: the record has no field '{group_field}' (or it is not a "
                       f"string or number); fields: {', '.join(sorted(record)[:8])}")
            continue
        yield text, str(group)
    if objects and not with_text:
        _raise_wrong_field(path, text_field, seen_fields)


def group_validation_mask(groups: np.ndarray, num_tokens: np.ndarray, percentage: float,
                          rng: np.random.Generator, named: list[str] | None = None) -> np.ndarray:
    """Which documents are held out, whole groups at a time: the groups `named`, or else groups in a seeded
    random order until they hold `percentage` percent of the tokens (the group that crosses the mark is held
    out too, so at least one is). At least one group always stays in training."""
    values, inverse = np.unique(groups.astype(str), return_inverse=True)
    if named:
        unknown = sorted(set(named) - set(values.tolist()))
        if unknown:
            examples = ", ".join(values[:12].tolist())
            raise DataError(f"--validation_groups {' '.join(unknown)}: no document has that group value; "
                            f"values: {examples}{', ...' if len(values) > 12 else ''}")
        held = np.isin(values, named)
    else:
        held = np.zeros(len(values), dtype=bool)
        if percentage > 0:
            tokens = np.bincount(inverse, weights=num_tokens, minlength=len(values))
            target = percentage / 100 * tokens.sum()
            order = rng.permutation(len(values))
            before = np.concatenate([[0.0], np.cumsum(tokens[order])[:-1]])
            held[order[before < target]] = True
    if held.all():
        raise DataError(f"the validation split would hold every group ({len(values)} distinct values of the "
                        "--split_by field): lower --validation_split_percentage, name fewer --validation_groups, "
                        "or split by a finer field")
    return held[inverse]
