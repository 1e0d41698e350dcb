"""``DistilledViT``: a timm ViT with a DeiT distillation token and head (Touvron et al. 2021).

DeiT ("Training data-efficient image transformers & distillation through attention") adds
a second learnable token next to CLS. It passes through every block like CLS and has its
own linear head: the CLS head learns from the labels, the distillation head from the
teacher (soft KL at temperature T, or cross-entropy on the teacher's argmax). At inference
the two heads' logits are averaged, so the model maps images (B, 3, S, S) to logits (B, C)
like any classifier: ONNX export, evaluation, early exits and serving see nothing new.

Why a wrapper and not timm's ``VisionTransformerDistilled``: that class re-implements the
position embedding and is registered for the DeiT shapes only, while dermkit's variants
are plain ``VisionTransformer`` instances with constructor overrides (``registry.py``).
timm's ``VisionTransformer`` already handles extra prefix tokens: ``reg_tokens=1`` adds one
learnable token right after CLS, with its own row of ``pos_embed`` (``num_prefix_tokens``
= 2), and its ``_pos_embed``, ``forward_features``, ``forward_intermediates`` and pooling
all know about it. The distillation token *is* that token (sequence index 1); the wrapper
only adds the second head and the averaging. State keys are ``vit.*`` and ``head_dist.*``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dermkit.models.backbones import SPEC_ATTR, create_backbone

DIST_INDEX = 1
"""Sequence position of the distillation token: timm puts register tokens right after CLS."""


# ----------------------------------------------------------------------------- wrappers


def prefixed_no_weight_decay(inner: nn.Module, prefix: str) -> set[str]:
    """The inner module's ``no_weight_decay()`` names (pos_embed, cls_token...) under ``prefix``.

    timm's optimizer factory reads ``model.no_weight_decay()`` by parameter name; a wrapper
    renames the parameters, so it must rename the list too or the tokens get decayed.
    """
    names = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
    return {prefix + n for n in names}


def prefixed_group_matcher(inner: nn.Module, prefix: str, coarse: bool) -> Callable[[str], int]:
    """A timm ``group_matcher`` (name -> layer) for a wrapper holding ``inner`` at ``prefix``.

    Layer-wise lr decay (``optim.layer_decay``) groups parameters with the model's matcher;
    the inner model's own groups are kept, and parameters outside it (extra heads, a feature
    projection) join the last group, the classifier's.
    """
    if not hasattr(inner, "group_matcher"):
        return lambda name: 0
    layers = group_parameters(inner, inner.group_matcher(coarse=coarse), reverse=True)
    last = max(layers.values(), default=0)

    def layer_of(name: str) -> int:
        return layers.get(name.removeprefix(prefix), last) if name.startswith(prefix) else last

    return layer_of


def _from_vit(name: str) -> property:
    """A read-only attribute of the wrapper that is the wrapped ViT's ``name``."""
    return property(lambda self: getattr(self.vit, name), doc=f"``self.vit.{name}``")


