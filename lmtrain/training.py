"""The one training path both stages use: output-dir and resume policy, the Trainer with the packed-block
collator and evaluation metrics, monitoring callbacks, and the final save in Hugging Face format."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtrain.callbacks import CurvePlotCallback, PlannedStopCallback, ThroughputCallback
from lmtrain.errors import UserError
from lmtrain.eval_figures import eval_figures, token_loss_stats

logger = logging.getLogger(__name__)


def collate_packed_blocks(rows: list[dict]) -> dict:
    """Stack pre-packed rows. No attention_mask on purpose: with position_ids and no mask, transformers builds
    a block-diagonal causal mask (SDPA/eager) or varlen flash-attention calls, so documents stay apart."""
    batch = {}
    for name in ("input_ids", "labels", "position_ids"):
        batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.long)
    return batch


# Added to every training batch by CountingCollator and taken out again before the model sees the batch.
REAL_TOKENS_KEY = "num_real_tokens"


def count_real_tokens(batch: dict) -> int:
    """Positions of the batch that are not padding, counted on the CPU tensors the collator just made.

    Every collator here pads the same way: a row's padding is its last position segment (position_ids
    restart at 0 where it begins) and has no trained label. A real segment always has one (a document's
    tokens are all labels; an SFT sample with no trainable token is dropped), so a last segment without any
    is padding. Rows without position_ids fall back to the attention mask, else count whole."""
    input_ids = batch["input_ids"]
    positions, labels = batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else input_ids.numel()
    length = positions.shape[-1]
    index = torch.arange(length).expand_as(positions)
    last_start = torch.where(positions == 0, index, 0).max(dim=-1).values
    tail_trained = ((labels != -100) & (index >= last_start.unsqueeze(-1))).any(dim=-1)
    padding = torch.where(tail_trained, 0, length - last_start)
    return input_ids.numel() - int(padding.sum())


class CountingCollator:
    """Wraps the training collator: adds the batch's real-token count (a plain int, which stays on the host
    when the batch moves to the device, so counting never synchronises with the GPU)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator(rows)
        batch[REAL_TOKENS_KEY] = count_real_tokens(batch)
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


COMPLETE_FILE = "lmtrain_complete.json"  # written last, after the final model: the run is finished
# What a run of ours writes into output_dir before its first checkpoint. A directory holding only these
# (a run that failed or was killed early) is ours to start again in, not "another run's files".
EARLY_RUN_FILES = ("lmtrain_config.json", "data_report.json", "samples.jsonl", "training_curves.png", "runs")


def checkpoint_step(path) -> int:
    suffix = Path(path).name.split("-")[-1]
    return int(suffix) if suffix.isdigit() else -1


def _checkpoint_dirs(output_dir) -> list[Path]:
    return sorted((p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()),
                  key=checkpoint_step, reverse=True)


def find_resume_checkpoint(output_dir: str) -> str | None:
    for path in _checkpoint_dirs(output_dir):
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning("skipping incomplete checkpoint %s (interrupted while saving?)", path)
    return None


def _planned_steps(args) -> dict:
    """What "finished" means for these arguments: the step budget, or the epochs when there is none."""
    return {"max_steps": args.max_steps} if args.max_steps and args.max_steps > 0 else \
        {"num_train_epochs": args.num_train_epochs}


def completed_run(args) -> dict | None:
    """The completion record when output_dir holds a finished run of this plan: rerunning its command (a
    cluster requeue, a retry-until-exit-0 wrapper) must change nothing. A different plan is refused."""
    path = Path(args.output_dir) / COMPLETE_FILE
    if args.overwrite_output_dir or args.resume_from_checkpoint or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is unreadable; treating the run as unfinished", path)
        return None
    planned = _planned_steps(args)
    if any(record.get("plan", {}).get(key) != value for key, value in planned.items()):
        done = ", ".join(f"{k} {v}" for k, v in record.get("plan", {}).items())
        asked = ", ".join(f"{k} {v}" for k, v in planned.items())
        raise UserError(f"output_dir '{args.output_dir}' holds a run that finished at step "
                        f"{record.get('global_step')} ({done}; {path}); this command asks for {asked}. To train "
                        f"further, start a new run from its weights (--model_name_or_path {args.output_dir} "
                        "--output_dir NEW_DIR); to redo it, pass --overwrite_output_dir")
    logger.info("run complete: %s finished at step %d (%s, %s); nothing to do. Pass --overwrite_output_dir to "
                "train it again from scratch", args.output_dir, record.get("global_step", -1),
                record.get("stopped_by", "max_steps"), path.name)
    return record


