"""The one training path both stages use: output-dir and resume policy, the Trainer with the packed-block
collator and evaluation metrics, monitoring callbacks, and the final save in Hugging Face format."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtrain.callbacks import CurvePlotCallback, PlannedStopCallback, ThroughputCallback
from lmtrain.eval_figures import eval_figures, token_loss_stats

logger = logging.getLogger(__name__)


def collate_packed_blocks(rows: list[dict]) -> dict:
    """Stack pre-packed rows. No attention_mask on purpose: with position_ids and no mask, transformers builds
    a block-diagonal causal mask (SDPA/eager) or varlen flash-attention calls, so documents stay apart."""
    batch = {}
    for name in ("input_ids", "labels", "position_ids"):
        batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.long)
    return batch


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint a crash did not cut short. The Trainer writes trainer_state.json after the weights,
    optimizer, scheduler and RNG states, so a parsable trainer_state.json next to weights means complete."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("*.safetensors")) or (path / "latest").exists() or any(path.glob("*.bin"))


def find_resume_checkpoint(output_dir: str) -> str | None:
    checkpoints = sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
                         reverse=True)
    for path in checkpoints:
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("skipping incomplete checkpoint %s (interrupted while saving?)", path)
    return None


def resolve_resume(args) -> str | None:
    """The checkpoint to resume from, and the output-dir policy: a non-empty output_dir with no checkpoint
    is refused unless --overwrite_output_dir, so a typo never mixes two runs' files."""
    if args.resume_from_checkpoint:
        if not is_complete_checkpoint(Path(args.resume_from_checkpoint)):
            raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a complete "
                                    "checkpoint directory (no trainer_state.json or weights)")
        return args.resume_from_checkpoint
    output = Path(args.output_dir)
    if not output.is_dir():
        return None
    found = find_resume_checkpoint(args.output_dir)
    if found:
        logger.info("resuming from %s (the newest complete checkpoint in output_dir)", found)
        return found
    if any(output.iterdir()) and not args.overwrite_output_dir:
        raise FileExistsError(f"output_dir '{output}' is not empty and holds no checkpoint to resume from. "
                              "Pick a new --output_dir, or pass --overwrite_output_dir to train into it anyway")
    return None


