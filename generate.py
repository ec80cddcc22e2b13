"""`python generate.py ...`, the same as `lmtrain generate ...`: generate text or chat with a model.

The code, its examples and options: lmtrain/cli/generate.py (or `--help`)."""
from lmtrain.cli.generate import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
