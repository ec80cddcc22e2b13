"""What training reads: a prepared dataset directory (memory-mapped), or raw sources prepared on the fly by
the same pipeline, once per machine (the main process prepares, the others wait and reuse the cache)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import datasets

from lmtrain.arguments import DataArguments
from lmtrain.data.pipeline import load_prepared, prepare_pretrain_data

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    block_size: int
    validation_bytes_per_token: float | None


def _limit(dataset: datasets.Dataset | None, count: int | None):
    return dataset.select(range(min(count, len(dataset)))) if dataset is not None and count else dataset


def load_pretrain_data(args: DataArguments, tokenizer, training_args) -> TrainingData:
    if args.dataset_path:
        prepared = load_prepared(args.dataset_path)
        report_path = os.path.join(args.dataset_path, "report.json")
        report = json.load(open(report_path, encoding="utf-8")) if os.path.exists(report_path) else {}
        logger.info("prepared data %s: %s", args.dataset_path, {k: len(v) for k, v in prepared.items()})
    else:
        with training_args.main_process_first(desc="preparing data"):
            prepared, report_obj = prepare_pretrain_data(args, tokenizer)
        report = report_obj.to_dict()
        if training_args.process_index == 0:
            logger.info("data preparation:\n%s", report_obj.summary())
            os.makedirs(training_args.output_dir, exist_ok=True)
            with open(os.path.join(training_args.output_dir, "data_report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
    train = _limit(prepared["train"], args.max_train_samples)
    validation = _limit(prepared.get("validation"), args.max_eval_samples)
    block_size = len(train[0]["input_ids"])
    _check_token_range(train, tokenizer)
    return TrainingData(train, validation, block_size,
                        report.get("bytes_per_token_by_split", {}).get("validation"))


def _check_token_range(train: datasets.Dataset, tokenizer):
    """Data tokenized with a different (larger) tokenizer would index past the embeddings on the GPU."""
    sample = train.with_format("arrow")[: min(256, len(train))]["input_ids"].combine_chunks().flatten()
    highest = max(sample.to_numpy()) if len(sample) else 0
    if highest >= len(tokenizer):
        raise ValueError(f"the data holds token id {highest} but the tokenizer has {len(tokenizer)} tokens: it was "
                         "prepared with another tokenizer. Prepare it again with --tokenizer_name of this run")
