"""Training callbacks: throughput / MFU / memory figures for the logs, curve plots at the end, and the planned
stop of time-boxed jobs (--stop_after_steps)."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from lmtrain.model.flops import count_parameters, device_peak_tflops, flops_per_token, model_flop_utilization

logger = logging.getLogger(__name__)

class ThroughputCallback(TrainerCallback):
    """tokens/s, MFU and step time for the logs, from host clocks only (no GPU synchronisation in the step loop;
    the loss logging already synchronises once per logging interval).

    tokens_per_second_per_device = real tokens / training seconds of this device over the logging window:
    - real tokens: the non-padding positions of the training batches (`count_real_tokens`, counted on the CPU
      where the collator makes the batch): every token of packed pretraining blocks except the padding of a
      last partial block, the samples of packed SFT rows without the row's padding, unpadded SFT lengths.
      Prompt tokens count (the model reads them); evaluation batches do not.
    - training seconds: loading the step's batches + the step itself (forward, backward, optimizer), up to
      the logging that closes the window. Evaluation, checkpoint saving and sample generation between
      steps are not training time and are left out.
    mfu = tokens/s * FLOPs per token (lmtrain/model/flops.py, at the batch's row length) / the device's peak.
    """

    def __init__(self, model, peak_tflops: float | None = None):
        self.model = model
        self.peak_tflops = peak_tflops or device_peak_tflops()
        self._parameters = None
        self._reset()
        self._step_start = self._last_step_end = None

    def _reset(self):
        self._seconds, self._steps, self._tokens, self._positions, self._rows = 0.0, 0, 0, 0, 0

    def add_batches(self, real_tokens: int, positions: int, rows: int, load_seconds: float):
        """One optimizer step's batches, as the trainer fetched them (LMTrainer.get_batch_samples)."""
        self._tokens += real_tokens
        self._positions += positions
        self._rows += rows
        self._seconds += load_seconds

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._last_step_end = time.perf_counter()
        if self._step_start is not None:
            self._seconds += self._last_step_end - self._step_start
            self._steps += 1
        self._step_start = None

    def _not_training(self, *args, **kwargs):
        # Evaluation or a save just ended: the time since the last step was not training.
        self._last_step_end = None

    on_evaluate = on_save = _not_training

    def metrics(self, args) -> dict:
        """Figures since the previous call (one logging interval), for this device."""
        if not self._steps:
            return {}
        seconds = self._seconds
        if self._last_step_end is not None:  # the logging itself waits for the device to finish the steps
            seconds += time.perf_counter() - self._last_step_end
        out = {"step_seconds": round(seconds / self._steps, 4)}
        if self._tokens and seconds > 0:
            tokens_per_second = self._tokens / seconds
            out["tokens_per_second_per_device"] = round(tokens_per_second, 1)
            if self.peak_tflops:
                if self._parameters is None:
                    self._parameters = count_parameters(self.model)
                config = self.model.config
                row_length = self._positions / max(self._rows, 1)
                flops = flops_per_token(self._parameters, config.num_hidden_layers, config.hidden_size, row_length)
                out["mfu"] = round(model_flop_utilization(tokens_per_second, flops, self.peak_tflops), 4)
        if torch.cuda.is_available():
            out["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self._reset()
        self._last_step_end = time.perf_counter()
        return out


class CurvePlotCallback(TrainerCallback):
    """Writes training_curves.png into output_dir when training ends."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from lmtrain.plotting import plot_runs

        path = Path(args.output_dir) / "training_curves.png"
        try:
            plot_runs({Path(args.output_dir).name: state.log_history}, path)
            logger.info("training curves: %s", path)
        except Exception as err:  # a plot must never fail a finished training run
            logger.warning("could not plot training curves: %s", err)


class PlannedStopCallback(TrainerCallback):
    """--stop_after_steps N, for time-boxed jobs: N optimizer steps of progress per run, counted from the step
    the run resumed at, then a checkpoint and a stop; rerunning the same command continues.

    A planned stop between two regular saves writes an extra checkpoint, marked with PLANNED_STOP_FILE. It
    does not count against save_total_limit: the limit is raised by one for the saves that would otherwise
    rotate a regular checkpoint out because of it, and the marked checkpoint is deleted once a later one is
    complete (never before, so there is always a checkpoint to resume from)."""

    PLANNED_STOP_FILE = "planned_stop.json"

    def __init__(self, stop_after_steps: int | None):
        self.stop_after_steps = stop_after_steps
        self.stop_at = None
        self.stopped_at = None       # the step of this run's planned stop, for the entry script's final message
        self._extra_save = False     # this save is the planned stop's own, not a regular one
        self._limit_raised = 0
        self._superseded = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stopped_at = None
        self.stop_at = state.global_step + self.stop_after_steps if self.stop_after_steps else None

    def _planned_checkpoints(self, output_dir: str, before_step: int, best: str | None) -> list[Path]:
        found = []
        for marker in Path(output_dir).glob(f"checkpoint-*/{self.PLANNED_STOP_FILE}"):
            path, suffix = marker.parent, marker.parent.name.split("-")[-1]
            if suffix.isdigit() and int(suffix) < before_step and (best is None or Path(best) != path):
                found.append(path)
        return found

    def add_extra_save(self, control):
        """Another stop between regular saves (a signal, lmtrain/training/signals.py): its checkpoint is
        handled like a planned stop's (not counted against save_total_limit, retired later)."""
        if not control.should_save:
            control.should_save, self._extra_save = True, True

    def on_step_end(self, args, state, control, **kwargs):
        # The run's own end (max_steps) already set should_training_stop: that is no planned stop.
        if self.stop_at is not None and state.global_step >= self.stop_at and not control.should_training_stop:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            if not control.should_save:
                control.should_save, self._extra_save = True, True
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)  # save_strategy epoch saves here, not at a step end

    def _before_save(self, args, state, control):
        if not control.should_save or self._limit_raised:
            return
        self._superseded = self._planned_checkpoints(args.output_dir, state.global_step, state.best_model_checkpoint)
        extra = len(self._superseded) + int(self._extra_save)
        if extra and args.save_total_limit and args.save_total_limit > 0:
            args.save_total_limit += extra
            self._limit_raised = extra

    def on_save(self, args, state, control, **kwargs):
        if self._limit_raised:
            args.save_total_limit -= self._limit_raised
            self._limit_raised = 0
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self._extra_save and checkpoint.is_dir():
                (checkpoint / self.PLANNED_STOP_FILE).write_text(json.dumps({"step": state.global_step}))
            for path in self._superseded:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("deleted %s, the checkpoint of a planned stop, now that %s is saved", path.name,
                            checkpoint.name)
        self._extra_save, self._superseded = False, []
