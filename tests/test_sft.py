"""SFT: label masks against the chat template's own assistant masks, truncation and drop counts, packing
boundaries, loss normalization under gradient accumulation, LoRA merge equivalence, resume, and a pad token
that must never hide the real end-of-turn token."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import sft
from lmtrain.data.sft import SFTStats, build_rows, encode_sample, render_conversation, to_messages
from lmtrain.model.config import resolve_config
from lmtrain.tokenizer import CHATML_TEMPLATE, IM_END, train_bpe_tokenizer

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"
WORDS = ("the king is dead long live the queen what is two plus three five answer briefly you are a helpful "
         "assistant repeat after me to be or not to be that is the question 0 1 2 3 4 5 6 7 8 9 + ? ! .").split()

CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is two plus three?"},
                {"role": "assistant", "content": "five"},
                {"role": "user", "content": "Repeat after me: to be or not to be"},
                {"role": "assistant", "content": "to be or not to be"}]
FORMATS = {
    "openai": {"messages": CONVERSATION},
    "sharegpt": {"system": "You are a helpful assistant.",
                 "conversations": [{"from": "human", "value": "What is two plus three?"},
                                   {"from": "gpt", "value": "five"},
                                   {"from": "human", "value": "Repeat after me: to be or not to be"},
                                   {"from": "gpt", "value": "to be or not to be"}]},
    "alpaca": {"instruction": "What is two plus three?", "input": "Answer briefly.", "output": "five"},
}


@pytest.fixture(scope="module")
def tokenizer():
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(400)]
    return train_bpe_tokenizer(texts, vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", TINY + f",vocab_size={len(tokenizer)}")
    path = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_labels(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_labels_equal_the_chat_template_assistant_masks(tokenizer, fmt):
    messages = to_messages(FORMATS[fmt], "test")
    ids, labels = encode_sample(tokenizer, messages, 512, False, SFTStats())
    expected_ids, expected_labels = reference_labels(tokenizer, messages)
    assert ids == expected_ids and labels == expected_labels
    end = tokenizer.convert_tokens_to_ids(IM_END)
    turns = sum(m["role"] == "assistant" for m in messages)
    assert sum(1 for label in labels if label == end) == turns  # every answer's end-of-turn is trained
    trained_text = tokenizer.decode([t for t in labels if t != -100])
    assert trained_text == "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")


def test_offset_fallback_for_templates_without_generation_markers(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for record in FORMATS.values():
        messages = to_messages(record, "test")
        assert render_conversation(plain, messages) == render_conversation(tokenizer, messages)


def test_train_on_prompt_keeps_every_label(tokenizer):
    ids, labels = encode_sample(tokenizer, CONVERSATION, 512, True, SFTStats())
    assert labels == ids


def test_truncation_policy_and_drop_counts(tokenizer):
    long_prompt = "to be or not to be " * 40
    stats = SFTStats()
    # 1. the oldest round goes first; the last answer survives whole
    messages = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "five"},
                {"role": "user", "content": "What is two plus three?"}, {"role": "assistant", "content": "five"}]
    ids, labels = encode_sample(tokenizer, messages, 40, False, stats)
    assert len(ids) <= 40 and tokenizer.decode([t for t in labels if t != -100]) == "five" + IM_END
    # 2. a single round too long: the prompt is cut from the left, the answer kept
    ids, labels = encode_sample(tokenizer, messages[:2], 40, False, stats)
    assert len(ids) == 40 and tokenizer.decode([t for t in labels if t != -100]) == "five" + IM_END
    # 3. prompt and answer both longer than max_length: the prompt's last half and the answer's head are kept
    #    (tests/test_sft_masks.py checks the exact slice)
    ids, labels = encode_sample(tokenizer, [{"role": "user", "content": long_prompt},
                                            {"role": "assistant", "content": long_prompt}], 40, False, stats)
    assert len(ids) == 40 and sum(label != -100 for label in labels) == 20
    assert encode_sample(tokenizer, [{"role": "user", "content": "hi"}], 40, False, stats) is None
    assert stats.truncated == 3
    assert stats.dropped == {"no_assistant_turn": 1}


def test_packing_keeps_samples_whole_and_apart(tokenizer):
    samples = [encode_sample(tokenizer, to_messages(r, "t"), 128, False, SFTStats()) for r in FORMATS.values()] * 5
    rows = build_rows(samples, 128, pack=True, pad_id=tokenizer.pad_token_id)
    assert sum(len(r) for r in rows["input_ids"]) < len(samples) * 128  # several samples share a row
    recovered = []
    for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        assert len(ids) == 128
        starts = [i for i, p in enumerate(positions) if p == 0] + [128]
        for a, b in zip(starts, starts[1:]):
            assert positions[a:b] == list(range(b - a))
            recovered.append((ids[a:b], labels[a:b]))
    real = [pair for pair in recovered if any(label != -100 for label in pair[1])]
    assert sorted(map(str, real)) == sorted(map(str, [(list(i), list(l)) for i, l in samples]))


def test_packed_row_loss_equals_separate_samples(tokenizer, tiny_model_dir):
    """Position ids without an attention mask really keep packed samples from attending to each other."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False
    samples = [encode_sample(tokenizer, to_messages(r, "t"), 128, True, SFTStats()) for r in FORMATS.values()]
    rows = build_rows(samples, 256, pack=True, pad_id=tokenizer.pad_token_id)
    assert len(rows["input_ids"]) == 1
    packed = {k: torch.tensor(v) for k, v in rows.items()}
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    offset = 0
    for ids, _ in samples:
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[offset:offset + len(ids)], alone, atol=1e-5, rtol=1e-4)
        offset += len(ids)


