"""generate.py, evaluate.py and export.py as a new user meets them (issue 9): greedy decoding that is the same
in every tool and equal to a hand-written argmax loop; missing model paths that are one message and never a
hub lookup; export refusing a file as its output directory; held-out chat files in the training formats;
empty inputs refused; streaming headers; the empty prompt; leaving --interactive; dtype spellings."""
from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import evaluate
import export
import generate
from lmtrain.errors import UserError
from lmtrain.evaluation import greedy_chat_answers, load_chat_eval
from lmtrain.generation import SamplingArguments, chat_loop, encode_prompts, load_for_inference
from lmtrain.locations import looks_local, parse_dtype
from lmtrain.model.config import resolve_config
from lmtrain.tokenizer import IM_END, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
NEW_TOKENS = 12
GREEDY_FLAGS = ["--do_sample", "false", "--max_new_tokens", str(NEW_TOKENS)]
PLAIN_PROMPTS = ["ROMEO.", "To be, or not to be", "O Romeo, Romeo"]
QUESTIONS = ["What is 18 + 8?", "Who loves Romeo?"]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A random tiny Qwen2 and its tokenizer; generation_config as from_config makes it (no stop tokens)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tokenizer)}"))
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(str(model_dir))


def argmax_loop(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = NEW_TOKENS) -> str:
    """The reference: one full forward pass per token, the most likely next token, until a stop token."""
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)}
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            ids.append(token)
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def run_script(script: str, *args: str, cwd=None, env=None, stdin: str | None = None, timeout: int = 300):
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                   "HF_HOME": os.environ["HF_HOME"], **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=environment, input=stdin, timeout=timeout)


def assert_one_message(result, *needles: str):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]


# --- 9.5: greedy is greedy, and the same everywhere ------------------------------------------------------

def test_generate_greedy_equals_an_argmax_loop(model_dir, loaded):
    model, tokenizer = loaded
    texts = generate.main(["--model", str(model_dir), "--prompt", *PLAIN_PROMPTS, *GREEDY_FLAGS])
    reference = [argmax_loop(model, tokenizer, tokenizer(p).input_ids) for p in PLAIN_PROMPTS]
    assert texts == reference
    # a random model repeats itself, so a hidden repetition penalty could not go unnoticed
    assert any(len(set(tokenizer(t, add_special_tokens=False).input_ids)) < len(tokenizer(t).input_ids)
               for t in reference)


def test_chat_answers_agree_between_generate_evaluate_and_argmax(model_dir, loaded, write_jsonl, tmp_path):
    model, tokenizer = loaded
    generated = generate.main(["--model", str(model_dir), "--chat_template", "--prompt", *QUESTIONS, *GREEDY_FLAGS])
    reference = [argmax_loop(model, tokenizer, chat_ids(tokenizer, q)) for q in QUESTIONS]
    assert generated == reference
    records = [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in zip(QUESTIONS, reference)]
    answers = greedy_chat_answers(model, tokenizer, records, max_new_tokens=NEW_TOKENS)
    assert [a for a, _ in answers] == [r.strip() for r in reference]
    results = evaluate.main(["--model", str(model_dir), "--sft_eval_file", write_jsonl(records),
                             "--max_new_tokens", str(NEW_TOKENS), "--output_json", str(tmp_path / "r.json")])
    assert results["exact_match"]["accuracy"] == 1.0


def test_repetition_penalty_applies_only_when_given():
    assert SamplingArguments(do_sample=False).generate_kwargs()["repetition_penalty"] == 1.0
    assert SamplingArguments(do_sample=False, repetition_penalty=1.3).generate_kwargs()["repetition_penalty"] == 1.3
    with pytest.raises(UserError, match="repetition_penalty"):
        generate.main(["--repetition_penalty", "0"])


# --- 9.6: model and tokenizer locations -----------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Any call into transformers' loaders (and so the hub) fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a loader was called with {args}: a local-looking path must not reach the hub")

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("name", ["outputs/nope", "outputs/demo/sft", "./nope", "nope/", "~/lmtrain-no-such-dir",
                                  "model/config.json"])
