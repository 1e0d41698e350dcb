"""Imbalance-aware classification losses and class-balanced sampling weights.

* ``weighted_ce``: cross-entropy with inverse-frequency class weights (``power`` 1) or
  their square root (``power`` 0.5, gentler: rare classes are not over-fitted as fast).
* ``focal``: focal loss (Lin et al. 2017), down-weights easy examples by (1 - p_t)^gamma.
* ``logit_adjusted``: adds tau * log(prior) to the logits during training only (Menon et
  al. 2021, "Long-tail learning via logit adjustment"), which makes the argmax at test
  time estimate the *balanced* error optimum without any re-weighting.

All take logits (B, C) and either hard targets (B,) or soft targets (B, C) from mixup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_weights(counts: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights (C,) normalised to mean 1; empty classes get weight 0."""
    counts = counts.float()
    w = torch.where(counts > 0, counts.clamp(min=1).pow(-power), torch.zeros_like(counts))
    return w * (counts > 0).sum() / w.sum()


def _soft(targets: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """Hard (B,) or soft (B, C) targets -> smoothed soft targets (B, C)."""
    if targets.ndim == 1:
        targets = F.one_hot(targets, n_classes).float()
    return targets * (1 - smoothing) + smoothing / n_classes


class ClassificationLoss(torch.nn.Module):
    """One module for every imbalance strategy; see the module docstring.

    Args:
        kind: "ce", "weighted_ce", "focal" or "logit_adjusted".
        class_counts: (C,) training images per class (weights and priors come from it).
    """

    def __init__(
        self,
        kind: str,
        class_counts: torch.Tensor,
        label_smoothing: float = 0.0,
        weight_power: float = 1.0,
        focal_gamma: float = 2.0,
        logit_tau: float = 1.0,
    ):
        super().__init__()
        if kind not in ("ce", "weighted_ce", "focal", "logit_adjusted"):
            raise ValueError(f"unknown loss '{kind}'")
        self.kind, self.smoothing, self.gamma = kind, label_smoothing, focal_gamma
        n = len(class_counts)
        weights = class_weights(class_counts, weight_power) if kind == "weighted_ce" else None
        self.register_buffer("weights", weights if weights is not None else torch.ones(n))
        prior = class_counts.float().clamp(min=1) / class_counts.sum()
        self.register_buffer("log_prior_shift", logit_tau * prior.log())

    @classmethod
    def from_config(cls, loss_cfg, class_counts: torch.Tensor) -> ClassificationLoss:
        """The loss a run's ``loss`` section (``config.LossConfig``) describes."""
        return cls(
            loss_cfg.loss,
            class_counts,
            loss_cfg.label_smoothing,
            loss_cfg.weight_power,
            loss_cfg.focal_gamma,
            loss_cfg.logit_tau,
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        n = logits.shape[1]
        soft = _soft(targets, n, self.smoothing)
        if self.kind == "logit_adjusted":
            logits = logits + self.log_prior_shift
        logp = logits.log_softmax(dim=1)
        if self.kind == "focal":
            pt = (soft * logp.exp()).sum(1)
            return (-(1 - pt).pow(self.gamma) * (soft * logp).sum(1)).mean()
        # A plain mean over samples (not over the batch's target weights, as
        # F.cross_entropy(weight=...) does) keeps the loss of a batch split across
        # data-parallel ranks equal to the loss of the whole batch.
        return -(soft * logp * self.weights).sum(1).mean()


def sampling_weights(labels: torch.Tensor, mode: str, n_classes: int) -> torch.Tensor | None:
    """Per-sample weights (N,) for a weighted sampler, or None for plain shuffling.

    "class_balanced": every class equally likely; "sqrt_balanced": class probability
    proportional to sqrt(count), a compromise that still sees the majority class often.
    """
    if mode == "random":
        return None
    counts = torch.bincount(labels, minlength=n_classes).float()
    power = {"class_balanced": 1.0, "sqrt_balanced": 0.5}.get(mode)
    if power is None:
        raise ValueError(f"unknown sampler '{mode}'")
    per_class = counts.clamp(min=1).pow(-power)
    return per_class[labels]