class DistilledViT(nn.Module):
    """A timm ``VisionTransformer`` built with ``reg_tokens=1`` plus a distillation head.

    Args:
        vit: a class-token ViT with one register token (the distillation token), token
            pooling and a classifier head, e.g. from :func:`create_distilled_vit`.

    ``forward(x)``: images (B, 3, S, S) -> (CLS logits + distillation logits) / 2, (B, C).
    ``forward_heads(tokens)``: both heads' logits separately, for training.
    The ViT attributes dermkit reads (``blocks``, ``patch_embed``, ``num_prefix_tokens``,
    ``embed_dim``...) are forwarded, so attention rollout, Grad-CAM, feature extraction and
    early exits work on it as on the plain ViT.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"a distillation token needs a timm VisionTransformer, got {type(vit)}")
        problems = []
        if not vit.has_class_token or vit.global_pool != "token" or vit.attn_pool is not None:
            problems.append(f"class-token pooling (it pools with {vit.global_pool!r})")
        if vit.num_reg_tokens != 1:
            problems.append(f"exactly one register token (it has {vit.num_reg_tokens})")
        if vit.num_classes <= 0:
            problems.append("a classifier head (num_classes=0)")
        if problems:
            raise ValueError(f"DistilledViT needs a ViT with {' and '.join(problems)}")
        self.vit = vit
        self.head_dist = nn.Linear(vit.embed_dim, vit.num_classes)
        # DeiT's initialisation: timm draws register tokens at std 1e-6, nearly equal to CLS.
        trunc_normal_(vit.reg_token, std=0.02)
        trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)
        spec = getattr(vit, SPEC_ATTR, None)
        if spec is not None:
            setattr(self, SPEC_ATTR, {**spec, "dist_token": True})

    # --- the ViT attributes other dermkit modules read (explain, exits, describe)
    blocks = _from_vit("blocks")
    patch_embed = _from_vit("patch_embed")
    patch_drop = _from_vit("patch_drop")
    norm_pre = _from_vit("norm_pre")
    norm = _from_vit("norm")
    embed_dim = _from_vit("embed_dim")
    num_prefix_tokens = _from_vit("num_prefix_tokens")
    num_features = _from_vit("num_features")
    head_hidden_size = _from_vit("head_hidden_size")
    num_classes = _from_vit("num_classes")
    pretrained_cfg = _from_vit("pretrained_cfg")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, gh, gw, D) or (B, N, D) -> CLS, distillation and patch tokens + pos."""
        return self.vit._pos_embed(x)

    def no_weight_decay(self) -> set[str]:
        return prefixed_no_weight_decay(self.vit, "vit.")

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return prefixed_group_matcher(self.vit, "vit.", coarse)

    # --- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> normed tokens (B, 2 + N, D): CLS, distillation, patches."""
        return self.vit.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, **kwargs):
        """timm's ``forward_intermediates`` (the two prefix tokens are split off as usual)."""
        return self.vit.forward_intermediates(x, **kwargs)

    def forward_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed tokens (B, 2 + N, D) -> (CLS head logits (B, C), distillation logits (B, C))."""
        vit = self.vit
        cls_logits = vit.forward_head(tokens)  # token pooling reads position 0, CLS
        dist = vit.head_drop(vit.fc_norm(tokens[:, DIST_INDEX]))
        return cls_logits, self.head_dist(dist)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 2 + N, D) -> mean of both heads' logits (B, C).

        ``pre_logits``: the mean of the CLS and distillation features (B, D), as timm's DeiT.
        """
        if pre_logits:
            vit = self.vit
            cls = vit.forward_head(tokens, pre_logits=True)
            return (cls + vit.head_drop(vit.fc_norm(tokens[:, DIST_INDEX]))) / 2
        cls_logits, dist_logits = self.forward_heads(tokens)
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> logits (B, C), the average of the two heads (DeiT inference)."""
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------- building


def create_distilled_vit(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    input_norm: str = "auto",
) -> DistilledViT:
    """The backbone ``name`` (a ViT) with a distillation token and head, randomly initialised."""
    vit = create_backbone(
        name,
        num_classes=num_classes,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
        input_norm=input_norm,
        reg_tokens=1,
    )
    return DistilledViT(vit)


def load_plain_vit_state(model: DistilledViT, state: dict[str, torch.Tensor]) -> None:
    """Fill ``model`` from a plain ViT of the same architecture (one prefix token fewer).

    Every tensor is copied; ``pos_embed`` gets a row for the distillation token, a copy of
    the CLS row (when the position embedding covers the prefix tokens). The distillation
    token and head keep their initial values. Any other difference is an error.
    """
    vit = model.vit
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and not vit.no_embed_class and pos.shape[1] == vit.pos_embed.shape[1] - 1:
        state["pos_embed"] = torch.cat([pos[:, :DIST_INDEX], pos[:, :1], pos[:, DIST_INDEX:]], 1)
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise ValueError(f"the plain ViT's weights do not fit the distilled ViT: {e}") from e
    if set(missing) != {"reg_token"} or unexpected:
        raise ValueError(
            f"the plain ViT's weights do not fit the distilled ViT: missing {missing}, "
            f"unexpected {unexpected}"
        )
