"""Generate text from any HF causal-LM directory (ours or any other).

    python generate.py --model outputs/demo/pretrain --prompt "ROMEO." --prompt "To be, or not" --stream
    python generate.py --model outputs/demo/sft --chat_template --prompt "What is 12 + 30?" --do_sample false
    python generate.py --model outputs/demo/sft --prompts_file prompts.jsonl --output_file outputs.jsonl
    python generate.py --model outputs/demo/sft --interactive          # chat in the terminal, keeps history

Generation stops at the end-of-text token and, for chat models, at the end-of-turn token.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable from any working directory

from lmtrain.arguments import parse_arguments  # noqa: E402
from lmtrain.generation import (SamplingArguments, chat_loop, diversity, generate_file, generate_texts,  # noqa: E402
                                load_for_inference)
from lmtrain.errors import run_entry_point  # noqa: E402


@dataclass
class GenerateArguments:
    model: str = field(default="outputs/demo/pretrain", metadata={"help": "HF model directory or hub name."})
    # "extend": `--prompt A --prompt B` (as in the docstring) keeps both; a plain list flag keeps only B.
    prompt: list[str] | None = field(default=None, metadata={
        "help": "Prompt(s) to complete: --prompt A B or --prompt A --prompt B.", "action": "extend"})
    prompts_file: str | None = field(default=None, metadata={"help": "jsonl with a 'prompt' field per line."})
    output_file: str | None = field(default=None, metadata={"help": "Where --prompts_file results go (jsonl)."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap prompts as a user turn (chat models)."})
    interactive: bool = field(default=False, metadata={"help": "Interactive chat in the terminal."})
    system: str | None = field(default=None, metadata={"help": "System prompt for --interactive."})
    stream: bool = field(default=False, metadata={"help": "Print tokens as they are generated."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together."})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16 or float32."})


def main(argv=None):
    args, sampling = parse_arguments([GenerateArguments, SamplingArguments], argv)
    model, tokenizer = load_for_inference(args.model, args.dtype)
    if args.interactive:
        return chat_loop(model, tokenizer, sampling, args.system)
    if args.prompts_file:
        output = args.output_file or str(Path(args.prompts_file).with_suffix(".out.jsonl"))
        count = generate_file(model, tokenizer, args.prompts_file, output, sampling, args.chat_template,
                              batch_size=args.batch_size)
        print(f"wrote {count} generations to {output}")
        return output
    prompts = args.prompt or ["ROMEO."]
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    texts = generate_texts(model, tokenizer, prompts, sampling, args.chat_template,
                           batch_size=1 if args.stream else args.batch_size, streamer=streamer)
    if not args.stream:
        for prompt, text in zip(prompts, texts):
            print(f"=== {prompt}\n{prompt if not args.chat_template else ''}{text}\n")
    print(json.dumps({"diversity": diversity(texts, tokenizer)}))
    return texts


if __name__ == "__main__":
    run_entry_point(main)