def mark_run_complete(trainer: Trainer, metrics: dict, stopped_by: str = "max_steps"):
    """Written after the final model and metrics, so its presence means all of them are complete."""
    if not trainer.is_world_process_zero():
        return
    record = {"global_step": trainer.state.global_step, "plan": _planned_steps(trainer.args),
              "stopped_by": stopped_by, "metrics": metrics}
    path = Path(trainer.args.output_dir) / COMPLETE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash leaves either no record or a whole one


def _early_run_files(args) -> set[str]:
    names = set(EARLY_RUN_FILES)
    if args.logging_dir:  # --logging_dir inside output_dir holds TensorBoard files of ours
        inside = Path(os.path.abspath(args.logging_dir))
        output = Path(os.path.abspath(args.output_dir))
        if output in inside.parents:
            names.add(inside.relative_to(output).parts[0])
    return names


def _start_fresh(args, output: Path):
    """--overwrite_output_dir: the earlier run's checkpoints are deleted (never resumed from, never counted
    by checkpoint rotation later) and so is its completion record; other files are kept or overwritten."""
    if args.process_index != 0:
        return
    checkpoints = _checkpoint_dirs(output)
    for path in checkpoints:
        shutil.rmtree(path, ignore_errors=True)
    for name in (COMPLETE_FILE, "samples.jsonl"):
        (output / name).unlink(missing_ok=True)
    if checkpoints:
        logger.warning("--overwrite_output_dir: starting fresh, deleted %d checkpoint(s) of the earlier run in %s "
                       "(%s)", len(checkpoints), output, ", ".join(p.name for p in checkpoints))
    else:
        logger.info("--overwrite_output_dir: starting fresh in %s", output)


