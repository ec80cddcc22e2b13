"""`python data_prep/prepare_pretrain.py ...`, the same as `lmtrain prepare ...`: prepare pretraining data into a dataset directory.

The code, its examples and options: lmtrain/cli/prepare.py (or `--help`)."""
from lmtrain.cli.prepare import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