def write_chat_file(path: Path, count: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # variable lengths
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} + {b} ?"},
                                                  {"role": "assistant", "content": f"{a + b} {answer}"}]}) + "\n")
    return path


def sft_args(model_dir, data, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_files", str(data), "--max_length", "64",
            "--validation_split_percentage", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "3", "--dataloader_num_workers", "0", "--plot_curves", "false",
            "--output_dir", str(out), *extra]


def test_gradient_accumulation_is_equivalent_to_a_big_batch(tiny_model_dir, tmp_path):
    """Variable-length, unpacked samples: 8x1, 4x2 and 1x8 give the same loss and the same update."""
    from safetensors.torch import load_file

    data = write_chat_file(tmp_path / "chat.jsonl", 8)
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    results = {}
    for batch, accumulation in ((8, 1), (4, 2), (1, 8)):
        out = tmp_path / f"b{batch}x{accumulation}"
        trainer, _ = sft.main(sft_args(tiny_model_dir, data, out, "--packing", "false", "--max_steps", "1",
                                       "--per_device_train_batch_size", str(batch),
                                       "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd",
                                       "--learning_rate", "1.0", "--lr_scheduler_type", "constant",
                                       "--max_grad_norm", "0", "--weight_decay", "0"))
        after = load_file(str(out / "model.safetensors"))
        update = torch.cat([(before[k] - after[k]).flatten() for k in sorted(before)])
        loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
        results[(batch, accumulation)] = (loss, update)
    reference_loss, reference_update = results[(8, 1)]
    assert reference_update.abs().max() > 0
    for key, (loss, update) in results.items():
        assert loss == pytest.approx(reference_loss, abs=1e-2), key
        assert (update - reference_update).abs().max() < 1e-2 * reference_update.abs().max(), key


def test_lora_merged_model_matches_adapter_and_sft_saves_both(tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtrain.arguments import LoraArguments
    from lmtrain.model.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft_model = apply_lora(model, LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # B starts at zero: make the adapter actually change the output
    ids = torch.tensor([tokenizer("to be or not to be that is the question").input_ids])
    adapted = peft_model(input_ids=ids).logits
    base = peft_model.get_base_model()
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)
    assert not any("lora" in n for n, _ in base.named_parameters())

    data = write_chat_file(tmp_path / "chat.jsonl", 16)
    out = tmp_path / "lora"
    sft.main(sft_args(tiny_model_dir, data, out, "--use_lora", "--lora_r", "4", "--max_steps", "3",
                      "--learning_rate", "1e-2", "--per_device_train_batch_size", "4"))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in reloaded.named_parameters()
               if not torch.equal(p, dict(original.named_parameters())[n])]
    assert any("proj" in n for n in changed)  # the merge changed the adapted linear layers


def test_sft_loss_falls_and_resume_reproduces_losses(tiny_model_dir, tmp_path):
    data = write_chat_file(tmp_path / "chat.jsonl", 64)
    common = ["--max_steps", "10", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
              "--save_strategy", "steps", "--save_steps", "100"]
    straight, _ = sft.main(sft_args(tiny_model_dir, data, tmp_path / "a", *common))
    losses = {r["step"]: r["loss"] for r in straight.state.log_history if "loss" in r}
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])
    sft.main(sft_args(tiny_model_dir, data, tmp_path / "b", *common, "--stop_after_steps", "4"))
    resumed, _ = sft.main(sft_args(tiny_model_dir, data, tmp_path / "b", *common))
    got = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    assert [got[s] for s in range(5, 11)] == [losses[s] for s in range(5, 11)]


def test_pad_token_equal_to_end_token_never_masks_it(tokenizer):
    from lmtrain.data.collators import PadToLongestCollator

    end = tokenizer.convert_tokens_to_ids(IM_END)
    same_pad = copy.deepcopy(tokenizer)
    same_pad.pad_token = IM_END  # the classic mistake: padding with the end-of-turn token
    samples = [encode_sample(same_pad, to_messages(r, "t"), 256, False, SFTStats()) for r in FORMATS.values()]
    for packed in (True, False):
        rows = build_rows(samples, 256, pack=packed, pad_id=same_pad.pad_token_id)
        batch = PadToLongestCollator(same_pad.pad_token_id)([{k: rows[k][i] for k in rows}
                                                             for i in range(len(rows["input_ids"]))])
        trained_ends = int((batch["labels"] == end).sum())
        assert trained_ends == sum(sum(m["role"] == "assistant" for m in to_messages(r, "t"))
                                   for r in FORMATS.values())
        padding = batch["input_ids"] == end
        assert padding.sum() > trained_ends  # padding used the same id, and was masked all the same


def test_full_sft_from_weights_under_zero3(tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the weights as they load: checks and saving must not read their (empty) local shapes."""
    import os
    import socket
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    data = write_chat_file(tmp_path / "chat.jsonl", 32)
    out = tmp_path / "zero3"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    result = subprocess.run([sys.executable, str(repo / "sft.py"), "--deepspeed", str(repo / "ds_configs/zero3.json"),
                             *sft_args(tiny_model_dir, data, out, "--max_steps", "4", "--learning_rate", "1e-2",
                                       "--per_device_train_batch_size", "4")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(p, dict(original.named_parameters())[n]) for n, p in tuned.named_parameters())
