"""Where the run's figures and samples go: SwanLab (offline without an account) and TensorBoard set-up, and
the greedy samples of fixed prompts written at every evaluation."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import Trainer

logger = logging.getLogger(__name__)


@torch.no_grad()
def log_samples(trainer: Trainer, prompts: list[str], max_new_tokens: int):
    """Greedy answers to fixed prompts, to watch the model learn: decoded by generate.py's own function
    (lmtrain.generation.generate_texts, greedy), so a sample is what `generate.py --do_sample false`
    prints for the saved model. --sample_chat_template (the default of sft.py) renders each prompt as a user
    turn as `--chat_template` does; pretraining continues the raw text. Every rank generates (ZeRO-3 shards
    the weights, so all ranks must run the forward passes in step); rank 0 writes the texts to the log,
    TensorBoard / SwanLab and OUTPUT_DIR/samples.jsonl."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from lmtrain.generation import SamplingArguments, generate_texts

    model, tokenizer = trainer.model, trainer.processing_class
    chat = getattr(trainer.args, "sample_chat_template", False)
    if chat and not getattr(tokenizer, "chat_template", None):
        logger.warning("--sample_chat_template: the tokenizer has no chat template; samples continue the raw prompt")
        chat = False
    was_training = model.training
    model.eval()
    greedy = SamplingArguments(max_new_tokens=max_new_tokens, do_sample=False)
    texts = generate_texts(model, tokenizer, list(prompts), greedy, chat=chat,
                           synced_gpus=is_deepspeed_zero3_enabled(), device=trainer.args.device)
    model.train(was_training)
    if not trainer.is_world_process_zero():
        return
    step = trainer.state.global_step
    with open(os.path.join(trainer.args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as handle:
        for prompt, text in zip(prompts, texts):
            logger.info("sample at step %d: %r -> %r", step, prompt, text)
            handle.write(json.dumps({"step": step, "prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
    table = "\n\n".join(f"**{p}**{t}" for p, t in zip(prompts, texts))
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.add_text("samples", table, step)
    import swanlab

    if swanlab.has_run():
        swanlab.log({"samples": swanlab.Text(table)}, step=step)


def configure_reporting(args):
    """SwanLab without an account or network: offline mode (logs kept under swanlog/, `swanlab sync` later)."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    if "swanlab" in report_to:
        _make_swanlab_get_run_return_none()
    if "swanlab" in report_to and "SWANLAB_MODE" not in os.environ and not os.environ.get("SWANLAB_API_KEY"):
        netrc = Path.home() / ".swanlab" / ".netrc"
        if not netrc.exists():
            os.environ["SWANLAB_MODE"] = "offline"
            logger.info("swanlab: not logged in, logging offline to ./swanlog (upload later with `swanlab sync`)")


def _make_swanlab_get_run_return_none():
    """transformers' SwanLabCallback asks `swanlab.get_run() is None` before starting a run; swanlab 0.10
    raises instead of returning None when no run exists. Give it the answer it expects."""
    import swanlab

    if getattr(swanlab.get_run, "_returns_none_without_run", False):
        return
    original = swanlab.get_run

    def get_run(*args, **kwargs):
        return original(*args, **kwargs) if swanlab.has_run() else None

    get_run._returns_none_without_run = True
    swanlab.get_run = get_run

