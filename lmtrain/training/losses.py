"""The training loss when a recipe option changes it: label smoothing and z-loss.

Without them the model computes its own loss (transformers' ForCausalLMLoss, or Liger's fused linear
cross-entropy on a GPU) and nothing here runs. With either, `CausalLMLoss` is the Trainer's
`compute_loss_func`: the model returns logits and the loss is, per predicted token t (labels shifted by one,
-100 ignored),

    (1 - eps) * -log p(y_t) + eps * mean_v(-log p(v))      label smoothing, eps = --label_smoothing_factor
    + c * logsumexp(logits_t) ** 2                          z-loss (PaLM), c = --z_loss_coefficient

summed and divided by `num_items_in_batch`: the Trainer's count of predicted tokens in the whole optimizer
step (every gradient-accumulation micro-batch, every rank with --average_tokens_across_devices). So a
packed block's and an SFT row's tokens weigh the same as in the unsmoothed loss, whatever the padding and
the prompt masks; the Trainer does not divide again by the accumulation steps (a compute_loss_func's loss
counts as normalized). Evaluation is unaffected: LMTrainer's validation figures come from plain per-token
cross-entropy (lmtrain/training/metrics.py).

Why z-loss: it pulls the softmax normalizer log Z towards 0, which keeps output logits from drifting to
large magnitudes (PaLM, Chowdhery et al. 2022, used c = 1e-4); the cost is a logsumexp per token, which the
cross-entropy computes anyway. Both options need the full logits: on a GPU they replace Liger's fused
cross-entropy, which never materializes them (more memory for large vocabularies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                       z_loss_coefficient: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, z-loss sum, predicted tokens) over a batch: logits [B, T, V] predict labels[:, 1:]."""
    logits = logits[..., :-1, :].float()
    targets = labels[..., 1:].to(logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)
    z_sum = flat_logits.new_zeros(())
    if z_loss_coefficient:
        log_z = torch.logsumexp(flat_logits[keep], dim=-1)
        z_sum = z_loss_coefficient * log_z.pow(2).sum()
    return loss + z_sum, z_sum.detach(), keep.sum()


class CausalLMLoss:
    """The Trainer's compute_loss_func(outputs, labels, num_items_in_batch) for these options."""

    def __init__(self, label_smoothing: float = 0.0, z_loss_coefficient: float = 0.0):
        self.label_smoothing = label_smoothing
        self.z_loss_coefficient = z_loss_coefficient
        self.last_z_loss = None  # the z-loss term of the last micro-batch, normalized like the loss
        self._window_z_loss = 0.0  # the training micro-batches' terms since take_window_z_loss(), a tensor

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total, z_sum, count = causal_lm_loss_sum(logits, labels, self.label_smoothing, self.z_loss_coefficient)
        # Without the step's count (no labels counted) this micro-batch's own tokens normalize it.
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        self.last_z_loss = z_sum / denominator
        if self.z_loss_coefficient and torch.is_grad_enabled():  # training, not evaluation (no_grad)
            # kept on the device: a float() here would wait for the GPU in every micro-batch
            self._window_z_loss = self._window_z_loss + self.last_z_loss
        return total / denominator

    def take_window_z_loss(self, optimizer_steps: int) -> float:
        """The z-loss term per optimizer step since the last call (the micro-batches of a step add up to that
        step's term, each normalized by the step's token count as the loss is), and a new window."""
        value, self._window_z_loss = float(self._window_z_loss) / max(optimizer_steps, 1), 0.0
        return value


def loss_function_for(args) -> CausalLMLoss | None:
    """The compute_loss_func of a run (TrainArguments), or None: the model's own loss."""
    smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
    z_loss = float(getattr(args, "z_loss_coefficient", 0.0) or 0.0)
    if not smoothing and not z_loss:
        return None
    return CausalLMLoss(smoothing, z_loss)
