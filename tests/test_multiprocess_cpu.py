"""Several processes on the CPU (issue 12.7), through torchrun with two workers: they train as data
parallel (2 processes x batch 2 = 1 process x batch 4: same losses and grad norms, no parallel_mode
warning), on-the-fly data preparation slower than --ddp_timeout does not crash the waiting rank, a
UserError on one rank ends both within seconds, and a SIGTERM to the launcher makes every rank save the
same step. Each torchrun costs ~30 s on 2 cores (two interpreters importing torch/transformers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# The worker torchrun starts: lmtrain's pretrain main, with the data preparation slowed down on rank 0
# (SLOW_PREPARATION seconds) or failing on rank 1 (FAIL_ON_RANK_1) to stage the cases under test.
WORKER = '''
import os, sys, time
import lmtrain.data.loading as loading
from lmtrain.errors import UserError, run_entry_point
from lmtrain.cli.pretrain import main

rank, prepared_once = int(os.environ["RANK"]), loading._prepared_once

def staged(training_args, desc, prepare):
    def slow_or_failing():
        if rank == 0:
            time.sleep(float(os.environ.get("SLOW_PREPARATION", "0")))
        if rank == 1 and os.environ.get("FAIL_ON_RANK_1"):
            raise UserError("staged failure on rank 1")
        return prepare()
    return prepared_once(training_args, desc, slow_or_failing)

loading._prepared_once = staged
sys.argv = sys.argv[:1] + sys.argv[1:]
run_entry_point(main)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, eight_scenes):
    root = tmp_path_factory.mktemp("multiprocess")
    corpus, tokenizer_dir = eight_scenes
    (root / "worker.py").write_text(WORKER)

    def args(out, *extra):
        return ["--tokenizer_name", str(tokenizer_dir), "--train_files", str(corpus), "--block_size", "32",
                "--config_name", "qwen2-tiny", "--config_overrides", TINY, "--validation_split_percentage", "0",
                "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "1", "--report_to", "none",
                "--seed", "7", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--plot_curves", "false",
                "--output_dir", str(out), *extra]

    return root, args


def torchrun(root: Path, argv: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(root / "worker.py"), *argv], cwd=REPO, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def training_rows(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {row["step"]: row for row in history if "loss" in row}


def test_two_processes_are_data_parallel_and_wait_for_a_slow_preparation(setup, tmp_path):
    """Rank 0 prepares for 12 s with --ddp_timeout 4: rank 1 waits (its own barrier has no such timeout),
    then both train as one data-parallel job whose curve is the one-process run with the global batch."""
    import pretrain

    root, args = setup
    cache = ["--prepared_cache_dir", str(tmp_path / "cache")]
    process = torchrun(root, args(tmp_path / "two", "--per_device_train_batch_size", "2", "--max_steps", "3",
                                  "--ddp_timeout", "4", *cache), env={"SLOW_PREPARATION": "12"})
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in output
    pretrain.main(args(tmp_path / "one", "--per_device_train_batch_size", "4", "--max_steps", "3", *cache))
    two, one = training_rows(tmp_path / "two"), training_rows(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:  # DDP averages the two ranks' gradients: equal up to float summation order
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5), (step, two[step], one[step])
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), step
        assert two[step]["learning_rate"] == one[step]["learning_rate"]


def test_a_user_error_on_one_rank_ends_both_promptly(setup, tmp_path):
    """Rank 0 goes on to training and waits for rank 1 in a collective (--ddp_timeout 1800); torchrun sees
    rank 1 exit 2 and ends rank 0 at once: the job ends in seconds, with the one-message error."""
    root, args = setup
    start = time.monotonic()
    process = torchrun(root, args(tmp_path / "out", "--per_device_train_batch_size", "2", "--max_steps", "3",
                                  "--prepared_cache_dir", str(tmp_path / "cache"), "--ddp_timeout", "1800"),
                       env={"FAIL_ON_RANK_1": "1"})
    output, _ = process.communicate(timeout=300)
    elapsed = time.monotonic() - start
    assert process.returncode != 0
    assert "error: staged failure on rank 1" in output
    assert elapsed < 150, f"took {elapsed:.0f} s"  # startup (~30 s on 2 cores) + seconds, far from 1800


def test_sigterm_to_the_launcher_makes_every_rank_save_the_same_step(setup, tmp_path):
    """torchrun forwards SIGTERM to both workers; the ranks agree on the stop step (lmtrain/training/
    signals.py) and each writes its part of that one checkpoint (rng_state_0/1.pth), then exit 143."""
    root, args = setup
    out = tmp_path / "out"
    process = torchrun(root, args(out, "--per_device_train_batch_size", "2", "--max_steps", "100000",
                                  "--save_steps", "100000", "--prepared_cache_dir", str(tmp_path / "cache")))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "'loss'" in line and len([s for s in seen if "'loss'" in s]) >= 3:
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + process.communicate(timeout=300)[0]
    assert process.returncode != 0, output[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 3
    assert (checkpoints[0] / "rng_state_0.pth").exists() and (checkpoints[0] / "rng_state_1.pth").exists()
    marker = json.loads((checkpoints[0] / "lmtrain_checkpoint.json").read_text())
    assert marker.get("step") == step and marker.get("world_size") == 2, marker


def test_deepspeed_with_several_processes_on_cpus_is_refused_in_one_message(setup, tmp_path, monkeypatch):
    """What torchrun/deepspeed would set for rank 0 of two; refused while parsing, before any heavy work."""
    import pretrain
    from lmtrain.errors import UserError

    root, args = setup
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="--deepspeed with 2 processes on CPUs.*one process only"):
        pretrain.main(args(tmp_path / "out", "--deepspeed", str(REPO / "ds_configs" / "zero2.json")))
