"""Reading raw corpora: jsonl / json / txt / parquet files, globs, directories, Hugging Face datasets and the
built-in demo corpus, into a stream of `{"text", "source"}` records.

Every bad record is either an error that names the file, the line and the problem (``strict=True``) or a
counted drop (``strict=False``); problems that make a whole input unusable (a missing file, a text field that
no record has) are always errors, because dropping a whole file silently is never what a user wants.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmtrain.errors import UserError, first_line
from lmtrain.locations import hub_unreachable_for, looks_local

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".jsonl", ".json", ".txt", ".text", ".md", ".parquet"}
# How many JSON objects we read before deciding that a text field which none of them has is a wrong column
# name (an error) rather than a few bad records (drops). Bounded, so a huge file never hangs on this check.
FIELD_CHECK_RECORDS = 100


class DataError(UserError):
    """Bad input that the user must fix; the message names the file, line and field."""


def reraise_data_error(err: Exception):
    """`datasets` wraps our DataError (in a DatasetGenerationError, or, from num_proc workers, as traceback
    text only); re-raise it as the one-message error naming file:line, or `err` itself if it holds none."""
    cause = err
    while cause is not None:
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from err
        text = str(cause)
        if "DataError: " in text:
            raise DataError(text.rsplit("DataError: ", 1)[1].strip().splitlines()[0]) from err
        cause = cause.__cause__ or cause.__context__
    raise err


# Per-source cleaning options end a source spec: `:key=value,key=value`. Every option holds a `=`, which
# neither a hub config (`name:config`) nor a Windows drive (`C:\\data`) does after its colon.
_SOURCE_OPTIONS = re.compile(r":([\w.-]+=[^,:=@]*(?:,[\w.-]+=[^,:=@]*)*)$")
# What a malformed option list looks like (an item without `=`, e.g. `languages=en,zh`): `:key=` at the end
# of the spec with a per-source key, so a file or hub name that merely holds `:` and `=` is not taken for one.
_LOOSE_SOURCE_OPTIONS = re.compile(r":([\w.-]+)=([^:@]*)$")
# Per-source options that are fractions or probabilities, checked like their global flags.
_UNIT_INTERVAL_KEYS = ("max_duplicate_line_fraction", "min_unique_word_fraction", "min_language_confidence")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclass
class SourceSpec:
    """One entry of a mixture: where the text is, its sampling weight (relative token share) and the
    cleaning settings it overrides (CleaningConfig fields, see lmtrain.data.cleaning.PER_SOURCE_KEYS)."""

    name: str
    location: str
    weight: float = 1.0
    cleaning: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        """`[NAME=]PATH[@WEIGHT][:key=value,...]` (PATH: file, glob, directory, hub name), e.g.
        `code=data/code/*.parquet@0.1:strip_html=false,min_chars=0`."""
        options = _SOURCE_OPTIONS.search(spec)
        if not options:
            _check_malformed_options(spec)
        body = spec[:options.start()] if options else spec
        name, _, rest = body.partition("=") if "=" in body.split("@")[0] else ("", "", body)
        location, _, weight = rest.rpartition("@") if "@" in rest else (rest, "", "1")
        try:
            weight_value = float(weight)
        except ValueError:
            raise DataError(f"source '{spec}': weight '{weight}' is not a number (use PATH@0.6)") from None
        if weight_value <= 0:
            raise DataError(f"source '{spec}': weight must be > 0")
        if not name:
            base = os.path.basename(location.rstrip("/").replace("*", "")) or location
            name = base.split(".")[0] or "source"
        cleaning = _parse_cleaning_options(spec, options.group(1)) if options else {}
        return cls(name=name, location=location, weight=weight_value, cleaning=cleaning)

    def cleaning_config(self, base):
        """`base` (the global CleaningConfig) with this source's overrides."""
        return dataclasses.replace(base, **self.cleaning) if self.cleaning else base


