"""`python pretrain.py ...`, the same as `lmtrain pretrain ...`: pretrain or continue pretraining a causal LM.

The code, its examples and options: lmtrain/cli/pretrain.py (or `--help`)."""
from lmtrain.cli.pretrain import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
