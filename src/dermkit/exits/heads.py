"""Exit heads: classifiers that read a ViT's token sequence (or a CNN's map) after a block.

Every head maps the tokens after a block, ``(B, N, D)`` with ``N = prefix + grid * grid``
(timm order: class token first, then the patch grid row-major), to logits ``(B, C)``.
The four kinds follow the head study of DYNAMAX (arXiv 2504.20922), which compared
classifier heads for early exits on ViTs and Mamba models:

* :class:`LinearCLSHead`: LayerNorm + linear on the class token (the ViT's own head shape).
* :class:`MLPPooledHead`: mean of the patch tokens, LayerNorm, a two-layer MLP.
* :class:`AttentionPoolHead`: a learned query attending over all tokens (timm's
  ``AttentionPoolLatent``), LayerNorm + linear.
* :class:`SSMHead`: a small selective state-space (Mamba) sequence model over the tokens.

On a CNN (``exits/backbones.py``) the heads are :class:`PooledMapHead`: global average
pooling, then a linear layer or an MLP.

The SSM head uses ``mambapy`` (Mamba in pure PyTorch: runs on CPU, needs no CUDA kernels,
and its sequential scan exports to ONNX as plain ops) rather than a hand-written scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mambapy.mamba import Mamba, MambaConfig
from timm.layers import AttentionPoolLatent
from torch import nn

from dermkit.exits.scan import mamba_forward

HEAD_TYPES = ("linear", "mlp", "attention", "ssm")


class LinearCLSHead(nn.Module):
    """LayerNorm + linear on the class token; the mean token when there is no class token.

    Args:
        dim: token width D.
        num_classes: C.
        num_prefix_tokens: class/register tokens before the patch grid (timm's attribute).
    """

    def __init__(self, dim: int, num_classes: int, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C)."""
        x = tokens[:, 0] if self.num_prefix_tokens else tokens.mean(1)
        return self.fc(self.norm(x))


class MLPPooledHead(nn.Module):
    """Mean of the patch tokens, LayerNorm, Linear-GELU-Dropout-Linear.

    Args:
        dim: token width D.
        num_classes: C.
        num_prefix_tokens: tokens before the patch grid, left out of the mean.
        hidden: MLP hidden width.
        drop: dropout between the two layers.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int = 1,
        hidden: int = 256,
        drop: float = 0.0,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, num_classes)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C)."""
        return self.mlp(self.norm(tokens[:, self.num_prefix_tokens :].mean(1)))


class AttentionPoolHead(nn.Module):
    """One learned query attends over all tokens (multi-head), then LayerNorm + linear.

    The pooling is timm's ``AttentionPoolLatent`` in pre-logits mode (``out_features=0``:
    no MLP after it), so the head stays small; the tokens are LayerNorm-ed first because
    intermediate ViT tokens are not normalised (only the last block's output is).

    Args:
        dim: token width D (divisible by ``num_heads``).
        num_classes: C.
        num_heads: attention heads of the pooling query.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention head: width {dim} is not divisible by {num_heads} heads")
        self.norm_in = nn.LayerNorm(dim)
        self.pool = AttentionPoolLatent(dim, out_features=0, num_heads=num_heads)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C)."""
        return self.fc(self.norm(self.pool(self.norm_in(tokens))))


class SSMHead(nn.Module):
    """A small Mamba (selective state-space, Gu & Dao 2023) classifier over the tokens.

    Sequence: the patch grid, average-pooled by ``grid_pool`` (a 2x2 pool turns the 64
    tokens of an 8x8 grid into 16, which keeps the head cheap next to a ViT block), read
    row-major, followed by the class token(s) last. Mamba is causal, so the output at the
    last position has scanned the whole sequence; it is the class token's read-out, which
    a linear layer maps to logits. The head is a sequence model: permuting the tokens
    changes its output (unlike the mean or attention pooling heads).

    ``mambapy``'s parallel scan (``pscan``) is used for training. In eval mode the scan is
    evaluated in closed form by :func:`dermkit.exits.scan.mamba_forward` (cumulative sums
    of ``log a`` and one masked ``exp``, the last layer for the last position only): a few
    tensor ops instead of mambapy's token-by-token loop, and plain ONNX ops (mambapy's
    ``pscan`` updates tensors in place, which does not trace faithfully). Setting
    ``eval_scan = "sequential"`` restores mambapy's loop (the reference in tests and the
    overhead benchmark).

    Args:
        dim: token width D.
        num_classes: C.
        num_prefix_tokens: class/register tokens before the patch grid.
        grid: side of the square patch grid (``N = num_prefix_tokens + grid**2``).
        d_model: Mamba width (the tokens are projected from D to it).
        n_layers: Mamba residual blocks.
        d_state: SSM state size per channel (N in the paper).
        expand: Mamba inner expansion factor (E in the paper).
        grid_pool: average-pool factor of the patch grid before the scan (1: none).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prefix_tokens: int = 1,
        grid: int | None = None,
        d_model: int = 64,
        n_layers: int = 1,
        d_state: int = 8,
        expand: int = 2,
        grid_pool: int = 2,
    ):
        super().__init__()
        if grid is None:
            raise ValueError("ssm head: the patch grid side is required (grid=...)")
        if grid_pool < 1 or grid % grid_pool:
            raise ValueError(f"ssm head: grid {grid} is not divisible by grid_pool {grid_pool}")
        self.num_prefix_tokens, self.grid, self.grid_pool = num_prefix_tokens, grid, grid_pool
        self.norm_in = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, d_model)
        self.config = MambaConfig(
            d_model=d_model, n_layers=n_layers, d_state=d_state, expand_factor=expand
        )
        self.mamba = Mamba(self.config)
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)
        self.eval_scan = "parallel"  # or "sequential": mambapy's loop over tokens

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, L, D) scan order: pooled patch grid row-major, prefix last."""
        B, _, D = tokens.shape
        p = self.num_prefix_tokens
        patches = tokens[:, p:]
        if self.grid_pool > 1:
            maps = patches.transpose(1, 2).reshape(B, D, self.grid, self.grid)
            patches = F.avg_pool2d(maps, self.grid_pool).flatten(2).transpose(1, 2)
        return torch.cat([patches, tokens[:, :p]], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, C)."""
        # mambapy reads the scan mode from its config at call time; the flag is shared by
        # the layers, so one assignment switches all of them.
        seq = self.proj(self.norm_in(self.sequence(tokens)))
        if not self.training and self.eval_scan == "parallel":
            return self.fc(self.norm(mamba_forward(self.mamba, seq, last_only=True)[:, -1]))
        self.config.pscan = self.training
        return self.fc(self.norm(self.mamba(seq)[:, -1]))


class PooledMapHead(nn.Module):
    """A CNN exit head: global average pool of a feature map, LayerNorm, linear or MLP.

    ``classifier`` maps the pooled vector (B, C_in) to logits, so heads can also be trained
    on pooled features computed once (``exits/cached.py``) and then read maps unchanged.

    Args:
        dim: channels C_in of the map.
        num_classes: C.
        hidden: MLP hidden width (Linear-GELU-Linear); None: one linear layer.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(dim)]
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)]
        else:
            layers.append(nn.Linear(dim, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C)."""
        return self.classifier(maps.mean((2, 3)))


def make_head(
    head_type: str,
    dim: int,
    num_classes: int,
    *,
    num_prefix_tokens: int = 1,
    grid: int | None = None,
    mlp_hidden: int = 256,
    attention_heads: int = 4,
    ssm_d_model: int = 64,
    ssm_layers: int = 1,
    ssm_d_state: int = 8,
    ssm_expand: int = 2,
    ssm_grid_pool: int = 2,
) -> nn.Module:
    """Build one exit head of ``head_type`` (one of ``HEAD_TYPES``) for (B, N, dim) tokens.

    ``grid`` is the side of the square patch grid (None when it is not square); the SSM
    head pools it by ``ssm_grid_pool`` when the side is divisible, else scans it unpooled.
    """
    if head_type == "linear":
        return LinearCLSHead(dim, num_classes, num_prefix_tokens)
    if head_type == "mlp":
        return MLPPooledHead(dim, num_classes, num_prefix_tokens, hidden=mlp_hidden)
    if head_type == "attention":
        return AttentionPoolHead(dim, num_classes, num_heads=attention_heads)
    if head_type == "ssm":
        pool = ssm_grid_pool if grid is not None and grid % ssm_grid_pool == 0 else 1
        return SSMHead(
            dim,
            num_classes,
            num_prefix_tokens,
            grid=grid,
            d_model=ssm_d_model,
            n_layers=ssm_layers,
            d_state=ssm_d_state,
            expand=ssm_expand,
            grid_pool=pool,
        )
    raise ValueError(f"unknown exit head type {head_type!r}; expected one of {HEAD_TYPES}")
