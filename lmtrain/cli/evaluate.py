"""Evaluate any HF causal-LM directory (ours or any other) on held-out text and/or chat tasks.

    # loss, perplexity and bits per byte, overall / per source / per document length
    python evaluate.py --model outputs/demo/pretrain --eval_files held_out/*.jsonl wiki=data/wiki_test.txt
    # exact-match accuracy (greedy answers) on the SFT demo's held-out prompts; a held-out file in the
    # training format (OpenAI / ShareGPT / Alpaca, the last message being the answer) works as well
    python evaluate.py --model outputs/demo/sft --sft_eval_file data/sft_demo/eval.jsonl

Prints a table and writes everything to --output_json (default: MODEL/eval_results.json).
Bits per byte divide the summed token loss by the text's UTF-8 size, so models with different tokenizers
compare on the same text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.cli.parsing import parse_arguments
from lmtrain.errors import UserError
from lmtrain.evaluation import (evaluate_text, format_table, greedy_chat_answers, load_chat_eval,
                                score_answers)
from lmtrain.generation import load_for_inference
from lmtrain.locations import parse_dtype


@dataclass
class EvaluateArguments:
    model: str = field(default="outputs/demo/pretrain", metadata={"help": "HF model directory or hub name."})
    eval_files: list[str] | None = field(default=None, metadata={
        "help": "Held-out text: files, globs, NAME=PATH (a source name for the breakdown)."})
    text_field: str = field(default="text", metadata={"help": "Text field of jsonl/parquet records."})
    max_length: int = field(default=1024, metadata={"help": "Scoring window in tokens."})
    max_documents: int | None = field(default=None, metadata={"help": "At most this many documents per source."})
    sft_eval_file: str | None = field(default=None, metadata={
        "help": "jsonl of {messages, answer, task}, or SFT training records (OpenAI / ShareGPT / Alpaca) whose "
                "last message is the answer: exact-match accuracy of greedy answers."})
    max_new_tokens: int = field(default=32, metadata={"help": "Answer length limit for exact match."})
    output_json: str | None = field(default=None, metadata={"help": "Default: MODEL/eval_results.json."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (as saved), bf16/bfloat16, fp16/float16/half or fp32/float32/float."})


def main(argv=None):
    (args,) = parse_arguments([EvaluateArguments], argv)
    if not args.eval_files and not args.sft_eval_file:
        raise UserError("nothing to evaluate: give --eval_files (held-out text) and/or --sft_eval_file (chat tasks)")
    parse_dtype(args.dtype)
    chat_records = load_chat_eval(args.sft_eval_file) if args.sft_eval_file else None  # bad files fail early
    model, tokenizer = load_for_inference(args.model, args.dtype)
    results = {"model": args.model}
    if args.eval_files:
        results["text"] = evaluate_text(model, tokenizer, args.eval_files, args.text_field, args.max_length,
                                        args.max_documents)
    if chat_records is not None:
        results["exact_match"] = score_answers(chat_records, greedy_chat_answers(model, tokenizer, chat_records,
                                                                                 args.max_new_tokens))
    print(format_table(results.get("text"), results.get("exact_match")))
    output = args.output_json or str(Path(args.model) / "eval_results.json")
    if Path(args.model).is_dir() or args.output_json:
        Path(output).write_text(json.dumps(results, indent=2))
        print(f"results: {output}")
    return results

