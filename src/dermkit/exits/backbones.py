"""Backbone adapters: what an early-exit model needs to know of a ViT or a CNN.

:class:`~dermkit.exits.model.EarlyExitModel` runs a backbone's parts itself (the input
stem, then its blocks one range at a time, then its own head), so it can read the state
after any block and stop there. An adapter names those parts for one family:

* :class:`ViTParts` (timm ``VisionTransformer``, dermkit's ``DistilledViT``): patch +
  position embedding, the transformer blocks, final norm + head. The state between
  blocks is the token sequence (B, N, D); every block has the same shape and cost.
* :class:`EfficientNetParts` (timm ``EfficientNet``: EfficientNet, EfficientNet-Lite,
  MobileNet-V2 style): conv stem, the stages ``blocks[0..S-1]`` (a "block" here is a
  stage: inside one the width stays, between two it grows and the resolution falls),
  then ``conv_head``/``bn2``, pooling and the classifier. The state is a feature map
  (B, C, H, W); stages differ several-fold in cost, so latency is measured per stage.

An adapter also builds the exit heads that fit its state (``make_head``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.efficientnet import EfficientNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dermkit.exits.heads import PooledMapHead, make_head
from dermkit.models.distilled import DistilledViT


class ViTParts:
    """A timm ViT (or ``DistilledViT``): tokens (B, N, D) between blocks."""

    family = "vit"
    uniform_blocks = True  # one block's latency stands for each (exits/latency.py)

    def __init__(self, backbone: VisionTransformer | DistilledViT):
        self.backbone = backbone
        self.depth = len(backbone.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, N, D) before the first block (timm's order)."""
        b = self.backbone
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    def block(self, i: int) -> nn.Module:
        return self.backbone.blocks[i]

    def final(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> the backbone's logits (B, C)."""
        return self.backbone.forward_head(self.backbone.norm(tokens))

    def make_head(self, head_type: str, after: int, num_classes: int, **kwargs: Any) -> nn.Module:
        """An exit head of ``head_type`` for the tokens after ``after`` blocks."""
        grid = self.backbone.patch_embed.grid_size
        return make_head(
            head_type,
            self.backbone.embed_dim,
            num_classes,
            num_prefix_tokens=self.backbone.num_prefix_tokens,
            grid=grid[0] if grid[0] == grid[1] else None,
            **kwargs,
        )


class EfficientNetParts:
    """A timm ``EfficientNet``: feature maps (B, C, H, W) between stages."""

    family = "cnn"
    uniform_blocks = False
    head_types = ("linear", "mlp")

    def __init__(self, backbone: EfficientNet):
        self.backbone = backbone
        self.depth = len(backbone.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the stem's map (B, C0, H/2, W/2)."""
        return self.backbone.bn1(self.backbone.conv_stem(x))

    def block(self, i: int) -> nn.Module:
        return self.backbone.blocks[i]

    def final(self, maps: torch.Tensor) -> torch.Tensor:
        """The last stage's map -> the backbone's logits (B, C): timm's own tail, so the
        exit model with every sample at the last exit computes exactly ``backbone(x)``."""
        b = self.backbone
        return b.forward_head(b.bn2(b.conv_head(maps)))

    def width(self, after: int) -> int:
        """Channels of the map after ``after`` stages."""
        # timm registers a block's output projection last (conv_pw of a depthwise-separable
        # block, conv_pwl of an inverted residual, after any squeeze-excite convs)
        convs = [m for m in self.backbone.blocks[after - 1].modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def make_head(self, head_type: str, after: int, num_classes: int, **kwargs: Any) -> nn.Module:
        """A pooled exit head (linear or MLP) for the map after ``after`` stages."""
        if head_type not in self.head_types:
            raise ValueError(
                f"exit heads on a CNN are {list(self.head_types)} (global-average-pooled "
                f"features); {head_type!r} reads ViT tokens"
            )
        hidden = kwargs.get("mlp_hidden", 256) if head_type == "mlp" else None
        return PooledMapHead(self.width(after), num_classes, hidden=hidden)


BackboneParts = ViTParts | EfficientNetParts


def backbone_parts(backbone: nn.Module) -> BackboneParts:
    """The adapter of ``backbone``; TypeError for a family early exits do not know."""
    if isinstance(backbone, (VisionTransformer, DistilledViT)):
        return ViTParts(backbone)
    if isinstance(backbone, EfficientNet):
        return EfficientNetParts(backbone)
    raise TypeError(
        "early exits need a timm VisionTransformer or EfficientNet backbone, got "
        f"{type(backbone).__name__}"
    )