def _check_malformed_options(spec: str):
    """A spec ending in per-source options that are not `key=value,key=value` would be read as part of the
    path ('in.jsonl:languages=en,zh does not exist'): say what is wrong with the options instead."""
    from lmtrain.data.cleaning import PER_SOURCE_KEYS

    loose = _LOOSE_SOURCE_OPTIONS.search(spec)
    if not loose or loose.group(1) not in PER_SOURCE_KEYS:
        return
    items = f"{loose.group(1)}={loose.group(2)}".split(",")
    key, start = None, 0
    for index, item in enumerate(items):
        if "=" in item:
            key, start = item.partition("=")[0], index
        elif key == "languages":
            codes = [items[start].partition("=")[2], *itertools.takewhile(lambda i: "=" not in i, items[start + 1:])]
            raise DataError(f"source '{spec}': per-source options are separated by commas, so join several "
                            f"languages with '+': languages={'+'.join(code.strip() for code in codes)}")
        else:
            raise DataError(f"source '{spec}': per-source option '{item}' is not key=value (options follow the "
                            "colon as key=value,key=value)")


def _parse_cleaning_options(spec: str, text: str) -> dict:
    from lmtrain.data.cleaning import PER_SOURCE_KEYS, CleaningConfig

    defaults = CleaningConfig()
    options = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in PER_SOURCE_KEYS:
            raise DataError(f"source '{spec}': unknown cleaning option '{key}'; per-source options are "
                            f"{', '.join(PER_SOURCE_KEYS)} (deduplication settings are global flags)")
        kind = type(getattr(defaults, key))
        try:
            if kind is bool:
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError
                parsed = value.lower() in _TRUE
            else:
                parsed = kind(value)
        except ValueError:
            expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")
            raise DataError(f"source '{spec}': cleaning option {key}={value!r} is not {expected}") from None
        if key == "unicode_normalization" and parsed.lower() not in ("nfc", "nfkc", "none"):
            raise DataError(f"source '{spec}': unicode_normalization must be NFC, NFKC or none")
        if key in _UNIT_INTERVAL_KEYS and not 0 <= parsed <= 1:  # nan fails too
            what = "a probability" if key == "min_language_confidence" else "a fraction"
            raise DataError(f"source '{spec}': {key}={value}: {what} in [0, 1]")
        options[key] = parsed
    return options


@dataclass
class ReadStats:
    """What happened while reading, per reason; merged into the preparation report."""

    records_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    empty_files: list = field(default_factory=list)
    # Separate from `dropped`, which the reader drains as it turns drops into rows.
    warned: Counter = field(default_factory=Counter)

    def drop(self, reason: str, where: str, strict: bool, message: str):
        if strict:
            raise DataError(f"{where}: {message} (with the default --lenient true such records are dropped and "
                            "counted)")
        self.dropped[reason] += 1
        self.warned[reason] += 1
        if self.warned[reason] <= 3:  # a few examples help; thousands of lines would drown the log
            logger.warning("dropping record at %s: %s", where, message)


def expand_location(location: str) -> list[str] | None:
    """Local files for a location, or None when it is not local (then it is a hub dataset name)."""
    if any(ch in location for ch in "*?["):
        files = sorted(glob.glob(location, recursive=True))
        if not files:
            raise DataError(f"no file matches '{location}'")
        return files
    path = Path(location)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return None  # a datasets.save_to_disk directory: read through `datasets`
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"directory '{location}' holds no {sorted(TEXT_SUFFIXES)} files")
        return files
    # a hub dataset is `name`, `org/name` or either with `:config` (wikimedia/wikipedia:20231101.en)
    if path.suffix.lower() in TEXT_SUFFIXES or looks_local(location):
        if not path.exists():
            raise DataError(f"file '{location}' does not exist")
        return [location]
    return None


def _check_text(value, where: str, text_field: str, stats: ReadStats, strict: bool) -> str | None:
    if value is None:
        stats.drop("missing_text", where, strict, f"field '{text_field}' is missing or null")
        return None
    if not isinstance(value, str):
        stats.drop("non_string_text", where, strict,
                   f"field '{text_field}' is a {type(value).__name__}, not a string")
        return None
    if not value.strip():
        # Empty texts are a normal sight in scraped data: always counted, never fatal.
        stats.dropped["empty_text"] += 1
        return None
    return value


