"""Length statistics of a dataset in tokens (P50/P90/P95/max and a histogram), to choose --block_size or the
SFT --max_length. Read by the project's own readers and tokenization, so the lengths are those training sees:
- raw pretraining files: lmtrain.data.sources.read_file + lmtrain.data.tokenize.tokenize_table (EOS included;
  before cleaning and deduplication);
- raw SFT files: lmtrain.data.sources.read_records + the chat template (lmtrain.data.chat_render), untruncated;
- a prepared directory (data_prep/prepare_pretrain.py or prepare_sft.py): the segments of its rows, found where
  position_ids restart; a pretraining document longer than a block appears as one piece per block."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)
PERCENTILES = (50, 90, 95, 99)
BATCH = 1000


def raw_pretrain_lengths(locations: list[str], tokenizer, text_field: str, txt_unit: str, limit: int | None):
    import pyarrow as pa

    from lmtrain.data.sources import ReadStats, read_file
    from lmtrain.data.tokenize import tokenize_table

    lengths, texts, stats = [], [], ReadStats()

    def flush():
        table = pa.table({"text": texts, "source": ["plan"] * len(texts)})
        lengths.extend(tokenize_table(table, tokenizer).column("num_tokens").to_pylist())
        texts.clear()

    for path in _local_files(locations):
        for text in read_file(path, text_field, txt_unit, stats, strict=False):
            texts.append(text)
            if len(texts) >= BATCH:
                flush()
            if limit and len(lengths) + len(texts) >= limit:
                break
        if limit and len(lengths) + len(texts) >= limit:
            break
    if texts:
        flush()
    return np.asarray(lengths, dtype=np.int64), sum(stats.dropped.values())


def raw_sft_lengths(locations: list[str], tokenizer, limit: int | None):
    from lmtrain.data.chat_render import RecordProblem, render_conversation
    from lmtrain.data.sft import record_to_messages
    from lmtrain.data.sft_prepare import _files
    from lmtrain.data.sources import ReadStats, read_records

    lengths, dropped, stats, first_problem = [], 0, ReadStats(), None
    for path in _files(locations):
        if path.startswith("hub://"):
            raise UserError(f"--train_files {path[len('hub://'):]}: the planner reads local files only (nothing is "
                            "downloaded); give a file, a glob or a directory")
        for where, record in read_records(path, stats, strict=False):
            try:
                ids, _ = render_conversation(tokenizer, record_to_messages(record, where))
            except RecordProblem as problem:
                dropped += 1
                first_problem = first_problem or str(problem)
                continue
            lengths.append(len(ids))
            if limit and len(lengths) >= limit:
                break
        if limit and len(lengths) >= limit:
            break
    if not lengths and first_problem:  # every record refused: say why, as strict training would
        raise UserError(f"--train_files {' '.join(locations)}: no usable conversation ({dropped} record(s) "
                        f"dropped; the first: {first_problem})")
    return np.asarray(lengths, dtype=np.int64), dropped + sum(stats.dropped.values())


def prepared_stage(path: str) -> str:
    """"sft" for a directory of data_prep/prepare_sft.py (its report.json says so), else "pretrain"."""
    import json

    report = Path(path) / "report.json"
    if not report.exists():
        return "pretrain"
    return "sft" if json.loads(report.read_text(encoding="utf-8")).get("stage") == "sft" else "pretrain"


def prepared_lengths(path: str, limit: int | None):
    """Segment lengths of a prepared directory's train rows (padding segments, with no trained token, left out)."""
    import datasets

    if not (Path(path) / "dataset_dict.json").exists():
        raise UserError(f"--dataset_path {path}: not a prepared directory (no dataset_dict.json); make one with "
                        "data_prep/prepare_pretrain.py or data_prep/prepare_sft.py")
    train = datasets.load_from_disk(path)["train"]
    table = train.data.table
    if "position_ids" not in table.column_names:
        raise UserError(f"--dataset_path {path}: its rows have no position_ids column; re-prepare it")
    lengths = []
    for batch in table.select(["position_ids", "labels"]).to_batches(max_chunksize=BATCH):
        positions, labels = batch.column(0), batch.column(1)
        flat = positions.flatten().to_numpy()
        trained = labels.flatten().to_numpy() != -100
        row_start = np.zeros(len(flat), dtype=bool)
        row_start[positions.offsets.to_numpy()[:-1]] = True
        segment = np.cumsum((flat == 0) | row_start) - 1
        sizes = np.bincount(segment)
        lengths.append(sizes[np.bincount(segment, weights=trained) > 0])
        if limit and sum(map(len, lengths)) >= limit:
            break
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return (lengths[:limit] if limit else lengths), 0


def prepared_row_length(path: str) -> int:
    """The row length of a prepared directory's training rows (the longest of the first 1,000: packed rows all
    have it, unpacked SFT rows are padded to the batch's longest)."""
    import datasets

    if not (Path(path) / "dataset_dict.json").exists():
        raise UserError(f"--dataset_path {path}: not a prepared directory (no dataset_dict.json); make one with "
                        "data_prep/prepare_pretrain.py or data_prep/prepare_sft.py")
    rows = datasets.load_from_disk(path)["train"]
    return max(len(ids) for ids in rows.select(range(min(len(rows), 1000)))["input_ids"])


def _local_files(locations: list[str]) -> list[str]:
    from lmtrain.data.sources import expand_location

    files = []
    for location in locations:
        local = expand_location(location)
        if local is None:
            raise UserError(f"--train_files {location}: the planner reads local files only (nothing is downloaded); "
                            "give a file, a glob or a directory")
        files += local
    return files


def length_summary(lengths: np.ndarray, dropped: int, row_length: int) -> dict:
    if len(lengths) == 0:
        raise UserError("the dataset has no document or sample to measure (every record was empty or dropped)")
    summary = {"count": int(len(lengths)), "dropped_records": int(dropped), "tokens": int(lengths.sum()),
               "mean": round(float(lengths.mean()), 1), "max": int(lengths.max())}
    for p in PERCENTILES:
        summary[f"p{p}"] = int(np.ceil(np.percentile(lengths, p)))
    summary["row_length"] = row_length
    summary["share_longer_than_row"] = round(float((lengths > row_length).mean()), 4)
    return summary


def plot_lengths(lengths: np.ndarray, summary: dict, out_path: str, what: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.unique(np.geomspace(1, max(2, lengths.max()), 60).astype(int)) if lengths.max() > 200 else 50
    axis.hist(lengths, bins=bins, color="#4c72b0")
    if lengths.max() > 200:
        axis.set_xscale("log")
    for p, style in ((50, ":"), (95, "--")):
        axis.axvline(summary[f"p{p}"], color="black", linestyle=style, label=f"P{p} = {summary[f'p{p}']}")
    axis.axvline(summary["row_length"], color="#c44e52", label=f"row length {summary['row_length']}")
    axis.set_xlabel(f"tokens per {what}")
    axis.set_ylabel(f"{what}s")
    axis.set_title(f"{summary['count']:,} {what}s, max {summary['max']:,} tokens")
    axis.legend()
    figure.tight_layout()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
