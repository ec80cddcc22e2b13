"""Every option of pretrain.py / sft.py / data_prep, as `HfArgumentParser` dataclasses.

Precedence: dataclass defaults < a YAML/JSON config file (the first argument, or `--config FILE`) < flags.
Spellings from older transformers versions and from classic run_clm-style launch scripts are translated
(`--evaluation_strategy` -> `--eval_strategy`, ...), so existing launch scripts run unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields

from transformers import HfArgumentParser, TrainingArguments

from lmtrain.data.cleaning import CleaningConfig
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


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained weights (HF directory or hub name) for continued pretraining / SFT."})
    config_name: str | None = field(default=None, metadata={
        "help": "Train from scratch with this config: a directory with config.json, a .json file, or a name "
                "from configs/ (qwen2-tiny, qwen2.5-0.5b, qwen2.5-1.5b, llama-1b, llama-7b)."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated config changes, e.g. hidden_size=512,num_hidden_layers=8."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Tokenizer directory or hub name (default: model_name_or_path, else config_name)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "dtype to load pretrained weights in (auto, bfloat16, float32); training precision is --bf16."})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa, flash_attention_2, flex_attention or eager. All keep packed documents apart."})
    resize_token_embeddings: bool = field(default=False, metadata={
        "help": "Allowed to resize the embeddings of pretrained weights to the tokenizer's vocabulary."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})

    def __post_init__(self):
        if self.model_name_or_path and self.config_name:
            raise ValueError("give --model_name_or_path (start from weights) or --config_name (from scratch), "
                             "not both; with weights, change the config through --config_overrides")
        if self.config_overrides and not (self.config_name or self.model_name_or_path):
            self.config_name = "qwen2-tiny"
        from lmtrain.model.attention import check_attention_name  # here, so a typo fails before data preparation
        check_attention_name(self.attn_implementation)


@dataclass
class DataArguments:
    dataset_path: str | None = field(default=None, metadata={
        "help": "A dataset directory written by data_prep/prepare_pretrain.py (memory-mapped)."})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "Raw training files/globs/dirs, prepared on the fly (classic run_clm spelling of --sources)."})
    sources: list[str] | None = field(default=None, metadata={
        "help": "Raw sources with mixture weights: NAME=PATH@WEIGHT (PATH: file, glob, directory, hub "
                "dataset, or 'shakespeare', the built-in demo corpus). Default: shakespeare. Per-source cleaning "
                "overrides follow a colon: code=data/code/*.parquet@0.1:strip_html=false,min_chars=0 (keys: "
                "unicode_normalization, remove_control_chars, strip_html, min_chars, max_chars, "
                "max_duplicate_line_fraction, min_unique_word_fraction)."})
    validation_files: list[str] | None = field(default=None, metadata={
        "help": "Raw validation files; default: a document-level split of the training sources."})
    validation_split_percentage: float = field(default=1.0, metadata={
        "help": "Percent of documents held out for validation (split before packing)."})
    text_field: str = field(default="text", metadata={"help": "The text field of jsonl/json/parquet records."})
    txt_unit: str = field(default="file", metadata={"help": "A .txt document is a whole file, a line or a paragraph."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per packed training block."})
    drop_remainder: bool = field(default=False, metadata={
        "help": "Drop the last partial block (classic group_texts) instead of padding and masking it."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preparation."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Ignore cached preparation results."})
    lenient: bool = field(default=True, metadata={
        "help": "Drop and count bad records (malformed JSON, bad UTF-8, missing/non-string text). "
                "--lenient false stops at the first one with its file and line."})
    clean: bool = field(default=True, metadata={"help": "Master switch for cleaning and deduplication."})
    mixture_tokens: int = field(default=0, metadata={
        "help": "Training tokens the mixture is sampled to (0: as many as all sources hold)."})
    prepare_seed: int = field(default=1234, metadata={"help": "Seed for the split and the mixture sampling."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many train blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval blocks."})
    prepared_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache for on-the-fly preparation (default ~/.cache/lmtrain/prepared)."})
    # Cleaning steps, each switchable; see lmtrain/data/cleaning.py.
    unicode_normalization: str = field(default="NFC", metadata={"help": "NFC, NFKC or none."})
    remove_control_chars: bool = field(default=True, metadata={"help": "Remove control/zero-width characters."})
    strip_html: bool = field(default=True, metadata={
        "help": "Remove tags, scripts and comments, and decode entities, in documents that look like HTML (a page, "
                "or a tag-dense fragment of prose); code and other text are kept as they are."})
    min_chars: int = field(default=20, metadata={"help": "Drop documents shorter than this (characters)."})
    max_chars: int = field(default=0, metadata={"help": "Drop documents longer than this (0: no limit)."})
    max_duplicate_line_fraction: float = field(default=0.3, metadata={"help": "Repetition filter (1: off)."})
    min_unique_word_fraction: float = field(default=0.1, metadata={"help": "Repetition filter (0: off)."})
    dedup_exact: bool = field(default=True, metadata={"help": "Remove exact duplicate documents."})
    dedup_near: bool = field(default=True, metadata={"help": "Remove near duplicates (MinHash LSH)."})
    near_dup_threshold: float = field(default=0.8, metadata={"help": "Jaccard threshold for near duplicates."})

    def __post_init__(self):
        if self.train_files and self.sources:
            raise ValueError("--train_files and --sources name the same thing; give one")
        if self.dataset_path and (self.train_files or self.sources):
            raise ValueError("--dataset_path is already prepared data; do not also give raw --sources")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100)")
        if self.txt_unit not in ("file", "line", "paragraph"):
            raise ValueError("--txt_unit must be file, line or paragraph")
        if self.block_size < 2:
            raise ValueError("--block_size must be at least 2")

    @property
    def source_specs(self) -> list[str]:
        return self.sources or self.train_files or ["shakespeare"]

    def cleaning_config(self) -> CleaningConfig:
        names = {f.name for f in fields(CleaningConfig)}
        config = CleaningConfig(**{k: v for k, v in asdict(self).items() if k in names})
        if not self.clean:
            config = CleaningConfig(unicode_normalization="none", remove_control_chars=False, strip_html=False,
                                    min_chars=0, max_chars=0, max_duplicate_line_fraction=1.0,
                                    min_unique_word_fraction=0.0, dedup_exact=False, dedup_near=False)
        return config


@dataclass
class TrainArguments(TrainingArguments):
    """TrainingArguments with pretraining defaults and the options transformers 5 dropped but scripts use."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, logs and the final model."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh: never resume from output_dir's checkpoints; they are deleted (with a log line), "
                "other files are kept or overwritten. Without it a run resumes from its newest checkpoint."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard log directory."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine decay ends at learning_rate * this."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "LR schedule after warmup."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95 is usual for LLM pretraining)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on norms/biases)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    sample_prompts: list[str] | None = field(default=None, metadata={
        "help": "Prompts to sample from at every evaluation; the texts go to the log, TensorBoard/SwanLab "
                "and OUTPUT_DIR/samples.jsonl."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Length of those samples."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop when the validation loss has not improved for this many evaluations (the best "
                "checkpoint is kept and loaded at the end)."})
    stop_after_steps: int | None = field(default=None, metadata={
        "help": "Planned stop for time-boxed jobs: make this many optimizer steps (counted from the step the "
                "run resumed at), save a checkpoint and exit 0 without writing the final model; rerunning the "
                "same command continues, and the run that reaches max_steps writes the final model."})
    plot_curves: bool = field(default=True, metadata={"help": "Write training_curves.png at the end."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Per-device dense bf16 peak for the MFU estimate (default: known GPUs, e.g. 989 for H100)."})

    def __post_init__(self):
        if self.lr_scheduler_type == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {"min_lr_rate": self.min_lr_ratio, **(self.lr_scheduler_kwargs or {})}
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.logging_dir:
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", self.logging_dir)
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"--stop_after_steps {self.stop_after_steps}: must be at least 1")
        evaluating = str(self.eval_strategy) not in ("no", "IntervalStrategy.NO")
        if self.early_stopping_patience:
            if not evaluating:
                raise ValueError("--early_stopping_patience needs evaluations: pass --eval_strategy steps "
                                 "--eval_steps N (and the same --save_strategy/--save_steps)")
            self.load_best_model_at_end = True
        if evaluating and self.metric_for_best_model is None:
            # Tracks the best checkpoint, which checkpoint rotation (save_total_limit) then never deletes.
            self.metric_for_best_model, self.greater_is_better = "eval_loss", False
        from lmtrain.distributed import default_single_process_environment  # before the distributed state
        default_single_process_environment(self.deepspeed)
        super().__post_init__()


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
        import difflib

        hints = [f"{key} (did you mean {', '.join(difflib.get_close_matches(key, actions, n=2))}?)"
                 if difflib.get_close_matches(key, actions, n=1) else key for key in unknown]
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


def parse_arguments(dataclass_types, argv: list[str] | None = None):
    """Dataclass defaults < the config file's values < command-line flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = split_config_file(argv)
    argv = translate_legacy_flags(argv)
    parser = HfArgumentParser(dataclass_types)
    if config_path:
        parser.set_defaults(**_config_defaults(parser, read_config_file(config_path), config_path))
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except UserError:
        raise
    except ValueError as error:  # a __post_init__ check: conflicting or out-of-range options
        where = f" (with config file {config_path})" if config_path else ""
        raise UserError(f"{error}{where}") from error


def save_resolved_config(output_dir: str, **groups) -> str:
    """Write every resolved option next to the checkpoints, nested by group for reading. Passed back as the
    config file (`python pretrain.py OUTPUT_DIR/lmtrain_config.json`) it repeats the run; secrets (hub
    tokens) are never written."""
    os.makedirs(output_dir, exist_ok=True)
    resolved = {}
    for name, group in groups.items():
        values = json.loads(group.to_json_string()) if hasattr(group, "to_json_string") else asdict(group)
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


@dataclass
class SFTDataArguments:
    dataset_path: str | None = field(default=None, metadata={
        "help": "A directory prepared by data_prep/prepare_sft.py (memory-mapped; instead of --train_files)."})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "SFT files (jsonl/json/parquet, globs, directories) or hub datasets: OpenAI 'messages', "
                "ShareGPT 'conversations' or Alpaca 'instruction'/'input'/'output' records. "
                "Default (without --dataset_path): data/sft_demo/train.jsonl."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Held-out SFT files."})
    validation_split_percentage: float = field(default=2.0, metadata={
        "help": "Percent of samples held out when no --validation_files (split before packing, seeded). "
                "When evaluation is on and this holds out no sample, one is held out; at 0 it is refused."})
    max_length: int = field(default=1024, metadata={
        "help": "Tokens per sample (and per packed row). Longer samples: oldest rounds dropped, then the "
                "prompt cut from the left if the last answer fits whole, else the prompt's last "
                "min(prompt, max_length // 2) tokens kept and the rest filled with the answer's head "
                "(its tail cut). Truncated samples are counted, never dropped."})
    packing: bool = field(default=True, metadata={
        "help": "Pack whole samples into max_length rows (positions restart per sample, no cross-attention)."})
    padding_free: bool = field(default=False, metadata={
        "help": "Without packing: concatenate each batch into one row instead of padding it."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also take loss on system/user tokens."})
    lenient: bool = field(default=True, metadata={
        "help": "Drop and count bad records (malformed JSON, bad format, unknown role, non-string content, no "
                "assistant turn, a turn order the template rejects, nothing trainable) instead of stopping; "
                "with false each is an error naming file:line. Truncation is never an error."})
    prepare_seed: int = field(default=1234, metadata={"help": "Seed for the validation split."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many train rows (a seeded random subset, --prepare_seed)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many eval rows (a seeded random subset: packed rows come longest first)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes that render and tokenize (datasets.map num_proc)."})
    prepared_cache_dir: str | None = field(default=None, metadata={
        "help": "Cache of preparation steps (default ~/.cache/lmtrain/prepared); reruns with the same files, "
                "tokenizer, template and settings reuse it."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Ignore cached preparation results."})

    def __post_init__(self):
        if self.dataset_path and (self.train_files or self.validation_files):
            raise ValueError("--dataset_path is already prepared SFT data; do not also give --train_files or "
                             "--validation_files (prepare them into a directory with data_prep/prepare_sft.py)")
        if not self.dataset_path and not self.train_files:
            self.train_files = ["data/sft_demo/train.jsonl"]
        if self.packing and self.padding_free:
            raise ValueError("--padding_free applies to unpacked batches; pass --packing false with it")
        if self.max_length < 8:
            raise ValueError("--max_length must be at least 8")


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "Modules to adapt, e.g. q_proj k_proj v_proj o_proj; 'all-linear' for every linear layer."})
    merge_lora: bool = field(default=True, metadata={
        "help": "Also save the merged full model to output_dir (the adapter goes to output_dir/adapter)."})


@dataclass
class SFTTrainArguments(TrainArguments):
    """SFT defaults: a smaller learning rate, no weight decay, the usual AdamW betas, a short warmup."""

    output_dir: str = field(default="outputs/sft", metadata={"help": "Checkpoints, logs and the final model."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the SFT data."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine decay ends at learning_rate * this."})
