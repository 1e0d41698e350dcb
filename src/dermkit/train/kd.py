"""Soft-target knowledge distillation loss (Hinton, Vinyals and Dean 2015).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * hard_loss(student, labels)

The temperature T > 1 softens both distributions so the student also learns the teacher's
ranking of the wrong classes ("dark knowledge": a naevus that looks a bit like a
melanoma). The gradient of the KL term scales as 1/T^2, hence the T^2 factor, which keeps
the balance between the two terms independent of T. The hard term is plain cross-entropy
(optionally label-smoothed) unless a ``hard_loss`` module is given, e.g. the configured
imbalance-aware ``ClassificationLoss``.

Variants:

* ``teacher_target="hard"`` (DeiT's hard distillation): the teacher term is the hard loss
  against the teacher's argmax instead of the soft KL.
* a DeiT distillation head (``student_dist``): the teacher term trains that head and the
  label term the CLS head, ``alpha * teacher(dist) + (1 - alpha) * labels(cls)``.
* :class:`OrdinalKDLoss`: a CORN head's K-1 outputs are logits of the conditional
  probabilities P(y > k | y > k-1), not a softmax; its soft term matches each of them,
  ``mean_k BCE(sigmoid(s_k / T), sigmoid(t_k / T)) * T^2``, and the label term is CORN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dermkit.tasks.ordinal import corn_class_probs, corn_loss


class KDLoss(nn.Module):
    """Distillation loss on logits.

    Args:
        alpha: weight of the KL term in [0, 1]; ``1 - alpha`` weighs the hard-label term.
        temperature: softmax temperature T > 0 applied to both student and teacher logits.
        label_smoothing: smoothing of the default cross-entropy hard term.
        hard_loss: optional ``(logits (B, C), targets) -> scalar`` replacing that
            cross-entropy (its own smoothing then applies).
        teacher_target: "soft" (KL at T) or "hard" (the hard loss on the teacher's argmax).
    """

    def __init__(
        self,
        alpha: float,
        temperature: float,
        label_smoothing: float = 0.0,
        hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher_target: str = "soft",
    ):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher_target not in ("soft", "hard"):
            raise ValueError(f"teacher_target must be 'soft' or 'hard', got {teacher_target!r}")
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self.hard_loss = hard_loss
        self.teacher_target = teacher_target

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

    def teacher_labels(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's predicted classes (B,) from its logits (B, C)."""
        return teacher.detach().argmax(1)

    def teacher_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Soft KL at T, or with ``teacher_target="hard"`` the hard loss on the teacher's argmax."""
        if self.teacher_target == "hard":
            return self.hard_term(student, self.teacher_labels(teacher))
        return self.soft_term(student, teacher)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor,
        student_dist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """student, teacher: logits (B, C); targets: (B,) indices or (B, C) probabilities.

        ``student_dist``: logits (B, C) of a distillation head (DeiT); the teacher term then
        trains it and the label term trains ``student`` (the CLS head).
        Returns the scalar loss; a term whose weight is 0 is not computed at all.
        """
        loss = student.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            dist = student if student_dist is None else student_dist
            loss = loss + self.alpha * self.teacher_term(dist, teacher)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.hard_term(student, targets)
        return loss


class OrdinalKDLoss(KDLoss):
    """Distillation of a CORN ordinal head: outputs (B, K-1), logits of P(y > k | y > k-1).

    soft term: ``T^2 * mean over rows and k of BCE(sigmoid(s_k / T), sigmoid(t_k / T))``.
    Each conditional probability is a Bernoulli of its own, so the teacher's is matched
    per threshold, softened by T like the softmax in Hinton's KD (the gradient of each
    term, ``(sigmoid(s_k / T) - sigmoid(t_k / T)) / T``, is zero exactly at the teacher's
    logits; the T^2 factor keeps the balance with the label term independent of T). The
    minimum is the teacher's binary entropy, not 0: BCE and the binary KL differ by it.
    Every row contributes to every k: the teacher defines each conditional for every image,
    unlike the labels, which CORN uses only on the rows with y > k-1.
    label term: the CORN loss (``tasks/ordinal.py``); the hard teacher target is the
    teacher's most probable class.
    """

    def __init__(self, alpha: float, temperature: float, teacher_target: str = "soft"):
        super().__init__(alpha, temperature, hard_loss=corn_loss, teacher_target=teacher_target)

    def soft_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student, teacher: conditional logits (B, K-1); scalar."""
        t = self.temperature
        target = torch.sigmoid(teacher.detach().float() / t)
        return F.binary_cross_entropy_with_logits(student.float() / t, target) * t * t

    def teacher_labels(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's most probable ordinal class (B,) from its conditional logits."""
        return corn_class_probs(teacher.detach()).argmax(1)
