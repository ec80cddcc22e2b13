"""Export a trained model as a standard Hugging Face directory, optionally in bf16 and with a LoRA adapter
merged, ready for `from_pretrained`, `pipeline("text-generation")`, vLLM, llama.cpp's GGUF converter and
lm-evaluation-harness (`--model hf`).

    python export.py --model outputs/qwen-0.5b --output_dir exports/qwen-0.5b-bf16 --dtype bfloat16
    python export.py --model outputs/demo/pretrain --adapter outputs/sft-lora/adapter --output_dir exports/merged
    python export.py --model outputs/sft --output_dir exports/sft --gguf exports/sft.gguf --llama_cpp_dir ~/llama.cpp
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmtrain.cli.parsing import parse_arguments
from lmtrain.errors import UserError


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "Trained model directory (or hub name)."})
    output_dir: str = field(metadata={"help": "Where the exported model goes."})
    dtype: str = field(default="bfloat16", metadata={
        "help": "bf16/bfloat16, fp16/float16/half, fp32/float32/float, or auto (as the weights were saved)."})
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter directory to merge in."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Safetensors shard size."})
    gguf: str | None = field(default=None, metadata={"help": "Also write this GGUF file for llama.cpp."})
    llama_cpp_dir: str | None = field(default=None, metadata={
        "help": "A llama.cpp checkout (or llama-cpp-python sdist's vendor/llama.cpp); its converter writes --gguf."})
    gguf_type: str = field(default="bf16", metadata={"help": "GGUF tensor type: f32, f16, bf16, q8_0 or auto."})


def main(argv=None):
    from transformers import AutoModelForCausalLM

    from lmtrain.locations import (check_adapter_location, check_model_location, check_output_directory, load_from,
                                   parse_dtype)
    from lmtrain.model.building import generation_config_for
    from lmtrain.tokenizer import load_tokenizer

    (args,) = parse_arguments([ExportArguments], argv)
    dtype = parse_dtype(args.dtype)  # "auto": keep the dtype the weights were saved in
    check_output_directory(args.output_dir)
    if Path(args.output_dir).resolve() == Path(args.model).resolve():
        # save_pretrained would overwrite the trained weights in place (in --dtype), and a failure halfway
        # would leave neither the original nor the export.
        raise UserError(f"--output_dir {args.output_dir} is the --model directory: the export would rewrite the "
                        "trained model in place. Pick another --output_dir (e.g. exports/NAME)")
    check_model_location(args.model, "--model")
    if args.adapter:
        check_adapter_location(args.adapter, "--adapter")
    if args.gguf:
        from lmtrain.gguf import check_llama_cpp_dir

        try:
            check_llama_cpp_dir(args.llama_cpp_dir)  # before the export, not after it
        except FileNotFoundError as error:
            raise UserError(f"--gguf: {error}") from None
    tokenizer_source = (args.adapter if args.adapter and Path(args.adapter, "tokenizer_config.json").exists()
                        else args.model)
    tokenizer = load_tokenizer(tokenizer_source, what="--adapter" if tokenizer_source == args.adapter else "--model")
    # float32 for a merge (the LoRA delta is added at full precision), then the requested dtype
    model = load_from(AutoModelForCausalLM.from_pretrained, args.model, "--model",
                      dtype=torch.float32 if args.adapter or dtype != "auto" else "auto")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    if dtype != "auto":
        model = model.to(dtype)
    model.config.use_cache = True
    model.generation_config = generation_config_for(tokenizer, model.generation_config)
    model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.output_dir)
    saved_as = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"exported {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters as {saved_as} "
          f"to {args.output_dir}")
    if args.gguf:
        from lmtrain.gguf import convert_to_gguf

        print(f"wrote {convert_to_gguf(args.output_dir, args.gguf, args.llama_cpp_dir, args.gguf_type)}")
    return args.output_dir

