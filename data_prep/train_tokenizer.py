"""`python data_prep/train_tokenizer.py ...`, the same as `lmtrain tokenizer ...`: train a byte-level BPE tokenizer.

The code, its examples and options: lmtrain/cli/tokenizer.py (or `--help`)."""
from lmtrain.cli.tokenizer import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
