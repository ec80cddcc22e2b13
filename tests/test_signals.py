"""Preemption (issue 12.3): SIGTERM / SIGINT during training saves a checkpoint at the next optimizer-step
boundary, exits with 128 + the signal number, and the rerun continues the loss curve exactly; a second signal
ends the process at once, without a completion marker. Real training processes, tiny Qwen2 on the CPU."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_pretrain_argv

import pretrain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def args(plays_dir, tiny_tokenizer_dir):
    return lambda output_dir, *extra: tiny_pretrain_argv(tiny_tokenizer_dir, plays_dir, output_dir, *extra)


def losses(history) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def logged_steps(log: Path) -> int:
    """Training rows the Trainer printed so far (with --disable_tqdm each log row is a line on stdout)."""
    return log.read_text(errors="replace").count("'loss':") if log.exists() else 0


def start(command: list[str], log: Path, *, patch: str = "") -> subprocess.Popen:
    """pretrain's entry point in a child process; `patch` is Python run first (test-only fault injection)."""
    code = f"import sys\n{patch}\nfrom lmtrain.cli.pretrain import main\nfrom lmtrain.errors import run_entry_point\n" \
           "run_entry_point(main, sys.argv[1:])"
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-c", code, *command], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


def wait_for(condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigterm_saves_at_the_step_boundary_exits_143_and_the_rerun_continues_the_curve(args, tmp_path):
    plan = ["--max_steps", "24", "--save_steps", "100"]  # no regular save before the signal
    straight, _ = pretrain.main(args(tmp_path / "straight", *plan))
    out, log = tmp_path / "preempted", tmp_path / "first.log"
    process = start(args(out, *plan), log)
    wait_for(lambda: logged_steps(log) >= 3 or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=240) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    saved = [p for p in out.glob("checkpoint-*")]
    assert len(saved) == 1, "one checkpoint, at the step the signal reached"
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < 24 and f"stopped by SIGTERM at step {step} of 24" in text
    assert (saved[0] / "lmtrain_checkpoint.json").exists()
    assert json.loads((saved[0] / "trainer_state.json").read_text())["global_step"] == step
    # Not mistaken for a finished run: no final model, no completion record.
    assert not (out / "model.safetensors").exists() and not (out / "lmtrain_complete.json").exists()

    rerun = subprocess.run([sys.executable, "pretrain.py", *args(out, *plan)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {saved[0]}" in rerun.stderr
    got = losses(json.loads((out / "trainer_state.json").read_text())["log_history"])
    expected = losses(straight.state.log_history)
    assert sorted(got) == list(range(1, 25))
    assert all(got[s] == expected[s] for s in expected), "the resumed losses differ from the uninterrupted run"
    assert (out / "lmtrain_complete.json").exists()
    # The stop's extra checkpoint was retired once the final one was complete (planned-stop bookkeeping).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-24"]


SLOW_SAVE = """
import time
from pathlib import Path
from transformers import Trainer
original = Trainer._save_rng_state
def slow(self, output_dir):
    Path(output_dir, "IN_SAVE").write_text("")
    time.sleep(120)
    return original(self, output_dir)
Trainer._save_rng_state = slow
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_second_signal_exits_at_once_and_leaves_no_completion_marker(args, tmp_path, signum, code):
    out, log = tmp_path / "twice", tmp_path / "twice.log"
    process = start(args(out, "--max_steps", "40", "--save_steps", "100"), log, patch=SLOW_SAVE)
    wait_for(lambda: logged_steps(log) >= 2 or process.poll() is not None)
    process.send_signal(signum)
    wait_for(lambda: any(out.glob("checkpoint-*/IN_SAVE")) or process.poll() is not None)
    started = time.time()
    process.send_signal(signum)  # while the (slowed) save is in progress
    assert process.wait(timeout=60) == code, log.read_text()[-3000:]
    assert time.time() - started < 30, "the second signal did not end the process at once"
    checkpoint = next(out.glob("checkpoint-*"))
    assert not (checkpoint / "lmtrain_checkpoint.json").exists()
    from lmtrain.training.checkpoints import find_resume_checkpoint

    assert find_resume_checkpoint(str(out)) is None  # the cut-short save is never resumed from
