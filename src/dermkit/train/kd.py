"""Soft-target knowledge distillation loss (Hinton, Vinyals and Dean 2015).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * hard_loss(student, labels)

The temperature T > 1 softens both distributions so the student also learns the teacher's
ranking of the wrong classes ("dark knowledge": a naevus that looks a bit like a
melanoma). The gradient of the KL term scales as 1/T^2, hence the T^2 factor, which keeps
the balance between the two terms independent of T. The hard term is plain cross-entropy
(optionally label-smoothed) unless a ``hard_loss`` module is given, e.g. the configured
imbalance-aware ``ClassificationLoss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    """Distillation loss on logits.

    Args:
        alpha: weight of the KL term in [0, 1]; ``1 - alpha`` weighs the hard-label term.
        temperature: softmax temperature T > 0 applied to both student and teacher logits.
        label_smoothing: smoothing of the default cross-entropy hard term.
        hard_loss: optional ``(logits (B, C), targets) -> scalar`` replacing that
            cross-entropy (its own smoothing then applies).
    """

    def __init__(
        self,
        alpha: float,
        temperature: float,
        label_smoothing: float = 0.0,
        hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self.hard_loss = hard_loss

    def soft_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(p_teacher || p_student) at temperature T, mean over the batch; scalar.

        student, teacher: logits (B, C). The teacher is treated as a constant.
        """
        t = self.temperature
        log_p_student = F.log_softmax(student.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * t * t

    def hard_term(self, student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss against labels: targets (B,) class indices or (B, C) soft targets (mixup)."""
        if self.hard_loss is not None:
            return self.hard_loss(student, targets)
        return F.cross_entropy(student.float(), targets, label_smoothing=self.label_smoothing)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """student, teacher: logits (B, C); targets: (B,) indices or (B, C) probabilities.

        Returns the scalar loss; a term whose weight is 0 is not computed at all.
        """
        loss = student.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            loss = loss + self.alpha * self.soft_term(student, teacher)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.hard_term(student, targets)
        return loss
