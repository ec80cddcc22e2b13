"""Export a trained model as a standard Hugging Face directory, optionally in bf16 and with a LoRA adapter
merged, ready for `from_pretrained`, `pipeline("text-generation")`, vLLM, llama.cpp's GGUF converter and
lm-evaluation-harness (`--model hf`).

    python export.py --model outputs/qwen-0.5b --output_dir exports/qwen-0.5b-bf16 --dtype bfloat16
    python export.py --model outputs/demo/pretrain --adapter outputs/sft-lora/adapter --output_dir exports/merged
    python export.py --model outputs/sft --output_dir exports/sft --gguf exports/sft.gguf --llama_cpp_dir ~/llama.cpp
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable from any working directory

import torch  # noqa: E402

from lmtrain.arguments import parse_arguments  # noqa: E402
from lmtrain.errors import run_entry_point  # noqa: E402


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "Trained model directory (or hub name)."})
    output_dir: str = field(metadata={"help": "Where the exported model goes."})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32."})
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter directory to merge in."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Safetensors shard size."})
    gguf: str | None = field(default=None, metadata={"help": "Also write this GGUF file for llama.cpp."})
    llama_cpp_dir: str | None = field(default=None, metadata={
        "help": "A llama.cpp checkout (or llama-cpp-python sdist's vendor/llama.cpp); its converter writes --gguf."})
    gguf_type: str = field(default="bf16", metadata={"help": "GGUF tensor type: f32, f16, bf16, q8_0 or auto."})


def main(argv=None):
    from transformers import AutoModelForCausalLM

    from lmtrain.modeling import generation_config_for
    from lmtrain.tokenizer import load_tokenizer

    (args,) = parse_arguments([ExportArguments], argv)
    if args.dtype not in ("bfloat16", "float16", "float32"):
        raise SystemExit(f"--dtype must be bfloat16, float16 or float32, not {args.dtype}")
    if args.gguf:
        from lmtrain.gguf import check_llama_cpp_dir

        try:
            check_llama_cpp_dir(args.llama_cpp_dir)  # before the export, not after it
        except FileNotFoundError as error:
            raise SystemExit(f"--gguf: {error}") from None
    tokenizer = load_tokenizer(args.adapter if args.adapter and Path(args.adapter, "tokenizer_config.json").exists()
                               else args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model = model.to(getattr(torch, args.dtype))
    model.config.use_cache = True
    model.generation_config = generation_config_for(tokenizer, model.generation_config)
    model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.output_dir)
    print(f"exported {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters as {args.dtype} "
          f"to {args.output_dir}")
    if args.gguf:
        from lmtrain.gguf import convert_to_gguf

        print(f"wrote {convert_to_gguf(args.output_dir, args.gguf, args.llama_cpp_dir, args.gguf_type)}")
    return args.output_dir


if __name__ == "__main__":
    run_entry_point(main)
