"""What training reads, for every stage: `load_training_data(stage, ...)` gives pretraining and SFT the
same TrainingData (datasets, collator, row length, bytes per token, report), so the entry scripts read
parse -> model -> data -> trainer -> train -> save and share this code.

The data is a prepared dataset directory (memory-mapped), or raw files prepared on the fly by the same
pipeline as data_prep/, once per machine (the main process prepares, the others wait and reuse the cache).
Prepared data is checked against the run before any step: the tokenizer it was made with, its block size
against --block_size, and the row length against the model's positions. Each would otherwise train
without a word on ids that mean other text, blocks of another length, or positions the model lacks."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from typing import Callable

import datasets
import numpy as np

from lmtrain.arguments import DataArguments
from lmtrain.data.collators import PadToLongestCollator, collate_packed_blocks
from lmtrain.data.pipeline import prepare_pretrain_data
from lmtrain.data.prepared import load_prepared
from lmtrain.data.tokenize import tokenizer_fingerprint
from lmtrain.data.sources import DataError

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # prepared directories already warned about (warn once per process)
STAGES = ("pretrain", "sft", "dpo")


@dataclass
class TrainingData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    collator: Callable[[list[dict]], dict]
    # Tokens per row when every row has the same length (packed blocks and packed SFT rows); None for
    # unpacked SFT rows, whose batches are padded to their longest row.
    tokens_per_row: int | None
    # The whole validation split's average: what bits per byte falls back to for validation blocks without
    # a `num_bytes` column (prepared by an older lmtrain; SFT rows have none).
    validation_bytes_per_token: float | None
    report: dict  # the preparation report (report.json of a prepared directory, else the one just made)


def load_training_data(stage: str, args, tokenizer, training_args=None, max_positions: int | None = None) -> TrainingData:
    """The data of a `stage` run ("pretrain": DataArguments, "sft": SFTDataArguments, "dpo":
    PreferenceDataArguments). `max_positions`: the
    model's max_position_embeddings, checked against the row length before any data is tokenized.
    `training_args` (None in tools and tests): preparation on the main process first, data_report.json in
    output_dir, and whether evaluation needs a validation split."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {', '.join(STAGES)}")
    load = {"pretrain": _load_pretrain, "sft": _load_sft, "dpo": _load_preference}[stage]
    data = load(args, tokenizer, training_args, max_positions)
    if training_args is not None and training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "data_report.json"), "w", encoding="utf-8") as handle:
            json.dump(data.report, handle, indent=2, default=str)
    data.validation = select_eval_blocks(data.validation, args.max_eval_samples, args.prepare_seed)
    return data


def _prepared_once(training_args, desc: str, prepare: Callable):
    """Run `prepare` on the main process first; the other ranks then reuse its cache (without a timeout:
    see lmtrain.distributed.main_process_first)."""
    from lmtrain.distributed import main_process_first

    with main_process_first(training_args, desc):
        return prepare()


