"""Checkpoints a kill -9 cut short (issue 12.4): every checkpoint carries a completion marker written last;
one without it (or whose files no longer match it) is skipped with the reason and never loaded; the rerun
resumes from the newest complete one and continues the loss curve exactly; save_total_limit never deletes
the last complete checkpoint before the new one is complete. Real runs, killed inside their save."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_pretrain_argv

import pretrain
from lmtrain.errors import UserError
from lmtrain.training.checkpoints import (CHECKPOINT_MARKER, checkpoint_problem, find_resume_checkpoint,
                                          rotate_complete_checkpoints, write_checkpoint_marker)

REPO = Path(__file__).resolve().parents[1]


def make_args(corpus_dir, tokenizer_dir):
    return lambda output_dir, *extra: tiny_pretrain_argv(tokenizer_dir, corpus_dir, output_dir, *extra)


@pytest.fixture
def args(plays_dir, tiny_tokenizer_dir):
    return make_args(plays_dir, tiny_tokenizer_dir)


def losses(history) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in history if "loss" in row}


# Where the child pauses inside the save of checkpoint-6 (after announcing it in PAUSED), to be killed there:
# - "optimizer": the weights and optimizer state are written, the RNG states and trainer_state.json are not;
# - "before_marker": every file the Trainer writes is there (trainer_state.json last), the marker is not.
PAUSES = {
    "optimizer": """
from transformers import Trainer
original = Trainer._save_rng_state
def paused(self, output_dir):
    if output_dir.endswith("checkpoint-6"):
        pause(output_dir)
    return original(self, output_dir)
Trainer._save_rng_state = paused
""",
    "before_marker": """
from transformers import TrainerState
original = TrainerState.save_to_json
def paused(self, json_path):
    original(self, json_path)
    if json_path.endswith("checkpoint-6/trainer_state.json"):
        pause(json_path)
TrainerState.save_to_json = paused
""",
}
CHILD = """
import sys, time
from pathlib import Path
def pause(where):
    Path(sys.argv[1]).write_text(where)
    time.sleep(600)
{patch}
from lmtrain.cli.pretrain import main
from lmtrain.errors import run_entry_point
run_entry_point(main, sys.argv[2:])
"""


PLAN = ["--max_steps", "8", "--save_steps", "3", "--save_total_limit", "1"]


@pytest.fixture(scope="module")
def straight_losses(plays_dir, tiny_tokenizer_dir, tmp_path_factory):
    make = make_args(plays_dir, tiny_tokenizer_dir)
    trainer, _ = pretrain.main(make(tmp_path_factory.mktemp("straight") / "out", *PLAN))
    return losses(trainer.state.log_history)


@pytest.mark.parametrize("where", sorted(PAUSES))
def test_killed_inside_a_save_resumes_from_the_newest_complete_checkpoint(args, tmp_path, log_lines, where,
                                                                          straight_losses):
    plan = PLAN
    out, paused = tmp_path / "killed", tmp_path / "PAUSED"
    process = subprocess.Popen([sys.executable, "-c", CHILD.format(patch=PAUSES[where]), str(paused),
                                *args(out, *plan)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while not paused.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert paused.exists(), process.stderr.read()[-3000:] if process.poll() is not None else "never paused"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # save_total_limit 1 did not delete checkpoint-3 while checkpoint-6 was being written.
    assert (out / "checkpoint-3" / CHECKPOINT_MARKER).exists()
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-6" / CHECKPOINT_MARKER).exists()

    log_lines.clear()
    resumed, _ = pretrain.main(args(out, *plan))
    assert any(line.startswith(f"skipping incomplete checkpoint {out / 'checkpoint-6'}: no completion marker")
               for line in log_lines), log_lines
    assert any(line.startswith(f"resuming from {out / 'checkpoint-3'}") for line in log_lines)
    got, expected = losses(resumed.state.log_history), straight_losses
    assert sorted(got) == list(range(1, 9)) and all(got[s] == expected[s] for s in expected)
    # The re-saved checkpoint-6 is complete (the interrupted attempt's directory was replaced); the limit holds.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    assert checkpoint_problem(out / "checkpoint-8") is None


def fake_checkpoint(output: Path, step: int, complete: bool = True) -> Path:
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 100)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_checkpoint_marker(path, step, world_size=1, zero_stage=None)
    return path


def test_rotation_counts_complete_checkpoints_only_and_keeps_the_newest_complete_and_the_best(tmp_path):
    for step, complete in ((2, True), (4, True), (5, False), (6, True), (8, True), (10, False)):
        fake_checkpoint(tmp_path, step, complete)
    rotate_complete_checkpoints(tmp_path, limit=2, best=str(tmp_path / "checkpoint-2"),
                                newest=tmp_path / "checkpoint-8")
    # 8 and 6: the two newest complete; 2: the best; 5: an interrupted save older than the new one, deleted;
    # 10: newer than the new checkpoint (a leftover a later save replaces), kept; 4: rotated out.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-2", "checkpoint-6",
                                                                     "checkpoint-8"]
    rotate_complete_checkpoints(tmp_path, limit=1, best=None, newest=tmp_path / "checkpoint-8")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]


def test_a_checkpoint_whose_files_changed_is_skipped_with_the_reason(tmp_path, caplog):
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6)
    with open(newest / "model.safetensors", "r+b") as handle:
        handle.truncate(40)  # e.g. a disk that filled up, or a copy cut short
    assert "model.safetensors has 40 bytes" in checkpoint_problem(newest)
    with caplog.at_level(logging.WARNING, logger="lmtrain.training.checkpoints"):
        assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")
    assert "skipping incomplete checkpoint" in caplog.text and "40 bytes" in caplog.text
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoint_problem(tmp_path / "checkpoint-3")


def test_resume_from_an_incomplete_checkpoint_is_refused_in_one_message(args, tmp_path):
    broken = fake_checkpoint(tmp_path, 4, complete=False)
    (broken / "trainer_state.json").unlink()
    command = args(tmp_path / "out", "--max_steps", "4", "--resume_from_checkpoint", str(broken))
    with pytest.raises(UserError, match="not a complete checkpoint .*no completion marker"):
        pretrain.main(command)
    run = subprocess.run([sys.executable, "pretrain.py", *command], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "not a complete checkpoint" in run.stderr
