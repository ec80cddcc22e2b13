"""Non-finite steps and instability (issue 12.5): a step with a NaN loss or an Inf gradient leaves the weights
and the optimizer state exactly as they were (without DeepSpeed and under ZeRO-2), is counted in the log rows,
and K consecutive ones stop the run with one message, keeping the last good checkpoint; loss spikes and
gradient-norm explosions/vanishing are warned about and counted. Faults are injected by monkeypatching."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_pretrain_argv
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

import lmtrain.cli.pretrain as pretrain_cli
from lmtrain.training.guards import StepGuard
from lmtrain.training.trainer import LMTrainer

REPO = Path(__file__).resolve().parents[1]
BAD_STEP = 3  # the optimizer step (1-based) whose batch is poisoned


@pytest.fixture
def args(plays_dir, tiny_tokenizer_dir):
    return lambda output_dir, *extra: tiny_pretrain_argv(tiny_tokenizer_dir, plays_dir, output_dir, *extra,
                                                         warmup_steps=1)


def nan_loss_at(steps):
    """compute_loss returning NaN (and so NaN gradients) during the given 1-based optimizer steps."""
    original = LMTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        result = original(self, model, inputs, *a, **k)
        if self.state.global_step + 1 in steps:
            return (result[0] * float("nan"), result[1]) if isinstance(result, tuple) else result * float("nan")
        return result
    return compute_loss


class Snapshots(TrainerCallback):
    """Weights and optimizer state after every optimizer step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after[state.global_step] = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                                         copy.deepcopy(optimizer.state_dict()))


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def run_with_snapshots(monkeypatch, argv):
    snapshots = Snapshots()
    build = pretrain_cli.build_trainer

    def build_with_snapshots(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(snapshots)
        return trainer
    monkeypatch.setattr(pretrain_cli, "build_trainer", build_with_snapshots)
    trainer, _ = pretrain_cli.main(argv)
    return trainer, snapshots.after


def inf_gradient_at(monkeypatch, step):
    """An Inf in the embedding's gradient during one optimizer step (the loss stays finite)."""
    original = LMTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        hook = None
        if self.state.global_step + 1 == step:
            hook = model.get_input_embeddings().weight.register_hook(lambda grad: grad + float("inf"))
        try:
            return original(self, model, inputs, num_items_in_batch)
        finally:
            if hook is not None:
                hook.remove()
    monkeypatch.setattr(LMTrainer, "training_step", training_step)


@pytest.mark.parametrize("fault", ["nan_loss", "inf_gradient"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_unchanged(args, tmp_path, monkeypatch, fault):
    if fault == "nan_loss":
        monkeypatch.setattr(LMTrainer, "compute_loss", nan_loss_at({BAD_STEP}))
    else:
        inf_gradient_at(monkeypatch, BAD_STEP)
    trainer, after = run_with_snapshots(monkeypatch, args(tmp_path / fault, "--max_steps", "5", "--save_steps",
                                                          "100"))
    weights, optimizer = after[BAD_STEP]
    assert same_tensors(weights, after[BAD_STEP - 1][0]), "the bad step changed the weights"
    assert same_tensors(optimizer, after[BAD_STEP - 1][1]), "the bad step changed the optimizer state"
    assert not same_tensors(after[BAD_STEP + 1][0], weights), "training did not go on after the bad step"
    rows = {row["step"]: row for row in trainer.state.log_history if "loss" in row}
    assert [rows[s]["nonfinite_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    if fault == "nan_loss":  # the log shows what happened (transformers' filter used to log a loss of 0)
        assert math.isnan(rows[BAD_STEP]["loss"])
        assert all(math.isfinite(rows[s]["loss"]) and rows[s]["loss"] > 0 for s in range(1, 6) if s != BAD_STEP)
    assert math.isfinite(rows[BAD_STEP + 1]["grad_norm"])
    # The schedule waited too: the step after the skipped one applies the rate the skipped one would have.
    assert rows[BAD_STEP + 1]["learning_rate"] == rows[BAD_STEP]["learning_rate"]
    assert trainer.state.global_step == 5


CHILD = """
import sys
from lmtrain.training.trainer import LMTrainer
original = LMTrainer.compute_loss
def compute_loss(self, model, inputs, *a, **k):
    result = original(self, model, inputs, *a, **k)
    if self.state.global_step + 1 in {steps}:
        return (result[0] * float("nan"), result[1]) if isinstance(result, tuple) else result * float("nan")
    return result
LMTrainer.compute_loss = compute_loss
from lmtrain.cli.pretrain import main
from lmtrain.errors import run_entry_point
run_entry_point(main, sys.argv[1:])
"""


def run_child(argv, steps) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                                                             "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", CHILD.format(steps=sorted(steps)), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_consecutive_non_finite_steps_stop_with_one_message_and_keep_the_last_good_checkpoint(args, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "unstable"
    run = run_child(args(out, "--max_steps", "20", "--save_steps", "2", "--save_total_limit", "10",
                         "--max_nonfinite_steps", "3"), set(range(5, 21)))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    message = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "training stopped at step 7: 3 consecutive optimizer steps (steps 5-7)" in \
        message[0] and "--max_nonfinite_steps" in message[0]
    assert not (out / "model.safetensors").exists() and not (out / "lmtrain_complete.json").exists()
    # Steps 5 and 6 were skipped, so checkpoint-6 holds step 4's weights; nothing was saved at the stop (7).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    four, six = load_file(out / "checkpoint-4/model.safetensors"), load_file(out / "checkpoint-6/model.safetensors")
    assert all(torch.equal(four[k], six[k]) for k in four)


def test_under_zero2_a_nan_step_is_skipped_by_the_engine_and_counted(args, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "zero2"
    run = run_child(["--deepspeed", "ds_configs/zero2.json", *args(out, "--max_steps", "4", "--save_steps", "1",
                                                                   "--save_total_limit", "10")], {BAD_STEP})
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    rows = {row["step"]: row for row in state["log_history"] if "loss" in row}
    assert [rows[s]["nonfinite_steps"] for s in range(1, 5)] == [0, 0, 1, 1]
    weights = {s: load_file(out / f"checkpoint-{s}/model.safetensors") for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2]), "ZeRO-2 applied the NaN step"
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])

    def optimizer_states(step):
        files = sorted((out / f"checkpoint-{step}").glob("global_step*/*optim_states.pt"))
        assert files, f"no optimizer states in checkpoint-{step}"
        return [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    two, three = optimizer_states(2), optimizer_states(3)
    assert same_tensors(two[0]["base_optimizer_state"], three[0]["base_optimizer_state"])
    assert same_tensors(two[0]["single_partition_of_fp32_groups"], three[0]["single_partition_of_fp32_groups"])


def feed(guard: StepGuard, losses, norms):
    state, control = TrainerState(), TrainerControl()
    for step, (loss, norm) in enumerate(zip(losses, norms), start=1):
        state.global_step = step
        guard._values = (loss, norm)
        guard.on_step_end(None, state, control)


def test_spikes_explosions_and_vanishing_gradients_are_counted_for_the_log_rows():
    guard = StepGuard()
    steady = [2.0 + 0.01 * ((i * 7) % 5) for i in range(30)]
    feed(guard, steady, [1.0 + 0.05 * (i % 3) for i in range(30)])
    assert guard.metrics() == {"nonfinite_steps": 0, "loss_spikes": 0, "grad_norm_explosions": 0,
                               "grad_norm_vanishings": 0}
    feed(guard, [2.5, 2.01, 2.02], [50.0, 1.0, 0.0])  # a spike with an exploded norm, then a zero norm
    assert guard.metrics() == {"nonfinite_steps": 0, "loss_spikes": 1, "grad_norm_explosions": 1,
                               "grad_norm_vanishings": 1}
    assert guard.metrics()["loss_spikes"] == 0  # counts are per log row
    feed(guard, [2.1], [1.0])  # within the recent spread: no warning
    assert guard.metrics()["loss_spikes"] == 0
