"""The beginning and the end of a training run, the same for every stage (pretrain.py, sft.py), so the entry
scripts keep only what differs between stages: which options, which model wrapping, which final save."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import set_seed

from lmtrain.cli.parsing import save_resolved_config
from lmtrain.distributed import single_process_deepspeed
from lmtrain.preflight_nodes import check_nodes_agree
from lmtrain.training.checkpoints import completed_run, mark_run_complete, resolve_resume
from lmtrain.training.preflight import preflight
from lmtrain.training.signals import exit_after_signal
from lmtrain.training.trainer import end_of_training, final_metrics, run_training


@dataclass
class RunStart:
    finished_metrics: dict | None  # not None: the run in output_dir already finished, nothing to do
    resume_from: str | None


def start_run(model_args, training_args, row_length: int | None, row_flag: str, use_lora: bool = False,
              **option_groups) -> RunStart:
    """Logging (rank 0 informs, the others warn), the finished-run check, the configuration checks (before
    any download or data preparation), the resume decision, the seed (before the model is built: its random
    init must repeat across runs) and the resolved options written next to the checkpoints."""
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    choice = getattr(training_args, "batch_size_choice", None)  # lmtrain.planning.auto_batch.CHOICE_ATTRIBUTE
    if choice:
        logging.getLogger("lmtrain.batch_size").info("%s", choice)
    finished = completed_run(training_args)  # a requeued finished run: change nothing
    if finished is not None:
        return RunStart(finished.get("metrics", {}), None)
    preflight(model_args, training_args, row_length, row_flag, use_lora=use_lora)
    single_process_deepspeed(training_args)
    check_nodes_agree(training_args, option_groups.get("data"))  # every node: the same code, data and GPUs
    resume_from = resolve_resume(training_args)
    set_seed(training_args.seed)
    if training_args.process_index == 0:
        save_resolved_config(training_args.output_dir, model=model_args, **option_groups)
    return RunStart(None, resume_from)


def train_and_finish(trainer, resume_from: str | None, evaluate: bool, save_final) -> dict:
    """Train, then end the run by how training ended: after SIGTERM/SIGINT a checkpoint and exit 128 + N;
    after a planned stop a checkpoint only; otherwise final metrics, the trainer state, the final model
    (`save_final()`) and, last, the completion record whose presence means the run is done."""
    result = run_training(trainer, resume_from)
    ended = end_of_training(trainer)
    if ended == "interrupted":
        exit_after_signal(trainer)
    if ended == "stopped":
        return dict(result.metrics)
    metrics = final_metrics(trainer, result, evaluate)
    trainer.save_state()
    save_final()
    mark_run_complete(trainer, metrics, ended)
    return metrics
