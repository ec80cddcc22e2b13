"""Checkpoint and run policy: which checkpoint a run resumes from, what --overwrite_output_dir deletes,
the completion record of a finished run, the completion marker of each checkpoint and checkpoint rotation,
and the checks that a checkpoint fits the model before training resumes from it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)

# Written last into every checkpoint, on rank 0 after all ranks finished writing their files: its presence
# (and the sizes it lists still matching) is what "complete" means. A kill -9 anywhere in the save, on any
# rank, leaves no marker, so that directory is skipped (and reported), never loaded.
CHECKPOINT_MARKER = "lmtrain_checkpoint.json"


def write_checkpoint_marker(path: Path, step: int, world_size: int, zero_stage: int | None, extra: dict | None = None):
    """`extra`: more facts a resume checks (the global batch; the universal copy, training/checkpoint_conversion.py)."""
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != CHECKPOINT_MARKER}
    record = {"step": step, "world_size": world_size, "zero_stage": zero_stage, **(extra or {}),
              "saved_at": time.time(), "files": files}
    tmp = path / (CHECKPOINT_MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path / CHECKPOINT_MARKER)  # atomic: a crash leaves either no marker or a whole one


def read_checkpoint_marker(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _legacy_complete(path: Path) -> bool:
    """The rule before markers: the Trainer writes trainer_state.json after the weights, optimizer, scheduler
    and RNG states (on rank 0 only, without waiting for the other ranks)."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("*.safetensors")) or (path / "latest").exists() or any(path.glob("*.bin"))


