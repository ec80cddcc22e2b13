"""Train a byte-level BPE tokenizer (with ChatML chat tokens and template) on raw text.

    python data_prep/train_tokenizer.py --output_dir outputs/tokenizer                 # demo corpus
    python data_prep/train_tokenizer.py --sources web=data/web/*.jsonl code=data/code/ \
        --vocab_size 32000 --sample_chars 500000000 --output_dir outputs/tokenizer

The result loads with AutoTokenizer.from_pretrained(output_dir). Any existing HF tokenizer directory (a
Qwen2.5 or LLaMA tokenizer, say) can be used instead of this one everywhere a tokenizer is asked for.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from lmtrain.arguments import parse_arguments  # noqa: E402
from lmtrain.data.sources import ReadStats, SourceSpec, read_file, read_hub_dataset, resolve_source_files  # noqa: E402
from lmtrain.tokenizer import sample_texts, train_bpe_tokenizer  # noqa: E402
from lmtrain.errors import run_entry_point  # noqa: E402

logger = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerArguments:
    output_dir: str = field(default="outputs/tokenizer", metadata={"help": "Where to save the tokenizer."})
    sources: list[str] = field(default_factory=lambda: ["shakespeare"], metadata={
        "help": "Text sources (files, globs, directories, hub datasets, or 'shakespeare')."})
    text_field: str = field(default="text", metadata={"help": "Text field of jsonl/json/parquet records."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})
    sample_chars: int = field(default=200_000_000, metadata={
        "help": "Train on the first N characters of the sources (0: all)."})


def iter_texts(args: TokenizerArguments):
    stats = ReadStats()
    for spec in map(SourceSpec.parse, args.sources):
        files = resolve_source_files(spec)
        if files is None:
            yield from read_hub_dataset(spec.location, args.text_field, "train", stats, strict=False)
            continue
        for path in files:
            yield from read_file(path, args.text_field, "file", stats, strict=False)
    if stats.dropped:
        logger.warning("records skipped while sampling text: %s", dict(stats.dropped))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments([TokenizerArguments], argv)
    tokenizer = train_bpe_tokenizer(sample_texts(iter_texts(args), args.sample_chars), args.vocab_size,
                                    args.min_frequency)
    tokenizer.save_pretrained(args.output_dir)
    logger.info("saved a %d-token tokenizer to %s", len(tokenizer), args.output_dir)
    return tokenizer


if __name__ == "__main__":
    run_entry_point(main)
