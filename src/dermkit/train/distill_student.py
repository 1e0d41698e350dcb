"""What distillation reads besides logits: pooled features, attention maps, a second head.

``DistillStudent`` wraps the student for training only. In eval mode it is the student
(``student(x)`` -> logits (B, C)), so validation, EMA scoring and TTA see the plain model;
in train mode it returns a dict with what the KD criterion needs:

* ``logits`` (B, C): the student's logits; with a DeiT distillation token (``models/
  distilled.py``) the CLS head's, and ``dist_logits`` (B, C) the distillation head's;
* ``features`` (B, D_t): the student's pooled pre-logit features (timm
  ``forward_head(forward_features(x), pre_logits=True)``, width D_s) through a learnable
  linear projection to the teacher's width D_t (FitNets-style hint, Romero et al. 2015);
* ``attention`` (B, N): the last block's CLS-to-patch attention averaged over heads
  (attention transfer in the spirit of Zagoruyko & Komodakis 2017, on ViT attention).

The projection is part of the wrapper, so the optimiser, checkpoints (exact resume) and
EMA cover it, yet it is training-only: the run saves ``wrapper.student`` as
``model.safetensors``, never the wrapper.

Attention is read with a forward hook on the last block's ``attn_drop`` (the input of the
dropout is the softmax of timm's explicit attention path), the way ``explain/saliency.py``
reads rollout maps; the fused kernel never exposes the probabilities, so the last block
runs the explicit path while hooked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dermkit.models.backbones import feature_dim
from dermkit.models.distilled import (
    DistilledViT,
    prefixed_group_matcher,
    prefixed_no_weight_decay,
)


def is_vit_like(model: nn.Module) -> bool:
    """A timm ViT (or ``DistilledViT``): patch embedding, blocks with timm ``Attention``."""
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "patch_embed") or not blocks:
        return False
    attn = getattr(blocks[-1], "attn", None)
    return hasattr(attn, "attn_drop") and hasattr(attn, "fused_attn")


def patch_count(model: nn.Module) -> int:
    """Number of patch tokens of a ViT (its grid at the size it was built for)."""
    return int(model.patch_embed.num_patches)


@contextmanager
def last_block_attention(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect the last block's attention probabilities (B, heads, N, N) of each forward.

    ``enabled=False`` yields an empty list and changes nothing (no hook, fused kernel kept).
    """
    maps: list[torch.Tensor] = []
    if not enabled:
        yield maps
        return
    attn = model.blocks[-1].attn
    fused = attn.fused_attn
    attn.fused_attn = False  # timm's explicit softmax path, whose probabilities we hook
    handle = attn.attn_drop.register_forward_hook(lambda m, inputs, out: maps.append(inputs[0]))
    try:
        yield maps
    finally:
        attn.fused_attn = fused
        handle.remove()


def cls_to_patch_attention(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Attention (B, heads, N, N) -> the CLS row over the patch tokens, heads averaged, (B, P).

    Renormalised to sum to 1 over the patches: CLS also attends to itself and to other
    prefix tokens (a distillation token), whose share differs between models.
    """
    row = attn[:, :, 0, num_prefix_tokens:].float().mean(1)
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention maps (B, P) whose rows sum to 1, batch mean."""
    log_s = student.float().clamp_min(1e-12).log()
    log_t = teacher.detach().float().clamp_min(1e-12).log()
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def feature_matching_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between projected student features (B, D_t) and the teacher's (B, D_t)."""
    return F.mse_loss(projected.float(), teacher.detach().float())


class DistillStudent(nn.Module):
    """The student during distillation training (see the module docstring).

    Args:
        student: the timm model (or ``DistilledViT``) being trained.
        teacher_features: the teacher's pooled feature width D_t; builds the projection
            ``Linear(D_s, D_t)`` and returns ``features``. None: no feature matching.
        attention: return the last block's CLS-to-patch ``attention`` (a ViT student).
    """

    def __init__(
        self, student: nn.Module, teacher_features: int | None = None, attention: bool = False
    ):
        super().__init__()
        self.student = student
        self.projection = (
            nn.Linear(feature_dim(student), teacher_features) if teacher_features else None
        )
        self.attention = attention

    @property
    def num_classes(self) -> int:
        """Outputs per image (C, or K-1 for a CORN head): ``predict_logits`` reads it."""
        return self.student.num_classes

    def no_weight_decay(self) -> set[str]:
        return prefixed_no_weight_decay(self.student, "student.")

    def group_matcher(self, coarse: bool = False):
        return prefixed_group_matcher(self.student, "student.", coarse)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Eval: logits (B, C). Train: {"logits", ["dist_logits"], ["features"], ["attention"]}."""
        if not self.training:
            return self.student(x)
        s = self.student
        with last_block_attention(s, enabled=self.attention) as maps:
            tokens = s.forward_features(x)
        out: dict[str, torch.Tensor] = {}
        if isinstance(s, DistilledViT):
            out["logits"], out["dist_logits"] = s.forward_heads(tokens)
        else:
            out["logits"] = s.forward_head(tokens)
        if self.projection is not None:
            out["features"] = self.projection(s.forward_head(tokens, pre_logits=True))
        if self.attention:
            out["attention"] = cls_to_patch_attention(maps[-1], s.num_prefix_tokens)
        return out


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, x: torch.Tensor, features: bool, attention: bool
) -> dict[str, torch.Tensor]:
    """One teacher forward on x (B, 3, S, S): {"logits", ["features"] (B, D_t), ["attention"]}."""
    with last_block_attention(teacher, enabled=attention) as maps:
        tokens = teacher.forward_features(x)
    out = {"logits": teacher.forward_head(tokens)}
    if features:
        out["features"] = teacher.forward_head(tokens, pre_logits=True)
    if attention:
        out["attention"] = cls_to_patch_attention(maps[-1], teacher.num_prefix_tokens)
    return out
