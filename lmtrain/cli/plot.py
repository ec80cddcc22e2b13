"""Turn training logs into PNG curves (loss, eval loss, perplexity, learning rate, grad norm, tokens/s).

    python plot.py outputs/demo/pretrain                           # one run -> outputs/demo/pretrain/curves.png
    python plot.py outputs/run-a outputs/run-b --output compare.png   # several runs on the same axes

A run is an output directory (its trainer_state.json, or its newest checkpoint's) or a trainer_state.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lmtrain.plotting import load_log_history, plot_runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or trainer_state.json files")
    parser.add_argument("--output", help="PNG path (default: RUN/curves.png for one run, curves.png otherwise)")
    args = parser.parse_args(argv)
    histories = {}
    for run in args.runs:
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        histories[name if name not in histories else run] = load_log_history(run)
    output = args.output or (str(Path(args.runs[0]) / "curves.png") if len(args.runs) == 1 and Path(args.runs[0]).is_dir()
                             else "curves.png")
    path = plot_runs(histories, output)
    print(f"wrote {path}")
    return path

