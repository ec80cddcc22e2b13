"""Prepared dataset directories: what data_prep/prepare_pretrain.py writes (the blocks, report.json, the
tokenizer, the held-out documents) and what training memory-maps back."""
from __future__ import annotations

import json
import os

import datasets

from lmtrain.data.sources import DataError


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