def _load_sft(args, tokenizer, training_args, max_positions: int | None) -> TrainingData:
    from lmtrain.data.sft import limit_rows, prepare_sft_data

    evaluate = training_args is not None and training_args.eval_strategy != "no"
    data, report = _prepared_once(training_args, "preparing SFT data",
                                  lambda: prepare_sft_data(args, tokenizer, evaluate=evaluate))
    # After loading: a prepared directory's max_length and packing replace the run's.
    check_positions(args.max_length, max_positions, "--max_length: the SFT samples", "Pass --max_length", "--max_length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = collate_packed_blocks if args.packing else PadToLongestCollator(pad_id, args.padding_free)
    # A seeded random subset, not the first rows: packed rows come out of the packer longest samples first.
    train = limit_rows(data["train"], args.max_train_samples, args.prepare_seed)
    return TrainingData(train, data.get("validation"), collator, args.max_length if args.packing else None,
                        None, report)


def _load_preference(args, tokenizer, training_args, max_positions: int | None) -> TrainingData:
    """Preference pairs (lmtrain/data/preference.py); the collator is TRL's, built by DPOTrainer (None here)."""
    from lmtrain.data.preference import prepare_preference_data
    from lmtrain.data.sft import limit_rows

    check_positions(args.max_length, max_positions, "--max_length: the preference sequences", "Pass", "--max_length")
    evaluate = training_args is not None and training_args.eval_strategy != "no"
    # No cache to share: every rank reads and encodes the pairs itself (the same result; the main process first).
    data, report = _prepared_once(training_args, "preparing preference data",
                                  lambda: prepare_preference_data(args, tokenizer, evaluate))
    return TrainingData(limit_rows(data["train"], args.max_train_samples, args.prepare_seed), data.get("validation"),
                        None, None, None, report)


def _limit(dataset: datasets.Dataset | None, count: int | None):
    return dataset.select(range(min(count, len(dataset)))) if dataset is not None and count else dataset


def _warn_once(key: str, message: str, *args):
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


def select_eval_blocks(validation: datasets.Dataset | None, count: int | None, seed: int):
    """At most `count` validation blocks, a seeded sample that keeps each source's share of the split.

    The blocks are stored source after source, so the first `count` would all come from the first source
    (an English + Chinese mix evaluated on English only). Selected blocks keep their stored order."""
    if validation is None or not count or count >= len(validation):
        return validation
    rng = np.random.default_rng(seed)
    if "source" not in validation.column_names:
        chosen = rng.choice(len(validation), size=count, replace=False)
        return validation.select(np.sort(chosen))
    sources = np.array(validation.with_format("arrow")["source"].to_pylist(), dtype=object)
    names, sizes = np.unique(sources, return_counts=True)
    # Shares proportional to each source's blocks, summing to exactly `count` (largest remainders get the
    # blocks left over); every source gets at least one block while `count` allows, so none goes unseen.
    exact = sizes * count / len(sources)
    quota = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - quota))[: count - quota.sum()]:
        quota[index] += 1
    if count >= len(names):
        for index in np.flatnonzero(quota == 0):
            quota[np.argmax(quota)] -= 1
            quota[index] = 1
    chosen = [rng.choice(np.flatnonzero(sources == name), size=int(k), replace=False) for name, k in zip(names, quota)]
    logger.info("evaluating on %d of %d validation blocks (seeded, per source: %s)", count, len(sources),
                ", ".join(f"{name} {k} of {size}" for name, k, size in zip(names, quota, sizes)))
    return validation.select(np.sort(np.concatenate(chosen)))


def _block_size_was_given(args: DataArguments) -> bool:
    """--block_size set by the user (a flag or a config-file key), whatever its value: parse_arguments records
    the options given (explicit_options). DataArguments built in code carry none; for them only a value
    other than the default can be told apart from it."""
    if hasattr(args, "explicit_options"):
        return "block_size" in args.explicit_options
    default = {f.name: f.default for f in fields(DataArguments)}["block_size"]
    return args.block_size is not None and args.block_size != default


def check_positions(block_size: int, max_positions: int | None, where: str, fix: str, flag: str = "--block_size"):
    """A row longer than the model's position table fails late on a GPU (or runs on extrapolated RoPE)."""
    if max_positions is not None and block_size > max_positions:
        raise DataError(f"{where} are {block_size} tokens long but the model has max_position_embeddings="
                        f"{max_positions}, which must be at least that. "
                        f"{fix} {flag} {max_positions} or less, or use a model with more positions "
                        f"(--config_overrides max_position_embeddings={block_size} when training from scratch)")


