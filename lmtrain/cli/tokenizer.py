"""Train a byte-level BPE tokenizer (with ChatML chat tokens and template) on raw text.

    python data_prep/train_tokenizer.py --output_dir outputs/tokenizer                 # demo corpus
    python data_prep/train_tokenizer.py --sources web=data/web/*.jsonl@0.7 zh=data/zh/@0.2 code=data/code/@0.1 \
        --vocab_size 32000 --sample_chars 500000000 --output_dir outputs/tokenizer

Each source gets its weight share of --sample_chars (weights default to 1: equal shares), drawn at random from
all of its documents (each source is read once, to the end); what was taken from each source is logged and
saved as sample_report.json next to the tokenizer.

Held-out text stays out of the tokenizer too: `--validation_groups` leaves out every document of those groups
of the `--split_by` field, the same two options prepare_pretrain.py holds them out with, so a bits-per-byte
figure measured on them is not flattered by merges learned from them (the demo, scripts/demo.sh):
    python data_prep/train_tokenizer.py --vocab_size 4096 --validation_groups macbeth --output_dir outputs/tok
    python data_prep/prepare_pretrain.py --tokenizer_name outputs/tok --validation_groups macbeth ...

The result loads with AutoTokenizer.from_pretrained(output_dir). Any existing HF tokenizer directory (a
Qwen2.5 or LLaMA tokenizer, say) can be used instead of this one everywhere a tokenizer is asked for.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.sources import DataError, ReadStats, SourceSpec, read_file, read_hub_dataset, resolve_source_files
from lmtrain.data.splitting import read_grouped_texts, resolve_split_field
from lmtrain.tokenizer import sample_sources, train_bpe_tokenizer

logger = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerArguments:
    output_dir: str = field(default="outputs/tokenizer", metadata={"help": "Where to save the tokenizer."})
    sources: list[str] = field(default_factory=lambda: ["shakespeare"], metadata={
        "help": "Text sources, [NAME=]PATH[@WEIGHT] (PATH: file, glob, directory, hub dataset, or 'shakespeare'); "
                "the weights split --sample_chars between them."})
    text_field: str = field(default="text", metadata={"help": "Text field of jsonl/json/parquet records."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size, special tokens included."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})
    sample_chars: int = field(default=200_000_000, metadata={
        "help": "Train on this many characters (0: all): each source gets its weight share (NAME=PATH@WEIGHT), "
                "sampled at random across its documents."})
    txt_unit: str = field(default="paragraph", metadata={
        "help": "Sampling unit of .txt/.md files: paragraph, line or file (long units are cut into pieces)."})
    seed: int = field(default=1234, metadata={"help": "Seed of the sampling."})
    sample_scan_factor: float = field(default=10.0, metadata={
        "help": "Read each source only up to this many times its share of --sample_chars, and sample from "
                "that (0: read every source to its end, a uniform sample of the whole source)."})
    split_by: str = field(default="auto", metadata={
        "help": "The record field whose values --validation_groups names, as in prepare_pretrain.py: a field, "
                "'file', or auto (the demo corpus's play)."})
    validation_groups: list[str] | None = field(default=None, metadata={
        "help": "Leave every document of these --split_by values out of the tokenizer's text (the groups "
                "prepare_pretrain.py --validation_groups holds out), so held-out figures stay clean."})

    def __post_init__(self):
        if self.txt_unit not in ("file", "line", "paragraph"):
            raise ValueError("--txt_unit must be file, line or paragraph")
        if self.sample_chars < 0:
            raise ValueError("--sample_chars must be >= 0 (0: all)")
        if self.sample_scan_factor != 0 and self.sample_scan_factor < 1:
            raise ValueError("--sample_scan_factor must be 0 (read everything) or at least 1")


def iter_source_texts(spec: SourceSpec, args: TokenizerArguments, group_field: str | None, seen_groups: set,
                      excluded: dict):
    """The texts of one source; with `group_field`, those outside --validation_groups only (what was left
    out is counted in `excluded`, every group value met is added to `seen_groups`)."""
    stats = ReadStats()
    files = resolve_source_files(spec)
    if group_field is not None:
        held_out = set(args.validation_groups)
        for path in files if files is not None else ["hub://" + spec.location]:
            for text, group in read_grouped_texts(path, args.text_field, group_field, args.txt_unit, stats, False):
                seen_groups.add(group)
                if group in held_out:
                    excluded["documents"] += 1
                    excluded["chars"] += len(text)
                else:
                    yield text
        excluded["sources_read_to_end"] += 1  # not reached when the sampling scan stops early
    elif files is None:
        yield from read_hub_dataset(spec.location, args.text_field, "train", stats, strict=False)
    else:
        for path in files:
            yield from read_file(path, args.text_field, args.txt_unit, stats, strict=False)
    if stats.dropped:
        logger.warning("source %s: records skipped while sampling text: %s", spec.name, dict(stats.dropped))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments([TokenizerArguments], argv)
    specs = [SourceSpec.parse(source) for source in args.sources]
    if len({spec.name for spec in specs}) != len(specs):
        raise DataError("--sources: two sources have the same name; name them: NAME=PATH@WEIGHT")
    group_field = None
    if args.validation_groups:
        group_field = resolve_split_field(args.split_by, [spec.location for spec in specs])
        if group_field is None:
            raise DataError("--validation_groups names groups of a --split_by field; pass --split_by FIELD (the demo "
                            "corpus is grouped by play without it)")
    seen_groups, excluded = set(), {"documents": 0, "chars": 0, "sources_read_to_end": 0}
    texts, report = sample_sources([(spec.name, spec.weight, iter_source_texts(spec, args, group_field, seen_groups,
                                                                               excluded)) for spec in specs],
                                   args.sample_chars, args.seed, args.sample_scan_factor)
    if group_field is not None:
        unknown = sorted(set(args.validation_groups) - seen_groups)
        read_everything = excluded.pop("sources_read_to_end") == len(specs)
        if unknown and read_everything:  # a typo would otherwise leave the held-out text in silently
            examples = ", ".join(sorted(seen_groups)[:12])
            raise DataError(f"--validation_groups {' '.join(unknown)}: no document has that {group_field} value; "
                            f"values: {examples}{', ...' if len(seen_groups) > 12 else ''}")
        if unknown:
            logger.warning("--validation_groups %s: not among the documents read (--sample_scan_factor stopped "
                           "before the end of a source), so not trained on either", " ".join(unknown))
        report["held_out"] = {"split_by": group_field, "validation_groups": sorted(args.validation_groups), **excluded}
        logger.info("left out of the tokenizer's text: %d documents (%d chars) of %s %s", excluded["documents"],
                    excluded["chars"], group_field, ", ".join(sorted(args.validation_groups)))
    if not texts:
        raise DataError(f"--sources {' '.join(args.sources)}: no text to train on")
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, args.min_frequency)
    tokenizer.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "sample_report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    logger.info("saved a %d-token tokenizer to %s (trained on %d chars; per source: sample_report.json)",
                len(tokenizer), args.output_dir, report["chars_sampled"])
    return tokenizer

