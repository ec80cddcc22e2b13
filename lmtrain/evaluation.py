"""Evaluating any HF causal LM: loss, perplexity and bits per byte on held-out text (by source and by
document length), and exact-match accuracy on chat tasks with known answers."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from lmtrain.data.sources import ReadStats, SourceSpec, read_file, resolve_source_files

LENGTH_BUCKETS = [(0, 1_000, "<1k chars"), (1_000, 4_000, "1k-4k"), (4_000, 16_000, "4k-16k"),
                  (16_000, float("inf"), ">=16k")]


def _bucket(chars: int) -> str:
    return next(name for low, high, name in LENGTH_BUCKETS if low <= chars < high)


@torch.inference_mode()
def document_nll(model, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of a document's tokens, and their count.

    The document is preceded by the EOS token, as in a packed training stream, so its first token is
    predicted too. A document longer than the window is scored in rolling windows as lm-evaluation-harness
    does (`loglikelihood_rolling`): each window predicts the next `max_length` tokens from a fresh context,
    and the last, shorter one keeps a full window of context; so the two tools give the same figures (for a
    tokenizer without BOS: lm-eval puts a BOS, where there is one, before the document instead of the EOS).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 token, not {max_length}")
    stream = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=True).input_ids
    total, predicted = 0.0, 0
    while predicted < len(stream) - 1:
        end = min(predicted + max_length, len(stream) - 1)  # predicts stream[predicted + 1 : end + 1]
        start = max(0, end - max_length)
        window = torch.tensor([stream[start:end + 1]], device=model.device)
        logits = model(input_ids=window[:, :-1]).logits[0, predicted - start:].float()
        total += torch.nn.functional.cross_entropy(logits, window[0, predicted - start + 1:], reduction="sum").item()
        predicted = end
    return total, predicted


def evaluate_text(model, tokenizer, sources: list[str], text_field: str = "text", max_length: int = 1024,
                  max_documents: int | None = None) -> dict:
    """Loss per token, perplexity and bits per byte, overall, per source and per length bucket."""
    groups = defaultdict(lambda: {"nll": 0.0, "tokens": 0, "bytes": 0, "documents": 0})
    for spec in map(SourceSpec.parse, sources):
        stats = ReadStats()
        documents = 0
        for path in resolve_source_files(spec) or []:
            for text in read_file(path, text_field, "file", stats, strict=False):
                if max_documents and documents >= max_documents:
                    break
                nll, tokens = document_nll(model, tokenizer, text, max_length)
                size = len(text.encode("utf-8"))
                for key in ("all", f"source:{spec.name}", f"length:{_bucket(len(text))}"):
                    group = groups[key]
                    group["nll"] += nll
                    group["tokens"] += tokens
                    group["bytes"] += size
                    group["documents"] += 1
                documents += 1
    results = {}
    for key, group in groups.items():
        loss = group["nll"] / max(1, group["tokens"])
        results[key] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        "bits_per_byte": group["nll"] / math.log(2) / max(1, group["bytes"]),
                        "tokens": group["tokens"], "bytes": group["bytes"], "documents": group["documents"]}
    return results


def load_chat_eval(eval_file: str) -> list[dict]:
    """Held-out chat prompts with known answers: {"messages", "answer", "task"} per jsonl line."""
    return [json.loads(line) for line in Path(eval_file).read_text(encoding="utf-8").splitlines() if line.strip()]


def greedy_chat_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                        batch_size: int = 16) -> list[tuple[str, bool]]:
    """(answer, stopped) per record, in order: the greedy reply through the chat template, whitespace-stripped,
    and whether it ended with an end-of-text / end-of-turn token rather than at max_new_tokens."""
    from lmtrain.generation import stop_token_ids

    stop_ids = stop_token_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                   for r in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        answers += [(tokenizer.decode(row, skip_special_tokens=True).strip(), any(t in stop_ids for t in row))
                    for row in generated[:, encoded["input_ids"].shape[1]:].tolist()]
    return answers


def score_answers(records: list[dict], answers: list[tuple[str, bool]]) -> dict:
    """Exact match (after stripping whitespace) of (answer, stopped) pairs against the records' answers:
    accuracy and stop rate overall and per task, and the first examples. Any engine's answers score here."""
    per_task = defaultdict(lambda: {"correct": 0, "total": 0, "stopped": 0})
    examples = []
    for record, (answer, stopped) in zip(records, answers, strict=True):
        task = per_task[record.get("task", "all")]
        task["total"] += 1
        task["correct"] += answer.strip() == record["answer"].strip()
        task["stopped"] += stopped
        if len(examples) < 10:
            examples.append({"prompt": record["messages"][-1]["content"], "expected": record["answer"],
                             "got": answer.strip()})
    total = sum(t["total"] for t in per_task.values())
    return {"accuracy": sum(t["correct"] for t in per_task.values()) / max(1, total),
            "stop_rate": sum(t["stopped"] for t in per_task.values()) / max(1, total),
            "per_task": {k: {"accuracy": v["correct"] / v["total"], **v} for k, v in sorted(per_task.items())},
            "examples": examples}


def exact_match(model, tokenizer, eval_file: str, max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Greedy answers to held-out chat prompts compared exactly with the expected answers; also how often
    generation ended with the end-of-turn token rather than running to max_new_tokens."""
    records = load_chat_eval(eval_file)
    return score_answers(records, greedy_chat_answers(model, tokenizer, records, max_new_tokens, batch_size))


def format_table(text_results: dict | None, match_results: dict | None) -> str:
    lines = []
    if text_results:
        lines.append(f"{'group':<28}{'loss':>8}{'ppl':>10}{'bits/byte':>11}{'tokens':>10}{'docs':>7}")
        for key, row in sorted(text_results.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            lines.append(f"{key:<28}{row['loss']:>8.4f}{row['perplexity']:>10.2f}{row['bits_per_byte']:>11.4f}"
                         f"{row['tokens']:>10}{row['documents']:>7}")
    if match_results:
        lines.append(f"exact match {match_results['accuracy']:.3f}, stopped at end of turn "
                     f"{match_results['stop_rate']:.3f}")
        for task, row in match_results["per_task"].items():
            lines.append(f"  {task:<16}{row['accuracy']:.3f} ({row['correct']}/{row['total']})")
    return "\n".join(lines)
