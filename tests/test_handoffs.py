"""The README's hand-offs to other tools, run for real: llama.cpp (GGUF conversion, then llama-cpp-python) and
lm-evaluation-harness (`--model hf` on lmtrain's local tasks).

These tools are not in requirements.txt (llama-cpp-python compiles llama.cpp for minutes), so the tests skip
without them; `bash scripts/check_handoffs.sh` installs them and runs this file.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
import torch

import export
from lmtrain.model.config import resolve_config
from lmtrain.tokenizer import RELOAD_PROBE

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_DIR = os.environ.get("LLAMA_CPP_DIR")


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A small random Qwen2 in the layout pretrain.py writes (weights, config, tokenizer, chat template); its
    large initial weights make greedy generation say something other than an immediate end token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", "hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
                                          "num_attention_heads=4,num_key_value_heads=2,initializer_range=0.5")
    config.vocab_size = -(-len(tiny_tokenizer) // 64) * 64
    config.eos_token_id, config.pad_token_id = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    directory = tmp_path_factory.mktemp("handoff") / "model"
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.skipif(not LLAMA_CPP_DIR, reason="set LLAMA_CPP_DIR to a llama.cpp checkout (scripts/check_handoffs.sh)")
def test_gguf_export_matches_the_hf_model_in_llama_cpp(tiny_model_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "model.gguf"
    export.main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "export"), "--dtype", "float32",
                 "--gguf", str(gguf_path), "--gguf_type", "f32", "--llama_cpp_dir", LLAMA_CPP_DIR])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    # f32 KV cache: the default f16 cache alone moves logits by ~1e-1 at these weight scales
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"

    # Same token ids for plain text (digits, whitespace runs, CJK, emoji) and for a chat prompt. llama.cpp
    # does not apply the tokenizer's NFC normalizer (for Qwen's own models neither), so text is given in NFC,
    # the form lmtrain's cleaning writes training data in.
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for text, special in ((unicodedata.normalize("NFC", RELOAD_PROBE), False), ("ROMEO. But soft, what light?", False), (prompt, True)):
        assert llm.tokenize(text.encode(), add_bos=False, special=special) == \
            tokenizer(text, add_special_tokens=False).input_ids

    # The GGUF's chat template (markers stripped) renders the prompt HF renders.
    template = llm.metadata["tokenizer.chat_template"]
    assert "{% generation" not in template and "endgeneration" not in template
    rendered = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="")(messages=messages).prompt
    assert rendered == prompt

    # Same next-token logits at every position, and the same greedy continuation.
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm.reset()
    llm.eval(ids)
    gguf_logits = torch.tensor(llm.scores[:len(ids)])
    with torch.inference_mode():
        hf_logits = model(torch.tensor([ids])).logits[0, :, :gguf_logits.shape[1]]
    assert torch.allclose(gguf_logits, hf_logits, atol=2e-3), (gguf_logits - hf_logits).abs().max()
    llm.reset()
    gguf_tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        gguf_tokens.append(token)
        if len(gguf_tokens) == 12:
            break
    hf_tokens = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert gguf_tokens == hf_tokens[0, len(ids):].tolist()
    llm.close()


def test_gguf_pre_tokenizer_names():
    from lmtrain.gguf import GPT2_REGEX, pre_tokenizer_name
    from lmtrain.tokenizer import QWEN2_SPLIT_REGEX

    def split(regex: str, **byte_level) -> dict:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False, **byte_level}]}

    nfc = {"type": "NFC"}
    assert pre_tokenizer_name({"normalizer": nfc, "pre_tokenizer": split(QWEN2_SPLIT_REGEX)}) == "qwen2"
    llama3 = QWEN2_SPLIT_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")  # LLaMA 3's tokenizer.json pattern
    assert pre_tokenizer_name({"normalizer": None, "pre_tokenizer": split(llama3)}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": split(GPT2_REGEX)}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    for refused in ({"pre_tokenizer": {"type": "Metaspace"}},
                    {"normalizer": {"type": "NFKC"}, "pre_tokenizer": split(QWEN2_SPLIT_REGEX)},
                    {"pre_tokenizer": split(QWEN2_SPLIT_REGEX, add_prefix_space=True)}):
        with pytest.raises(ValueError, match="matches none"):
            pre_tokenizer_name(refused)


def test_templates_without_generation_markers_render_the_same_text(tiny_tokenizer):
    """Plain Jinja (llama.cpp, llama-cpp-python) renders the stripped template exactly as transformers renders
    the original, whitespace-control dashes on the markers included."""
    import jinja2

    from lmtrain.gguf import strip_generation_tags
    from lmtrain.tokenizer import CHATML_TEMPLATE

    # plain text next to dashed markers: deleting the markers would leave that whitespace in
    dashed = ("{% for message in messages %}{{ message['role'] }}:\n{% if message['role'] == 'assistant' %}\n"
              "  {%- generation -%}\n  {{ message['content'] }}  \n  {%- endgeneration -%}\n"
              "{% else %}{{ message['content'] }}{% endif %};{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for template in (CHATML_TEMPLATE, dashed):
        plain = strip_generation_tags(template)
        assert "generation %" not in plain and "generation -%" not in plain
        rendered = jinja2.Environment().from_string(plain).render(messages=messages, add_generation_prompt=False)
        assert rendered == tiny_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def _task_copy(name: str, data_file: Path, directory: Path) -> Path:
    """configs/lm_eval/NAME.yaml with its data file replaced."""
    import yaml

    task = yaml.safe_load((ROOT / "configs/lm_eval" / f"{name}.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data_file)
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
    return directory


def test_lm_eval_harness_agrees_with_evaluate(tiny_model_dir, tiny_tokenizer, demo_texts, write_jsonl, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from lmtrain.evaluation import evaluate_text, exact_match

    heldout = write_jsonl([{"text": t[:1500]} for t in demo_texts[-6:]], "heldout.jsonl")  # ~450 tokens each
    questions = write_jsonl([
        {"task": "add", "messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
        for a, b in ((3, 4), (12, 30), (7, 7))] + [
        {"task": "follow", "messages": [{"role": "user", "content": "Say one."}, {"role": "assistant",
                                                                                    "content": "one"},
                                        {"role": "user", "content": "And the next?"}], "answer": "two"}],
        "eval.jsonl")
    tasks = _task_copy("lmtrain_heldout", Path(heldout), tmp_path / "tasks")
    _task_copy("lmtrain_sft_demo", Path(questions), tasks)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32,max_length=128",
        tasks=["lmtrain_heldout", "lmtrain_sft_demo"], task_manager=TaskManager(include_path=str(tasks)),
        device="cpu", batch_size=1, log_samples=True)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = evaluate_text(model, tiny_tokenizer, [str(heldout)], max_length=128)  # documents span several windows
    theirs = results["results"]["lmtrain_heldout"]
    assert theirs["bits_per_byte,none"] == pytest.approx(ours["all"]["bits_per_byte"], rel=1e-4)

    matched = exact_match(model, tiny_tokenizer, str(questions), max_new_tokens=16, batch_size=1)
    samples = results["samples"]["lmtrain_sft_demo"]
    theirs_text = [sample["filtered_resps"][0] for sample in sorted(samples, key=lambda s: s["doc_id"])]
    assert len(theirs_text) == 4 and any(theirs_text)  # a random model still says something
    assert theirs_text == [example["got"] for example in matched["examples"]]
    assert results["results"]["lmtrain_sft_demo"]["exact_match,strip"] == pytest.approx(matched["accuracy"])
    print(f"lm-eval bits/byte {theirs['bits_per_byte,none']:.6f}, evaluate.py {ours['all']['bits_per_byte']:.6f}; "
          f"answers {theirs_text}")
