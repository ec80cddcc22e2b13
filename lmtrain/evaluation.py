"""Evaluating any HF causal LM: loss, perplexity and bits per byte on held-out text (by source and by
document length), and exact-match accuracy on chat tasks with known answers."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

from lmtrain.data.sources import DataError, ReadStats, SourceSpec, read_file, resolve_source_files

logger = logging.getLogger(__name__)

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
    """Loss per token, perplexity and bits per byte, overall, per source and per length bucket.

    A source with no document is skipped with a warning when others have some; no document at all is an
    error (an empty table would read as a result)."""
    groups = defaultdict(lambda: {"nll": 0.0, "tokens": 0, "bytes": 0, "documents": 0})
    empty = []
    for spec in map(SourceSpec.parse, sources):
        stats = ReadStats()
        documents = 0
        files = resolve_source_files(spec)
        if files is None:
            raise DataError(f"--eval_files: '{spec.location}' is not a local file, glob or directory (held-out "
                            f"text is read from files: jsonl with a '{text_field}' field, json, parquet or txt)")
        for path in files:
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
        if sum(stats.dropped.values()):
            logger.warning("source '%s': skipped records %s", spec.name, dict(stats.dropped))
        if not documents:
            empty.append(f"'{spec.name}' ({', '.join(files)})")
        if not documents and len(set(stats.empty_files)) < len(files):  # an empty file: the reader said so
            logger.warning("source '%s' (%s) has no documents with text in field '%s': skipped", spec.name,
                           ", ".join(files), text_field)
    if not groups:
        raise DataError(f"--eval_files: no documents to score in {'; '.join(empty)}: the files are empty or have "
                        f"no text in field '{text_field}' (set --text_field)")
    results = {}
    for key, group in groups.items():
        loss = group["nll"] / max(1, group["tokens"])
        results[key] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        "bits_per_byte": group["nll"] / math.log(2) / max(1, group["bytes"]),
                        "tokens": group["tokens"], "bytes": group["bytes"], "documents": group["documents"]}
    return results


CHAT_EVAL_FORMATS = ("{'messages': [...prompt...], 'answer': str, 'task': optional str}, or a training record "
                     "(OpenAI 'messages', ShareGPT 'conversations', Alpaca 'instruction'/'output') whose last "
                     "message is the assistant's answer")


def chat_eval_record(record, where: str) -> dict:
    """One held-out chat task as {"messages" (the prompt), "answer", other fields kept}.

    Besides the evaluation format ({messages, answer, task}), a record in any SFT training format counts:
    the messages before its last one (the assistant's) are the prompt, that message's content the answer,
    so a held-out split of the training data scores as it is. Messages pass the same checks as in training
    (lmtrain.data.sft: known roles, string content), so evaluation accepts exactly what training accepts."""
    from lmtrain.data.sft import RecordProblem, check_messages, record_to_messages

    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got a {type(record).__name__}; each line is "
                        f"{CHAT_EVAL_FORMATS}")
    if "answer" in record:
        messages = record.get("messages")
        if messages is None and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        if not isinstance(record["answer"], str):
            raise DataError(f"{where}: field 'answer' must be a string, not {type(record['answer']).__name__}")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise DataError(f"{where}: with an 'answer', field 'messages' must be a non-empty list of "
                            f"{{'role', 'content'}} objects (or give a string 'prompt')")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            check_messages(messages + [{"role": "assistant", "content": record["answer"]}])
        except RecordProblem as err:
            raise DataError(f"{where}: {err}") from None
        return {**record, "messages": messages}
    if not any(key in record for key in ("messages", "conversations", "instruction")):
        raise DataError(f"{where}: found fields {sorted(record)}; expected {CHAT_EVAL_FORMATS}")
    try:
        messages = record_to_messages(record, where)
    except RecordProblem as err:
        if err.reason != "no_assistant_turn":
            raise DataError(f"{where}: {err}") from None
        messages = None
    if not messages or len(messages) < 2 or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "no assistant"
        raise DataError(f"{where}: without an 'answer' field the last message must be the assistant's answer, "
                        f"after at least one prompt message (last role: {last}); expected {CHAT_EVAL_FORMATS}")
    kept = {k: v for k, v in record.items() if k not in ("messages", "conversations", "instruction", "input",
                                                           "output", "system")}
    return {**kept, "messages": messages[:-1], "answer": messages[-1]["content"]}


def strict_records(path: str):
    """(where, record) of a record file read strictly through the shared reader (BOM accepted; invalid
    UTF-8, malformed JSON and non-objects are one DataError naming file:line). A file without a
    .json / .parquet suffix is read as JSON lines."""
    from lmtrain.data.sources import read_jsonl_records, read_records

    stats = ReadStats()
    reader = read_records if Path(path).suffix.lower() in (".jsonl", ".json", ".parquet") else read_jsonl_records
    try:
        yield from reader(path, stats, True)
    except DataError as err:  # the training reader's hint about --lenient does not apply here
        message = str(err).replace(" (with the default --lenient true such records are dropped and counted)", "")
        raise DataError(message) from None


def load_chat_eval(eval_file: str) -> list[dict]:
    """Held-out chat prompts with known answers, one record per jsonl line (see `chat_eval_record`)."""
    path = Path(eval_file)
    if not path.is_file():
        raise DataError(f"--sft_eval_file: no such file: {eval_file}")
    records = [chat_eval_record(record, where) for where, record in strict_records(eval_file)]
    if not records:
        raise DataError(f"--sft_eval_file {eval_file} holds no records; each line is {CHAT_EVAL_FORMATS}")
    return records


def greedy_chat_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 32,
                        batch_size: int = 16) -> list[tuple[str, bool]]:
    """(answer, stopped) per record, in order: the greedy reply through the chat template, whitespace-stripped,
    and whether it ended with an end-of-text / end-of-turn token rather than at max_new_tokens."""
    from lmtrain.generation import greedy_kwargs, stop_token_ids

    stop_ids = stop_token_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                   for r in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            generated = model.generate(**encoded, **greedy_kwargs(max_new_tokens),
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
