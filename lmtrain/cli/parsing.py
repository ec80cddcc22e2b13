"""Command line and config files -> the option dataclasses of lmtrain/arguments.py.

Precedence: dataclass defaults < a YAML/JSON config file (the first argument, or `--config FILE`) < flags.
Spellings from older transformers versions and from classic run_clm-style launch scripts are translated
(`--evaluation_strategy` -> `--eval_strategy`, ...), so existing launch scripts run unchanged. The resolved
options are written to OUTPUT_DIR/lmtrain_config.json, which read back repeats the run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import dataclasses
from dataclasses import asdict

from transformers import HfArgumentParser, TrainingArguments

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "lmtrain_config.json"  # the resolved options, written into output_dir

# Old flag -> current flag. None: accepted and ignored (the behaviour is now always on, or moved).
LEGACY_FLAGS = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "save_safetensors": None,            # always safetensors now
    "include_tokens_per_second": None,   # tokens/s is always logged
    "use_fast_tokenizer": None,          # fast tokenizers only
    "low_cpu_mem_usage": None,           # transformers 5 always loads lazily
    "use_auth_token": None,
    "streaming": None,                   # preparation always streams from disk
    "keep_linebreaks": None,             # line breaks are always kept
}


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# The groups save_resolved_config nests the options under; a file shaped that way is read flat again.
CONFIG_GROUPS = ("model", "data", "lora", "training")


def read_config_file(path: str) -> dict:
    """A YAML/JSON config file as {option: value}. Values keep their YAML/JSON types (null, true/false,
    lists, mappings); the resolved OUTPUT_DIR/lmtrain_config.json, nested by group, is flattened."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise UserError(f"config file {path}: cannot be read ({error.strerror or error})") from error
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError
        raise UserError(f"config file {path}: not valid JSON ({error})") from error
    except Exception as error:  # yaml.YAMLError carries the line and column in its message
        raise UserError(f"config file {path}: not valid YAML ({' '.join(str(error).split())})") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path}: expected a mapping of option names to values "
                        f"(`learning_rate: 3.0e-4`), found a {type(values).__name__}")
    if values and all(key in CONFIG_GROUPS and isinstance(value, dict) for key, value in values.items()):
        flat = {}
        for group in values.values():
            flat.update(group)
        values = flat
    return values


def _config_defaults(parser: HfArgumentParser, values: dict, path: str) -> dict:
    """Config-file values as parser defaults (so flags still override them), checked against the options."""
    actions = {action.dest: action for action in parser._actions}
    defaults, unknown = {}, []
    for key, value in values.items():
        key = str(key)
        if key in LEGACY_FLAGS:
            if LEGACY_FLAGS[key] is None:
                logger.info("%s: %s is accepted for compatibility and has no effect", path, key)
                continue
            key = LEGACY_FLAGS[key]
        action = actions.get(key)
        if action is None or key == "help":
            unknown.append(key)
            continue
        if isinstance(value, str) and value.endswith("_TOKEN>") and key.endswith("_token"):
            continue  # a redacted secret in a saved config: keep the default (None)
        if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
            value = [value]
        if isinstance(value, list) and action.nargs not in ("+", "*") and key == "report_to":
            value = ",".join(str(v) for v in value) or "none"
        try:  # converted by the option's own type, as the same value given as a flag would be
            if isinstance(value, list) and action.type is not None:
                value = [action.type(str(v)) for v in value]
            elif value is not None and not isinstance(value, dict) and action.type is not None:
                value = action.type(str(value))
        except Exception as error:  # ValueError, argparse.ArgumentTypeError
            raise UserError(f"config file {path}: {key}: {value!r} is not a valid value ({error})") from error
        defaults[key] = value
    if unknown:
        hints = [_with_nearest(key, actions) for key in unknown]
        raise UserError(f"config file {path}: unknown option(s): {'; '.join(hints)}. Every key must be a "
                        "flag name without the dashes (see --help)")
    return defaults


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """The config file (the first argument, or `--config FILE`) and the remaining flags."""
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file: --config run.yaml")
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, argv


def translate_legacy_flags(argv: list[str]) -> list[str]:
    argv = _join_report_to(argv)
    translated, skip_values = [], False
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            skip_values = False
            if name in LEGACY_FLAGS:
                new = LEGACY_FLAGS[name]
                if new is None:
                    logger.info("--%s is accepted for compatibility and has no effect", name)
                    skip_values = True
                    continue
                token = f"--{new}{eq}{value}"
        elif skip_values:
            continue
        translated.append(token)
    return translated


