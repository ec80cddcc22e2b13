"""`python data_prep/prepare_sft.py ...`, the same as `lmtrain prepare-sft ...`: prepare SFT data into a dataset directory.

The code, its examples and options: lmtrain/cli/prepare_sft.py (or `--help`)."""
from lmtrain.cli.prepare_sft import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