def _load_pretrain(args: DataArguments, tokenizer, training_args, max_positions: int | None) -> TrainingData:
    """Packed blocks, from --dataset_path or prepared now from raw sources."""
    if args.dataset_path:
        prepared = load_prepared(args.dataset_path)
        report_path = os.path.join(args.dataset_path, "report.json")
        report = json.load(open(report_path, encoding="utf-8")) if os.path.exists(report_path) else {}
        logger.info("prepared data %s: %s", args.dataset_path, {k: len(v) for k, v in prepared.items()})
        check_prepared_tokenizer(args.dataset_path, report, tokenizer)
        block_size = len(prepared["train"][0]["input_ids"])
        if _block_size_was_given(args) and args.block_size != block_size:
            raise DataError(f"--block_size {args.block_size}, but --dataset_path {args.dataset_path} holds blocks "
                            f"of {block_size} tokens (fixed when it was prepared). Drop --block_size (a flag or a "
                            f"config-file key) to train on "
                            f"{block_size}-token blocks, or prepare the data again with data_prep/prepare_pretrain.py "
                            f"--block_size {args.block_size}")
        logger.info("training on the prepared blocks of %d tokens (--dataset_path %s)", block_size, args.dataset_path)
        check_positions(block_size, max_positions, f"the blocks of --dataset_path {args.dataset_path}",
                        "Prepare the data again with data_prep/prepare_pretrain.py")
    else:
        check_positions(args.block_size, max_positions, "--block_size: the training blocks", "Pass")
        prepared, report_obj = _prepared_once(training_args, "preparing data",
                                              lambda: prepare_pretrain_data(args, tokenizer))
        report = report_obj.to_dict()
        if training_args is None or training_args.process_index == 0:
            logger.info("data preparation:\n%s", report_obj.summary())
    train = _limit(prepared["train"], args.max_train_samples)
    validation = prepared.get("validation")
    if validation is not None and "num_bytes" not in validation.column_names:
        _warn_once(f"columns:{args.dataset_path}", "validation blocks of %s carry no source or byte counts "
                   "(prepared by an older lmtrain): evaluation samples blocks at random and bits per byte uses the "
                   "split's average bytes per token. Prepare the data again for exact and per-source figures",
                   args.dataset_path)
    block_size = len(train[0]["input_ids"])
    _check_token_range(train, tokenizer)
    return TrainingData(train, validation, collate_packed_blocks, block_size,
                        report.get("bytes_per_token_by_split", {}).get("validation"), report)


def _describe_difference(saved: dict, current: dict) -> str:
    if saved.get("vocab_size") != current["vocab_size"]:
        return f"{saved.get('vocab_size')} tokens there, {current['vocab_size']} here"
    if saved.get("vocab_sha256") != current["vocab_sha256"]:
        return f"same size ({current['vocab_size']} tokens) but other token strings or ids"
    if saved.get("eos_token_id") != current["eos_token_id"]:
        return f"end-of-text id {saved.get('eos_token_id')} there, {current['eos_token_id']} here"
    return "the same vocabulary, but a probe text encodes to other ids (another normalizer or split rule)"


def check_prepared_tokenizer(path: str, report: dict, tokenizer, prepare_script: str = "data_prep/prepare_pretrain.py"):
    """Refuse data prepared with another tokenizer: same-size vocabularies pass the id-range check, and the
    model would silently learn ids that mean other text. Compared: the fingerprint in report.json, else the
    tokenizer copy in DIR/tokenizer (older directories); with neither, a warning."""
    saved = report.get("tokenizer")
    copy_dir = os.path.join(path, "tokenizer")
    if not saved and os.path.isdir(copy_dir):
        from transformers import AutoTokenizer

        saved = tokenizer_fingerprint(AutoTokenizer.from_pretrained(copy_dir))
        saved["name_or_path"] = copy_dir
    if not saved:
        _warn_once(f"tokenizer:{path}", "%s records no tokenizer (no report.json fingerprint, no tokenizer/ copy): "
                   "cannot check it was prepared with this run's tokenizer; only the id range is checked", path)
        return
    current = tokenizer_fingerprint(tokenizer)
    keys = ("vocab_size", "vocab_sha256", "eos_token_id", "probe_ids")
    if all(saved.get(key) == current[key] for key in keys):
        return
    hint = f" (a copy is in {copy_dir})" if os.path.isdir(copy_dir) else ""
    raise DataError(
        f"--dataset_path {path} was prepared with another tokenizer: '{saved.get('name_or_path')}'{hint}, and this "
        f"run's tokenizer is '{current['name_or_path']}' ({_describe_difference(saved, current)}). Its token ids would "
        f"mean other text to this model. Train with --tokenizer_name "
        f"{copy_dir if hint else saved.get('name_or_path')}, or prepare the data again with "
        f"{prepare_script} --tokenizer_name {current['name_or_path']}")


def _check_token_range(train: datasets.Dataset, tokenizer):
    """Data tokenized with a different (larger) tokenizer would index past the embeddings on the GPU."""
    sample = train.with_format("arrow")[: min(256, len(train))]["input_ids"].combine_chunks().flatten()
    highest = max(sample.to_numpy()) if len(sample) else 0
    if highest >= len(tokenizer):
        raise DataError(f"the data holds token id {highest} but the tokenizer has {len(tokenizer)} tokens: it was "
                        "prepared with another tokenizer. Prepare it again with --tokenizer_name of this run")
