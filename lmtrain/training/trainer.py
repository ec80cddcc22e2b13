"""The Trainer both stages use (LMTrainer: throughput figures, token-weighted evaluation, samples) and
its wiring: build_trainer, run_training (resume with the checkpoint checks), why training ended, the final
metrics and the final save in Hugging Face format."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from lmtrain.errors import UserError
from lmtrain.training.callbacks import CurvePlotCallback, PlannedStopCallback, ThroughputCallback
from lmtrain.training.checkpoints import (check_checkpoint_fits, checkpoint_step, finish_from_checkpoint,
                                          save_checkpoint_with_marker)
from lmtrain.training.guards import NonFiniteStop, StepGuard
from lmtrain.training.signals import PreemptionCallback, signal_name
from lmtrain.data.collators import REAL_TOKENS_KEY, CountingCollator, collate_packed_blocks
from lmtrain.model.compiling import apply_layer_options
from lmtrain.training.losses import CausalLMLoss, loss_function_for
from lmtrain.training.metrics import eval_figures, token_loss_stats
from lmtrain.training.reporting import configure_reporting, log_samples

logger = logging.getLogger(__name__)


def run_training(trainer: Trainer, resume_from: str | None):
    """trainer.train, with a checkpoint that does not fit the model reported as a UserError."""
    if resume_from is None:
        return trainer.train()
    check_checkpoint_fits(trainer.model, resume_from)
    if 0 < trainer.args.max_steps <= checkpoint_step(resume_from):
        return finish_from_checkpoint(trainer, resume_from)
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
    finish the run), "stopped" (a planned stop: a checkpoint is saved, the final model is not written, and
    rerunning the command continues) or "interrupted" (the same, after SIGTERM/SIGINT; the entry script exits
    with 128 + the signal number). Too many consecutive non-finite steps raise NonFiniteStop."""
    from transformers import EarlyStoppingCallback

    state, args = trainer.state, trainer.args
    callbacks = trainer.callback_handler.callbacks
    guard = next((c for c in callbacks if isinstance(c, StepGuard) and c.halted), None)
    if guard is not None:
        raise NonFiniteStop(guard.halted)
    signalled = next((c for c in callbacks if isinstance(c, PreemptionCallback) and c.stopped_at is not None), None)
    if signalled is not None:
        logger.warning("stopped by %s at step %d of %d: checkpoint-%d is saved, the final model is not written. "
                       "Rerun the same command to continue", signal_name(signalled.received), state.global_step,
                       state.max_steps, state.global_step)
        return "interrupted"
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
    `num_bytes` column (lmtrain/training/metrics.py); `eval_bytes_per_token` is the fallback for data without it.
    """

    def __init__(self, *args, eval_bytes_per_token: float | None = None, throughput: ThroughputCallback | None = None,
                 guard: StepGuard | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_bytes_per_token = eval_bytes_per_token
        self.throughput = throughput
        if throughput is not None:
            self.add_callback(throughput)
        self.guard = guard
        if guard is not None:
            self.add_callback(guard)
        self._z_loss_logged_at = None  # global_step of the last logged z_loss (set when training starts)

    def log(self, logs: dict, *args, **kwargs):
        # Added here rather than in a callback's on_log so every reporter (TensorBoard, SwanLab) sees them.
        if self.throughput is not None and "loss" in logs:
            logs.update(self.throughput.metrics(self.args))
        if self.guard is not None and "loss" in logs:
            if self.guard.window_was_all_bad():
                logs["loss"] = float("nan")
            logs.update(self.guard.metrics())
        z_loss = self.compute_loss_func
        if isinstance(z_loss, CausalLMLoss) and z_loss.z_loss_coefficient and "loss" in logs:
            # the part of the logged loss that is z-loss (this process's micro-batches), so its size can be judged
            logs["z_loss"] = z_loss.take_window_z_loss(self.state.global_step - (self._z_loss_logged_at or 0))
            self._z_loss_logged_at = self.state.global_step
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._z_loss_logged_at is None:  # the first step of this run: a resumed run's window starts here
            self._z_loss_logged_at = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.note_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's last call between the backward passes and optimizer.step: where a non-finite step is
        turned into a skipped one (lmtrain/training/guards.py)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.guard is not None:
            self.guard.check(self, model, grad_norm)
        return grad_norm

    def _save_checkpoint(self, model, trial):
        # The completion marker, then rotation counting complete checkpoints (lmtrain/training/checkpoints.py).
        save_checkpoint_with_marker(self, lambda: super(LMTrainer, self)._save_checkpoint(model, trial))

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



def trainer_callbacks(args) -> list:
    """The callbacks of every stage's trainer (LMTrainer here, the DPO trainer in training/preference.py)."""
    callbacks = [CurvePlotCallback()] if args.plot_curves else []
    # Always present: it also retires the checkpoints of earlier planned stops (see PlannedStopCallback).
    planned = PlannedStopCallback(args.stop_after_steps)
    callbacks += [PreemptionCallback(planned), planned]  # this order: a signal's extra save is a planned one
    if args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    return callbacks


def build_trainer(model, tokenizer, args, train_dataset, eval_dataset=None, data_collator=collate_packed_blocks,
                  eval_bytes_per_token: float | None = None) -> LMTrainer:
    configure_reporting(args)
    callbacks = trainer_callbacks(args)
    trainer = LMTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     data_collator=data_collator, processing_class=tokenizer, callbacks=callbacks,
                     compute_loss_func=loss_function_for(args),  # label smoothing / z-loss, else the model's
                     eval_bytes_per_token=eval_bytes_per_token,
                     throughput=ThroughputCallback(model, peak_tflops=args.peak_tflops),
                     guard=StepGuard(args.max_nonfinite_steps))
    apply_layer_options(trainer.model, args)
    return trainer


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

