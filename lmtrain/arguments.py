"""Every option of the lmtrain commands (pretrain, sft, the data preparation), as `HfArgumentParser`
dataclasses; lmtrain/cli/parsing.py turns the command line and config files into them.

This module only declares options and checks them against each other (`__post_init__`). It imports nothing
from lmtrain/data/ or the trainer: the packages that act on the options read them (e.g. the cleaning
rules are built from DataArguments by lmtrain.data.cleaning.cleaning_config), so the dependencies point
one way, from the code that does the work to the options, and the options can be parsed without loading it.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

logger = logging.getLogger(__name__)


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
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (varlen on a CUDA GPU with PyTorch >= 2.10, else sdpa), varlen (PyTorch's FlashAttention-2 "
                "variable-length kernel), sdpa, flex_attention, flash_attention_2 or eager. All keep packed "
                "documents apart."})
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


# The DataArguments a run on --dataset_path still reads (block_size: checked against the prepared blocks).
OPTIONS_USED_WITH_PREPARED_DATA = {"dataset_path", "block_size", "max_train_samples", "max_eval_samples",
                                   "prepare_seed"}


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
                "max_duplicate_line_fraction, min_unique_word_fraction, languages, min_language_confidence; "
                "several languages are joined with '+', as the options are separated by commas: "
                "web=data/web/*.jsonl:languages=en+zh,min_language_confidence=0.9, code=...:languages=none)."})
    validation_files: list[str] | None = field(default=None, metadata={
        "help": "Raw validation files; default: a document-level split of the training sources."})
    validation_split_percentage: float = field(default=1.0, metadata={
        "help": "Percent of documents held out for validation (split before packing); with --split_by FIELD, "
                "whole groups are held out (in a seeded order) until they hold this percent of the tokens."})
    split_by: str = field(default="auto", metadata={
        "help": "What the validation split keeps whole: 'document', 'file' (every document of a file on one "
                "side), or a record field (e.g. 'url_domain', 'book_id': documents with equal values on one "
                "side). 'auto': 'play' for the built-in shakespeare corpus (both editions of a held-out play "
                "are held out), 'document' otherwise."})
    validation_groups: list[str] | None = field(default=None, metadata={
        "help": "Hold out exactly these values of the --split_by field (e.g. --validation_groups hamlet "
                "tempest), instead of a percentage."})
    text_field: str = field(default="text", metadata={"help": "The text field of jsonl/json/parquet records."})
    txt_unit: str = field(default="file", metadata={"help": "A .txt document is a whole file, a line or a paragraph."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per packed training block."})
    drop_remainder: bool = field(default=False, metadata={
        "help": "Drop the last partial block (classic group_texts) instead of padding and masking it."})
    packing_strategy: str = field(default="group_texts", metadata={
        "help": "group_texts: concatenate documents and cut every block_size tokens (no padding; most documents "
                "straddle two blocks). best_fit: documents that fit in a block are never cut (best-fit decreasing, "
                "like the SFT packer), longer ones are cut into blocks and their last piece packed like a short "
                "document; each block's free tail is masked padding (report.json: padded_tokens)."})
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
    # Quality filters (lmtrain/data/quality.py), off by default; their drops are counted per reason.
    languages: str = field(default="", metadata={
        "help": "Keep only documents in these languages, e.g. en,zh (ISO 639-1 codes of py3langid, whose model "
                "ships in its wheel); others are dropped as wrong_language. Per source: NAME=PATH:languages=none "
                "(e.g. code) or languages=en+zh. Default: no language filter."})
    min_language_confidence: float = field(default=0.0, metadata={
        "help": "With --languages: also drop a document in a wanted language whose probability is below this "
                "(low_language_confidence), e.g. 0.9."})
    perplexity_model: str | None = field(default=None, metadata={
        "help": "A causal LM directory (with its tokenizer) that scores every kept document; with "
                "--max_perplexity, documents above it are dropped as high_perplexity."})
    max_perplexity: float | None = field(default=None, metadata={
        "help": "Drop documents whose perplexity under --perplexity_model (per token of its tokenizer, on the "
                "first --perplexity_max_tokens tokens) is above this. report.json lists the percentiles."})
    perplexity_max_tokens: int = field(default=512, metadata={"help": "Tokens of each document scored."})
    perplexity_batch_tokens: int = field(default=16384, metadata={
        "help": "Tokens per scoring batch (documents sorted by length, so batches are nearly unpadded)."})

    def __post_init__(self):
        if self.train_files and self.sources:
            raise ValueError("--train_files and --sources name the same thing; give one")
        if self.dataset_path and (self.train_files or self.sources):
            raise ValueError("--dataset_path is already prepared data; do not also give raw --sources or --train_files")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100)")
        if not self.split_by.strip():
            raise ValueError("--split_by: give 'auto', 'document', 'file' or a record field name")
        if self.validation_files and (self.validation_groups or self.split_by not in ("auto", "document")):
            raise ValueError("--validation_files is the validation split; --split_by / --validation_groups choose "
                             "one from the training sources: give one or the other")
        if self.txt_unit not in ("file", "line", "paragraph"):
            raise ValueError("--txt_unit must be file, line or paragraph")
        if (self.perplexity_model is None) != (self.max_perplexity is None):
            raise ValueError("--perplexity_model and --max_perplexity go together: the model scores, the "
                             "threshold drops")
        if self.max_perplexity is not None and not (math.isfinite(self.max_perplexity) and self.max_perplexity > 1):
            raise ValueError(f"--max_perplexity {self.max_perplexity}: a finite number above 1 (a perplexity is at "
                             "least 1)")
        if self.perplexity_max_tokens < 2:
            raise ValueError(f"--perplexity_max_tokens {self.perplexity_max_tokens}: must be at least 2 (a document's "
                             "first token is not predicted, so fewer leave nothing to score)")
        if self.perplexity_batch_tokens < 1:
            raise ValueError(f"--perplexity_batch_tokens {self.perplexity_batch_tokens}: must be at least 1")
        if not 0 <= self.min_language_confidence <= 1:  # nan fails too
            raise ValueError(f"--min_language_confidence {self.min_language_confidence}: a probability in [0, 1]")
        if (self.min_language_confidence != type(self).__dataclass_fields__["min_language_confidence"].default
                and self.languages.strip().lower() in ("", "none")
                and not any("languages=" in spec for spec in self.source_specs)):
            # Per-source languages (NAME=PATH:languages=en) use it too: lmtrain/data/pipeline.py checks those.
            raise ValueError(f"--min_language_confidence {self.min_language_confidence} applies only with a "
                             "language filter: add --languages (e.g. --languages en,zh) or leave it out")
        for name in ("max_duplicate_line_fraction", "min_unique_word_fraction", "near_dup_threshold"):
            if not 0 <= getattr(self, name) <= 1:  # nan fails too
                raise ValueError(f"--{name} {getattr(self, name)}: a fraction in [0, 1]")
        if (self.languages or self.perplexity_model) and not self.clean:
            raise ValueError("--languages / --perplexity_model are cleaning steps, and --clean false turns every "
                             "cleaning step off: drop one or the other")
        if self.packing_strategy not in ("group_texts", "best_fit"):
            raise ValueError(f"--packing_strategy {self.packing_strategy}: group_texts or best_fit")
        if self.packing_strategy == "best_fit" and self.drop_remainder:
            raise ValueError("--drop_remainder drops group_texts' last partial block; best_fit pads every block "
                             "and has no remainder: give one or the other")
        if self.block_size < 2:
            raise ValueError("--block_size must be at least 2")

    @property
    def source_specs(self) -> list[str]:
        return self.sources or self.train_files or ["shakespeare"]

    def check_explicit_options(self):
        """Called by parse_arguments once it knows which options were given: with --dataset_path the data was
        prepared already, so a cleaning, filter or packing option here would be accepted and do nothing."""
        given = sorted(set(getattr(self, "explicit_options", ())) - OPTIONS_USED_WITH_PREPARED_DATA)
        if self.dataset_path and given:
            logging.getLogger("lmtrain.arguments").warning(
                "%s %s no effect with --dataset_path: %s was prepared with its own (see its report.json). Prepare "
                "it again with data_prep/prepare_pretrain.py to change %s", ", ".join(f"--{name}" for name in given),
                "has" if len(given) == 1 else "have", self.dataset_path, "it" if len(given) == 1 else "them")

    def options_not_recorded(self) -> set[str]:
        """Left out of lmtrain_config.json with --dataset_path: the preparation options, given or not (they did
        nothing; recorded defaults would say, e.g., group_texts for data packed best_fit: the data's own are in
        data_report.json), and --block_size unless given (the prepared blocks decide the length; a recorded
        default of 1024 fed back would be an explicit --block_size that disagrees)."""
        if not self.dataset_path:
            return set()
        given = set(getattr(self, "explicit_options", ()))  # set by lmtrain.cli.parsing.parse_arguments
        preparation = set(self.__dataclass_fields__) - OPTIONS_USED_WITH_PREPARED_DATA
        return preparation | ({"block_size"} - given)


_tensorboard_dir_set = None  # the TENSORBOARD_LOGGING_DIR this process set, not one the user exported


def _point_tensorboard_at(logging_dir: str | None):
    """--logging_dir reaches transformers' TensorBoard callback through TENSORBOARD_LOGGING_DIR. Set per run,
    not once per process: a later run in the same process (a notebook, the tests, the child processes it
    starts) must not write its events into an earlier run's directory."""
    global _tensorboard_dir_set
    if logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = _tensorboard_dir_set = logging_dir
    elif _tensorboard_dir_set is not None and os.environ.get("TENSORBOARD_LOGGING_DIR") == _tensorboard_dir_set:
        del os.environ["TENSORBOARD_LOGGING_DIR"]
        _tensorboard_dir_set = None


