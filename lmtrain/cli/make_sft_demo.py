"""Generate the SFT demo data: chat tasks whose answers can be checked exactly.

    python data_prep/make_sft_demo.py --output_dir data/sft_demo
    python data_prep/make_sft_demo.py --train_samples 40000 --output_dir data/sft_demo     # scripts/demo.sh on a CPU
    python data_prep/make_sft_demo.py --task_weights which_play=3 repeat=2 --output_dir data/sft_mix  # another mix

Tasks: addition, the next number, repeating a phrase, naming the play a quoted line comes from (lines from
the built-in Shakespeare corpus), and two-turn follow-ups ("And plus 7?"). Some samples carry a system
prompt. Writes train.jsonl (OpenAI `messages` format) and eval.jsonl (the prompt turns, the expected
`answer` and the `task`), whose prompts never occur in train.jsonl.

For preference tuning (dpo.py) it also writes preference_train.jsonl and preference_eval.jsonl: pairs of
{"prompt", "chosen", "rejected"} where chosen is the right answer and rejected a plausible wrong one (off
by one, a carry missed, the follow-up ignored, a word dropped, another play). The eval pairs are the
prompts of eval.jsonl, so no held-out prompt is ever trained on, in SFT or DPO.
"""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.cli.parsing import parse_arguments
from lmtrain.data.demo_corpus import ensure_demo_corpus
from lmtrain.locations import check_output_directory