def test_missing_local_paths_are_one_message_without_loading(name, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/nope` next to an outputs/ folder is a path, not a hub org
    assert looks_local(name)
    for call in (lambda: generate.main(["--model", name]),
                 lambda: evaluate.main(["--model", name, "--eval_files", "x"]),
                 lambda: export.main(["--model", name, "--output_dir", "out"]),
                 lambda: load_tokenizer(name)):
        with pytest.raises(UserError, match=f"no such (file or )?directory: {name}"):
            call()
    assert not (tmp_path / "out").exists()


def test_hub_like_names_go_to_the_hub_and_fail_in_one_message(monkeypatch):
    import transformers

    assert not looks_local("Qwen/Qwen2.5-0.5B") and not looks_local("gpt2")

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import lmtrain.locations

    monkeypatch.setattr(lmtrain.locations, "_hub_unreachable", lambda: None)  # reachable, but the load fails
    with pytest.raises(UserError, match=r"could not load 'someorg/somemodel' from the hub \(offline\?\): We couldn't"):
        load_tokenizer("someorg/somemodel")
    with pytest.raises(UserError, match="--config_name: no such directory: someorg/cfg, and could not load"):
        resolve_config("someorg/cfg")
    # an unreachable hub: straight to the cache (local_files_only), no minute of retries
    seen = {}

    def cache_only(name, *args, **kwargs):
        seen.update(kwargs)
        raise OSError("not in the cache")

    monkeypatch.setattr(lmtrain.locations, "_hub_unreachable", lambda: "https://huggingface.co: no route")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", cache_only)
    with pytest.raises(UserError, match=r"cannot be reached from here \(https://huggingface.co: no route\) and the "
                                        r"Hugging Face cache does not hold it"):
        load_tokenizer("someorg/somemodel")
    assert seen.get("local_files_only") is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and not cached: refused before any loader runs
    with pytest.raises(UserError, match="offline mode .* does not hold 'someorg/somemodel'"):
        generate.main(["--model", "someorg/somemodel"])


def test_directories_that_are_not_models(model_dir, tmp_path, no_loading):
    run = tmp_path / "run"
    (run / "checkpoint-20").mkdir(parents=True)
    (run / "checkpoint-20" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"run has no config.json.*not a model directory.*checkpoint-20"):
        generate.main(["--model", str(run)])
    tokenizer_less = tmp_path / "weights-only"
    tokenizer_less.mkdir()
    (tokenizer_less / "config.json").write_text("{}")
    with pytest.raises(UserError, match="weights-only has no tokenizer.json .*not a tokenizer directory"):
        generate.main(["--model", str(tokenizer_less)])
    with pytest.raises(UserError, match="is a file, not a model directory"):
        generate.main(["--model", str(model_dir / "config.json")])


class ConnectionCounter:
    """A local TCP listener standing in for the hub (HF_ENDPOINT): counts every connection attempt."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self):
        while self.running:
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.server.close()


def test_missing_model_in_a_subprocess_is_fast_and_never_contacts_the_hub(tmp_path):
    (tmp_path / "outputs").mkdir()
    hub = ConnectionCounter()
    try:  # no offline mode: on the old code this retried against the endpoint for about a minute
        env = {"HF_ENDPOINT": hub.endpoint}
        started = time.monotonic()
        generated = run_script("generate.py", "--model", "outputs/demo/sft", cwd=tmp_path, env=env)
        tokenizer = run_script("data_prep/prepare_pretrain.py", "--tokenizer_name", "outputs/nope",
                               "--output_dir", "data/x", "--sources", "x.jsonl", cwd=tmp_path, env=env)
        elapsed = time.monotonic() - started
    finally:
        hub.close()
    assert_one_message(generated, "--model: no such directory: outputs/demo/sft")
    assert_one_message(tokenizer, "no such directory: outputs/nope")
    assert hub.connections == 0
    assert elapsed < 120  # two interpreter starts; each hub retry cycle alone took ~25 s

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the hub is unreachable
    started = time.monotonic()
    hub_name = run_script("generate.py", "--model", "someorg/somemodel",
                          env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert_one_message(hub_name, "no such directory: someorg/somemodel", "cannot be reached from here")
    assert "Retrying" not in hub_name.stderr and time.monotonic() - started < 60  # ~25 s of retries before


# --- 9.7: export --------------------------------------------------------------------------------------

def test_export_refuses_a_file_as_output_dir_before_loading(model_dir, tmp_path, no_loading):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(UserError, match="--output_dir .*afile is a file"):
        export.main(["--model", str(model_dir), "--output_dir", str(afile)])
    with pytest.raises(UserError, match="afile is a file, so the directory cannot be created"):
        export.main(["--model", str(model_dir), "--output_dir", str(afile / "inside")])
    assert afile.read_text() == "keep me"
    with pytest.raises(UserError, match="--adapter: no such directory"):
        export.main(["--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--output_dir", "x"])
    with pytest.raises(UserError, match="--adapter: .* has no adapter_config.json: not a LoRA adapter directory"):
        export.main(["--model", str(model_dir), "--adapter", str(model_dir), "--output_dir", "x"])
    with pytest.raises(UserError, match="--dtype 'int8' is not a dtype: use one of auto, bf16"):
        export.main(["--model", str(model_dir), "--output_dir", "x", "--dtype", "int8"])


def test_export_file_output_dir_in_a_subprocess(model_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    result = run_script("export.py", "--model", str(model_dir), "--output_dir", str(afile),
                        env={"HF_HUB_OFFLINE": "1"})
    assert_one_message(result, "is a file")
    assert "exported" not in result.stdout


@pytest.mark.parametrize("spelling, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                             ("auto", torch.float32)])
def test_export_dtype_spellings(model_dir, tmp_path, spelling, dtype):
    from safetensors.torch import load_file

    export.main(["--model", str(model_dir), "--output_dir", str(tmp_path / spelling), "--dtype", spelling])
    assert {t.dtype for t in load_file(str(tmp_path / spelling / "model.safetensors")).values()} == {dtype}


# --- 9.16: dtype spellings -----------------------------------------------------------------------------

def test_dtype_spellings():
    expected = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "BF16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                "torch.bfloat16": torch.bfloat16, "auto": "auto"}
    assert {s: parse_dtype(s) for s in expected} == expected
    for bad in ("bf8", "int8", "fp64"):
        with pytest.raises(UserError, match="is not a dtype: use one of auto, bf16, bfloat16, fp16"):
            parse_dtype(bad)


def test_generate_dtype_bf16(model_dir, no_loading):
    with pytest.raises(UserError, match="--dtype 'bf17' is not a dtype"):
        generate.main(["--model", str(model_dir), "--dtype", "bf17"])  # refused before loading


def test_load_for_inference_bf16(model_dir):
    model, _ = load_for_inference(str(model_dir), "bf16")
    assert model.dtype == torch.bfloat16


# --- 9.9 / 9.12: evaluate.py inputs ----------------------------------------------------------------------

def test_evaluate_accepts_the_training_formats(model_dir, loaded, write_jsonl, tmp_path):
    model, tokenizer = loaded
    question = QUESTIONS[0]
    answer = argmax_loop(model, tokenizer, chat_ids(tokenizer, question)).strip()
    system = "You are terse."
    with_system = argmax_loop(model, tokenizer, tokenizer(tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False).input_ids).strip()
    records = [
        {"task": "eval-format", "messages": [{"role": "user", "content": question}], "answer": answer},
        {"task": "openai", "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]},
        {"task": "sharegpt", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
        {"task": "alpaca", "instruction": question, "output": answer},
        {"task": "alpaca-system", "instruction": question, "output": with_system, "system": system},
        {"task": "wrong", "instruction": question, "output": answer + " not this"},
    ]
    path = write_jsonl(records)
    loaded_records = load_chat_eval(path)
    assert [r["messages"] for r in loaded_records[:4]] == [[{"role": "user", "content": question}]] * 4
    assert loaded_records[4]["messages"][0] == {"role": "system", "content": system}
    results = evaluate.main(["--model", str(model_dir), "--sft_eval_file", path, "--max_new_tokens", str(NEW_TOKENS),
                             "--output_json", str(tmp_path / "results.json")])
    per_task = results["exact_match"]["per_task"]
    assert {task: row["correct"] for task, row in per_task.items()} == {
        "eval-format": 1, "openai": 1, "sharegpt": 1, "alpaca": 1, "alpaca-system": 1, "wrong": 0}


@pytest.mark.parametrize("lines, message", [
    ([{"messages": [{"role": "user", "content": "q"}], "answer": "a"}, '{"messages": [broken'],
     r"data.jsonl:2: malformed JSON"),
    ([{"messages": [{"role": "user", "content": "q"}]}],
     r"data.jsonl:1: without an 'answer' field the last message must be the assistant's answer"),
    ([{"question": "q", "reply": "a"}], r"data.jsonl:1: found fields \['question', 'reply'\]; expected .*'answer'"),
    ([{"messages": [{"role": "user", "content": "q"}], "answer": 5}], r"data.jsonl:1: field 'answer' must be a string"),
    ([{"conversations": [{"from": "alien", "value": "q"}]}], r"data.jsonl:1: ShareGPT turns need 'from'"),
    ([], r"holds no records"),
])
def test_bad_chat_eval_files_name_file_and_line(lines, message, write_jsonl, no_loading):
    path = write_jsonl(lines)
    with pytest.raises(UserError, match=message):
        evaluate.main(["--model", "unused-model", "--sft_eval_file", path])  # refused before loading


def test_empty_eval_files(model_dir, write_jsonl, tmp_path, caplog):
    empty = write_jsonl([], "empty.jsonl")
    with pytest.raises(UserError, match=r"no documents to score in 'empty' \(.*empty.jsonl\)"):
        evaluate.main(["--model", str(model_dir), "--eval_files", empty, "--output_json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
    good = write_jsonl([{"text": "ROMEO. He jests at scars that never felt a wound."}], "good.jsonl")
    caplog.clear()
    with caplog.at_level("WARNING"):
        results = evaluate.main(["--model", str(model_dir), "--eval_files", empty, good,
                                 "--output_json", str(tmp_path / "r.json")])
    assert "source:good" in results["text"] and "source:empty" not in results["text"]
    assert results["text"]["all"]["documents"] == 1
    about_empty = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "empty" in r.getMessage()]
    assert len(about_empty) == 1 and "empty.jsonl" in about_empty[0] and "skipped" in about_empty[0], about_empty


def test_chat_eval_reads_through_the_shared_strict_reader(write_jsonl):
    good = {"messages": [{"role": "user", "content": "q"}], "answer": "a"}
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid UTF-8"):
        load_chat_eval(write_jsonl([good, b'{"prompt": "\xff", "answer": "a"}'], "bad.jsonl"))
    bom = write_jsonl([b"\xef\xbb\xbf" + json.dumps(good).encode(), good], "bom.jsonl")
    assert [r["answer"] for r in load_chat_eval(bom)] == ["a", "a"]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": ["q"]}], "answer": "a"}, r"content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}]}, r"content must be a string"),
    ({"messages": [{"role": "wizard", "content": "q"}], "answer": "a"}, r"unknown role\(s\) \['wizard'\]"),
    ({"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"unknown role\(s\) \['wizard'\]"),
])
def test_chat_eval_refuses_what_training_refuses(record, message, write_jsonl):
    path = write_jsonl([record])
    with pytest.raises(UserError, match=r"data.jsonl:1: .*" + message):
        load_chat_eval(path)


def test_generate_file_non_utf8_line_names_file_and_line(write_jsonl, tmp_path, no_loading):
    from lmtrain.generation import generate_file

    path = write_jsonl([b'{"prompt": "\xff"}'], "p.jsonl")
    with pytest.raises(UserError, match=r"p.jsonl:1: not valid UTF-8"):
        generate_file(None, None, path, str(tmp_path / "out.jsonl"), SamplingArguments(), chat=False)
    with pytest.raises(UserError, match=r"p.jsonl:1: not valid UTF-8"):
        generate.main(["--model", "unused", "--prompts_file", path])
    bom = write_jsonl([b'\xef\xbb\xbf{"prompt": "x"}'], "bom.jsonl")
    from lmtrain.generation import read_prompts
    assert read_prompts(bom) == [{"prompt": "x"}]


# --- 9.12 / 9.10 / 9.13: generate.py inputs and outputs --------------------------------------------------

def test_generate_refuses_an_empty_prompts_file(write_jsonl, no_loading):
    empty = write_jsonl([], "empty.jsonl")
    with pytest.raises(UserError, match="empty.jsonl holds no prompts"):
        generate.main(["--model", "unused", "--prompts_file", empty])
    with pytest.raises(UserError, match="--prompts_file: no such file"):
        generate.main(["--model", "unused", "--prompts_file", empty + ".missing"])
    with pytest.raises(UserError, match="--prompt or --prompts_file, not both"):
        generate.main(["--prompt", "x", "--prompts_file", empty])


def test_generate_empty_prompts_file_in_a_subprocess(write_jsonl):
    result = run_script("generate.py", "--prompts_file", write_jsonl([" "], "empty.jsonl"),
                        env={"HF_HUB_OFFLINE": "1"})
    assert_one_message(result, "empty.jsonl holds no prompts")


def test_prompts_with_output_file_are_written(model_dir, tmp_path):
    output = tmp_path / "sub" / "x.jsonl"
    texts = generate.main(["--model", str(model_dir), "--prompt", *PLAIN_PROMPTS[:2], *GREEDY_FLAGS,
                           "--output_file", str(output)])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == [{"prompt": p, "output": t} for p, t in zip(PLAIN_PROMPTS[:2], texts)]


def test_streaming_prints_the_same_as_batch_output(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", *PLAIN_PROMPTS[:2], *GREEDY_FLAGS]
    batch = generate.main(args)
    batch_out = capsys.readouterr().out
    streamed = generate.main(args + ["--stream"])
    stream_out = capsys.readouterr().out
    assert streamed == batch
    assert stream_out == batch_out
    assert stream_out.index(f"=== {PLAIN_PROMPTS[0]}\n{PLAIN_PROMPTS[0]}{batch[0]}") \
        < stream_out.index(f"=== {PLAIN_PROMPTS[1]}\n{PLAIN_PROMPTS[1]}{batch[1]}")


def test_an_empty_prompt_starts_from_the_end_of_text_token(model_dir, loaded):
    model, tokenizer = loaded
    assert tokenizer("").input_ids == []  # no BOS: nothing to condition on without the EOS
    texts = generate.main(["--model", str(model_dir), "--prompt", "", PLAIN_PROMPTS[0], *GREEDY_FLAGS,
                           "--batch_size", "2"])
    assert texts == [argmax_loop(model, tokenizer, [tokenizer.eos_token_id]),
                     argmax_loop(model, tokenizer, tokenizer(PLAIN_PROMPTS[0]).input_ids)]
    # what the model is given: the EOS alone, left-padded next to the other prompt of the batch
    encoded = encode_prompts(tokenizer, ["", PLAIN_PROMPTS[0]], chat=False, device="cpu")
    width = len(tokenizer(PLAIN_PROMPTS[0]).input_ids)
    assert encoded["input_ids"][0].tolist() == [tokenizer.pad_token_id] * (width - 1) + [tokenizer.eos_token_id]
    assert encoded["attention_mask"][0].tolist() == [0] * (width - 1) + [1]
    assert encoded["input_ids"][1].tolist() == tokenizer(PLAIN_PROMPTS[0]).input_ids


# --- 9.14: leaving --interactive -------------------------------------------------------------------------

def scripted_input(monkeypatch, replies):
    """builtins.input answering from `replies`; an exception instance is raised instead."""
    replies = iter(replies)

    def fake_input(prompt=""):
        reply = next(replies)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    monkeypatch.setattr(builtins, "input", fake_input)


def counting_generate(model, monkeypatch, interrupt_first: bool = False):
    calls = []
    original = model.generate

    def generate_(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        if interrupt_first and len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate_)
    return calls


@pytest.mark.parametrize("leave", ["exit", "quit", "/exit", "QUIT", KeyboardInterrupt(), EOFError(), ""])
def test_chat_loop_leaves_without_sending_the_exit_word(loaded, monkeypatch, leave):
    model, tokenizer = loaded
    calls = counting_generate(model, monkeypatch)
    scripted_input(monkeypatch, ["hello", leave, "never read"])
    history = chat_loop(model, tokenizer, SamplingArguments(do_sample=False, max_new_tokens=4))
    assert len(calls) == 1
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"


def test_ctrl_c_during_an_answer_stops_that_answer(loaded, monkeypatch):
    model, tokenizer = loaded
    calls = counting_generate(model, monkeypatch, interrupt_first=True)
    scripted_input(monkeypatch, ["first", "second", "exit"])
    history = chat_loop(model, tokenizer, SamplingArguments(do_sample=False, max_new_tokens=4))
    assert len(calls) == 2  # "exit" is not sent
    # the interrupted turn is dropped, so the template never sees two user turns in a row
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "second"


def test_interactive_subprocess_exits_quietly(model_dir):
    args = ["--model", str(model_dir), "--interactive", "--do_sample", "false", "--max_new_tokens", "4"]
    result = run_script("generate.py", *args, stdin="hello\nexit\nnot read\n", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("assistant> ") == 1

    process = subprocess.Popen([sys.executable, str(REPO / "generate.py"), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout.readline().startswith("chat:")  # the loop is waiting at the prompt
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # Ctrl-C at the prompt
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
