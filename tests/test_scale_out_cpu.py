"""Scale-out on the CPU (issue 17): what can be shown without GPUs.

- Two processes (torchrun, gloo data parallel): the global batch is per-device batch x accumulation x world
  size and rank 0 logs it once; over each epoch the ranks train on disjoint rows whose union is the whole
  training set (row hashes recorded by tests/scale_out_probe.py); the logged loss is the mean over the ranks;
  rank 1 writes nothing but its own RNG state, and TensorBoard gets one run.
- A resume that cannot load what it finds (a ZeRO checkpoint of another world size, another global batch)
  stops before anything is loaded, saying what to run.
- DeepSpeed universal checkpoints (one process: DeepSpeed runs on CPUs in one process only): a ZeRO-2
  checkpoint converted by `lmtrain convert-checkpoint --to universal` resumes from the universal copy alone,
  with the uninterrupted run's losses, grad norms and consumed-token count (slow).
- ZeRO-3 export through zero_to_fp32 (`--to hf`): the weights equal the engine's, embeddings stay tied (slow).

The torchrun run costs ~35 s on 2 cores (two interpreters importing torch/transformers); the DeepSpeed
runs ~30 s each, side by side in one fixture (`python -m pytest -m slow tests/test_scale_out_cpu.py`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest


REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "scale_out_probe.py"
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# 20 rows: 10 per rank, 5 micro-batches of 2 per rank and epoch: 2 steps of 8 rows and a last one of 4 (one
# micro-batch per rank), so the epoch's remainder is covered too.
BATCH, ACCUMULATION, WORLD, ROWS, EPOCHS = 2, 2, 2, 20, 2
GLOBAL = BATCH * ACCUMULATION * WORLD
STEPS_PER_EPOCH = -(-ROWS // GLOBAL)


def clean_environment(**extra) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    environment.update(extra)
    return environment


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, eight_scenes):
    root = tmp_path_factory.mktemp("scale-out")
    corpus, tokenizer_dir = eight_scenes

    def args(out, *extra):
        return ["--tokenizer_name", str(tokenizer_dir), "--train_files", str(corpus), "--block_size", "32",
                "--config_name", "qwen2-tiny", "--config_overrides", TINY, "--learning_rate", "3e-3",
                "--warmup_steps", "2", "--logging_steps", "1", "--seed", "7", "--dataloader_num_workers", "0",
                "--disable_tqdm", "true", "--prepared_cache_dir", str(root / "cache"), "--output_dir", str(out),
                *extra]

    return root, args


@pytest.fixture(scope="module")
def two_processes(inputs):
    """One two-process run: 20 training rows, 2 per device x 2 accumulation x 2 processes = 8 rows per step,
    2 epochs of 3 steps, evaluation with a sample every 2 steps, a checkpoint every 2 steps, TensorBoard,
    curves and the final model."""
    root, args = inputs
    out, record = root / "two", root / "record"
    record.mkdir()
    argv = args(out, "--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps",
                str(ACCUMULATION), "--max_train_samples", str(ROWS), "--num_train_epochs", str(EPOCHS),
                "--validation_split_percentage", "20", "--max_eval_samples", "4", "--eval_strategy", "steps",
                "--eval_steps", "2", "--save_steps", "2", "--sample_prompts", "To be", "--sample_max_new_tokens",
                "3", "--report_to", "tensorboard", "--plot_curves", "true")
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(WORLD), str(PROBE), str(record), *argv], cwd=REPO, env=clean_environment(),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert process.returncode == 0, process.stdout[-4000:]
    steps = {rank: [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in range(WORLD)}
    writes = {rank: json.loads((record / f"writes{rank}.json").read_text()) for rank in range(WORLD)}
    return SimpleNamespace(out=out, log=process.stdout, steps=steps, writes=writes,
                           dataset=json.loads((record / "dataset.json").read_text()))


def logged_rows(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {row["step"]: row for row in history if "loss" in row}


def test_the_global_batch_is_logged_once_and_sets_the_steps(two_processes):
    lines = [line for line in two_processes.log.splitlines() if "global batch:" in line]
    assert len(lines) == 1, lines  # rank 0 only
    assert f"global batch: {GLOBAL} rows per optimizer step = {BATCH} per device x {ACCUMULATION} accumulation x " \
           f"{WORLD} processes" in lines[0]
    assert sorted(logged_rows(two_processes.out)) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for rank, steps in two_processes.steps.items():
        sizes = [len(step["rows"]) for step in steps]
        assert sizes == [BATCH * ACCUMULATION, BATCH * ACCUMULATION, BATCH] * EPOCHS, (rank, sizes)


def test_each_epoch_trains_on_every_row_once_across_the_ranks(two_processes):
    dataset = Counter(two_processes.dataset)
    assert len(dataset) == ROWS == len(two_processes.dataset)  # distinct rows: a hash identifies its row
    for epoch in range(EPOCHS):
        per_rank = {rank: [row for step in steps if (step["step"] - 1) // STEPS_PER_EPOCH == epoch
                           for row in step["rows"]] for rank, steps in two_processes.steps.items()}
        assert not set(per_rank[0]) & set(per_rank[1]), epoch  # no row on both ranks
        assert Counter(per_rank[0] + per_rank[1]) == dataset, epoch  # none twice, none skipped
    epochs = [[row for step in two_processes.steps[0] if (step["step"] - 1) // STEPS_PER_EPOCH == e
               for row in step["rows"]] for e in range(EPOCHS)]
    assert epochs[0] != epochs[1]  # the sampler reshuffles per epoch


def test_the_logged_loss_is_the_mean_over_the_ranks(two_processes):
    logged = logged_rows(two_processes.out)
    for step, row in logged.items():
        per_rank = [sum(s["losses"]) for rank in range(WORLD) for s in two_processes.steps[rank] if s["step"] == step]
        assert len(per_rank) == WORLD, step
        assert row["loss"] == pytest.approx(sum(per_rank) / WORLD, rel=1e-4), (step, per_rank)
        assert row["loss"] < 0.75 * sum(per_rank), step  # not the sum of the ranks' losses


def test_only_rank_0_writes_logs_reports_samples_and_the_model(two_processes):
    out, writes = two_processes.out, two_processes.writes
    # rank 1's only files: its RNG state in each checkpoint (each rank resumes its own random stream), and the
    # preflight's write check (an unnamed O_TMPFILE file opened on output_dir itself: "."), made on every rank
    assert sorted(writes[1]) == [".", *(f"checkpoint-{step}/rng_state_1.pth" for step in (2, 4, 6))], writes[1]
    written = set(writes[0])
    for name in ("lmtrain_config.json", "data_report.json", "samples.jsonl", "trainer_state.json", "all_results.json",
                 "lmtrain_complete.tmp", "model.safetensors", "checkpoint-2/model.safetensors",
                 "checkpoint-2/optimizer.pt", "checkpoint-2/rng_state_0.pth",
                 "checkpoint-4/lmtrain_checkpoint.json.tmp", "training_curves.png"):
        assert name in written, name  # the audit sees what rank 0 writes (lmtrain_complete: written, then renamed)
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one TensorBoard run, not one per rank
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert Counter(s["step"] for s in samples) == {step: 1 for step in range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2)}
    assert (out / "training_curves.png").is_file() and (out / "model.safetensors").is_file()
    logged = [line for line in two_processes.log.splitlines() if line.startswith("{'loss'")]
    assert len(logged) == EPOCHS * STEPS_PER_EPOCH, logged  # each step's log line printed once


# --- resume checks: fast, without DeepSpeed --------------------------------------------------------------

def fake_checkpoint(out: Path, step: int, world_size: int, zero_stage, global_batch: int, universal=False) -> Path:
    from lmtrain.training.checkpoints import write_checkpoint_marker

    path = out / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "latest").write_text(f"global_step{step}")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if universal:
        (path / f"global_step{step}_universal").mkdir()
        (path / "latest_universal").write_text(f"global_step{step}_universal")
    write_checkpoint_marker(path, step, world_size, zero_stage, extra={"global_batch": global_batch})
    return path


def run_args(out: Path, world_size=1, batch=4, accumulation=1, deepspeed="ds_configs/zero2.json"):
    return SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False,
                           logging_dir=None, process_index=0, world_size=world_size,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                           deepspeed=deepspeed, hf_deepspeed_config=SimpleNamespace(config={}))


def test_a_zero_checkpoint_of_another_world_size_stops_with_the_command_to_run(tmp_path):
    from lmtrain.errors import UserError
    from lmtrain.training.checkpoints import resolve_resume

    path = fake_checkpoint(tmp_path, 8, world_size=2, zero_stage=2, global_batch=8)
    with pytest.raises(UserError, match=r"written by 2 processes under ZeRO-2 and this run has 1.*\n.*lmtrain "
                                        rf"convert-checkpoint --checkpoint {path} --to universal"):
        resolve_resume(run_args(tmp_path, world_size=1, batch=4, accumulation=2))
    args = run_args(tmp_path, world_size=2, batch=2, accumulation=2)  # the same world and global batch: fine
    assert resolve_resume(args) == str(path) and "checkpoint" not in args.hf_deepspeed_config.config


def test_a_resume_with_another_global_batch_stops_before_loading(tmp_path):
    from lmtrain.errors import UserError
    from lmtrain.training.checkpoints import resolve_resume

    fake_checkpoint(tmp_path, 8, world_size=1, zero_stage=None, global_batch=8)
    with pytest.raises(UserError, match=r"global batch of 8 rows per step and this run's is 4 \(4 per device x 1 "
                                        r"accumulation x 1 processes\).*--global_batch_size 8"):
        resolve_resume(run_args(tmp_path, deepspeed=None))


def test_a_universal_checkpoint_loads_on_another_world_size_through_deepspeed_only(tmp_path):
    from lmtrain.errors import UserError
    from lmtrain.training.checkpoints import resolve_resume

    path = fake_checkpoint(tmp_path, 8, world_size=2, zero_stage=2, global_batch=8, universal=True)
    args = run_args(tmp_path, world_size=1, batch=4, accumulation=2)
    assert resolve_resume(args) == str(path)
    assert args.hf_deepspeed_config.config["checkpoint"] == {"load_universal": True}
    with pytest.raises(UserError, match="universal checkpoint .*add --deepspeed"):
        resolve_resume(run_args(tmp_path, world_size=1, batch=4, accumulation=2, deepspeed=None))


def test_convert_checkpoint_refuses_a_checkpoint_without_zero_states(tmp_path):
    from lmtrain.cli.convert_checkpoint import main
    from lmtrain.errors import UserError
    from lmtrain.training.checkpoints import write_checkpoint_marker

    path = tmp_path / "checkpoint-2"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x")
    write_checkpoint_marker(path, 2, 1, None)
    with pytest.raises(UserError, match="no DeepSpeed ZeRO states.*resumes on any number of processes as it is"):
        main(["--checkpoint", str(path), "--to", "universal"])
    with pytest.raises(UserError, match="not a complete checkpoint"):
        main(["--checkpoint", str(tmp_path / "checkpoint-9"), "--to", "universal"])
    with pytest.raises(UserError, match="--to hf needs --output_dir"):
        main(["--checkpoint", str(path), "--to", "hf"])


# --- DeepSpeed on the CPU (one process): universal checkpoints and the ZeRO-3 export ----------------------

DS_STEPS, DS_SAVE = 6, 3


@pytest.fixture(scope="module")
def deepspeed_runs(inputs):
    """Side by side: ZeRO-2 and ZeRO-3 uninterrupted (the references), and each stopped at step 3
    (--stop_after_steps, a checkpoint there); commands[name] continues a stopped run."""
    root, args = inputs

    def command(config, out, *extra):
        return [sys.executable, "pretrain.py", "--deepspeed", f"ds_configs/{config}", *args(
            root / out, "--per_device_train_batch_size", "2", "--max_steps", str(DS_STEPS), "--save_steps",
            str(DS_SAVE), "--validation_split_percentage", "0", "--include_num_input_tokens_seen", "true",
            "--report_to", "none", "--plot_curves", "false", *extra)]

    commands = {"reference": command("zero2.json", "ds-reference"), "resumed": command("zero2.json", "ds-resumed"),
                "zero3-reference": command("zero3.json", "ds-zero3-reference"), "zero3": command("zero3.json", "ds-zero3")}
    first = {name: argv + (["--stop_after_steps", str(DS_SAVE)] if name in ("resumed", "zero3") else [])
             for name, argv in commands.items()}
    processes = {name: subprocess.Popen(argv, cwd=REPO, env=clean_environment(), text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT) for name, argv in first.items()}
    for name, process in processes.items():
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, f"{name}:\n{output[-4000:]}"
    return root, commands


def curve(out: Path) -> dict[int, tuple]:
    return {step: (row["loss"], row["grad_norm"], row["learning_rate"], row["num_input_tokens_seen"])
            for step, row in logged_rows(out).items()}


@pytest.mark.slow
def test_a_zero2_checkpoint_resumes_from_its_universal_copy_alone(deepspeed_runs):
    """Converted, then the original ZeRO optimizer partition deleted (and the completion marker rewritten to
    match): the resumed run can only have read the universal copy, and it continues the uninterrupted run
    exactly (steps 5 and 6 depend on the restored Adam moments, not only the weights)."""
    from lmtrain.cli.convert_checkpoint import main as convert
    from lmtrain.training.checkpoints import read_checkpoint_marker, write_checkpoint_marker

    root, commands = deepspeed_runs
    checkpoint = root / "ds-resumed" / f"checkpoint-{DS_SAVE}"
    assert read_checkpoint_marker(checkpoint)["global_batch"] == 2
    universal = Path(convert(["--checkpoint", str(checkpoint), "--to", "universal", "--workers", "1"]))
    assert universal == checkpoint / f"global_step{DS_SAVE}_universal" and (universal / "zero").is_dir()
    record = read_checkpoint_marker(checkpoint)
    assert record["universal"] == universal.name and any(name.startswith(universal.name) for name in record["files"])
    for partition in (checkpoint / f"global_step{DS_SAVE}").glob("*optim_states.pt"):
        partition.unlink()
    write_checkpoint_marker(checkpoint, DS_SAVE, 1, 2, extra={k: record[k] for k in ("global_batch", "universal")})

    resumed = subprocess.run(commands["resumed"], cwd=REPO, env=clean_environment(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resuming from the universal checkpoint {checkpoint}/{universal.name}" in resumed.stdout
    reference, continued = curve(root / "ds-reference"), curve(root / "ds-resumed")
    assert sorted(continued) == list(range(1, DS_STEPS + 1))
    for step in range(DS_SAVE + 1, DS_STEPS + 1):
        loss, grad_norm, rate, tokens = continued[step]
        assert loss == pytest.approx(reference[step][0], rel=1e-5), step
        assert grad_norm == pytest.approx(reference[step][1], rel=1e-4), step
        assert rate == reference[step][2] and tokens == reference[step][3], step  # the consumed-token count


@pytest.mark.slow
def test_zero3_export_through_zero_to_fp32_equals_the_engine_weights_with_tied_embeddings(deepspeed_runs, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmtrain.cli.convert_checkpoint import main as convert
    from lmtrain.training.checkpoints import read_checkpoint_marker

    root, _ = deepspeed_runs
    checkpoint = root / "ds-zero3" / f"checkpoint-{DS_SAVE}"
    assert read_checkpoint_marker(checkpoint)["zero_stage"] == 3
    exported = Path(convert(["--checkpoint", str(checkpoint), "--to", "hf", "--output_dir", str(tmp_path / "hf")]))
    # The engine's weights: gathered from the partitions by the engine for the checkpoint's model.safetensors
    # (stage3_gather_16bit_weights_on_model_save; fp32 on a CPU).
    engine = load_file(checkpoint / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(exported)
    state = model.state_dict()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert {name for name in engine} <= set(state)
    for name, tensor in engine.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    initial = AutoModelForCausalLM.from_config(model.config)
    assert any(not torch.equal(state[n], t) for n, t in initial.state_dict().items() if n in state)  # not a fresh init
    assert (exported / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_from_its_universal_copy_with_the_same_weights(deepspeed_runs):
    """What DeepSpeed 0.19.8 gives for ZeRO-3 (pinned, documented in docs/MULTI_GPU.md): the weights and the
    consumed-token count come back exactly (the first resumed step's loss is the uninterrupted run's), the
    following steps differ slightly (ZeRO-3's regular resume is exact: tests/test_resume_matrix.py). Its
    universal loader gives every parameter group the first group's hyperparameters (stage3.py
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), which the resume warns about."""
    from lmtrain.cli.convert_checkpoint import main as convert

    root, commands = deepspeed_runs
    checkpoint = root / "ds-zero3" / f"checkpoint-{DS_SAVE}"
    convert(["--checkpoint", str(checkpoint), "--to", "universal", "--workers", "1"])
    resumed = subprocess.run(commands["zero3"], cwd=REPO, env=clean_environment(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "ZeRO-3 universal checkpoint" in resumed.stdout and "first parameter group" in resumed.stdout
    reference, continued = curve(root / "ds-zero3-reference"), curve(root / "ds-zero3")
    assert sorted(continued) == list(range(1, DS_STEPS + 1))
    first = DS_SAVE + 1
    assert continued[first][0] == pytest.approx(reference[first][0], rel=1e-6)  # the weights came back
    for step in range(first, DS_STEPS + 1):
        assert continued[step][0] == pytest.approx(reference[step][0], rel=1e-4), step  # close, not equal
        assert continued[step][2:] == reference[step][2:], step  # learning rate, consumed tokens
