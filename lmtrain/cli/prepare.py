"""Prepare pretraining data: load -> clean -> deduplicate -> tokenize -> pack -> split -> save.

    python data_prep/prepare_pretrain.py --tokenizer_name outputs/tokenizer --output_dir data/shakespeare
    python data_prep/prepare_pretrain.py --tokenizer_name Qwen/Qwen2.5-0.5B \
        --sources web=data/web/*.jsonl@0.6 books=data/books/@0.15 code=data/code/*.parquet@0.1 \
                  wiki=wikimedia/wikipedia:20231101.en@0.1 papers=data/papers.jsonl@0.05 \
        --block_size 2048 --preprocessing_num_workers 16 --output_dir data/mix

The output directory memory-maps into training (`pretrain.py --dataset_path DIR`) and holds report.json:
documents read, dropped per reason, duplicates removed, tokens, blocks, length percentiles, bytes per
token, each source's achieved token share, the validation blocks per source, and the tokenizer's
fingerprint (training with another tokenizer is refused; DIR/tokenizer is a copy of the one used).
Validation blocks are packed per source and carry `source` and `num_bytes` columns, so evaluation can
sample every source and report bits per byte of exactly the blocks it evaluated. An empty input file is
skipped and counted as `empty_file`; a source whose every file is empty gives its weight to the others.
Run with --help for every cleaning switch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmtrain.arguments import DataArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.pipeline import prepare_pretrain_data
from lmtrain.data.prepared import save_prepared
from lmtrain.tokenizer import load_tokenizer

logger = logging.getLogger("prepare_pretrain")


@dataclass
class PrepareArguments:
    output_dir: str = field(default="data/prepared", metadata={"help": "Where the prepared dataset goes."})
    tokenizer_name: str = field(default="outputs/tokenizer", metadata={"help": "HF tokenizer directory or name."})


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_args, data_args = parse_arguments([PrepareArguments, DataArguments], argv)
    tokenizer = load_tokenizer(prepare_args.tokenizer_name)
    dataset, report = prepare_pretrain_data(data_args, tokenizer)
    save_prepared(dataset, report, prepare_args.output_dir, tokenizer)
    print(report.summary())
    print(f"saved to {prepare_args.output_dir} (report: {prepare_args.output_dir}/report.json)")
    return dataset, report

