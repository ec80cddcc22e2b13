"""Training callbacks: throughput / MFU / memory figures for the logs, and curve plots at the end."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Dense bf16 peak per device, TFLOP/s, for the MFU estimate (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0, "B200": 2250.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(model, sequence_length: int) -> float:
    """PaLM (appendix B): 6 * parameters + 12 * layers * hidden * sequence, forward and backward."""
    from lmtrain.modeling import count_parameters

    config = model.config
    return 6 * count_parameters(model) + 12 * config.num_hidden_layers * config.hidden_size * sequence_length


class ThroughputCallback(TrainerCallback):
    """Measures wall time per optimizer step. Reads only host clocks: no GPU synchronisation in the step
    loop (the loss logging already synchronises once per logging interval)."""

    def __init__(self, model, tokens_per_sample: int | None, peak_tflops: float | None):
        self.model = model
        self.tokens_per_sample = tokens_per_sample
        self.peak_tflops = peak_tflops or device_peak_tflops()
        self._flops_per_token = None
        self._window_start = None
        self._window_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._window_start, self._window_steps = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kwargs):
        self._window_steps += 1

    def metrics(self, args) -> dict:
        """Figures since the previous call (one logging interval), per device."""
        if not self._window_steps or self._window_start is None:
            return {}
        now = time.perf_counter()
        seconds_per_step = (now - self._window_start) / self._window_steps
        self._window_start, self._window_steps = now, 0
        out = {"step_seconds": round(seconds_per_step, 4)}
        if self.tokens_per_sample:
            tokens = self.tokens_per_sample * args.per_device_train_batch_size * args.gradient_accumulation_steps
            out["tokens_per_second_per_device"] = round(tokens / seconds_per_step, 1)
            if self.peak_tflops:
                if self._flops_per_token is None:
                    self._flops_per_token = flops_per_token(self.model, self.tokens_per_sample)
                out["mfu"] = round(tokens / seconds_per_step * self._flops_per_token / (self.peak_tflops * 1e12), 4)
        if torch.cuda.is_available():
            out["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
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
    """--stop_after_steps N: checkpoint and stop at step N (time-boxed jobs; resume by rerunning)."""

    def __init__(self, stop_after_steps: int):
        self.stop_after_steps = stop_after_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.stop_after_steps:
            control.should_save = True
            control.should_training_stop = True