def _json_problem(err: Exception) -> str:
    """What json.loads could not read. Besides syntax errors (JSONDecodeError) it raises RecursionError for
    nesting deeper than Python's recursion limit and ValueError for an integer of more than 4,300 digits
    (sys.int_max_str_digits): both are bad records, found by tests/test_fuzz_readers.py."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg}, column {err.colno}"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(";")[0]


def read_jsonl_records(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, dict]]:
    """(where, record) for each JSON object of a JSON-lines file. Reads bytes, so a non-UTF-8 line is
    reported with its line number; a bad line is a counted drop or (strict) a DataError naming file:line."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            stats.records_read += 1
            try:
                # utf-8-sig on the first line: files saved by Windows tools start with a byte-order mark,
                # which json.loads rejects, silently losing the first record.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                stats.drop("invalid_utf8", where, strict, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, or what json.loads cannot hold
                stats.drop("malformed_json", where, strict, f"malformed JSON ({_json_problem(err)})")
                continue
            if not isinstance(record, dict):
                stats.drop("not_an_object", where, strict, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def read_json_array_records(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, dict]]:
    """(where, record) of a `.json` file: a JSON array, or JSON lines (many ".json" files really are)."""
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl_records(path, stats, strict)
        return
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: not a valid JSON array ({_json_problem(err)})") from None
    for index, record in enumerate(records):
        stats.records_read += 1
        where = f"{path}[{index}]"
        if not isinstance(record, dict):
            stats.drop("not_an_object", where, strict, f"expected a JSON object, got {type(record).__name__}")
            continue
        yield where, record


def read_parquet_records(path: str, stats: ReadStats, columns: list[str] | None = None
                         ) -> Iterator[tuple[str, dict]]:
    """(where, record) per row of a parquet file, read in batches (never the whole file at once)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}'; columns: {', '.join(parquet.schema_arrow.names)}. "
                        f"Pass --text_field with the right name")
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=8192):
        for record in batch.to_pylist():
            stats.records_read += 1
            yield f"{path} row {row}", record
            row += 1


HELD_OUT_SPLITS = ("validation", "test")


def _check_hub_reachable(name: str):
    """A hub dataset is read from the hub itself (streamed; its split names too): when the hub cannot be
    reached, one message now instead of a minute of retries per request."""
    unreachable = hub_unreachable_for(name.partition(":")[0])
    if unreachable:
        raise DataError(f"hub dataset '{name}' (not a local path: no such file or directory here) cannot be read: "
                        f"the hub cannot be reached from here ({unreachable})")


def held_out_split(name: str) -> str:
    """The split --validation_files reads of a hub dataset (`name` or `name:config`) or a save_to_disk
    directory: its validation or test split. Never train: the held-out figures would be training pairs'."""
    if os.path.isdir(name):
        index = os.path.join(name, "dataset_dict.json")
        if not os.path.exists(index):
            return "train"  # one saved Dataset, not a DatasetDict: all of it is what was given
        with open(index, encoding="utf-8") as handle:
            splits = json.load(handle)["splits"]
    else:
        repo, _, config = name.partition(":")
        _check_hub_reachable(name)
        try:
            import datasets

            splits = datasets.get_dataset_split_names(repo, config or None)
        except Exception as err:  # offline, unknown name, ...: the same failure load_dataset would meet
            raise DataError(f"--validation_files {name}: cannot list its splits ({err})") from err
    for split in HELD_OUT_SPLITS:
        if split in splits:
            return split
    raise DataError(f"--validation_files {name}: no {' or '.join(HELD_OUT_SPLITS)} split (splits: "
                    f"{', '.join(splits)}); hold pairs out with --validation_split_percentage instead")


def read_hub_records(name: str, split: str, stats: ReadStats, required_column: str | None = None
                     ) -> Iterator[tuple[str, dict]]:
    """(where, record) of a hub dataset name (`name` or `name:config`, streamed) or a `save_to_disk`
    directory."""
    import datasets

    if os.path.isdir(name):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        repo, _, config = name.partition(":")
        _check_hub_reachable(name)
        try:
            dataset = datasets.load_dataset(repo, config or None, split=split, streaming=True)
        except Exception as err:  # offline, no such repository or config, no access: the user's to fix
            raise DataError(f"hub dataset '{name}' (not a local path: no such file or directory here) could not "
                            f"be loaded: {type(err).__name__}: {first_line(err)}") from None
    columns = dataset.column_names or []
    if required_column and columns and required_column not in columns:
        raise DataError(f"dataset '{name}': no column '{required_column}'; columns: {', '.join(columns)}")
    for index, record in enumerate(dataset):
        stats.records_read += 1
        yield f"{name}[{index}]", record