@dataclass
class TrainArguments(TrainingArguments):
    """TrainingArguments with pretraining defaults and the options transformers 5 dropped but scripts use."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, logs and the final model."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh: never resume from output_dir's checkpoints; they are deleted (with a log line), and "
                "so is an earlier run's final model, adapter/, results, trainer_state.json and plot (files of "
                "ours only; others are kept). Without it a run resumes from its newest checkpoint."})
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
    sample_chat_template: bool = field(default=False, metadata={
        "help": "Render each sample prompt as a user turn through the tokenizer's chat template (as "
                "generate.py --chat_template does); false: a raw continuation. Default: false for pretrain.py, "
                "true for sft.py."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop when the validation loss has not improved for this many evaluations (the best "
                "checkpoint is kept and loaded at the end)."})
    stop_after_steps: int | None = field(default=None, metadata={
        "help": "Planned stop for time-boxed jobs: make this many optimizer steps (counted from the step the "
                "run resumed at), save a checkpoint and exit 0 without writing the final model; rerunning the "
                "same command continues, and the run that reaches max_steps writes the final model."})
    plot_curves: bool = field(default=True, metadata={"help": "Write training_curves.png at the end."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Stop after this many consecutive optimizer steps with a NaN/Inf loss or gradient norm (each is "
                "skipped: weights and optimizer state unchanged); 0: skip them without ever stopping."})
    dataloader_num_workers: int = field(default=-1, metadata={
        "help": "Processes that collate batches ahead of the step. -1 (default): 2 on a GPU (the setting of the "
                "speed figures in docs/PERFORMANCE.md), 0 on a CPU, where workers would take cores from training."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Rows per device per micro-batch, or auto: on a CUDA GPU the largest the planner fits in its memory "
                "(less 10%%), on a CPU 8 (docs/PLANNER.md)."})
    use_liger_kernel: bool = field(default=True, metadata={
        "help": "Liger's fused Triton kernels on a CUDA GPU: a linear + cross-entropy that never materializes the "
                "vocabulary-wide logits, RMSNorm, RoPE and SwiGLU. On by default where liger-kernel is installed "
                "and a GPU is present (off on CPUs); --use_liger_kernel false turns them off."})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (Inductor fuses its norms, RoPE and SwiGLU) while the loss stays "
                "Liger's fused linear cross-entropy outside the compiled graphs, so the vocabulary-wide logits are "
                "never materialized as under --torch_compile (which must turn Liger off). lmtrain/model/compiling.py"})
    fp8: bool = field(default=False, metadata={
        "help": "Float8 matmuls in the decoder layers' linear layers (torchao's float8 training, tensorwise "
                "scaling; needs torchao and an FP8 GPU such as H100/H200, on a CPU torchao emulates it, slowly; use with "
                "--compile_layers, torchao's casts are slow uncompiled). Off by default: it moves the loss by more than bf16 noise "
                "(docs/PERFORMANCE.md)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Per-device dense bf16 peak for the MFU estimate (default: known GPUs, e.g. 989 for H100)."})
    z_loss_coefficient: float = field(default=0.0, metadata={
        "help": "Add c * logsumexp(logits)**2 per predicted token to the loss (PaLM's z-loss, c = 1e-4 there), "
                "which keeps the softmax normalizer near 1; 0: off. Like --label_smoothing_factor it replaces the "
                "model's own (on a GPU: Liger's fused) loss with lmtrain/training/losses.py, normalized over the "
                "step's predicted tokens."})

    def __post_init__(self):
        if self.lr_scheduler_type == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {"min_lr_rate": self.min_lr_ratio, **(self.lr_scheduler_kwargs or {})}
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        _point_tensorboard_at(self.logging_dir)
        check_training_numbers(self)
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"--max_nonfinite_steps {self.max_nonfinite_steps}: must be 0 (never stop) or more")
        if not (math.isfinite(self.z_loss_coefficient) and self.z_loss_coefficient >= 0):
            raise ValueError(f"--z_loss_coefficient {self.z_loss_coefficient}: must be 0 (off) or more, and finite")
        if not (math.isfinite(self.min_lr_ratio) and self.min_lr_ratio >= 0):
            raise ValueError(f"--min_lr_ratio {self.min_lr_ratio}: a finite number, 0 or more")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise ValueError(f"--peak_tflops {self.peak_tflops}: a finite number above 0")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor {self.label_smoothing_factor}: must be in [0, 1)")
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
        import torch

        # Decided by this machine: the resolved config records the values as given, so replaying it on a GPU
        # machine gets the GPU's choices, not the CPU's.
        self._as_given = {}
        if self.dataloader_num_workers == -1:
            self._as_given["dataloader_num_workers"] = -1
            self.dataloader_num_workers = 2 if torch.cuda.is_available() and not self.use_cpu else 0
        if self.use_liger_kernel and not (torch.cuda.is_available() and not self.use_cpu
                                          and importlib.util.find_spec("liger_kernel")):
            # Its kernels are Triton GPU kernels; without them the model's own layers run (same results).
            logger.info("Liger kernels off: they need a CUDA GPU and the liger-kernel package")
            self._as_given["use_liger_kernel"] = True
            self.use_liger_kernel = False
        if self.compile_layers and self.torch_compile:
            raise ValueError("--compile_layers and --torch_compile: pick one (--compile_layers compiles each decoder "
                             "layer and keeps Liger's fused loss; --torch_compile compiles the whole model)")
        liger_off_under_compile(self)
        if self.fp8:
            from lmtrain.model.fp8 import check_fp8_possible

            check_fp8_possible(self.use_cpu)
        if self.bf16 and not self.use_cpu and not self.deepspeed and not torch.cuda.is_available():
            # PyTorch runs bf16 autocast on CPUs, but transformers refuses --bf16 there unless told use_cpu.
            logger.info("--bf16 without a GPU: training in bf16 on the CPU (use_cpu)")
            self.use_cpu = True
        from lmtrain.distributed import cpu_data_parallel, default_single_process_environment, init_cpu_process_group
        default_single_process_environment(self.deepspeed)  # all before the distributed state is set up
        if cpu_data_parallel(self.use_cpu, self.deepspeed):  # torchrun without GPUs: gloo data parallel
            self.use_cpu = True
            init_cpu_process_group(self.ddp_timeout)
        super().__post_init__()

    def values_as_given(self) -> dict:
        """The options this machine decided (-1 workers, Liger without a GPU), as given: what the resolved
        config records, so that replaying it elsewhere decides them again."""
        return dict(getattr(self, "_as_given", {}))


def check_training_numbers(args):
    """Values transformers or torch would take silently (a negative --max_steps trains the epochs; 0 trains one
    step and calls the run complete) or fail on deep in the first step, with a traceback."""
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(f"--max_steps {args.max_steps}: give a positive number of optimizer steps (or leave it out "
                         "to train --num_train_epochs)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"--{name} {value}: must be at least 1")
    if not math.isfinite(args.learning_rate):
        raise ValueError(f"--learning_rate {args.learning_rate}: must be a finite number")
    if args.learning_rate < 0:
        raise ValueError(f"--learning_rate {args.learning_rate}: must not be negative")
    if args.max_steps == -1 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise ValueError(f"--num_train_epochs {args.num_train_epochs}: must be positive and finite (or give "
                         "--max_steps)")


def liger_off_under_compile(args):
    """torch.compile traced Liger's Triton kernels wrongly on torch 2.11 + liger-kernel 0.8.5: NaN from the first
    step (docs/PERFORMANCE.md, one H200). A run asking for --torch_compile gets the model's own layers instead;
    under --compile_layers Liger keeps only the loss, which runs outside the compiled layers."""
    if args.torch_compile and args.use_liger_kernel:
        logger.warning("--torch_compile: Liger kernels off (compiled together they gave NaN losses from the first "
                       "step on torch 2.11 + liger-kernel 0.8.5; docs/PERFORMANCE.md)")
        args.use_liger_kernel = False
    elif getattr(args, "compile_layers", False) and args.use_liger_kernel:
        from lmtrain.model.compiling import LIGER_UNDER_LAYER_COMPILE

        args.liger_kernel_config = {**LIGER_UNDER_LAYER_COMPILE, **(args.liger_kernel_config or {})}


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

    def check_explicit_options(self):
        """Called by parse_arguments once it knows which options were given: a LoRA option without --use_lora
        would otherwise be accepted and ignored without a word (full fine-tuning runs instead)."""
        given = sorted(set(getattr(self, "explicit_options", ())) - {"use_lora"})
        if given and not self.use_lora:
            import logging

            logging.getLogger("lmtrain.arguments").warning(
                "%s %s no effect without --use_lora: this run fine-tunes all weights. Add --use_lora to train "
                "LoRA adapters", ", ".join(f"--{name}" for name in given), "has" if len(given) == 1 else "have")

    def options_not_recorded(self) -> set[str]:
        """Without --use_lora the LoRA options do not apply, so lmtrain_config.json leaves them out (fed back,
        they would read as given and be warned about)."""
        return set() if self.use_lora else {f for f in self.__dataclass_fields__ if f != "use_lora"}


@dataclass
class SFTTrainArguments(TrainArguments):
    """SFT defaults: a smaller learning rate, no weight decay, the usual AdamW betas, a short warmup."""

    output_dir: str = field(default="outputs/sft", metadata={"help": "Checkpoints, logs and the final model."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the SFT data."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine decay ends at learning_rate * this."})
    sample_chat_template: bool = field(default=True, metadata={
        "help": "Render each --sample_prompts prompt as a user turn through the chat template (as generate.py "
                "--chat_template does, so the samples are the answers generate.py and evaluate.py give); "
                "false: a raw continuation."})


# The loss variants of TRL's DPOTrainer (trl 1.16, DPOConfig.loss_type), checked here so a typo fails at parse
# time rather than at the first step; tests/test_dpo.py checks the list against TRL's.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class PreferenceDataArguments:
    train_files: list[str] = field(default_factory=lambda: ["data/sft_demo/preference_train.jsonl"], metadata={
        "help": "Preference pairs (jsonl/json/parquet, globs, directories) or hub datasets: records with 'chosen' "
                "and 'rejected' (strings or message lists) and a 'prompt' (a string or messages), or without "
                "'prompt' two whole conversations whose shared first messages are the prompt."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Held-out preference pairs."})
    validation_split_percentage: float = field(default=2.0, metadata={
        "help": "Percent of pairs held out when no --validation_files (seeded); when evaluation is on and this "
                "holds out none, one pair is held out; at 0 evaluation is refused."})
    max_length: int = field(default=1024, metadata={
        "help": "Tokens of prompt + reply, for each of chosen and rejected. Longer pairs: the prompt is kept whole "
                "when it leaves the replies min(their length, max_length // 4) tokens (else only its last tokens "
                "up to that), the replies are cut from the end. Truncated pairs are counted, not dropped."})
    lenient: bool = field(default=True, metadata={
        "help": "Drop and count bad pairs (malformed JSON, a missing or non-string field, an unknown role, an "
                "empty reply, chosen identical to rejected) instead of stopping; with false each is an error "
                "naming file:line."})
    prepare_seed: int = field(default=1234, metadata={"help": "Seed for the validation split."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many training pairs (a seeded random subset, --prepare_seed)."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Use at most this many held-out pairs (a seeded random subset)."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in [0, 100)")
        if self.max_length < 8:
            raise ValueError("--max_length must be at least 8")


@dataclass
class DPOTrainArguments(TrainArguments):
    """Preference tuning (TRL's DPOTrainer): DPO defaults for the optimizer, and the DPO loss options. TRL's
    other DPOConfig options keep TRL's defaults (lmtrain/training/preference.py)."""

    output_dir: str = field(default="outputs/dpo", metadata={"help": "Checkpoints, logs and the final model."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's DPO default)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the preference pairs."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine decay ends at learning_rate * this."})
    sample_chat_template: bool = field(default=True, metadata={
        "help": "Render each --sample_prompts prompt as a user turn through the chat template; false: raw text."})
    beta: float = field(default=0.1, metadata={
        "help": "How far the policy may move from the reference: the rewards are beta * (log pi - log pi_ref); "
                "larger beta keeps it closer. For ipo, the regularization tau."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": f"DPO loss (several: summed with --loss_weights): {', '.join(DPO_LOSS_TYPES)}. sigmoid is the DPO "
                "paper's, ipo IPO's, hinge SLiC's, robust/exo_pair need --label_smoothing."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per --loss_type (default: 1 each)."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "robust: the probability a pair's preference is flipped, in [0, 0.5); exo_pair: its epsilon; also "
                "read by aot and aot_unpaired. Refused with other losses, which ignore it."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Score every pair with the reference once before training, so no reference model is held during "
                "training (full fine-tuning then needs one model's memory, not two)."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={
        "help": "Batch size of that scoring (default: the train / eval batch size)."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        unknown = [name for name in self.loss_type if name not in DPO_LOSS_TYPES]
        if unknown:
            raise ValueError(f"--loss_type {' '.join(unknown)}: not a DPO loss; choose from "
                             f"{', '.join(DPO_LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"--loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} "
                             f"--loss_type entries; give one per loss")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"--beta {self.beta}: a finite number > 0")
        if not math.isfinite(self.label_smoothing):
            raise ValueError(f"--label_smoothing {self.label_smoothing}: must be a finite number")
        if any(not math.isfinite(w) for w in self.loss_weights or []):
            raise ValueError(f"--loss_weights {' '.join(map(str, self.loss_weights))}: every weight must be finite")
        if "exo_pair" in self.loss_type and self.label_smoothing <= 0:
            raise ValueError("--loss_type exo_pair needs --label_smoothing > 0 (its epsilon; the EXO paper uses 1e-3)")
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing {self.label_smoothing}: robust DPO needs a value in [0, 0.5)")
        # Options DPOTrainer would accept and never read: refused, so no run is believed smoothed that is not.
        smoothed = ("robust", "exo_pair", "aot", "aot_unpaired")  # the losses TRL's _compute_loss reads it in
        if self.label_smoothing and not set(smoothed) & set(self.loss_type):
            raise ValueError(f"--label_smoothing {self.label_smoothing}: only --loss_type {', '.join(smoothed)} use it; "
                             f"{' '.join(self.loss_type)} would ignore it (TRL's sigmoid DPO has no label smoothing)")
        for flag in ("label_smoothing_factor", "z_loss_coefficient"):  # the language-model loss of pretrain/SFT
            if getattr(self, flag, 0):
                raise ValueError(f"--{flag} {getattr(self, flag)}: a language-model loss option of pretrain.py and "
                                 "sft.py; the DPO loss ignores it (label smoothing of preferences: --label_smoothing "
                                 "with --loss_type robust)")
        super().__post_init__()
