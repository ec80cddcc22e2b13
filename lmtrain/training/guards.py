"""Non-finite steps and instability.

A step whose loss (any micro-batch's) or gradient norm is NaN/Inf is not applied: the weights and the
optimizer state (AdamW's moments and step count) stay as they were, the learning-rate schedule does not
advance (as DeepSpeed and the fp16 loss scaler do for a skipped step), and the step is counted
(`nonfinite_steps` in every log row) and logged with its values. After --max_nonfinite_steps consecutive
such steps training stops with one message; no checkpoint of those steps is written, so the last good
checkpoint stays the one a rerun resumes from, and no final model is written.

How a step is skipped:
- without DeepSpeed, LMTrainer._get_grad_norm (called after the backward passes and the clipping, right
  before optimizer.step) calls StepGuard.check; on a bad step every gradient is set to None, so the torch
  optimizer leaves each parameter and its state alone (AdamW skips parameters without a gradient; zeroing
  the gradients would still decay the moments and apply weight decay);
- under DeepSpeed the engine has already stepped inside the backward call; ZeRO skips a step whose gradient
  norm is not finite itself (fp32 always, bf16 with bf16.check_grad_overflow, on by default, fp16 through its
  loss scaler) and reports an infinite norm, which is counted here. A non-finite loss with finite
  gradients cannot be undone there; it is counted and logged.
- with fp16, a gradient overflow is the loss scaler's business (it skips the step and lowers the scale; a
  few in a row are normal at the start), so only a non-finite loss counts toward --max_nonfinite_steps.

Warnings (log line + a count in the next log row, so TensorBoard/SwanLab show them), each against the
previous WINDOW finite steps (at least MIN_WINDOW of them):
- loss_spikes: a step loss above mean + 6 x max(std, 1% of mean);
- grad_norm_explosions: a gradient norm above 10 x the median;
- grad_norm_vanishings: a gradient norm below the median / 100 (or exactly 0).
Detecting costs one host read of the loss and the norm per step; the Trainer already reads the loss of
each micro-batch for its NaN filter, so no new device synchronisation is added.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque

import torch
from transformers import TrainerCallback

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)

WINDOW, MIN_WINDOW = 100, 20
SPIKE_STDS, SPIKE_MIN_RELATIVE = 6.0, 0.01
EXPLOSION_RATIO, VANISHING_RATIO = 10.0, 0.01


class NonFiniteStop(UserError):
    """Too many consecutive non-finite steps: one message, exit 2, the last good checkpoint kept."""


class StepGuard(TrainerCallback):
    """Checks each optimizer step (see the module docstring); a callback for the counting and the stop."""

    def __init__(self, max_nonfinite_steps: int = 5):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0      # this run's total (continued from the log history after a resume)
        self.consecutive = 0
        self.first_bad_step = None
        self.halted = None            # the NonFiniteStop message once training was stopped for it
        self._losses = deque(maxlen=WINDOW)
        self._norms = deque(maxlen=WINDOW)
        self._micro_losses = []
        self._bad = None              # this step's reason, set by check()
        self._values = (None, None)
        self._window_counts = {"loss_spikes": 0, "grad_norm_explosions": 0, "grad_norm_vanishings": 0}
        self._window_steps = self._window_bad = 0  # optimizer steps, and skipped ones, since the last log row

    # -- called by LMTrainer -------------------------------------------------------------------------------
    def note_loss(self, loss: torch.Tensor):
        self._micro_losses.append(loss.detach())

    def check(self, trainer, model, grad_norm) -> bool:
        """After backward and clipping, before optimizer.step: True when this step must not be applied."""
        loss = float(torch.stack([x.float().reshape(()) for x in self._micro_losses]).sum()) \
            if self._micro_losses else float("nan")
        self._micro_losses = []
        norm = float(grad_norm) if grad_norm is not None else None
        bad_loss = not math.isfinite(loss)
        bad_norm = norm is not None and not math.isfinite(norm)
        fp16 = trainer.args.fp16 or (trainer.is_deepspeed_enabled
                                     and trainer.accelerator.state.deepspeed_plugin.deepspeed_config
                                     .get("fp16", {}).get("enabled") is True)
        bad = bad_loss or (bad_norm and not fp16)
        if trainer.args.world_size > 1 and not trainer.is_deepspeed_enabled and torch.distributed.is_initialized():
            # The losses are per rank: every rank must skip the same steps (the norm is already global).
            device = trainer.args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(bad)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
        self._values = (loss, norm)
        self._bad = None
        if bad:
            self._bad = "loss" if bad_loss else "gradient norm"
            if not trainer.is_deepspeed_enabled:
                for parameter in model.parameters():
                    parameter.grad = None
        optimizer = trainer.optimizer
        if not trainer.is_deepspeed_enabled and getattr(optimizer, "scaler", None) is None:
            optimizer._is_overflow = bool(bad)  # accelerate's "step was skipped": the scheduler waits too
        return bad

    def metrics(self) -> dict:
        """Counts for the next log row (reset after each row except the running total)."""
        out = {"nonfinite_steps": self.nonfinite_steps, **self._window_counts}
        self._window_counts = dict.fromkeys(self._window_counts, 0)
        self._window_steps = self._window_bad = 0
        return out

    def window_was_all_bad(self) -> bool:
        """Every step since the last log row was skipped: transformers' NaN filter then logs a made-up loss
        (0 when logging every step), so the row must say NaN instead."""
        return self._window_steps > 0 and self._window_bad == self._window_steps

    # -- callback ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.consecutive, self.first_bad_step, self.halted = 0, None, None
        previous = [row["nonfinite_steps"] for row in state.log_history if "nonfinite_steps" in row]
        self.nonfinite_steps = previous[-1] if previous else 0

    def on_step_end(self, args, state, control, **kwargs):
        loss, norm = self._values
        self._values = (None, None)
        self._window_steps += 1
        if self._bad is not None:
            self._window_bad += 1
            self.nonfinite_steps += 1
            self.consecutive += 1
            self.first_bad_step = self.first_bad_step or state.global_step
            logger.warning("step %d: non-finite %s (loss %s, gradient norm %s): the update was skipped, weights and "
                           "optimizer state unchanged (%d in a row, stop at %d)", state.global_step, self._bad, loss,
                           norm, self.consecutive, self.max_nonfinite_steps)
            self._bad = None
            if self.max_nonfinite_steps and self.consecutive >= self.max_nonfinite_steps:
                self.halted = (
                    f"training stopped at step {state.global_step}: {self.consecutive} consecutive optimizer steps "
                    f"(steps {self.first_bad_step}-{state.global_step}) had a non-finite loss or gradient norm, and "
                    f"none was applied. The newest checkpoint in {args.output_dir} is the last good state (rerunning "
                    "resumes from it and meets the same batches). Lower --learning_rate or raise --warmup_steps, "
                    "use --bf16 rather than --fp16, check the data those steps read, or raise "
                    "--max_nonfinite_steps to skip more of them")
                control.should_training_stop = True
                control.should_save = False  # keep the last good checkpoint the newest one
            return
        self.consecutive, self.first_bad_step = 0, None
        if loss is not None and math.isfinite(loss):
            self._watch_loss(loss, state.global_step)
        if norm is not None and math.isfinite(norm):
            self._watch_norm(norm, state.global_step)

    def _watch_loss(self, loss: float, step: int):
        if len(self._losses) >= MIN_WINDOW:
            mean, std = statistics.fmean(self._losses), statistics.pstdev(self._losses)
            limit = mean + SPIKE_STDS * max(std, SPIKE_MIN_RELATIVE * abs(mean))
            if loss > limit:
                self._window_counts["loss_spikes"] += 1
                logger.warning("step %d: loss spike %.4g (the previous %d steps: mean %.4g, std %.3g; threshold %.4g)",
                               step, loss, len(self._losses), mean, std, limit)
        self._losses.append(loss)

    def _watch_norm(self, norm: float, step: int):
        if len(self._norms) >= MIN_WINDOW:
            median = statistics.median(self._norms)
            if norm > EXPLOSION_RATIO * median:
                self._window_counts["grad_norm_explosions"] += 1
                logger.warning("step %d: gradient norm %.4g is over %gx the median %.4g of the previous %d steps",
                               step, norm, EXPLOSION_RATIO, median, len(self._norms))
            elif norm == 0 or norm < VANISHING_RATIO * median:
                self._window_counts["grad_norm_vanishings"] += 1
                logger.warning("step %d: gradient norm %.4g is under %g of the median %.4g of the previous %d steps "
                               "(vanishing gradients?)", step, norm, VANISHING_RATIO, median, len(self._norms))
        self._norms.append(norm)
