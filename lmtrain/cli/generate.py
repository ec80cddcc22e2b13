"""Generate text from any HF causal-LM directory (ours or any other).

    python generate.py --model outputs/demo/pretrain --prompt "ROMEO." --prompt "To be, or not" --stream
    python generate.py --model outputs/demo/sft --chat_template --prompt "What is 12 + 30?" --do_sample false
    python generate.py --model outputs/demo/sft --prompts_file prompts.jsonl --output_file outputs.jsonl
    python generate.py --model outputs/demo/sft --interactive          # chat in the terminal, keeps history

Generation stops at the end-of-text token and, for chat models, at the end-of-turn token. `--do_sample false`
is plain greedy decoding (no repetition penalty unless --repetition_penalty is given): the answers
evaluate.py scores and the samples logged during training. In --interactive, an empty line, `exit`, `quit`,
Ctrl-D or Ctrl-C leaves; Ctrl-C while an answer is written stops that answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.cli.parsing import parse_arguments
from lmtrain.generation import (SamplingArguments, chat_loop, diversity, generate_texts,
                                load_for_inference, read_prompts, write_generations)
from lmtrain.locations import parse_dtype


@dataclass
class GenerateArguments:
    model: str = field(default="outputs/demo/pretrain", metadata={
        "help": "HF model directory (a LoRA adapter directory too) or hub name."})
    # "extend": `--prompt A --prompt B` (as in the docstring) keeps both; a plain list flag keeps only B.
    prompt: list[str] | None = field(default=None, metadata={
        "help": "Prompt(s) to complete: --prompt A B or --prompt A --prompt B. An empty prompt starts a new "
                "document (from the end-of-text token).", "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "jsonl with a 'prompt' field per line."})
    output_file: str | None = field(default=None, metadata={
        "help": "jsonl of the results (prompt and output per line), for --prompt or --prompts_file "
                "(default for --prompts_file: PROMPTS.out.jsonl)."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap prompts as a user turn (chat models)."})
    interactive: bool = field(default=False, metadata={"help": "Interactive chat in the terminal."})
    system: str | None = field(default=None, metadata={"help": "System prompt for --interactive."})
    stream: bool = field(default=False, metadata={"help": "Print tokens as they are generated."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (as saved), bf16/bfloat16, fp16/float16/half or fp32/float32/float."})

    def __post_init__(self):
        if self.prompt and self.prompts_file:
            raise ValueError("give --prompt or --prompts_file, not both")
        if self.interactive and (self.prompt or self.prompts_file or self.output_file):
            raise ValueError("--interactive reads the prompts from the terminal: drop --prompt, --prompts_file "
                             "and --output_file")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, not {self.batch_size}")
        if self.output_file and Path(self.output_file).is_dir():
            raise ValueError(f"--output_file {self.output_file} is a directory: give a .jsonl file name")


def main(argv=None):
    args, sampling = parse_arguments([GenerateArguments, SamplingArguments], argv)
    parse_dtype(args.dtype)  # a bad spelling is refused before the model loads
    records = read_prompts(args.prompts_file) if args.prompts_file else None  # so is an empty file
    model, tokenizer = load_for_inference(args.model, args.dtype)
    if args.interactive:
        return chat_loop(model, tokenizer, sampling, args.system)
    if records is not None:
        output = args.output_file or str(Path(args.prompts_file).with_suffix(".out.jsonl"))
        completions = generate_texts(model, tokenizer, [r["prompt"] for r in records], sampling,
                                     args.chat_template, batch_size=args.batch_size)
        print(f"wrote {write_generations(records, completions, output)} generations to {output}")
        return output
    prompts = args.prompt or ["ROMEO."]
    if args.stream:  # one prompt at a time, each under the same header as the non-streaming output
        from transformers import TextStreamer

        texts = []
        for prompt in prompts:
            print(f"=== {prompt}\n{prompt if not args.chat_template else ''}", end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            texts += generate_texts(model, tokenizer, [prompt], sampling, args.chat_template, streamer=streamer)
            print()
    else:
        texts = generate_texts(model, tokenizer, prompts, sampling, args.chat_template, batch_size=args.batch_size)
        for prompt, text in zip(prompts, texts):
            print(f"=== {prompt}\n{prompt if not args.chat_template else ''}{text}\n")
    if args.output_file:
        write_generations([{"prompt": p} for p in prompts], texts, args.output_file)
        print(f"wrote {len(texts)} generations to {args.output_file}")
    print(json.dumps({"diversity": diversity(texts, tokenizer)}))
    return texts