TASKS = ["add", "next_number", "repeat", "which_play", "follow_up"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are a scholar of Shakespeare."]


@dataclass
class DemoArguments:
    output_dir: str = field(default="data/sft_demo", metadata={"help": "Where train.jsonl / eval.jsonl go."})
    train_samples: int = field(default=20000, metadata={"help": "Training conversations."})
    task_weights: list[str] | None = field(default=None, metadata={
        "help": "TASK=N (a whole number) per task: N training conversations of it for every one of a weight-1 "
                "task, e.g. --task_weights repeat=2 which_play=3 (unnamed tasks: 1; 0 leaves a task out of "
                "training). Only train.jsonl changes: eval.jsonl, and so what the accuracy means, stays the same."})
    eval_per_task: int = field(default=50, metadata={"help": "Held-out prompts per task."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    preference_pairs: int = field(default=2000, metadata={
        "help": "Training preference pairs (preference_train.jsonl); 0: none. Drawn after the SFT data, with "
                "their own random stream, so train.jsonl / eval.jsonl do not depend on this."})

    def __post_init__(self):
        self.task_cycle = training_task_cycle(self.task_weights)


def training_task_cycle(task_weights: list[str] | None) -> list[str]:
    """The order training conversations cycle through the tasks: each task as often as its weight (default:
    TASKS once each, the order train.jsonl has always had)."""
    weights = dict.fromkeys(TASKS, 1)
    for item in task_weights or []:
        task, _, value = item.partition("=")
        if task not in weights or not value.strip().isdigit():
            raise ValueError(f"--task_weights {item}: give TASK=N with N a whole number >= 0, TASK one of "
                             f"{', '.join(TASKS)}")
        weights[task] = int(value)
    if not any(weights.values()):
        raise ValueError("--task_weights: every weight is 0, so there is nothing to train on")
    return [task for task in TASKS for _ in range(weights[task])]


def play_lines(min_chars: int = 30, max_chars: int = 70) -> dict[str, list[str]]:
    """Verse lines of each play (modern editions), long enough to be distinctive."""
    lines = defaultdict(set)
    with open(ensure_demo_corpus(), encoding="utf-8") as handle:
        for record in map(json.loads, handle):
            if record["play_file"].endswith("_f"):
                continue  # First Folio spelling; one edition per play keeps the titles unambiguous
            for line in record["text"].split("\n"):
                line = line.strip()
                if min_chars <= len(line) <= max_chars and re.match(r"^[A-Z][a-z]", line) and not line.isupper():
                    lines[record["title"]].add(line)
    return {title: sorted(found) for title, found in lines.items() if len(found) >= 20}


def make_task(task: str, rng: random.Random, plays: dict[str, list[str]]) -> tuple[list[dict], str]:
    """(prompt messages, answer) for one task instance."""
    if task == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return [{"role": "user", "content": f"What is {a} + {b}?"}], str(a + b)
    if task == "next_number":
        n = rng.randint(0, 300)
        return [{"role": "user", "content": f"What number comes after {n}?"}], str(n + 1)
    if task == "repeat":
        title = rng.choice(sorted(plays))
        words = rng.choice(plays[title]).split()[:rng.randint(2, 4)]
        phrase = " ".join(w.strip(",.;:!?") for w in words)
        return [{"role": "user", "content": f"Repeat after me: {phrase}"}], phrase
    if task == "which_play":
        title = rng.choice(sorted(plays))
        return [{"role": "user", "content": f'Which play is this line from? "{rng.choice(plays[title])}"'}], title
    if task == "follow_up":
        a, b, c = rng.randint(0, 30), rng.randint(0, 30), rng.randint(1, 9)
        return [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)},
                {"role": "user", "content": f"And plus {c}?"}], str(a + b + c)
    raise ValueError(task)


def wrong_answer(task: str, answer: str, rng: random.Random, plays: dict[str, list[str]]) -> str:
    """A plausible wrong answer to a task instance: the mistakes a model that almost knows makes."""
    if task in ("add", "next_number", "follow_up"):
        value = int(answer)
        offsets = {"add": [-10, -1, 1, 10], "next_number": [-1, 1], "follow_up": [-1, 1, 2]}[task]
        wrong = [value + k for k in offsets if value + k >= 0]
        return str(rng.choice(wrong))
    if task == "repeat":
        words = answer.split()
        if len(words) > 2 and rng.random() < 0.5:
            del words[rng.randrange(len(words))]  # a word dropped
        else:
            i = rng.randrange(len(words))
            words.insert(i, words[i])  # a word said twice
        return " ".join(words)
    if task == "which_play":
        return rng.choice([title for title in sorted(plays) if title != answer])
    raise ValueError(task)


def write_preference_pairs(out: Path, args, plays: dict[str, list[str]], eval_records: list[dict],
                           eval_prompts: set[str]) -> int:
    """preference_train.jsonl (new prompts, never an eval.jsonl one) and preference_eval.jsonl (the eval.jsonl
    prompts, each with its answer and a wrong one)."""
    rng = random.Random(args.seed + 1)
    with open(out / "preference_eval.jsonl", "w", encoding="utf-8") as handle:
        for record in eval_records:
            handle.write(json.dumps({"task": record["task"], "prompt": record["messages"], "chosen": record["answer"],
                                     "rejected": wrong_answer(record["task"], record["answer"], rng, plays)}) + "\n")
    written = 0
    with open(out / "preference_train.jsonl", "w", encoding="utf-8") as handle:
        while written < args.preference_pairs:
            task = TASKS[written % len(TASKS)]
            messages, answer = make_task(task, rng, plays)
            if json.dumps(messages) in eval_prompts:
                continue
            if rng.random() < 0.3:
                messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
            handle.write(json.dumps({"task": task, "prompt": messages, "chosen": answer,
                                     "rejected": wrong_answer(task, answer, rng, plays)}) + "\n")
            written += 1
    return written


def main(argv=None):
    (args,) = parse_arguments([DemoArguments], argv)
    check_output_directory(args.output_dir)  # before the corpus is read
    rng = random.Random(args.seed)
    plays = play_lines()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_prompts, eval_records = set(), []
    with open(out / "eval.jsonl", "w", encoding="utf-8") as handle:
        for task in TASKS:
            written = 0
            while written < args.eval_per_task:
                messages, answer = make_task(task, rng, plays)
                key = json.dumps(messages)
                if key in eval_prompts:
                    continue
                eval_prompts.add(key)
                eval_records.append({"task": task, "messages": messages, "answer": answer})
                handle.write(json.dumps(eval_records[-1]) + "\n")
                written += 1
    written = 0
    with open(out / "train.jsonl", "w", encoding="utf-8") as handle:
        while written < args.train_samples:
            task = args.task_cycle[written % len(args.task_cycle)]
            messages, answer = make_task(task, rng, plays)
            if json.dumps(messages) in eval_prompts:
                continue  # held-out prompts never appear in training
            if rng.random() < 0.3:
                messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
            handle.write(json.dumps({"messages": messages + [{"role": "assistant", "content": answer}]}) + "\n")
            written += 1
    pairs = write_preference_pairs(out, args, plays, eval_records, eval_prompts) if args.preference_pairs else 0
    print(f"wrote {written} training conversations, {len(eval_prompts)} held-out prompts and {pairs} training "
          f"preference pairs (+{len(eval_records) if pairs else 0} held-out) to {out} ({len(plays)} plays for the "
          f"which_play task)")

