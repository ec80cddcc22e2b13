"""`python sft.py ...`, the same as `lmtrain sft ...`: supervised fine-tuning on conversations (full or LoRA).

The code, its examples and options: lmtrain/cli/sft.py (or `--help`)."""
from lmtrain.cli.sft import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
