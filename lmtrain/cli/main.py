"""`lmtrain COMMAND [CONFIG.yaml] [flags]`: every tool of the toolkit behind one command, as LLaMA-Factory's
`llamafactory-cli` and TRL's `trl` do. Each command is the same code as a top-level script:

    lmtrain tokenizer --output_dir outputs/tokenizer           # = python data_prep/train_tokenizer.py ...
    lmtrain prepare --tokenizer_name outputs/tokenizer --output_dir data/shakespeare
    lmtrain pretrain examples/pretrain_tiny.yaml --max_steps 50 # = python pretrain.py ... (deepspeed: the script)
    lmtrain sft --model_name_or_path outputs/demo/pretrain --train_files data/sft_demo/train.jsonl
    lmtrain pretrain --help                                      # a command's options
"""
from __future__ import annotations

import importlib
import sys

from lmtrain.errors import EXIT_USER_ERROR, run_entry_point

# command -> (module under lmtrain.cli, the top-level script it equals, what it does)
COMMANDS = {
    "pretrain": ("pretrain", "pretrain.py", "pretrain or continue pretraining a causal LM"),
    "sft": ("sft", "sft.py", "supervised fine-tuning on conversations (full or LoRA)"),
    "dpo": ("dpo", "dpo.py", "preference tuning (DPO, IPO, ...) after SFT (full or LoRA)"),
    "prepare": ("prepare", "data_prep/prepare_pretrain.py", "prepare pretraining data into a dataset directory"),
    "prepare-sft": ("prepare_sft", "data_prep/prepare_sft.py", "prepare SFT data into a dataset directory"),
    "tokenizer": ("tokenizer", "data_prep/train_tokenizer.py", "train a byte-level BPE tokenizer"),
    "make-sft-demo": ("make_sft_demo", "data_prep/make_sft_demo.py", "generate the SFT demo data"),
    "evaluate": ("evaluate", "evaluate.py", "evaluate a model on held-out text and chat tasks"),
    "generate": ("generate", "generate.py", "generate text or chat with a model"),
    "export": ("export", "export.py", "export a checkpoint or LoRA run to a Hugging Face / GGUF model"),
    "plot": ("plot", "plot.py", "plot training curves of one or more runs"),
    "plan": ("plan", "plan.py", "plan a run: parameters, FLOPs, memory per GPU, micro-batch, time and cost"),
    "convert-checkpoint": ("convert_checkpoint", "-m lmtrain.cli.convert_checkpoint",
                           "a DeepSpeed checkpoint to a universal one (resume on another GPU count) or an HF model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what} (= python {script})" for name, (_, script, what) in COMMANDS.items()]
    return ("usage: lmtrain COMMAND [CONFIG.yaml] [flags]   (lmtrain COMMAND --help: its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"error: unknown command '{command}'" + (f" (did you mean {near[0]}?)" if near else "")
              + f"\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    sys.argv[0] = f"lmtrain {command}"  # the prog name in the command's --help and usage messages
    module = importlib.import_module(f"lmtrain.cli.{COMMANDS[command][0]}")  # only the command's imports
    run_entry_point(module.main, rest)
    return 0


def console_main():
    """The `lmtrain` console script (pyproject.toml [project.scripts])."""
    sys.exit(main())
