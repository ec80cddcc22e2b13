"""Evaluation and generation: loss / perplexity / bits per byte against a direct computation with the model,
windowed scoring, generation that stops at the end token, batch order, exact-match accuracy, diversity
figures, plots from a real run's logs, and the evaluate.py / generate.py command lines."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluate
import generate
import plot
import pretrain
from lmtrain.errors import UserError
from lmtrain.evaluation import evaluate_text, exact_match
from lmtrain.generation import SamplingArguments, diversity, generate_file, generate_texts
from lmtrain.model.config import resolve_config
from lmtrain.tokenizer import IM_END, load_tokenizer
from test_pretrain import base_args, corpus_and_tokenizer  # noqa: F401 (a fixture)

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
GREEDY = SamplingArguments(max_new_tokens=10, do_sample=False)
QUESTIONS = ["Who loves Romeo?", "What is two plus three?", "Name the prince of Denmark, please."]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    # A private copy: generation and exact match switch padding_side on the tokenizer they are given.
    return load_tokenizer(str(tiny_tokenizer_dir))


def tiny_model(tokenizer, overrides: str = ""):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", f"{TINY},vocab_size={len(tokenizer)}{overrides}")
    # generation_config is left as from_config makes it (no stop tokens): generation must find the
    # tokenizer's end-of-text and end-of-turn tokens itself, as for a model saved by another toolkit.
    return AutoModelForCausalLM.from_config(config).eval()


def scripted_model(tokenizer, successors: dict[int, int]):
    """A real Qwen2 whose greedy next token depends on the current token only: `successors[t]` follows t.

    Attention and MLP outputs are zeroed (o_proj, down_proj), so the last hidden state is the current
    token's embedding; the scripted tokens get orthogonal unit embeddings, and the untied lm_head scores
    `successors[t]` along token t's direction only (other rows zero)."""
    model = tiny_model(tokenizer, ",tie_word_embeddings=False")
    hidden = model.config.hidden_size
    assert len(successors) <= hidden
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.get_input_embeddings().weight, model.lm_head.weight
        head.zero_()
        for axis, (current, following) in enumerate(successors.items()):
            embeddings[current] = 0.0
            embeddings[current, axis] = 1.0
            head[following, axis] = 10.0
    return model


def answering(tokenizer, last_prompt_token: int, answer: str, end: int) -> dict[int, int]:
    """Successors that make a scripted model answer `answer` and then emit `end`; were generation to go on
    past `end`, the answer would start again."""
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    chain = [last_prompt_token, *ids, end]
    assert len(set(chain)) == len(chain), f"{answer!r} repeats a token: pick another answer"
    return {**dict(zip(chain, chain[1:])), end: ids[0]}


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def juliet_model(tokenizer):
    """Answers every chat prompt with "Juliet" followed by the end-of-turn token."""
    last = {tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False).input_ids[-1] for q in QUESTIONS}
    assert len(last) == 1  # every generation prompt ends with the same token ("assistant\n")
    return scripted_model(tokenizer, answering(tokenizer, last.pop(), "Juliet",
                                               tokenizer.convert_tokens_to_ids(IM_END)))


@pytest.fixture(scope="module")
def juliet_model_dir(juliet_model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("juliet-model")
    juliet_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def full_context_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """EOS + the document in one forward pass; the summed cross entropy of every next token."""
    stream = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text).input_ids])
    with torch.no_grad():
        logits = model(input_ids=stream).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, stream[0, 1:], reduction="sum").item(), stream.shape[1] - 1


