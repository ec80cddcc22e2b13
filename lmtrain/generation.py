"""Text generation from any HF causal-LM directory: single prompts, batches from jsonl, streaming, chat,
and diversity figures (distinct-n, repetition rate) for a set of generations."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from lmtrain.tokenizer import end_of_turn_token_id

logger = logging.getLogger(__name__)


@dataclass
class SamplingArguments:
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate at most."})
    do_sample: bool = field(default=True, metadata={"help": "Sample; --do_sample false is greedy decoding."})
    temperature: float = field(default=0.8, metadata={"help": "Softmax temperature when sampling."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens (0: off)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (1: off)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Penalty for repeated tokens (1: off)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kwargs


def load_for_inference(path: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    from lmtrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    model.config.use_cache = True
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's own stop tokens (its generation_config) plus the tokenizer's end of text and end of turn.

    A model saved without them (from_config, or by a toolkit that lists only <|endoftext|> while its chat
    template ends turns with another token) would otherwise run on past the answer to max_new_tokens."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    candidates = [*configured, tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    return list(dict.fromkeys(i for i in candidates if i is not None))


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], sampling: SamplingArguments, chat: bool = False,
                   batch_size: int = 8, streamer=None) -> list[str]:
    """Completions for `prompts`, in the same order. Left padding so every prompt ends where generation
    starts; generation stops at the end-of-text / end-of-turn tokens (`stop_token_ids`)."""
    torch.manual_seed(sampling.seed)
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model, tokenizer)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        if chat:
            batch = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in batch]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
        generated = model.generate(**encoded, **sampling.generate_kwargs(), streamer=streamer,
                                   eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def generate_file(model, tokenizer, prompts_file: str, output_file: str, sampling: SamplingArguments,
                  chat: bool, prompt_field: str = "prompt", batch_size: int = 8) -> int:
    """jsonl of {"prompt": ...} (other fields kept) -> jsonl with an added "output", in input order."""
    records = []
    with open(prompts_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{prompts_file}:{line_number}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
                raise ValueError(f"{prompts_file}:{line_number}: needs a string field '{prompt_field}'")
            records.append(record)
    completions = generate_texts(model, tokenizer, [r[prompt_field] for r in records], sampling, chat, batch_size)
    with open(output_file, "w", encoding="utf-8") as handle:
        for record, completion in zip(records, completions):
            handle.write(json.dumps({**record, "output": completion}, ensure_ascii=False) + "\n")
    return len(records)


def diversity(texts: list[str], tokenizer, max_n: int = 3) -> dict:
    """distinct-n (unique n-grams / n-grams over all texts) and the repetition rate (share of tokens that
    repeat an n-gram, n=4, already seen in the same text)."""
    token_lists = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    figures = {}
    for n in range(1, max_n + 1):
        grams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
        figures[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeated = total = 0
    for tokens in token_lists:
        seen = Counter()
        for i in range(len(tokens) - 3):
            gram = tuple(tokens[i:i + 4])
            repeated += seen[gram] > 0
            seen[gram] += 1
            total += 1
    figures["repetition_rate_4gram"] = repeated / total if total else 0.0
    return figures


def chat_loop(model, tokenizer, sampling: SamplingArguments, system: str | None = None):
    """Interactive chat in the terminal; keeps the history and renders it with the chat template."""
    from transformers import TextStreamer

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use plain prompts (without --chat)")
    history = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop_ids = stop_token_ids(model, tokenizer)
    print("chat: empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        if user == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        encoded = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(model.device)
        print("assistant> ", end="", flush=True)
        with torch.inference_mode():
            generated = model.generate(**encoded, **sampling.generate_kwargs(), streamer=streamer,
                                       eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
