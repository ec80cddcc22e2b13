"""`python evaluate.py ...`, the same as `lmtrain evaluate ...`: evaluate a model on held-out text and chat tasks.

The code, its examples and options: lmtrain/cli/evaluate.py (or `--help`)."""
from lmtrain.cli.evaluate import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