def windowed_nll(model, tokenizer, text: str, window: int) -> float:
    """Token by token, with lm-evaluation-harness's rolling windows: the token at stream position p belongs
    to the window predicting positions k*window+1 .. end (k = (p-1) // window, end capped at the stream's
    end) and sees the stream from end - window (at least 0) up to p - 1. One context per token, right-padded
    into one batch: causal attention keeps the padding after a context from changing it."""
    stream = [tokenizer.eos_token_id] + tokenizer(text).input_ids
    last = len(stream) - 1

    def start(p: int) -> int:
        return max(0, min(((p - 1) // window + 1) * window, last) - window)

    contexts = [stream[start(p):p] for p in range(1, len(stream))]
    batch = torch.tensor([c + [tokenizer.pad_token_id] * (window - len(c)) for c in contexts])
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    last = logits[torch.arange(len(contexts)), torch.tensor([len(c) - 1 for c in contexts])]
    return torch.nn.functional.cross_entropy(last, torch.tensor(stream[1:]), reduction="sum").item()


def test_text_metrics_equal_a_direct_computation(tokenizer, random_model, write_jsonl):
    model = random_model
    plays = ["ROMEO. But soft, what light through yonder window breaks?",
             "HAMLET. To be, or not to be, that is the question. " * 30]  # 1,560 characters
    chinese = ["莎士比亚写了三十七部戏剧 🎭，其中《哈姆雷特》最有名 🙂。"]
    sources = [f"plays={write_jsonl([{'text': t} for t in plays], 'plays.jsonl')}",
               f"zh={write_jsonl([{'text': t} for t in chinese], 'zh.jsonl')}"]
    results = evaluate_text(model, tokenizer, sources, max_length=1024)

    direct = {text: full_context_nll(model, tokenizer, text) for text in plays + chinese}

    def check(key: str, texts: list[str]):
        nll = sum(direct[t][0] for t in texts)
        tokens = sum(direct[t][1] for t in texts)
        size = sum(len(t.encode("utf-8")) for t in texts)
        row = results[key]
        assert (row["tokens"], row["bytes"], row["documents"]) == (tokens, size, len(texts)), key
        assert row["loss"] == pytest.approx(nll / tokens, rel=1e-5), key
        assert row["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5), key
        assert row["bits_per_byte"] == pytest.approx(nll / math.log(2) / size, rel=1e-5), key

    assert len(chinese[0].encode("utf-8")) > 2 * len(chinese[0])  # multibyte: bytes, not characters, count
    assert sorted(results) == ["all", "length:1k-4k", "length:<1k chars", "source:plays", "source:zh"]
    check("all", plays + chinese)
    check("source:plays", plays)
    check("source:zh", chinese)
    check("length:<1k chars", [plays[0], chinese[0]])
    check("length:1k-4k", [plays[1]])


@pytest.mark.parametrize("window", [5, "tokens-1", "tokens"])
def test_documents_longer_than_the_window_are_scored_in_windows(tokenizer, random_model, write_jsonl, window):
    model = random_model
    text = "JULIET. O Romeo, Romeo, wherefore art thou Romeo?"
    tokens = len(tokenizer(text).input_ids)
    window = {"tokens": tokens, "tokens-1": tokens - 1}.get(window, window)  # one window; one + a last token
    results = evaluate_text(model, tokenizer, [write_jsonl([{"text": text}])], max_length=window)
    row = results["all"]
    assert row["tokens"] == tokens  # every token predicted exactly once, the first from the EOS before it
    assert row["loss"] * tokens == pytest.approx(windowed_nll(model, tokenizer, text, window), rel=1e-5)
    if window < tokens - 1:  # context really restarts (with tokens-1 the last window lacks only the EOS)
        assert row["loss"] * tokens != pytest.approx(full_context_nll(model, tokenizer, text)[0], rel=1e-4)


@pytest.mark.parametrize("chat", [True, False], ids=["chat-end-of-turn", "plain-end-of-text"])
def test_generation_stops_at_the_end_token(tokenizer, chat):
    prompt = QUESTIONS[0] if chat else "To be, or not"
    answer = "Juliet" if chat else " to be"
    rendered = chat_prompt(tokenizer, prompt) if chat else prompt
    end = tokenizer.convert_tokens_to_ids(IM_END) if chat else tokenizer.eos_token_id
    model = scripted_model(tokenizer, answering(tokenizer, tokenizer(rendered).input_ids[-1], answer, end))
    assert model.generation_config.eos_token_id is None  # the tokenizer alone says where to stop

    (output,) = generate_texts(model, tokenizer, [prompt], GREEDY, chat=chat)
    assert output == answer  # without stopping the answer would start again: "Juliet" + "Jul" ...
    assert len(tokenizer(output, add_special_tokens=False).input_ids) < GREEDY.max_new_tokens


def test_batched_generation_keeps_input_order(tokenizer, random_model, tmp_path):
    model = random_model
    prompts = ["ROMEO.", "To be, or not to be, that is the question: whether 'tis nobler", "O",
               "Now is the winter of our discontent", "Friends, Romans, countrymen"]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    output_file = tmp_path / "outputs.jsonl"
    greedy = SamplingArguments(max_new_tokens=6, do_sample=False)
    assert generate_file(model, tokenizer, str(prompts_file), str(output_file), greedy, chat=False,
                         batch_size=2) == len(prompts)

    rows = [json.loads(line) for line in output_file.read_text().splitlines()]
    alone = [generate_texts(model, tokenizer, [p], greedy, batch_size=1)[0] for p in prompts]
    assert [(r["id"], r["prompt"]) for r in rows] == list(enumerate(prompts))
    assert [r["output"] for r in rows] == alone
    assert len(set(alone)) == len(alone)  # distinct outputs, so a reordering could not go unnoticed


def test_exact_match_accuracy_per_task(tokenizer, juliet_model, write_jsonl):
    def record(task, question, answer):
        return {"task": task, "answer": answer, "messages": [{"role": "user", "content": question}]}

    questions = iter(QUESTIONS * 3)
    records = [record("names", next(questions), "Juliet"), record("names", next(questions), "Romeo"),
               record("names", next(questions), "  Juliet\n"),  # compared after stripping whitespace
               record("math", next(questions), "5"), record("math", next(questions), "Juliet"),
               record("math", next(questions), "juliet"), record("math", next(questions), "Juliet.")]
    results = exact_match(juliet_model, tokenizer, write_jsonl(records), max_new_tokens=8, batch_size=3)
    assert results["per_task"]["names"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3, "stopped": 3}
    assert results["per_task"]["math"] == {"accuracy": 0.25, "correct": 1, "total": 4, "stopped": 4}
    assert results["accuracy"] == pytest.approx(3 / 7)
    assert results["stop_rate"] == 1.0
    assert {e["got"] for e in results["examples"]} == {"Juliet"}


def test_exact_match_counts_answers_that_run_to_the_limit(tokenizer, write_jsonl):
    """An answer that never reaches the end-of-turn token is not counted as stopped."""
    prompt = chat_prompt(tokenizer, QUESTIONS[0])
    ids = tokenizer("Juliet", add_special_tokens=False).input_ids
    chain = [tokenizer(prompt).input_ids[-1], *ids]
    model = scripted_model(tokenizer, {**dict(zip(chain, chain[1:])), ids[-1]: ids[0]})  # Juliet forever
    path = write_jsonl([{"answer": "Juliet", "messages": [{"role": "user", "content": QUESTIONS[0]}]}])
    results = exact_match(model, tokenizer, path, max_new_tokens=2 * len(ids))
    assert results["stop_rate"] == 0.0 and results["accuracy"] == 0.0
    assert results["examples"][0]["got"] == "JulietJuliet"


def test_diversity_figures_equal_hand_counts(tokenizer):
    words = SimpleNamespace  # a tokenizer stand-in whose tokens are whitespace-separated words
    word_tokenizer = lambda text, add_special_tokens=False: words(input_ids=text.split())  # noqa: E731
    figures = diversity(["a b a b a b", "c d", "a b a b"], word_tokenizer)
    # unigrams: 12, unique {a, b, c, d}; bigrams: 5 + 1 + 3 = 9 (none across texts), unique {ab, ba, cd};
    # trigrams: 4 + 0 + 2, unique {aba, bab}; 4-grams: "abab baba abab" + "abab": one repeat within a text
    # (the last text's "abab" was seen only in another text).
    assert figures == {"distinct_1": 4 / 12, "distinct_2": 3 / 9, "distinct_3": 2 / 6, "repetition_rate_4gram": 1 / 4}
    assert diversity([], word_tokenizer) == {"distinct_1": 0.0, "distinct_2": 0.0, "distinct_3": 0.0,
                                              "repetition_rate_4gram": 0.0}
    repeated = diversity(["to be or not " * 10], tokenizer)  # the real tokenizer, a text that loops
    assert repeated["repetition_rate_4gram"] > 0.8 and repeated["distinct_1"] < 0.2


def test_plots_from_real_training_logs(corpus_and_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    import matplotlib.pyplot as plt

    root, corpus, tokenizer_dir = corpus_and_tokenizer
    runs = {}
    for name, rate in (("run-a", "3e-3"), ("run-b", "1e-3")):
        runs[name] = tmp_path / name
        pretrain.main(base_args(root, corpus, tokenizer_dir, runs[name], "--max_steps", "4", "--learning_rate", rate,
                                "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "16",
                                "--per_device_eval_batch_size", "16", "--plot_curves", "false"))
    histories = {name: json.loads((path / "trainer_state.json").read_text())["log_history"]
                 for name, path in runs.items()}

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: (figures.append(figure), close(figure)))
    single = plot.main([str(runs["run-a"]), "--output", str(tmp_path / "one.png")])
    both = plot.main([str(runs["run-a"]), str(runs["run-b"]), "--output", str(tmp_path / "two.png")])
    for png in (single, both):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    axes = {axis.get_title(): axis for axis in figures[1].axes if axis.get_title()}
    assert {"train loss", "eval loss", "eval perplexity", "learning rate", "grad norm"} <= set(axes)
    for title, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        lines = {line.get_label(): line for line in axes[title].get_lines()}
        assert sorted(lines) == ["run-a", "run-b"], title  # both runs on the same axes
        for name, history in histories.items():
            logged = [(row["step"], row[key]) for row in history if key in row]
            assert len(logged) == (4 if key == "loss" else 2)
            assert list(zip(lines[name].get_xdata(), lines[name].get_ydata())) == logged, (title, name)


def test_evaluate_command_line_writes_results(juliet_model_dir, tokenizer, tmp_path, write_jsonl):
    model_dir = Path(shutil.copytree(juliet_model_dir, tmp_path / "model"))
    held_out = write_jsonl([{"text": "ROMEO. He jests at scars that never felt a wound."},
                            {"text": "莎士比亚 🎭"}], "held_out.jsonl")
    tasks = write_jsonl([{"task": "names", "answer": a, "messages": [{"role": "user", "content": q}]}
                         for q, a in zip(QUESTIONS, ["Juliet", "Romeo", "Juliet"])], "tasks.jsonl")
    returned = evaluate.main(["--model", str(model_dir), "--eval_files", f"held={held_out}",
                              "--sft_eval_file", tasks, "--max_new_tokens", "8"])
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    texts = [json.loads(line)["text"] for line in Path(held_out).read_text().splitlines()]
    assert saved["text"]["source:held"]["tokens"] == sum(len(tokenizer(t).input_ids) for t in texts)
    assert saved["text"]["source:held"]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert saved["exact_match"]["accuracy"] == pytest.approx(2 / 3) and saved["exact_match"]["stop_rate"] == 1.0
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate.main(["--model", str(model_dir)])  # nothing to evaluate on


def test_generate_command_line_round_trip(juliet_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "id": i}, ensure_ascii=False) + "\n"
                               for i, q in enumerate(QUESTIONS)))
    output = tmp_path / "outputs.jsonl"
    written = generate.main(["--model", str(juliet_model_dir), "--prompts_file", str(prompts), "--output_file",
                             str(output), "--chat_template", "--do_sample", "false", "--max_new_tokens", "12",
                             "--batch_size", "2"])
    assert written == str(output)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == [{"prompt": q, "id": i, "output": "Juliet"} for i, q in enumerate(QUESTIONS)]

    texts = generate.main(["--model", str(juliet_model_dir), "--prompt", QUESTIONS[0], "--prompt", QUESTIONS[1],
                           "--chat_template", "--do_sample", "false", "--max_new_tokens", "12"])
    assert texts == ["Juliet", "Juliet"]
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1])["diversity"]["distinct_1"] == pytest.approx(0.5)
