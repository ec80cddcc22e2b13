"""Mixtures: which documents of each source the training split takes so that each source gets its weight
share of the tokens (repeated or subsampled), and the sources that have nothing to give."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from lmtrain.data.sources import DataError, SourceSpec

logger = logging.getLogger(__name__)
REPEAT_WARNING = 10  # passes over one source's data beyond which the repetition is said out loud


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
    for name, info in per_source.items():
        info["achieved_share"] = info["train_tokens"] / total
        # Whole documents are taken, up to the target: a source whose documents are each larger than its share
        # of the tokens gets none of them, which is not what its weight asked for.
        if info["achieved_share"] < info["target_share"] / 2:
            logger.warning("source '%s': weight share %.3f but token share %.3f (%d tokens): its documents are "
                           "larger than its share of the %d training tokens, and only whole documents are taken. "
                           "Raise its weight or the data of the other sources, or split its documents.", name,
                           info["target_share"], info["achieved_share"], info["train_tokens"], total_tokens)
        elif info["epochs"] >= REPEAT_WARNING:
            logger.warning("source '%s': repeated %.1f times to reach its weight share %.3f (it holds %d tokens): "
                           "the model will see its documents that often", name, info["epochs"],
                           info["target_share"], info["held_tokens"])
    return indices, per_source


def check_sources_have_training_documents(weights: dict[str, float], train_sources: np.ndarray,
                                          validation_sources: np.ndarray, row_sources: np.ndarray,
                                          drops: np.ndarray):
    """A source with nothing left for training is an error that says where its documents went: dropped by
    which filter (the per-reason counts of that source alone) or held out for validation."""
    for name in weights:
        if (train_sources == name).any():
            continue
        mine = drops[row_sources == name]
        dropped = Counter(reason for reason in mine if reason)
        held_out = int((validation_sources == name).sum())
        where = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common()) or "none dropped"
        raise DataError(f"source '{name}' has no training documents left: {len(mine)} read; dropped: {where}; "
                        f"{held_out} held out for validation. Check its files and --text_field, and loosen the "
                        f"filter that dropped them (docs/DATA_QUALITY.md) or give the source more data")


def empty_sources(row_sources: np.ndarray, drops: np.ndarray, specs: list[SourceSpec]) -> list[str]:
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