class LMTrainer(Trainer):
    """Trainer whose evaluation also reports perplexity and bits per byte, token-weighted, per source too.

    bits/byte = (mean loss per token in nats) / ln 2 / (UTF-8 bytes per token of the evaluated blocks), which
    compares models with different tokenizers. The blocks' bytes come from the validation split's
    `num_bytes` column (lmtrain/eval_figures.py); `eval_bytes_per_token` is the fallback for data without it.
    """

    def __init__(self, *args, eval_bytes_per_token: float | None = None, throughput: ThroughputCallback | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_bytes_per_token = eval_bytes_per_token
        self.throughput = throughput
        if throughput is not None:
            self.add_callback(throughput)

    def log(self, logs: dict, *args, **kwargs):
        # Added here rather than in a callback's on_log so every reporter (TensorBoard, SwanLab) sees them.
        if self.throughput is not None and "loss" in logs:
            logs.update(self.throughput.metrics(self.args))
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # one entry of a dict eval_dataset (Trainer.evaluate recursing)
            dataset = self.eval_dataset[dataset]
        nested, self._nested_eval = getattr(self, "_nested_eval", False), isinstance(dataset, dict)
        # Per-block source and bytes, read before the Trainer drops the columns the model does not take.
        columns = getattr(dataset, "column_names", None) or []
        self._eval_columns = {name: dataset.with_format("arrow")[name].to_pylist()
                              for name in ("source", "num_bytes") if name in columns}
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._nested_eval = nested
        if self.args.sample_prompts and not nested:
            log_samples(self, self.args.sample_prompts, self.args.sample_max_new_tokens)
        return metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop, gathering per-block token statistics (prediction_step) instead of logits, so
        the figures are token-weighted and computed from exactly the blocks evaluated, on every rank's data."""
        if description == "Prediction" or self.compute_metrics is not None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        self._token_stats = True
        try:
            output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        finally:
            self._token_stats = False
        stats = output.predictions
        if isinstance(stats, np.ndarray) and stats.ndim == 2 and stats.shape[1] == 3:
            columns = self._eval_columns
            num_bytes = np.asarray(columns["num_bytes"], dtype=np.float64) if "num_bytes" in columns else None
            output.metrics.update(eval_figures(stats, columns.get("source"), num_bytes, self.eval_bytes_per_token,
                                               metric_key_prefix))  # eval_loss: now the token-weighted mean
        return output._replace(predictions=None)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not getattr(self, "_token_stats", False) or inputs.get("labels") is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        stats = token_loss_stats(outputs.logits, inputs["labels"])
        return stats[:, 0].sum() / stats[:, 1].sum().clamp(min=1), stats, None


@torch.no_grad()
def log_samples(trainer: Trainer, prompts: list[str], max_new_tokens: int):
    """Greedy continuations of fixed prompts, to watch the model learn. Every rank generates (ZeRO-3 shards
    the weights, so all ranks must run the forward passes); rank 0 writes the texts to the log,
    TensorBoard / SwanLab and OUTPUT_DIR/samples.jsonl."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model, tokenizer = trainer.model, trainer.processing_class
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(trainer.args.device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id, synced_gpus=is_deepspeed_zero3_enabled())
        texts.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    if not trainer.is_world_process_zero():
        return
    step = trainer.state.global_step
    with open(os.path.join(trainer.args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as handle:
        for prompt, text in zip(prompts, texts):
            logger.info("sample at step %d: %r -> %r", step, prompt, text)
            handle.write(json.dumps({"step": step, "prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
    table = "\n\n".join(f"**{p}**{t}" for p, t in zip(prompts, texts))
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.add_text("samples", table, step)
    import swanlab

    if swanlab.has_run():
        swanlab.log({"samples": swanlab.Text(table)}, step=step)


def configure_reporting(args):
    """SwanLab without an account or network: offline mode (logs kept under swanlog/, `swanlab sync` later)."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    if "swanlab" in report_to:
        _make_swanlab_get_run_return_none()
    if "swanlab" in report_to and "SWANLAB_MODE" not in os.environ and not os.environ.get("SWANLAB_API_KEY"):
        netrc = Path.home() / ".swanlab" / ".netrc"
        if not netrc.exists():
            os.environ["SWANLAB_MODE"] = "offline"
            logger.info("swanlab: not logged in, logging offline to ./swanlog (upload later with `swanlab sync`)")


def _make_swanlab_get_run_return_none():
    """transformers' SwanLabCallback asks `swanlab.get_run() is None` before starting a run; swanlab 0.10
    raises instead of returning None when no run exists. Give it the answer it expects."""
    import swanlab

    if getattr(swanlab.get_run, "_returns_none_without_run", False):
        return
    original = swanlab.get_run

    def get_run(*args, **kwargs):
        return original(*args, **kwargs) if swanlab.has_run() else None

    get_run._returns_none_without_run = True
    swanlab.get_run = get_run


def build_trainer(model, tokenizer, args, train_dataset, eval_dataset=None, data_collator=collate_packed_blocks,
                  eval_bytes_per_token: float | None = None, tokens_per_sample: int | None = None) -> LMTrainer:
    configure_reporting(args)
    callbacks = [CurvePlotCallback()] if args.plot_curves else []
    if args.stop_after_steps:
        callbacks.append(PlannedStopCallback(args.stop_after_steps))
    if args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    return LMTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     data_collator=data_collator, processing_class=tokenizer, callbacks=callbacks,
                     eval_bytes_per_token=eval_bytes_per_token,
                     throughput=ThroughputCallback(model, tokens_per_sample, args.peak_tflops))


def final_metrics(trainer: Trainer, result, evaluate: bool) -> dict:
    """Training metrics plus a last evaluation (before any LoRA merge changes the model), logged and written
    to OUTPUT_DIR/all_results.json."""
    metrics = dict(result.metrics)
    if evaluate:
        step = trainer.state.global_step
        logged = {k: v for row in trainer.state.log_history if row.get("step") == step
                  for k, v in row.items() if k.startswith("eval_")}
        if "eval_loss" in logged and not trainer.args.load_best_model_at_end:
            metrics.update(logged)  # this very model was just evaluated: reuse, rather than evaluate twice
        else:
            metrics.update(trainer.evaluate())
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("all", metrics)
    return metrics


def save_final_model(trainer: Trainer, output_dir: str):
    """Weights (safetensors; gathered from all ranks under ZeRO-3), config with the KV cache re-enabled for
    inference, generation config and tokenizer: a directory `from_pretrained` loads."""
    model = trainer.model
    model.config.use_cache = True
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        model.generation_config.save_pretrained(output_dir)
        weights = sum(f.stat().st_size for f in Path(output_dir).glob("*.safetensors"))
        logger.info("saved the final model to %s (%.1f MB of weights)", output_dir, weights / 1e6)


class PadToLongestCollator:
    """For unpacked SFT rows of different lengths. Pads on the right to the longest row; padding gets labels
    -100 and positions of its own segment, so (with no attention_mask) no real token attends to it.
    `padding_free=True` instead concatenates the batch into one row: no padding at all, the samples kept
    apart by their restarting position_ids (flash-attention varlen, or a block-diagonal SDPA mask)."""

    def __init__(self, pad_id: int, padding_free: bool = False):
        self.pad_id = pad_id
        self.padding_free = padding_free

    def __call__(self, rows: list[dict]) -> dict:
        if self.padding_free:
            return {name: torch.tensor([[v for row in rows for v in row[name]]], dtype=torch.long)
                    for name in ("input_ids", "labels", "position_ids")}
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}
