"""PNG curves from Trainer log histories (one or several runs on the same axes)."""
from __future__ import annotations

import json
from pathlib import Path

from lmtrain.errors import UserError

CURVES = [("loss", "train loss"), ("eval_loss", "eval loss"), ("eval_perplexity", "eval perplexity"),
          ("learning_rate", "learning rate"), ("grad_norm", "grad norm"),
          ("tokens_per_second_per_device", "tokens/s per device")]


def load_log_history(run: str | Path) -> list[dict]:
    """A run directory (its trainer_state.json, or the newest checkpoint's) or a trainer_state.json path.
    A missing path, a directory without one, or a file that is not a trainer_state.json is a UserError."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"{run}: no such file or directory; give a run's output directory or its trainer_state.json")
    if path.is_dir():
        candidates = [path / "trainer_state.json"] + sorted(path.glob("checkpoint-*/trainer_state.json"),
                                                             key=lambda p: checkpoint_number(p.parent))[::-1]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise UserError(f"{run}: no trainer_state.json in it or in a checkpoint-*/ inside it (the Trainer writes "
                            "it with each checkpoint and at the end of a run); give a run's output directory")
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("log_history")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{path}: not a readable trainer_state.json ({error})") from None
    if not isinstance(history, list):
        raise UserError(f"{path}: holds no 'log_history' list; is it a trainer_state.json?")
    return history


def checkpoint_number(path: Path) -> int:
    suffix = path.name.split("-")[-1]
    return int(suffix) if suffix.isdigit() else -1


def plot_runs(histories: dict[str, list[dict]], out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(key, title) for key, title in CURVES if any(key in row for h in histories.values() for row in h)]
    if not present:
        raise UserError("the logs hold none of: " + ", ".join(k for k, _ in CURVES) + " (no step was logged yet?)")
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, (key, title) in zip(axes.flat, present):
        for name, history in histories.items():
            points = [(row["step"], row[key]) for row in history if key in row and "step" in row]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=name, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if key in ("loss", "eval_loss", "eval_perplexity") and all(v > 0 for h in histories.values()
                                                                   for r in h if key in r for v in [r[key]]):
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(present):]:
        axis.axis("off")
    if len(histories) > 1:
        axes.flat[0].legend()
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
