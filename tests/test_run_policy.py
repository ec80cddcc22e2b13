"""The run-directory policy of pretrain.py / sft.py: resume, planned stops, --overwrite_output_dir, the rerun
of a finished run, and attempts that stopped before their first checkpoint. Tiny Qwen2 on the CPU."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pretrain
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.errors import UserError
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
WIDER = "hidden_size=48,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:120]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                                    show_progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return root, corpus, root / "tokenizer"


@pytest.fixture
def args(corpus_and_tokenizer):
    root, corpus, tokenizer = corpus_and_tokenizer

    def make(output_dir: Path, *extra: str, model: str = TINY) -> list[str]:
        return ["--tokenizer_name", str(tokenizer), "--train_files", str(corpus), "--block_size", "64",
                "--config_name", "qwen2-tiny", "--config_overrides", model, "--prepared_cache_dir",
                str(root / "cache"), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                "--warmup_steps", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "7",
                "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--output_dir", str(output_dir), *extra]

    return make


def losses(history) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_planned_stops_make_n_steps_per_run_and_reproduce_the_uninterrupted_run(args, tmp_path, log_lines):
    plan = ["--max_steps", "20", "--save_steps", "5", "--save_total_limit", "2"]
    straight, _ = pretrain.main(args(tmp_path / "straight", *plan))
    out = tmp_path / "boxed"
    seen = {}
    for submission in (1, 2, 3):
        log_lines.clear()
        trainer, _ = pretrain.main(args(out, *plan, "--stop_after_steps", "7"))
        seen[submission] = trainer.state.global_step
        if submission < 3:  # a planned stop: a checkpoint, and nothing that says the run is done
            assert not (out / "model.safetensors").exists() and not (out / "all_results.json").exists()
            assert not (out / "lmtrain_complete.json").exists()
            assert not any("saved the final model" in line for line in log_lines)
            assert any("planned stop" in line and "Rerun the same command" in line for line in log_lines)
    assert seen == {1: 7, 2: 14, 3: 20}  # 7 steps of progress per submission, counted from the resumed step
    assert (out / "model.safetensors").exists() and (out / "lmtrain_complete.json").exists()
    # The planned stops' extra checkpoints (7, 14) pushed no regular one out: the same ones as uninterrupted.
    assert checkpoints(out) == checkpoints(tmp_path / "straight") == ["checkpoint-15", "checkpoint-20"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    got, expected = losses(history), losses(straight.state.log_history)
    assert sorted(got) == list(range(1, 21))
    assert all(got[step] == expected[step] for step in range(8, 21)), "resumed losses differ"


def test_rerunning_a_finished_run_changes_nothing(args, tmp_path, log_lines):
    out = tmp_path / "done"
    command = args(out, "--max_steps", "4", "--save_steps", "2")
    pretrain.main(command)
    watched = ["model.safetensors", "trainer_state.json", "all_results.json", "checkpoint-4/trainer_state.json"]
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in watched}
    log_lines.clear()
    trainer, metrics = pretrain.main(command)
    assert trainer is None and "train_loss" in metrics
    assert {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in watched} == before
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert any("run complete" in line for line in log_lines)
    # As a cluster requeue sees it: exit 0, the final model untouched.
    rerun = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *command], capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and "run complete" in rerun.stderr, rerun.stderr[-2000:]
    assert (out / "model.safetensors").stat().st_mtime_ns == before["model.safetensors"][1]
    # Another plan for the same directory is not silently "complete".
    with pytest.raises(UserError, match="finished at step 4.*max_steps 8"):
        pretrain.main(args(out, "--max_steps", "8", "--save_steps", "2"))


def test_final_save_cut_short_is_finished_from_the_last_checkpoint_without_training(args, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "cut"
    command = args(out, "--max_steps", "4", "--save_steps", "2")
    pretrain.main(command)
    for name in ("lmtrain_complete.json", "model.safetensors", "all_results.json"):
        (out / name).unlink()  # as if killed after checkpoint-4, during the final save
    trainer, _ = pretrain.main(command)
    assert trainer.state.global_step == 4  # not 5: no step past max_steps
    final, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert final.keys() == checkpoint.keys() and all((final[k] == checkpoint[k]).all() for k in final)
    assert (out / "lmtrain_complete.json").exists()


def test_overwrite_output_dir_starts_fresh_and_removes_the_old_checkpoints(args, tmp_path, log_lines):
    out = tmp_path / "over"
    pretrain.main(args(out, "--max_steps", "6", "--save_steps", "3"))
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-6"]
    log_lines.clear()
    trainer, _ = pretrain.main(args(out, "--max_steps", "2", "--save_steps", "2", "--overwrite_output_dir",
                                    model=WIDER))
    assert trainer.state.global_step == 2 and trainer.model.config.hidden_size == 48
    assert checkpoints(out) == ["checkpoint-2"]  # the old ones are gone: never resumed, never rotated
    assert not any("resuming from" in line for line in log_lines)
    assert any("starting fresh, deleted 2 checkpoint(s)" in line for line in log_lines)
    assert json.loads((out / "lmtrain_complete.json").read_text())["global_step"] == 2


def test_checkpoint_of_another_model_shape_is_one_message_naming_both_shapes(args, tmp_path):
    out = tmp_path / "shape"
    pretrain.main(args(out, "--max_steps", "6", "--save_steps", "2", "--stop_after_steps", "2"))
    with pytest.raises(UserError, match=r"checkpoint-2 does not fit this model: .* shape \[\d+, 32\] .* \[\d+, 48\]"):
        pretrain.main(args(out, "--max_steps", "6", "--save_steps", "2", model=WIDER))
    run = subprocess.run([sys.executable, str(REPO / "pretrain.py"),
                          *args(out, "--max_steps", "6", "--save_steps", "2", model=WIDER)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "does not fit this model" in run.stderr and "checkpoint-2" in run.stderr


def test_files_of_a_failed_first_attempt_do_not_block_the_corrected_rerun(args, tmp_path):
    from lmtrain.data.sources import DataError

    out = tmp_path / "retry"
    command = args(out, "--max_steps", "2")
    broken = [tmp_path / "missing.jsonl" if part.endswith("plays.jsonl") else part for part in command]
    with pytest.raises(DataError):
        pretrain.main([str(part) for part in broken])
    assert (out / "lmtrain_config.json").exists()  # what the failed attempt left behind
    trainer, _ = pretrain.main(command)
    assert trainer.state.global_step == 2
    # Somebody else's file still refuses the directory.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not ours")
    with pytest.raises(UserError, match="not empty"):
        pretrain.main(args(other, "--max_steps", "1"))


def test_early_files_of_both_stages_are_ours(tmp_path):
    from lmtrain.arguments import TrainArguments
    from lmtrain.training.checkpoints import resolve_resume

    out = tmp_path / "early"
    (out / "runs" / "Dec01_host").mkdir(parents=True)
    for name in ("lmtrain_config.json", "data_report.json", "samples.jsonl"):
        (out / name).write_text("{}")
    (out / "checkpoint-5").mkdir()  # killed inside its first save: incomplete
    assert resolve_resume(TrainArguments(output_dir=str(out), report_to="none")) is None
    assert not (out / "samples.jsonl").exists()  # appended to by a run: would mix the two attempts


def test_sigterm_before_the_first_checkpoint_then_the_same_command_trains(args, tmp_path):
    out = tmp_path / "term"
    command = args(out, "--max_steps", "3", "--save_steps", "100", "--prepared_cache_dir", str(tmp_path / "fresh"))
    process = subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *command],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "lmtrain_config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # during model building / data preparation
    process.wait(timeout=120)
    assert not (out / "lmtrain_complete.json").exists() and not checkpoints(out), "ended before the signal"
    assert any(out.iterdir())
    trainer, _ = pretrain.main(command)
    assert trainer.state.global_step == 3 and (out / "lmtrain_complete.json").exists()


def test_early_stopping_says_so_and_finishes_the_run(args, tmp_path, log_lines):
    out = tmp_path / "early"
    command = args(out, "--max_steps", "100", "--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps",
                   "2", "--save_steps", "2", "--early_stopping_patience", "1", "--max_eval_samples", "4")
    trainer, _ = pretrain.main(command)
    assert trainer.state.global_step == 4
    assert any(line.startswith("early stopping: eval_loss did not improve for 1 evaluations; training ended at "
                               "step 4 of 100") for line in log_lines)
    assert json.loads((out / "lmtrain_complete.json").read_text())["stopped_by"] == "early_stopping"
    assert pretrain.main(command)[0] is None  # finished: the rerun does not train on