def _join_report_to(argv: list[str]) -> list[str]:
    """`--report_to tensorboard swanlab` -> `--report_to tensorboard,swanlab` (the parser takes one value)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--report_to":
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out += ["--report_to", ",".join(values)]
        else:
            out.append(argv[i])
            i += 1
    return out


def explicit_options(options) -> frozenset:
    """The field names of a parsed dataclass that the user gave (a flag or a config-file key), as opposed to
    defaults; empty for an instance built in code. A value equal to the default, given on purpose, counts."""
    return getattr(options, EXPLICIT_ATTRIBUTE, frozenset())


EXPLICIT_ATTRIBUTE = "explicit_options"  # an attribute, not a dataclass field: never saved in lmtrain_config.json


def _given_on_command_line(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the command line sets: argv parsed again with every default suppressed, so only
    options present in it land in the namespace (argparse's own matching: --no_X, --x=1, abbreviations)."""
    import argparse

    saved_defaults, saved_parser_defaults = [(a, a.default) for a in parser._actions], parser._defaults
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults = {}
        namespace, _ = argparse.ArgumentParser.parse_known_args(parser, argv, argparse.Namespace())
    finally:
        for action, default in saved_defaults:
            action.default = default
        parser._defaults = saved_parser_defaults
    return set(vars(namespace))


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Parser(HfArgumentParser):
    """HfArgumentParser for users: a flag is matched whole (argparse would take --max_step for --max_steps, or
    for whichever flag it abbreviates, silently), and a bad value is one message, not the usage screen."""

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)
        # argparse reads -0.0001 as a value but -1e-4 as an unknown flag ("expected one argument")
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        raise UserError(f"{message} (--help lists the options)")


def _with_nearest(name: str, known) -> str:
    """`name (did you mean a, b?)` with the two nearest known names, or `name` when none is near."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=2)
    return f"{name} (did you mean {', '.join(close)}?)" if close else name


def unknown_arguments_message(parser, remaining: list[str]) -> str:
    """The flags no option takes, each with the nearest real ones (as config-file keys get them)."""
    # each option's --name_with_underscores spelling (transformers adds a --dashed alias of each)
    known = [flag for action in parser._actions for flag in action.option_strings
             if flag.startswith("--") and "-" not in flag[2:]]
    flags = [item.split("=", 1)[0] for item in remaining if item.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(remaining)}: every value follows its --option"
    return f"unknown option(s): {'; '.join(_with_nearest(flag, known) for flag in flags)} (--help lists the options)"


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """Dataclass defaults < the config file's values < command-line flags. Each returned instance carries
    `explicit_options` (see explicit_options()), and its `check_explicit_options()` runs when it has one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = split_config_file(argv)
    argv = translate_legacy_flags(argv)
    parser = _Parser(dataclass_types)
    config_values = read_config_file(config_path) if config_path else {}
    training = any(issubclass(t, TrainingArguments) for t in dataclass_types)
    batch_choice = None
    if training:  # --per_device_train_batch_size auto, --global_batch_size: numbers before TrainingArguments exists
        from lmtrain.planning.auto_batch import GLOBAL_HELP, resolve_batch_flags

        parser.add_argument("--global_batch_size", type=int, default=None, help=GLOBAL_HELP)
        argv, config_values, batch_choice = resolve_batch_flags(dataclass_types, argv, config_values)
    from_config = {}
    if config_path:
        from_config = _config_defaults(parser, config_values, config_path)
        parser.set_defaults(**from_config)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                                return_remaining_strings=True)
        if remaining:
            raise UserError(unknown_arguments_message(parser, remaining))
        parsed = [options for options in parsed if dataclasses.is_dataclass(options)]  # the --global_batch_size
        for options in parsed:
            for name in ("max_train_samples", "max_eval_samples"):
                value = getattr(options, name, None)
                if value is not None and value < 1:
                    raise UserError(f"--{name} {value}: must be at least 1 (leave it out to use every sample)")
        given = set(from_config) | _given_on_command_line(parser, argv)
        for options in parsed:
            names = {f.name for f in dataclasses.fields(options)}
            object.__setattr__(options, EXPLICIT_ATTRIBUTE, frozenset(given & names))
            if hasattr(options, "check_explicit_options"):
                options.check_explicit_options()
            if batch_choice and isinstance(options, TrainingArguments):
                from lmtrain.planning.auto_batch import CHOICE_ATTRIBUTE

                object.__setattr__(options, CHOICE_ATTRIBUTE, batch_choice)  # logged by start_run
        return parsed
    except UserError:
        raise
    except ValueError as error:  # a __post_init__ check: conflicting or out-of-range options
        where = f" (with config file {config_path})" if config_path else ""
        raise UserError(f"{error}{where}") from error


def save_resolved_config(output_dir: str, **groups) -> str:
    """Write every resolved option next to the checkpoints, nested by group for reading. Passed back as the
    config file (`python pretrain.py OUTPUT_DIR/lmtrain_config.json`) it repeats the run; secrets (hub
    tokens) are never written, nor a group's options_not_recorded() (options that did not apply)."""
    os.makedirs(output_dir, exist_ok=True)
    resolved = {}
    for name, group in groups.items():
        values = json.loads(group.to_json_string()) if hasattr(group, "to_json_string") else asdict(group)
        values.update(getattr(group, "values_as_given", dict)())  # machine-decided values: as given
        for key in getattr(group, "options_not_recorded", lambda: ())():
            values.pop(key, None)  # decided elsewhere (e.g. by the prepared data), or not applying to this run
        for key in [k for k in values if k.endswith("_token")]:
            if getattr(group, key, None) is None:
                values[key] = None
            else:
                del values[key]
        resolved[name] = values
    path = os.path.join(output_dir, CONFIG_FILE_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(resolved, handle, indent=2, default=str)
    return path