def checkpoint_problem(path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete."""
    path = Path(path)
    if not (path / CHECKPOINT_MARKER).exists():
        return f"no completion marker {CHECKPOINT_MARKER} (the save was interrupted, or an older lmtrain wrote it)"
    record = read_checkpoint_marker(path)
    if record is None:
        return f"{CHECKPOINT_MARKER} is unreadable"
    for name, size in record.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing (listed in {CHECKPOINT_MARKER})"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {CHECKPOINT_MARKER} lists {size} (changed or truncated)"
    return None


def is_complete_checkpoint(path: Path) -> bool:
    return checkpoint_problem(path) is None


COMPLETE_FILE = "lmtrain_complete.json"  # written last, after the final model: the run is finished
# What a run of ours writes into output_dir before its first checkpoint. A directory holding only these
# (a run that failed or was killed early) is ours to start again in, not "another run's files".
EARLY_RUN_FILES = ("lmtrain_config.json", "data_report.json", "samples.jsonl", "training_curves.png", "runs")


def checkpoint_step(path) -> int:
    suffix = Path(path).name.split("-")[-1]
    return int(suffix) if suffix.isdigit() else -1


def _checkpoint_dirs(output_dir) -> list[Path]:
    return sorted((p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()),
                  key=checkpoint_step, reverse=True)


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint; each newer incomplete one is reported with the reason."""
    for path in _checkpoint_dirs(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def rotate_complete_checkpoints(output_dir, limit: int | None, best: str | None, newest: Path):
    """save_total_limit counting complete checkpoints only (transformers' rotation counts every directory
    and orders by mtime): keeps the `limit` newest complete ones, never the newest complete one nor the best,
    and deletes the incomplete leftovers of interrupted saves older than `newest` (never loadable). Called after
    `newest`'s marker is written, so the previous complete checkpoint outlives every moment of the new save."""
    if not limit or limit <= 0:
        return
    complete, leftovers = [], []
    for path in _checkpoint_dirs(output_dir):  # newest first
        if checkpoint_problem(path) is None:
            complete.append(path)
        elif checkpoint_step(path) < checkpoint_step(newest):
            leftovers.append(path)
    keep = set(complete[:max(limit, 1)])
    if best:
        keep.add(Path(best))
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in leftovers:
        logger.info("deleting %s: an incomplete checkpoint older than %s", path.name, newest.name)
        shutil.rmtree(path, ignore_errors=True)


def _planned_steps(args) -> dict:
    """What "finished" means for these arguments: the step budget, or the epochs when there is none."""
    return {"max_steps": args.max_steps} if args.max_steps and args.max_steps > 0 else \
        {"num_train_epochs": args.num_train_epochs}


def completed_run(args) -> dict | None:
    """The completion record when output_dir holds a finished run of this plan: rerunning its command (a
    cluster requeue, a retry-until-exit-0 wrapper) must change nothing. A different plan is refused."""
    path = Path(args.output_dir) / COMPLETE_FILE
    if args.overwrite_output_dir or args.resume_from_checkpoint or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is unreadable; treating the run as unfinished", path)
        return None
    planned = _planned_steps(args)
    if any(record.get("plan", {}).get(key) != value for key, value in planned.items()):
        done = ", ".join(f"{k} {v}" for k, v in record.get("plan", {}).items())
        asked = ", ".join(f"{k} {v}" for k, v in planned.items())
        raise UserError(f"output_dir '{args.output_dir}' holds a run that finished at step "
                        f"{record.get('global_step')} ({done}; {path}); this command asks for {asked}. To train "
                        f"further, start a new run from its weights (--model_name_or_path {args.output_dir} "
                        "--output_dir NEW_DIR); to redo it, pass --overwrite_output_dir")
    logger.info("run complete: %s finished at step %d (%s, %s); nothing to do. Pass --overwrite_output_dir to "
                "train it again from scratch", args.output_dir, record.get("global_step", -1),
                record.get("stopped_by", "max_steps"), path.name)
    return record


def mark_run_complete(trainer: Trainer, metrics: dict, stopped_by: str = "max_steps"):
    """Written after the final model and metrics, so its presence means all of them are complete."""
    if not trainer.is_world_process_zero():
        return
    record = {"global_step": trainer.state.global_step, "plan": _planned_steps(trainer.args),
              "stopped_by": stopped_by, "metrics": metrics}
    path = Path(trainer.args.output_dir) / COMPLETE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash leaves either no record or a whole one


def _early_run_files(args) -> set[str]:
    names = set(EARLY_RUN_FILES)
    if args.logging_dir:  # --logging_dir inside output_dir holds TensorBoard files of ours
        inside = Path(os.path.abspath(args.logging_dir))
        output = Path(os.path.abspath(args.output_dir))
        if output in inside.parents:
            names.add(inside.relative_to(output).parts[0])
    return names


# What a finished run of ours leaves at the top of output_dir (the final model of save_pretrained, tokenizer
# and generation config, the LoRA adapter, results, state and plot). A new run that stops early (a planned
# stop, a crash) would leave the old run's model there next to its checkpoints, and loading OUTPUT_DIR would
# quietly give the old model: --overwrite_output_dir deletes these names, and only these (never a user's file).
FINAL_OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                      "training_args.bin", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                      "tokenizer.model", "all_results.json", "train_results.json", "eval_results.json",
                      "trainer_state.json", "training_curves.png")
FINAL_OUTPUT_PATTERNS = ("model-*-of-*.safetensors",)
FINAL_OUTPUT_DIRS = ("adapter",)


def _final_outputs(output: Path) -> list[Path]:
    found = [output / name for name in FINAL_OUTPUT_FILES if (output / name).is_file()]
    found += [path for pattern in FINAL_OUTPUT_PATTERNS for path in sorted(output.glob(pattern)) if path.is_file()]
    return found + [output / name for name in FINAL_OUTPUT_DIRS if (output / name).is_dir()]


def _start_fresh(args, output: Path):
    """--overwrite_output_dir: the earlier run's checkpoints are deleted (never resumed from, never counted
    by checkpoint rotation later), and so are its completion record and its final output (FINAL_OUTPUT_FILES:
    the old model must not outlive it next to the new run's checkpoints); other files are kept."""
    if args.process_index != 0:
        return
    checkpoints = _checkpoint_dirs(output)
    for path in checkpoints:
        shutil.rmtree(path, ignore_errors=True)
    for name in (COMPLETE_FILE, "samples.jsonl"):
        (output / name).unlink(missing_ok=True)
    finals = _final_outputs(output)
    for path in finals:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if checkpoints:
        logger.warning("--overwrite_output_dir: starting fresh, deleted %d checkpoint(s) of the earlier run in %s "
                       "(%s)", len(checkpoints), output, ", ".join(p.name for p in checkpoints))
    if finals:
        logger.warning("--overwrite_output_dir: deleted the earlier run's final output in %s: %s", output,
                       ", ".join(p.name + ("/" if p.name in FINAL_OUTPUT_DIRS else "") for p in finals))
    if not checkpoints and not finals:
        logger.info("--overwrite_output_dir: starting fresh in %s", output)


def resolve_resume(args) -> str | None:
    """The checkpoint to resume from (_resume_decision), checked against this run's world size and global batch
    before anything is loaded (a ZeRO checkpoint of another world size needs its universal copy)."""
    from lmtrain.training.checkpoint_conversion import check_resume_world

    found = _resume_decision(args)
    check_resume_world(args, found)
    return found


def _resume_decision(args) -> str | None:
    """The checkpoint to resume from, and the output-dir policy:
    - --resume_from_checkpoint PATH: that checkpoint;
    - --overwrite_output_dir: start fresh (the earlier checkpoints are deleted, see _start_fresh);
    - else the newest complete checkpoint in output_dir;
    - else a fresh start, if output_dir holds nothing or only files an earlier attempt of ours wrote before
      its first checkpoint (EARLY_RUN_FILES); any other file refuses, so a typo never mixes two runs."""
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {path}: no such directory. Give a checkpoint-N directory, "
                            "or leave the flag out to resume from the newest complete one in --output_dir")
        problem = checkpoint_problem(path)
        if problem is not None and not (path / CHECKPOINT_MARKER).exists() and _legacy_complete(path):
            logger.warning("--resume_from_checkpoint %s has no %s (written before markers existed?); its "
                           "trainer_state.json and weights are there, so it is used as given", path, CHECKPOINT_MARKER)
        elif problem is not None:
            raise UserError(f"--resume_from_checkpoint {path}: not a complete checkpoint ({problem}). Give another "
                            "checkpoint, or leave the flag out to resume from the newest complete one")
        return args.resume_from_checkpoint
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is a file; give a directory")
    if not output.is_dir():
        return None
    if args.overwrite_output_dir:
        _start_fresh(args, output)
        return None
    found = find_resume_checkpoint(args.output_dir)
    if found:
        logger.info("resuming from %s (the newest complete checkpoint in output_dir)", found)
        return found
    ours = _early_run_files(args)
    foreign = sorted(p.name for p in output.iterdir()
                     if p.name not in ours and not p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise UserError(f"output_dir '{output}' is not empty ({shown}) and holds no checkpoint to resume from. "
                        "Pick a new --output_dir, or pass --overwrite_output_dir to train into it anyway")
    if any(output.iterdir()):
        logger.info("output_dir %s holds only files of an earlier attempt that stopped before its first "
                    "checkpoint: starting fresh", output)
        if args.process_index == 0:
            (output / "samples.jsonl").unlink(missing_ok=True)  # appended to: would mix both attempts
    return None


def check_checkpoint_fits(model, checkpoint: str):
    """A checkpoint of another model shape fails deep inside the Trainer with a torch traceback; compare the
    parameter shapes first (from the safetensors headers: no tensor is read)."""
    from safetensors import safe_open

    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in expected:
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise UserError(
                        f"checkpoint {checkpoint} does not fit this model: {key} has shape {list(shape)} in "
                        f"{file.name} and {list(expected[key])} in the model these flags build. Resume with the "
                        "model options that wrote it, or pass --overwrite_output_dir to start fresh (deletes the "
                        "old checkpoints), or give a new --output_dir")


def finish_from_checkpoint(trainer: Trainer, checkpoint: str):
    """The checkpoint already reached max_steps (the final save was cut short): Trainer.train would train one
    step past the plan, so load the checkpoint's weights and state instead of training."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if trainer.is_deepspeed_enabled:
        raise UserError(f"{checkpoint} is at step {state.global_step}, the end of the run, but the final model was "
                        "not saved (interrupted?). Export it from the checkpoint (python export.py ...), or pass "
                        "--overwrite_output_dir to train again")
    weights = checkpoint
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint and Path(state.best_model_checkpoint).is_dir():
        weights = state.best_model_checkpoint
    trainer._load_from_checkpoint(weights)
    trainer.state = state
    logger.warning("%s already reached max_steps %d; the final save had not finished: saving the final model "
                   "from %s without training", checkpoint, trainer.args.max_steps, weights)
    logged = [row["loss"] for row in state.log_history if "loss" in row]
    train_loss = sum(logged) / len(logged) if logged else float("nan")  # the mean of the logged losses
    return TrainOutput(state.global_step, train_loss, {"train_loss": train_loss, "epoch": state.epoch})



def save_checkpoint_with_marker(trainer: Trainer, save):
    """Trainer._save_checkpoint (`save`, which writes checkpoint-N on every rank) with the rotation moved
    after the completion marker: the marker is written by rank 0 once every rank has returned from the save,
    and only then are older checkpoints deleted (counting complete ones only)."""
    args = trainer.args
    folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    if trainer.is_world_process_zero() and folder.is_dir() and checkpoint_problem(folder) is not None:
        # An interrupted save of this very step (before a crash and the resume): start it clean, so no file
        # of that attempt (another world size's shards, a half-written optimizer state) survives into this one.
        logger.info("%s exists but is incomplete (%s): deleting it before saving again", folder.name,
                    checkpoint_problem(folder))
        shutil.rmtree(folder, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    limit, args.save_total_limit = args.save_total_limit, None  # transformers' rotation off: ours runs below
    try:
        save()
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()  # every rank's shards are on disk before the marker says so
    if trainer.is_world_process_zero() and folder.is_dir():
        zero_stage = None
        if trainer.is_deepspeed_enabled:
            zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        from lmtrain.distributed import global_batch_rows

        write_checkpoint_marker(folder, trainer.state.global_step, args.world_size, zero_stage,
                                extra={"global_batch": global_batch_rows(args)})
        rotate_complete_checkpoints(args.output_dir, limit, trainer.state.best_model_checkpoint, folder)
    trainer.accelerator.wait_for_everyone()
