"""Text generation from any HF causal-LM directory: single prompts, batches from jsonl, streaming, chat,
and diversity figures (distinct-n, repetition rate) for a set of generations."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
    # Off by default: `--do_sample false` must be plain greedy decoding, the same answers evaluate.py's exact
    # match and the training samples get. When given, it applies to sampling and greedy decoding alike.
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "Penalty for repeated tokens, sampling or greedy (1: off, the default)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition_penalty must be > 0 (1: off), not {self.repetition_penalty}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0):
            raise ValueError("sampling needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0 "
                             "(for greedy decoding pass --do_sample false)")

    def generate_kwargs(self) -> dict:
        # Every value explicit, so a model's own generation_config.json (Qwen's sets repetition_penalty
        # 1.05 and do_sample true) cannot change the decoding these flags name.
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kwargs


def greedy_kwargs(max_new_tokens: int) -> dict:
    """The greedy decoding every tool of ours uses (generate.py --do_sample false, evaluate.py)."""
    return SamplingArguments(max_new_tokens=max_new_tokens, do_sample=False).generate_kwargs()


def load_for_inference(path: str, dtype: str = "auto", what: str = "--model"):
    """Model and tokenizer of a directory (a LoRA adapter directory too) or hub name, in eval mode, on the GPU
    when there is one. A missing path is one message, not a hub lookup; dtype takes the usual spellings."""
    from transformers import AutoModelForCausalLM

    from lmtrain.locations import ADAPTER_FILES, MODEL_FILES, check_location, load_from, parse_dtype
    from lmtrain.tokenizer import load_tokenizer

    torch_dtype = parse_dtype(dtype)  # before any loading: a typo costs nothing
    path = check_location(path, what, MODEL_FILES + ADAPTER_FILES, "model")
    tokenizer = load_tokenizer(path, what=what)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_from(AutoModelForCausalLM.from_pretrained, path, what, needs=MODEL_FILES + ADAPTER_FILES,
                      dtype=torch_dtype).to(device).eval()
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


def encode_prompts(tokenizer, prompts: list[str], chat: bool, device) -> dict:
    """Left-padded input ids for a batch of prompts (chat: as a user turn through the chat template).

    A plain prompt that encodes to no token at all (an empty prompt, with a tokenizer that adds no BOS)
    starts from the end-of-text token instead: in pretraining every document follows one, so the model
    then writes a new document (and there is something to condition the first token on)."""
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(p, add_special_tokens=not chat).input_ids or [tokenizer.eos_token_id] for p in prompts]
    width = max(map(len, ids))
    input_ids = [[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids]
    attention_mask = [[0] * (width - len(row)) + [1] * len(row) for row in ids]
    return {"input_ids": torch.tensor(input_ids, device=device),
            "attention_mask": torch.tensor(attention_mask, device=device)}


# no_grad rather than inference_mode: the training samples call this between steps, and a tensor made under
# inference_mode (a buffer a forward pass updates, a ZeRO-3 gathered weight) cannot be used by autograd later.
@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], sampling: SamplingArguments, chat: bool = False,
                   batch_size: int = 8, streamer=None, synced_gpus: bool = False, device=None) -> list[str]:
    """Completions for `prompts`, in the same order. Left padding so every prompt ends where generation
    starts; generation stops at the end-of-text / end-of-turn tokens (`stop_token_ids`). generate.py,
    evaluate.py's answers and the samples logged during training all decode through here.
    synced_gpus: every rank generates in step (ZeRO-3, whose forward passes gather weights from all ranks).
    Greedy decoding does not seed the random generator (so training samples leave the training RNG alone)."""
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
    stop_ids = stop_token_ids(model, tokenizer)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = encode_prompts(tokenizer, prompts[start:start + batch_size], chat, device or model.device)
        generated = model.generate(**encoded, **sampling.generate_kwargs(), streamer=streamer,
                                   eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                   **({"synced_gpus": True} if synced_gpus else {}))
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def read_prompts(prompts_file: str, prompt_field: str = "prompt") -> list[dict]:
    """The records of a jsonl prompts file; every problem names the file and line."""
    from lmtrain.data.sources import DataError
    from lmtrain.evaluation import strict_records

    if not Path(prompts_file).is_file():
        raise DataError(f"--prompts_file: no such file: {prompts_file}")
    records = []
    for where, record in strict_records(prompts_file):
        if not isinstance(record.get(prompt_field), str):
            raise DataError(f"{where}: needs a string field '{prompt_field}'")
        records.append(record)
    if not records:
        raise DataError(f"{prompts_file} holds no prompts: give one JSON object with a '{prompt_field}' field "
                        f"per line")
    return records


def write_generations(records: list[dict], completions: list[str], output_file: str) -> int:
    """jsonl: each record with an added "output", in input order."""
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as handle:
        for record, completion in zip(records, completions, strict=True):
            handle.write(json.dumps({**record, "output": completion}, ensure_ascii=False) + "\n")
    return len(records)


def generate_file(model, tokenizer, prompts_file: str, output_file: str, sampling: SamplingArguments,
                  chat: bool, prompt_field: str = "prompt", batch_size: int = 8) -> int:
    """jsonl of {"prompt": ...} (other fields kept) -> jsonl with an added "output", in input order."""
    records = read_prompts(prompts_file, prompt_field)
    completions = generate_texts(model, tokenizer, [r[prompt_field] for r in records], sampling, chat, batch_size)
    return write_generations(records, completions, output_file)


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


EXIT_COMMANDS = {"exit", "quit", "/exit", "/quit", "/bye", ":q"}


def chat_loop(model, tokenizer, sampling: SamplingArguments, system: str | None = None) -> list[dict]:
    """Interactive chat in the terminal; keeps the history and renders it with the chat template.

    Leaves on an empty line, `exit` / `quit` / `/exit`, Ctrl-D or Ctrl-C at the prompt; Ctrl-C while an
    answer is being written stops that answer (the turn is dropped from the history). Returns the history."""
    from transformers import TextStreamer

    from lmtrain.errors import UserError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template, so --interactive cannot render a conversation; "
                        "use plain prompts (--prompt, without --chat_template)")
    history = [{"role": "system", "content": system}] if system else []
    stop_ids = stop_token_ids(model, tokenizer)
    print("chat: empty line, exit, Ctrl-D or Ctrl-C to quit; /reset clears the history")
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not user or user.lower() in EXIT_COMMANDS:
            break
        if user == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": user})
        encoded = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(model.device)
        print("assistant> ", end="", flush=True)
        # A fresh streamer per answer: one interrupted mid-answer keeps state that would print the next prompt.
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.inference_mode():
                generated = model.generate(**encoded, **sampling.generate_kwargs(), streamer=streamer,
                                           eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        except KeyboardInterrupt:
            print("\n(answer stopped; Ctrl-C again at the prompt to quit)")
            history.pop()  # an unanswered question would leave the template two user turns in a row
            continue
        reply = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
    return history
