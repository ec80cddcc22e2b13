"""`python data_prep/make_sft_demo.py ...`, the same as `lmtrain make-sft-demo ...`: generate the SFT demo data.

The code, its examples and options: lmtrain/cli/make_sft_demo.py (or `--help`)."""
from lmtrain.cli.make_sft_demo import main
from lmtrain.errors import run_entry_point

if __name__ == "__main__":
    run_entry_point(main)
