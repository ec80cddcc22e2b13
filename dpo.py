"""`python dpo.py ...`, the same as `lmtrain dpo ...`: preference tuning (DPO, IPO, ...) after SFT (full or LoRA).

The code, its examples and options: lmtrain/cli/dpo.py (or `--help`)."""
from lmtrain.cli.dpo import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
