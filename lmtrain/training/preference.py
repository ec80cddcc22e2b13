"""Preference tuning on TRL's DPOTrainer, wired like the other stages: PreferenceTrainer is DPOTrainer with
LMTrainer's parts (throughput, non-finite step guard, checkpoint completion markers, the applied learning
rate, samples at evaluation) and build_preference_trainer attaches the same callbacks as build_trainer
(planned stop, preemption signals, early stopping, curves), so resume, monitoring and the final save are
the ones pretrain.py and sft.py have.

What TRL does, and what we do instead:
- the loss, the reference log-probs, the rewards/accuracies, margins and log-prob metrics: TRL's;
- tokenizing: ours (lmtrain/data/preference.py, the SFT chat renderer and our truncation and drop counts),
  handed to DPOTrainer as prompt_ids / chosen_ids / rejected_ids, which its _prepare_dataset would
  otherwise re-derive from text;
- the reference model: a frozen copy built by build_model (the same overrides and checks as the policy)
  rather than TRL's reload from config._name_or_path; none with LoRA (the adapter switched off is the
  starting model) or with --precompute_ref_log_probs (the starting model scores every pair before step 1).
"""
from __future__ import annotations

import logging
import os
from dataclasses import MISSING, fields

from transformers import Trainer

from lmtrain.model.compiling import apply_layer_options
from lmtrain.training.callbacks import ThroughputCallback
from lmtrain.training.guards import StepGuard
from lmtrain.training.reporting import configure_reporting
from lmtrain.training.trainer import LMTrainer, trainer_callbacks

logger = logging.getLogger(__name__)
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def complete_dpo_config(args):
    """Give DPOTrainArguments every DPOConfig attribute DPOTrainer reads. The ones lmtrain does not expose keep
    TRL's defaults; these are fixed: max_length None (the pairs are truncated when they are encoded, by our
    rule, and counted), padding_free False and pad_to_multiple_of None (TRL's collator pads to the longest).

    DPOTrainArguments cannot simply subclass DPOConfig: DPOConfig's max_length, trust_remote_code and
    padding_free would clash with the data and model options of the same names on one command line."""
    from trl import DPOConfig

    fixed = {"max_length": None, "padding_free": False, "pad_to_multiple_of": None, "truncation_mode": "keep_start",
             "model_init_kwargs": None, "dataset_num_proc": None, "pad_token": None}
    for spec in fields(DPOConfig):
        if spec.name in fixed:
            setattr(args, spec.name, fixed[spec.name])
        elif not hasattr(args, spec.name):
            setattr(args, spec.name, spec.default_factory() if spec.default is MISSING else spec.default)
    return args


def _dpo_trainer_class():
    from trl import DPOTrainer

    class PreferenceTrainer(LMTrainer, DPOTrainer):
        """DPOTrainer with LMTrainer's logging, guard and checkpoint handling (method resolution: LMTrainer's
        overrides first, each calling on into DPOTrainer's). Evaluation is DPOTrainer's: the preference loss
        and reward figures on held-out pairs, not LMTrainer's per-token language-model statistics."""

        evaluation_loop = Trainer.evaluation_loop
        prediction_step = DPOTrainer.prediction_step

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.model
            if getattr(model, "peft_config", None) and "ref" in model.peft_config and self.ref_model is None:
                # DPOTrainer copies a PeftModel's adapter as a frozen "ref" adapter, for adapters trained
                # before. Ours is new (lora_B = 0: the adapted model is the base model), so the reference is
                # the base with the adapter switched off, as DPOTrainer does for a peft_config it wraps itself.
                model.delete_adapter("ref")
                model.set_adapter("default")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if all(name in dataset.column_names for name in TOKENIZED_COLUMNS):
                return dataset  # encoded by lmtrain/data/preference.py
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def create_model_card(self, *args, **kwargs):
            """No TRL README.md in output_dir at each checkpoint: the run's record is lmtrain_config.json and
            lmtrain_complete.json, and --overwrite_output_dir removes only files of ours."""

    return PreferenceTrainer


def build_preference_trainer(model, ref_model, tokenizer, args, train_dataset, eval_dataset=None):
    """The DPO trainer with the callbacks build_trainer gives the other stages."""
    # TRL pings the hub with a usage record when a trainer starts; a training toolkit stays quiet (and
    # offline clusters never wait on it). HF_HUB_DISABLE_TELEMETRY=0 turns it back on.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    complete_dpo_config(args)
    configure_reporting(args)
    callbacks = trainer_callbacks(args)
    trainer = _dpo_trainer_class()(
        model=model, ref_model=ref_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=callbacks,
        # MFU counts the policy's forward and backward; the reference's forward (a third more) is not in it.
        throughput=ThroughputCallback(model, peak_tflops=args.peak_tflops), guard=StepGuard(args.max_nonfinite_steps))
    # The policy only: a separate reference model stays as loaded (bf16, eager); it runs no backward.
    apply_layer_options(trainer.model, args)
    # precomputed first: with LoRA too the pairs are then scored once, and no reference forward runs in training
    reference = ("a frozen copy of the starting model" if trainer.ref_model is not None else
                 "log-probs of the starting model, computed before training" if args.precompute_ref_log_probs
                 else "the base model with the LoRA adapter switched off")
    logger.info("DPO: loss %s, beta %g, reference: %s", "+".join(args.loss_type), args.beta, reference)
    return trainer


def build_reference_model(model_args, tokenizer, training_args, use_lora: bool):
    """The frozen reference of full fine-tuning: built like the policy (build_model), so it is the same
    starting model. None with LoRA (the adapter switched off is the reference) or with precomputed
    reference log-probs (the policy scores the pairs before it trains)."""
    if use_lora or training_args.precompute_ref_log_probs:
        return None
    from lmtrain.model.building import build_model

    reference = build_model(model_args, tokenizer)
    reference.eval().requires_grad_(False)
    return reference
