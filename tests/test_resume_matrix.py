"""Resume equivalence matrix (issue 12.2): a run stopped and resumed trains exactly like the uninterrupted
run: the same per-step loss, learning rate and grad norm (trainer_state.json, logging_steps 1) and the same
samples at every step (tests/resume_probe.py records a hash of every training row per optimizer step).

Stops: mid-epoch (--stop_after_steps), SIGKILL during a micro-batch in the middle of gradient accumulation
(resumed from the last periodic checkpoint), at an epoch boundary, and twice in a row; without DeepSpeed,
with ZeRO-2 and ZeRO-3; pretraining and SFT. One uninterrupted reference per configuration (module scope)
serves every stop point. The default run holds a subset (every stop without DeepSpeed for pretraining,
mid-epoch and twice for SFT, one stop each for ZeRO-2/ZeRO-3 pretraining and ZeRO-2 SFT); the other cells
are marked `slow`: `python -m pytest -m slow tests/test_resume_matrix.py`.

Tiny model, 2 rows x 2 accumulation steps, 24 training rows: 6 optimizer steps per epoch, 14 steps in all
(the run crosses two epoch boundaries and the sampler reshuffles at each)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import resume_probe
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "resume_probe.py"
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
BATCH, ACCUMULATION, ROWS, STEPS = 2, 2, 24, 14
STEPS_PER_EPOCH = ROWS // (BATCH * ACCUMULATION)
SAVE_STEPS = 4
# stop name -> how the run is cut: ("stop", [N, ...]) one run per N with --stop_after_steps N, then the
# same command to the end; ("kill", (STEP, MICRO)) SIGKILL in micro-batch MICRO of STEP, then the same command.
STOPS = {"mid_epoch": ("stop", [3]), "epoch_boundary": ("stop", [STEPS_PER_EPOCH]), "twice": ("stop", [5, 4]),
         "mid_accumulation": ("kill", (6, 1))}
DEEPSPEED = {"none": None, "zero2": "zero2.json", "zero3": "zero3.json"}
WORDS = "the king is dead long live the queen what is two plus three five answer briefly to be or not".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-matrix")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:8]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = random.Random(0)
    chats = root / "chat.jsonl"
    with open(chats, "w") as handle:
        for _ in range(40):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} + {b} ?"},
                                                  {"role": "assistant", "content": f"{a + b} {answer}"}]}) + "\n")
    tokenizer = train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                                    show_progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return root, corpus, chats


def run_args(inputs, stage: str, deepspeed: str | None, out: Path) -> list[str]:
    root, corpus, chats = inputs
    common = ["--per_device_train_batch_size", str(BATCH), "--gradient_accumulation_steps", str(ACCUMULATION),
              "--max_train_samples", str(ROWS), "--max_steps", str(STEPS), "--learning_rate", "3e-3",
              "--warmup_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps",
              str(SAVE_STEPS), "--report_to", "none", "--seed", "7", "--dataloader_num_workers", "0",
              "--disable_tqdm", "true", "--plot_curves", "false", "--output_dir", str(out),
              # A cache per run: a DeepSpeed reference prepares beside the interrupted run, and two processes
              # writing one preparation cache at the same moment collide on its temporary files.
              "--prepared_cache_dir", str(out.parent / "cache")]
    if deepspeed:
        common += ["--deepspeed", str(REPO / "ds_configs" / deepspeed)]
    if stage == "pretrain":
        return ["--tokenizer_name", str(root / "tokenizer"), "--train_files", str(corpus), "--block_size", "32",
                "--config_name", "qwen2-tiny", "--config_overrides", TINY, "--validation_split_percentage", "0",
                *common]
    return ["--tokenizer_name", str(root / "tokenizer"), "--config_name", "qwen2-tiny", "--config_overrides", TINY,
            "--train_files", str(chats), "--max_length", "48", "--validation_split_percentage", "0", *common]


def train(inputs, stage: str, deepspeed: str | None, out: Path, log: Path, *extra: str, kill_at=None,
          wait: bool = True):
    """One run; in process without DeepSpeed (unless it must be killed), else in a subprocess. Returns the
    exit status (-9 for a killed process), or with wait=False the running subprocess."""
    argv = run_args(inputs, stage, deepspeed, out) + list(extra)
    if deepspeed is None and kill_at is None:
        from lmtrain.cli.pretrain import main as pretrain_main
        from lmtrain.cli.sft import main as sft_main

        uninstall = resume_probe.install(log)
        try:
            (pretrain_main if stage == "pretrain" else sft_main)(argv)
        finally:
            uninstall()
        return 0
    kill = "-" if kill_at is None else f"{kill_at[0]}:{kill_at[1]}"
    with open(f"{log}.stderr", "a") as stderr:  # a file, not a pipe: nobody reads it while the run goes on
        process = subprocess.Popen([sys.executable, str(PROBE), stage, str(log), kill, *argv], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    process.stderr_path = f"{log}.stderr"
    return process if not wait else finished(process)


def finished(process: subprocess.Popen) -> int:
    process.wait(timeout=600)
    assert process.returncode in (0, -9), Path(process.stderr_path).read_text()[-3000:]
    return process.returncode


def curve(out: Path) -> dict[int, tuple]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {row["step"]: (row["loss"], row["learning_rate"], row["grad_norm"]) for row in history if "loss" in row}


_references: dict[tuple, tuple] = {}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """reference(stage, deepspeed) -> (curve, samples) of the uninterrupted run, made once per module.
    reference(stage, deepspeed, start=True) only starts it: a DeepSpeed reference then runs in its
    subprocess while the test makes the interrupted run (DeepSpeed runs are mostly start-up time)."""
    def get(stage: str, deepspeed: str | None, start: bool = False):
        key = (stage, deepspeed)
        if key not in _references:
            out = tmp_path_factory.mktemp(f"reference-{stage}-{deepspeed or 'none'}")
            _references[key] = (out, train(inputs, stage, deepspeed, out / "run", out / "samples.jsonl",
                                           wait=deepspeed is None))
        out, state = _references[key]
        if start:
            return None
        if isinstance(state, subprocess.Popen):
            finished(state)
            _references[key] = (out, 0)
        return curve(out / "run"), resume_probe.read_log(out / "samples.jsonl")

    yield get
    _references.clear()


def cell(stage: str, ds: str, stop: str, default: bool):
    return pytest.param(stage, ds, stop, id=f"{stage}-{ds}-{stop}", marks=() if default else pytest.mark.slow)


DEFAULT_CELLS = {("pretrain", "none", stop) for stop in STOPS} | {
    ("sft", "none", "mid_epoch"), ("sft", "none", "twice"), ("pretrain", "zero2", "mid_accumulation"),
    ("pretrain", "zero3", "mid_epoch"), ("sft", "zero2", "mid_epoch")}
CELLS = [cell(stage, ds, stop, (stage, ds, stop) in DEFAULT_CELLS)
         for stage in ("pretrain", "sft") for ds in DEEPSPEED for stop in STOPS]


@pytest.mark.parametrize("stage,ds,stop", CELLS)
def test_resumed_run_equals_the_uninterrupted_run(inputs, reference, tmp_path, stage, ds, stop):
    reference(stage, DEEPSPEED[ds], start=True)
    out, log = tmp_path / "run", tmp_path / "samples.jsonl"
    kind, value = STOPS[stop]
    resumed_at = []  # the step each resumed run starts after
    if kind == "kill":
        assert train(inputs, stage, DEEPSPEED[ds], out, log, kill_at=value) == -9
        assert not (out / "trainer_state.json").exists() and (out / f"checkpoint-{SAVE_STEPS}").is_dir()
        resumed_at.append(SAVE_STEPS)  # the newest checkpoint before the killed step
        first_records = len(resume_probe.read_log(log))
        train(inputs, stage, DEEPSPEED[ds], out, log)
    else:
        for steps in value:
            train(inputs, stage, DEEPSPEED[ds], out, log, "--stop_after_steps", str(steps))
            resumed_at.append(sum(resumed_at[-1:]) + steps)
        train(inputs, stage, DEEPSPEED[ds], out, log)
    if stop == "twice":
        assert len(resumed_at) >= 2

    expected_curve, expected_samples = reference(stage, DEEPSPEED[ds])
    assert sorted(expected_curve) == list(range(1, STEPS + 1))
    got_curve, got_samples = curve(out), resume_probe.read_log(log)
    for step in range(1, STEPS + 1):
        assert got_curve[step] == expected_curve[step], (
            f"step {step} (resumed after {resumed_at}): loss, lr, grad norm {got_curve[step]} != uninterrupted "
            f"{expected_curve[step]}")
        assert got_samples[step]["rows"] == expected_samples[step]["rows"], f"step {step}: other samples"
    rows_per_step = BATCH * ACCUMULATION
    for step in resumed_at:
        # Skipping the batches already trained reads no rows: the first resumed step has read its own rows
        # (and at most the dataloader's one batch of look-ahead), never the skipped ones.
        assert got_samples[step + 1]["read"] <= rows_per_step + BATCH, got_samples[step + 1]
    if kind == "kill":
        assert first_records >= value[0]  # the killed run had started the step it was killed in
