"""`python plan.py ...`, the same as `lmtrain plan ...`: size, memory, time and cost of a run before paying for it.

The code, its examples and options: lmtrain/cli/plan.py (or `--help`); the formula: docs/PLANNER.md."""
from lmtrain.cli.plan import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