def resolve_resume(args) -> str | None:
    """The checkpoint to resume from, and the output-dir policy:
    - --resume_from_checkpoint PATH: that checkpoint;
    - --overwrite_output_dir: start fresh (the earlier checkpoints are deleted, see _start_fresh);
    - else the newest complete checkpoint in output_dir;
    - else a fresh start, if output_dir holds nothing or only files an earlier attempt of ours wrote before
      its first checkpoint (EARLY_RUN_FILES); any other file refuses, so a typo never mixes two runs."""
    if args.resume_from_checkpoint:
        if not is_complete_checkpoint(Path(args.resume_from_checkpoint)):
            raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a complete "
                            "checkpoint directory (no trainer_state.json or weights)")
        return args.resume_from_checkpoint
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is a file; give a directory")
    if not output.is_dir():
        return None
    if args.overwrite_output_dir:
        _start_fresh(args, output)
        return None
    found = find_resume_checkpoint(args.output_dir)
    if found:
        logger.info("resuming from %s (the newest complete checkpoint in output_dir)", found)
        return found
    ours = _early_run_files(args)
    foreign = sorted(p.name for p in output.iterdir()
                     if p.name not in ours and not p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise UserError(f"output_dir '{output}' is not empty ({shown}) and holds no checkpoint to resume from. "
                        "Pick a new --output_dir, or pass --overwrite_output_dir to train into it anyway")
    if any(output.iterdir()):
        logger.info("output_dir %s holds only files of an earlier attempt that stopped before its first "
                    "checkpoint: starting fresh", output)
        if args.process_index == 0:
            (output / "samples.jsonl").unlink(missing_ok=True)  # appended to: would mix both attempts
    return None


def check_checkpoint_fits(model, checkpoint: str):
    """A checkpoint of another model shape fails deep inside the Trainer with a torch traceback; compare the
    parameter shapes first (from the safetensors headers: no tensor is read)."""
    from safetensors import safe_open

    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in expected:
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise UserError(
                        f"checkpoint {checkpoint} does not fit this model: {key} has shape {list(shape)} in "
                        f"{file.name} and {list(expected[key])} in the model these flags build. Resume with the "
                        "model options that wrote it, or pass --overwrite_output_dir to start fresh (deletes the "
                        "old checkpoints), or give a new --output_dir")


def _finish_from_checkpoint(trainer: Trainer, checkpoint: str):
    """The checkpoint already reached max_steps (the final save was cut short): Trainer.train would train one
    step past the plan, so load the checkpoint's weights and state instead of training."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if trainer.is_deepspeed_enabled:
        raise UserError(f"{checkpoint} is at step {state.global_step}, the end of the run, but the final model was "
                        "not saved (interrupted?). Export it from the checkpoint (python export.py ...), or pass "
                        "--overwrite_output_dir to train again")
    weights = checkpoint
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint and Path(state.best_model_checkpoint).is_dir():
        weights = state.best_model_checkpoint
    trainer._load_from_checkpoint(weights)
    trainer.state = state
    logger.warning("%s already reached max_steps %d; the final save had not finished: saving the final model "
                   "from %s without training", checkpoint, trainer.args.max_steps, weights)
    logged = [row["loss"] for row in state.log_history if "loss" in row]
    train_loss = sum(logged) / len(logged) if logged else float("nan")  # the mean of the logged losses
    return TrainOutput(state.global_step, train_loss, {"train_loss": train_loss, "epoch": state.epoch})


def run_training(trainer: Trainer, resume_from: str | None):
    """trainer.train, with a checkpoint that does not fit the model reported as a UserError."""
    if resume_from is None:
        return trainer.train()
    check_checkpoint_fits(trainer.model, resume_from)
    if 0 < trainer.args.max_steps <= checkpoint_step(resume_from):
        return _finish_from_checkpoint(trainer, resume_from)
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except (RuntimeError, ValueError) as error:
        text = str(error)
        if isinstance(error, UserError) or not ("size mismatch" in text or "parameter group" in text
                                                or "Error(s) in loading state_dict" in text):
            raise
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else text)
        raise UserError(f"checkpoint {resume_from} does not fit this model or optimizer ({first}). Resume with "
                        "the options that wrote it, or pass --overwrite_output_dir to start fresh (deletes the old "
                        "checkpoints), or give a new --output_dir") from error


def end_of_training(trainer: Trainer) -> str:
    """Why trainer.train returned, said in the log: "max_steps" (the plan's end), "early_stopping" (both
    finish the run), or "stopped" (a planned stop or an interruption: a checkpoint is saved, the final model
    is not written, and rerunning the command continues)."""
    from transformers import EarlyStoppingCallback

    state, args = trainer.state, trainer.args
    callbacks = trainer.callback_handler.callbacks
    planned = next((c for c in callbacks if isinstance(c, PlannedStopCallback) and c.stopped_at is not None), None)
    early = next((c for c in callbacks if isinstance(c, EarlyStoppingCallback)
                  and c.early_stopping_patience_counter >= c.early_stopping_patience), None)
    if early is not None:
        logger.info("early stopping: %s did not improve for %d evaluations; training ended at step %d of %d "
                    "(best: %s, %s)", args.metric_for_best_model, early.early_stopping_patience, state.global_step,
                    state.max_steps, state.best_model_checkpoint, "loaded for the final model"
                    if args.load_best_model_at_end else "kept")
        return "early_stopping"
    if planned is not None or state.global_step < state.max_steps:
        why = f"planned stop (--stop_after_steps {planned.stop_after_steps})" if planned else "training stopped"
        logger.info("%s at step %d of %d: checkpoint-%d is saved, the final model is not written yet. Rerun the same "
                    "command to continue%s", why, state.global_step, state.max_steps, state.global_step,
                    f" ({planned.stop_after_steps} more steps per run)" if planned else "")
        return "stopped"
    return "max_steps"


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

    def get_train_dataloader(self):
        # Only training batches carry the real-token count; evaluation batches go to the model unchanged.
        collator = self.data_collator
        self.data_collator = CountingCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """One optimizer step's batches: timed and counted for the throughput figures, and the learning rate
        this step will apply noted (see _get_learning_rate)."""
        start = time.perf_counter()
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = sum(batch.pop(REAL_TOKENS_KEY, 0) for batch in batches)
        if self.throughput is not None and batches:
            self.throughput.add_batches(tokens, sum(b["input_ids"].numel() for b in batches),
                                        sum(b["input_ids"].shape[0] for b in batches), time.perf_counter() - start)
        self._applied_lr = (self.state.global_step, super()._get_learning_rate())
        return batches, num_items

    def _get_learning_rate(self):
        """The rate the current step applies. The Trainer reads the scheduler right after the optimizer step,
        but when DeepSpeed owns the scheduler (an optimizer in the DeepSpeed config, e.g. zero3_offload) the
        engine has already stepped it by then, so the next step's rate was logged. Read before the step."""
        step, rate = getattr(self, "_applied_lr", (None, None))
        if step == self.state.global_step:
            return rate
        return super()._get_learning_rate()

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
            columns = getattr(self, "_eval_columns", {})  # set by evaluate(); absent when called directly
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
    # Always present: it also retires the checkpoints of earlier planned stops (see PlannedStopCallback).
    callbacks.append(PlannedStopCallback(args.stop_after_steps))
    if args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    return LMTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     data_collator=data_collator, processing_class=tokenizer, callbacks=callbacks,
                     eval_bytes_per_token=eval_bytes_per_token,
                     throughput=ThroughputCallback(model, peak_tflops=args.peak_tflops))  # tokens_per_sample: now counted per batch


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
