"""``EarlyExitViT``: a timm VisionTransformer with classifier heads after some of its blocks.

The wrapper runs the ViT's parts itself (patch embedding + position embedding, then the
blocks one range at a time), so it can read the token sequence after any block and, in
``infer.py``, stop computing for samples that have already left. Exit ``j`` reads the
tokens after ``exit_depths[j]`` blocks; the last exit is the backbone's own head (final
norm + ``forward_head``), so with every sample going to the last exit the wrapper computes
exactly ``backbone(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dermkit.exits.heads import make_head
from dermkit.models.distilled import DistilledViT


def default_exit_blocks(depth: int) -> list[int]:
    """A few exit points in the latter half: blocks completed before each early exit.

    12 blocks -> [6, 8, 10]; 6 -> [3, 4, 5]; 4 -> [2, 3]; 2 -> [1]; 32 -> [16, 21, 26, 31].
    Early exits in the first half rarely reach the final head's accuracy (DYNAMAX's and
    most early-exit studies' observation), so they would mostly cost head compute.
    """
    if depth < 2:
        raise ValueError(f"a ViT with {depth} block(s) has no room for an early exit")
    step = max(1, depth // 6)
    return list(range(depth // 2, depth, step))


class EarlyExitViT(nn.Module):
    """A timm ViT plus one exit head of ``head_type`` after each block count in ``exit_blocks``.

    Args:
        backbone: a timm ``VisionTransformer`` with a classifier head (``num_classes > 0``),
            e.g. from ``create_backbone('vit_tiny_patch8_64', ...)``, or a ``DistilledViT``
            (its last exit is then the mean of its CLS and distillation heads).
        exit_blocks: blocks completed before each early exit, each in [1, depth - 1];
            None -> :func:`default_exit_blocks`.
        head_type: "linear", "mlp", "attention" or "ssm" (see ``heads.py``).
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
        if not isinstance(backbone, (VisionTransformer, DistilledViT)):
            raise TypeError(
                f"early exits need a timm VisionTransformer backbone, got {type(backbone).__name__}"
            )
        if backbone.num_classes <= 0:
            raise ValueError("the backbone has no classifier head (num_classes=0)")
        num_classes = backbone.num_classes if num_classes is None else num_classes
        if num_classes != backbone.num_classes:
            raise ValueError(
                f"num_classes {num_classes} differs from the backbone head's {backbone.num_classes}"
            )
        depth = len(backbone.blocks)
        blocks = default_exit_blocks(depth) if exit_blocks is None else sorted(set(exit_blocks))
        if not blocks or blocks[0] < 1 or blocks[-1] >= depth:
            raise ValueError(f"exit_blocks {list(exit_blocks or [])} must lie in [1, {depth - 1}]")
        self.backbone = backbone
        self.head_type = head_type
        self.num_classes = num_classes
        self.exit_blocks = tuple(blocks)
        self.depth = depth
        grid = backbone.patch_embed.grid_size
        self.heads = nn.ModuleList(
            make_head(
                head_type,
                backbone.embed_dim,
                num_classes,
                num_prefix_tokens=backbone.num_prefix_tokens,
                grid=grid[0] if grid[0] == grid[1] else None,
                **(head_kwargs or {}),
            )
            for _ in blocks
        )

    def keep_exits(self, keep: Sequence[int]) -> EarlyExitViT:
        """A model with only the early exits ``keep`` (indices into ``exit_blocks``); it
        shares this one's backbone and heads. ``keep = []`` leaves the final exit alone."""
        keep = sorted(set(keep))
        if keep and not 0 <= keep[0] <= keep[-1] < len(self.exit_blocks):
            raise ValueError(f"keep {keep}: this model has {len(self.exit_blocks)} early exits")
        view = EarlyExitViT.__new__(EarlyExitViT)
        nn.Module.__init__(view)
        view.backbone = self.backbone
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
        """Images (B, 3, H, W) -> tokens (B, N, D) before the first block (timm's order)."""
        b = self.backbone
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    def run_blocks(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks [start, end) on tokens (B, N, D) -> (B, N, D)."""
        for blk in self.backbone.blocks[start:end]:
            tokens = blk(tokens)
        return tokens

    def exit_logits(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """Logits (B, C) of exit j from the tokens (B, N, D) after ``exit_depths[j]`` blocks."""
        if j == self.n_exits - 1:
            return self.backbone.forward_head(self.backbone.norm(tokens))
        return self.heads[j](tokens)

    def segment(self, inputs: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run segment j: images (j = 0) or tokens -> (tokens after exit j's block, logits j)."""
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
        """JSON-able summary: head type, exit depths, head parameters."""
        return {
            "head_type": self.head_type,
            "exit_blocks": list(self.exit_blocks),
            "depth": self.depth,
            "num_classes": self.num_classes,
            "head_params": sum(p.numel() for p in self.heads.parameters()),
            "backbone_params": sum(p.numel() for p in self.backbone.parameters()),
        }
