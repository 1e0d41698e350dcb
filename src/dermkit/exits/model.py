"""``EarlyExitModel``: a timm ViT or EfficientNet with classifier heads after some blocks.

The wrapper runs the backbone's parts itself (its stem, then the blocks one range at a
time; ``backbones.py`` names the parts per family), so it can read the state after any
block (ViT tokens, CNN feature maps) and, in ``infer.py``, stop computing for samples
that have already left. Exit ``j`` reads the state after ``exit_depths[j]`` blocks; the
last exit is the backbone's own head, so with every sample going to the last exit the
wrapper computes exactly ``backbone(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dermkit.exits.backbones import backbone_parts


def default_exit_blocks(depth: int) -> list[int]:
    """A few exit points in the latter half: blocks completed before each early exit.

    12 blocks -> [6, 8, 10]; 6 -> [3, 4, 5]; 4 -> [2, 3]; 2 -> [1]; 32 -> [16, 21, 26, 31].
    Early exits in the first half rarely reach the final head's accuracy (DYNAMAX's and
    most early-exit studies' observation), so they would mostly cost head compute.
    """
    if depth < 2:
        raise ValueError(f"a backbone with {depth} block(s) has no room for an early exit")
    step = max(1, depth // 6)
    return list(range(depth // 2, depth, step))


class EarlyExitModel(nn.Module):
    """A backbone plus one exit head of ``head_type`` after each block count in ``exit_blocks``.

    Args:
        backbone: a classifier (``num_classes > 0``): a timm ``VisionTransformer``, e.g.
            from ``create_backbone('vit_tiny_patch8_64', ...)``, a ``DistilledViT`` (its
            last exit is then the mean of its CLS and distillation heads), or a timm
            ``EfficientNet`` (e.g. ``tf_efficientnet_lite0``; a block is then a stage).
        exit_blocks: blocks completed before each early exit, each in [1, depth - 1];
            None -> :func:`default_exit_blocks`.
        head_type: "linear", "mlp", "attention" or "ssm" for a ViT; "linear" or "mlp"
            (pooled) for a CNN (see ``heads.py``).
        num_classes: C; must equal the backbone's (its head is the last exit).
        head_kwargs: extra arguments of :func:`dermkit.exits.heads.make_head`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        exit_blocks: Sequence[int] | None = None,
        head_type: str = "linear",
        num_classes: int | None = None,
        head_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        parts = backbone_parts(backbone)
        if backbone.num_classes <= 0:
            raise ValueError("the backbone has no classifier head (num_classes=0)")
        num_classes = backbone.num_classes if num_classes is None else num_classes
        if num_classes != backbone.num_classes:
            raise ValueError(
                f"num_classes {num_classes} differs from the backbone head's {backbone.num_classes}"
            )
        depth = parts.depth
        blocks = default_exit_blocks(depth) if exit_blocks is None else sorted(set(exit_blocks))
        if not blocks or blocks[0] < 1 or blocks[-1] >= depth:
            raise ValueError(f"exit_blocks {list(exit_blocks or [])} must lie in [1, {depth - 1}]")
        self.backbone = backbone
        self.parts = parts
        self.head_type = head_type
        self.num_classes = num_classes
        self.exit_blocks = tuple(blocks)
        self.depth = depth
        self.heads = nn.ModuleList(
            parts.make_head(head_type, d, num_classes, **(head_kwargs or {})) for d in blocks
        )

    def keep_exits(self, keep: Sequence[int]) -> EarlyExitModel:
        """A model with only the early exits ``keep`` (indices into ``exit_blocks``); it
        shares this one's backbone and heads. ``keep = []`` leaves the final exit alone."""
        keep = sorted(set(keep))
        if keep and not 0 <= keep[0] <= keep[-1] < len(self.exit_blocks):
            raise ValueError(f"keep {keep}: this model has {len(self.exit_blocks)} early exits")
        view = EarlyExitModel.__new__(EarlyExitModel)
        nn.Module.__init__(view)
        view.backbone, view.parts = self.backbone, self.parts
        view.heads = nn.ModuleList(self.heads[j] for j in keep)
        view.head_type, view.num_classes, view.depth = self.head_type, self.num_classes, self.depth
        view.exit_blocks = tuple(self.exit_blocks[j] for j in keep)
        return view.train(self.training)

    @property
    def n_exits(self) -> int:
        """Early exits + the final one."""
        return len(self.exit_blocks) + 1

    @property
    def exit_depths(self) -> tuple[int, ...]:
        """Blocks computed before each exit, (n_exits,); the last is the full depth."""
        return (*self.exit_blocks, self.depth)

    def block_range(self, j: int) -> tuple[int, int]:
        """Blocks [start, end) that run between exit j - 1 and exit j."""
        start = 0 if j == 0 else self.exit_depths[j - 1]
        return start, self.exit_depths[j]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the state before the first block: ViT tokens (B, N, D) in
        timm's order, or a CNN's stem map (B, C0, H', W')."""
        return self.parts.embed(x)

    def run_blocks(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks [start, end) on the state (tokens or map) -> the state after them."""
        for i in range(start, end):
            tokens = self.parts.block(i)(tokens)
        return tokens

    def exit_logits(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """Logits (B, C) of exit j from the state after ``exit_depths[j]`` blocks."""
        if j == self.n_exits - 1:
            return self.parts.final(tokens)
        return self.heads[j](tokens)

    def segment(self, inputs: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run segment j: images (j = 0) or state -> (state after exit j's block, logits j).

        "Tokens" here and in the ONNX segments' names is the state between blocks: ViT
        tokens or a CNN's feature map."""
        tokens = self.embed(inputs) if j == 0 else inputs
        tokens = self.run_blocks(tokens, *self.block_range(j))
        return tokens, self.exit_logits(tokens, j)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) -> logits (B, C) of every exit, early ones first."""
        out, h = [], x
        for j in range(self.n_exits):
            h, logits = self.segment(h, j)
            out.append(logits)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same as :meth:`forward_all`."""
        return self.forward_all(x)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: backbone family, head type, exit depths, head parameters."""
        return {
            "family": self.parts.family,
            "head_type": self.head_type,
            "exit_blocks": list(self.exit_blocks),
            "depth": self.depth,
            "num_classes": self.num_classes,
            "head_params": sum(p.numel() for p in self.heads.parameters()),
            "backbone_params": sum(p.numel() for p in self.backbone.parameters()),
        }


EarlyExitViT = EarlyExitModel
"""The name from when only ViTs had exits; ``exits/train.py`` and older callers import it."""
