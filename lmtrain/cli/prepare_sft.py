"""Prepare SFT data: read -> render with the chat template -> tokenize with assistant-only labels ->
truncate -> split -> pack -> save.

    python data_prep/make_sft_demo.py --output_dir data/sft_demo
    python data_prep/prepare_sft.py --tokenizer_name outputs/demo/pretrain \
        --train_files data/sft_demo/train.jsonl --max_length 256 --output_dir data/sft_prepared
    python sft.py --model_name_or_path outputs/demo/pretrain --dataset_path data/sft_prepared \
        --output_dir outputs/demo/sft

    # a large set: 16 processes render and tokenize; a rerun with the same inputs reuses the cache
    python data_prep/prepare_sft.py --tokenizer_name Qwen/Qwen2.5-0.5B --train_files data/chat/*.jsonl \
        --max_length 2048 --preprocessing_num_workers 16 --output_dir data/chat_prepared

The output directory memory-maps into training (`sft.py --dataset_path DIR`; the tokenizer is checked
against DIR/report.json) and holds report.json: samples, dropped per reason, truncated, tokens, trainable
tokens, rows, sample length percentiles in tokens, and whether each step was computed or reused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmtrain.arguments import SFTDataArguments
from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.sft_prepare import prepare_sft_files, save_prepared_sft, summary
from lmtrain.errors import UserError
from lmtrain.tokenizer import load_tokenizer

logger = logging.getLogger("prepare_sft")


@dataclass
class PrepareSFTArguments:
    output_dir: str = field(default="data/sft_prepared", metadata={"help": "Where the prepared dataset goes."})
    tokenizer_name: str = field(default="outputs/tokenizer", metadata={
        "help": "HF tokenizer directory or name (its chat template renders the conversations)."})


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_args, data_args = parse_arguments([PrepareSFTArguments, SFTDataArguments], argv)
    if data_args.dataset_path:
        raise UserError("--dataset_path is training's input; give --train_files to prepare")
    tokenizer = load_tokenizer(prepare_args.tokenizer_name)
    dataset, report = prepare_sft_files(data_args, tokenizer)
    save_prepared_sft(dataset, report, prepare_args.output_dir, tokenizer)
    print(summary(report))
    print(f"saved to {prepare_args.output_dir} (report: {prepare_args.output_dir}/report.json)")
    return dataset, report