def read_records(path: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, dict]]:
    """(where, record) of one record file (jsonl / json / parquet), the core every stage reads through.
    An empty file is skipped (listed in stats.empty_files); `where` is file:line, file[index] or file row N."""
    if os.path.getsize(path) == 0:
        logger.warning("%s is empty: skipped", path)
        stats.empty_files.append(path)
        return
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl_records(path, stats, strict)
    elif suffix == ".json":
        yield from read_json_array_records(path, stats, strict)
    elif suffix == ".parquet":
        yield from read_parquet_records(path, stats)
    else:
        raise DataError(f"{path}: records are read from .jsonl, .json or .parquet files, not '{suffix}'")


def _texts_of_records(records: Iterator[tuple[str, dict]], path: str, text_field: str, stats: ReadStats,
                      strict: bool) -> Iterator[str]:
    """The `text_field` of each record. A field that none of the first FIELD_CHECK_RECORDS records has (or,
    strict, the first record lacks) is a wrong column name: an error, not thousands of drops."""
    seen_fields: Counter = Counter()
    objects = with_field = 0
    for where, record in records:
        objects += 1
        seen_fields.update(record.keys())
        if text_field in record:
            with_field += 1
        elif with_field == 0 and objects >= FIELD_CHECK_RECORDS:
            _raise_wrong_field(path, text_field, seen_fields)
        elif strict and with_field == 0:
            _raise_wrong_field(f"{where}", text_field, seen_fields)
        text = _check_text(record.get(text_field), where, text_field, stats, strict)
        if text is not None:
            yield text
    if objects and not with_field:
        _raise_wrong_field(path, text_field, seen_fields)


def read_jsonl(path: str, text_field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    """Yield texts line by line (see read_jsonl_records)."""
    yield from _texts_of_records(read_jsonl_records(path, stats, strict), path, text_field, stats, strict)


def _raise_wrong_field(path: str, text_field: str, seen_fields: Counter):
    fields = ", ".join(name for name, _ in seen_fields.most_common(8))
    raise DataError(f"{path}: no record has the field '{text_field}'; fields found: {fields}. "
                    f"Pass --text_field with the right name")


def read_json_array(path: str, text_field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    yield from _texts_of_records(read_json_array_records(path, stats, strict), path, text_field, stats, strict)


def read_txt(path: str, unit: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    """A text file as one document (`file`), one per line (`line`) or per blank-line paragraph."""
    def decode(raw: bytes, where: str) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            stats.drop("invalid_utf8", where, strict, f"not valid UTF-8 ({err.reason} at byte {err.start})")
            return None

    if unit == "file":
        stats.records_read += 1
        text = decode(Path(path).read_bytes(), path)
        if text is not None and text.strip():
            yield text
        elif text is not None:
            stats.dropped["empty_text"] += 1
        return
    paragraph: list[str] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = decode(raw, f"{path}:{line_number}")
            if line is None:
                continue
            if unit == "line":
                stats.records_read += 1
                if line.strip():
                    yield line.rstrip("\n")
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                stats.records_read += 1
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
    if paragraph:
        stats.records_read += 1
        yield "".join(paragraph).rstrip("\n")


def read_parquet(path: str, text_field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    for where, record in read_parquet_records(path, stats, columns=[text_field]):
        text = _check_text(record[text_field], where, text_field, stats, strict)
        if text is not None:
            yield text


def read_hub_dataset(name: str, text_field: str, split: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    """Texts of a hub dataset or a `save_to_disk` directory (see read_hub_records)."""
    for where, record in read_hub_records(name, split, stats, required_column=text_field):
        text = _check_text(record.get(text_field), where, text_field, stats, strict)
        if text is not None:
            yield text


def read_file(path: str, text_field: str, txt_unit: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    if os.path.getsize(path) == 0:
        logger.warning("%s is empty: skipped", path)
        stats.empty_files.append(path)
        return
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path, text_field, stats, strict)
    elif suffix == ".json":
        yield from read_json_array(path, text_field, stats, strict)
    elif suffix == ".parquet":
        yield from read_parquet(path, text_field, stats, strict)
    else:
        yield from read_txt(path, txt_unit, stats, strict)


def resolve_source_files(spec: SourceSpec) -> list[str] | None:
    """Files of a source (None for hub datasets); the built-in demo corpus is fetched on first use."""
    from lmtrain.data.demo_corpus import DEMO_SOURCES, ensure_demo_corpus

    if spec.location in DEMO_SOURCES:
        return [str(ensure_demo_corpus(spec.location))]
    return expand_location(spec.location)
