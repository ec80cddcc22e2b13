"""`python export.py ...`, the same as `lmtrain export ...`: export a checkpoint or LoRA run to a Hugging Face / GGUF model.

The code, its examples and options: lmtrain/cli/export.py (or `--help`)."""
from lmtrain.cli.export import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
