"""`python plot.py ...`, the same as `lmtrain plot ...`: plot training curves of one or more runs.

The code, its examples and options: lmtrain/cli/plot.py (or `--help`)."""
from lmtrain.cli.plot import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
