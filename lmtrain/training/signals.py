"""Preemption: SIGTERM (what SLURM, Kubernetes and most schedulers send before killing a job) or SIGINT
(Ctrl-C) during training saves a checkpoint at the end of the optimizer step in progress and stops; the
process then exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), so a retry-until-exit-0
wrapper runs it again, and rerunning the same command resumes from that checkpoint. A second signal ends the
process at once (the default action of that signal), without a checkpoint.

Handlers are installed when training begins and removed when it ends: a signal during model building or
data preparation ends the process as usual (nothing to save yet), and one during the final save kills it
as usual too (the checkpoint policy finishes the run from the last checkpoint on the rerun).

Under several processes every rank must stop at the same step, or the ranks that stop first leave the
others waiting in a collective. The flag is agreed with one all_reduce(MAX) of a single number at each step
end when world_size > 1 (a few microseconds next to a step; none in a single process)."""
from __future__ import annotations

import logging
import signal
import threading

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code_for(signum: int) -> int:
    """The shell's convention for "ended by signal N": 128 + N."""
    return 128 + int(signum)


class PreemptionCallback(TrainerCallback):
    """First SIGTERM/SIGINT: note it; at the next step end, save a checkpoint and stop training.
    `received` is the signal number this run stopped for (None without one)."""

    def __init__(self, planned_stop=None):
        self.planned_stop = planned_stop  # PlannedStopCallback: its extra-save bookkeeping covers ours too
        self.received = None
        self.stopped_at = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # the second signal: the user (or scheduler) means it
            self._restore()
            logger.warning("second %s: exiting now, without a checkpoint", signal.Signals(signum).name)
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("received %s: finishing the current optimizer step, then saving a checkpoint and stopping "
                       "(send it again to exit at once, without a checkpoint)", signal.Signals(signum).name)

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_at = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training runs outside the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _agreed(self, args) -> int:
        """The signal number any rank received (0: none), the same on every rank."""
        received = self.received or 0
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([received], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        return received

    def on_step_end(self, args, state, control, **kwargs):
        received = self._agreed(args)
        if not received or control.should_training_stop:  # the run's own end (max_steps) comes first
            return
        self.received, self.stopped_at = received, state.global_step
        control.should_training_stop = True
        if self.planned_stop is not None:
            self.planned_stop.add_extra_save(control)
        else:
            control.should_save = True
        logger.warning("%s: saving checkpoint-%d and stopping", signal.Signals(received).name, state.global_step)


def exit_after_signal(trainer):
    """The entry script's end after a signal stop: exit 128 + N (143 for SIGTERM), so schedulers and retry
    wrappers see the run as unfinished; the checkpoint is already saved."""
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PreemptionCallback))
    raise SystemExit(exit_code_for(callback.received))
