"""The VAE's convolutional encoder as a timm-style classification backbone.

``dermkit pretrain vae`` (``dermkit.ssl.vae``) trains a convolutional VAE from scratch;
its encoder maps an image to the mean of the approximate posterior q(z|x), a latent map.
This module holds that encoder in a form the rest of dermkit already knows how to use: a
model with timm's interface (``forward_features`` -> the posterior-mean map,
``forward_head`` -> the spatially pooled mean, then a linear classifier;
``reset_classifier``, ``num_features``, ``num_classes``, ``pretrained_cfg``), registered
with timm as ``dermkit_vae_encoder`` so ``timm.create_model`` and
``dermkit.models.backbones.create_backbone`` (variants ``vae_encoder_32`` and
``vae_encoder_64`` in ``registry.py``) build it like any other backbone. The VAE owns one
of these (built with ``num_classes=0``) as its encoder, so the encoder weights it saves
load key for key into a classifier; only ``head.*`` is new.

Written here rather than taken from a library because no maintained VAE encoder has this
classifier interface; the building blocks (GroupNorm, SiLU, timm's ``DropPath``) are
standard. Layout (widths ``w_0..w_n``, 2**(n+1) downsampling)::

    stem  3x3 conv, in_chans -> w_0                          (B, w_0, S, S)
    stages[i]: 3x3 stride-2 conv -> w_i, ``depth`` ResBlocks  (B, w_i, S/2^(i+1), ...)
    norm + SiLU, to_mu 1x1 conv -> latent_channels           (B, Z, S/2^(n+1), ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import register_model
from torch import nn

__all__ = ["ResBlock", "VaeEncoder"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups for ``channels`` channels."""
    # GroupNorm, not BatchNorm: the VAE trains at small batches and the encoder must give
    # the same posterior mean for an image whatever else is in its batch.
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block, (B, C, H, W) -> same.

    x + DropPath(conv(SiLU(GN(conv(SiLU(GN(x))))))).
    """

    def __init__(self, channels: int, drop_path: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.body(x))


class VaeEncoder(nn.Module):
    """Convolutional VAE encoder with a linear classifier on the pooled posterior mean.

    Args:
        num_classes: classifier outputs; 0 gives ``head = Identity`` (the encoder alone).
        in_chans: input channels.
        widths: channels of each downsampling stage; the latent map is 2**len(widths)
            times smaller than the input.
        depth: residual blocks per stage.
        latent_channels: Z, channels of the latent map (= ``num_features``).
        drop_rate: dropout on the pooled features before the head.
        drop_path_rate: stochastic depth of the residual blocks, rising linearly to this.
        global_pool: ``"avg"`` (mean over the latent map) is the only pooling.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 1,
        latent_channels: int = 64,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"VaeEncoder: global_pool must be 'avg', got {global_pool!r}")
        widths = tuple(int(w) for w in widths)
        self.widths, self.depth, self.in_chans = widths, depth, in_chans
        self.latent_channels = latent_channels
        self.reduction = 2 ** len(widths)
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1)
        rates = torch.linspace(0, drop_path_rate, len(widths) * depth).tolist()
        stages, prev = [], widths[0]
        for i, w in enumerate(widths):
            down = nn.Conv2d(prev, w, 3, stride=2, padding=1)
            blocks = [ResBlock(w, rates[i * depth + j]) for j in range(depth)]
            stages.append(nn.Sequential(down, *blocks))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.norm = group_norm(prev)
        self.act = nn.SiLU()
        self.to_mu = nn.Conv2d(prev, latent_channels, 1)
        self.hidden_channels = prev
        self.num_features = self.head_hidden_size = latent_channels
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.head = nn.Linear(latent_channels, num_classes) if num_classes else nn.Identity()
        # What timm keeps in pretrained_cfg and dermkit.models.weights reads from it.
        self.pretrained_cfg = self.default_cfg = {
            "architecture": "dermkit_vae_encoder",
            "classifier": "head",
            "first_conv": "stem",
            "num_classes": num_classes,
            "fixed_input_size": False,
        }

    # --------------------------------------------------------------- the VAE's use

    def forward_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) -> hidden map (B, widths[-1], S/r, S/r), before ``to_mu``.

        The VAE reads its log-variance off this map with its own 1x1 conv, which is not
        part of the backbone (a classifier has no use for it).
        """
        return self.act(self.norm(self.stages(self.stem(x))))

    # --------------------------------------------------------------- timm interface

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) -> posterior mean map (B, Z, S/r, S/r)."""
        return self.to_mu(self.forward_hidden(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Posterior mean map (B, Z, h, w) -> pooled (B, Z) if ``pre_logits`` else logits."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) -> logits (B, num_classes), or (B, Z) features without a head."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: Identity)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"VaeEncoder: global_pool must be 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()


@register_model
def dermkit_vae_encoder(pretrained: bool = False, **kwargs: Any) -> VaeEncoder:
    """timm entrypoint: ``timm.create_model("dermkit_vae_encoder", widths=..., ...)``.

    There are no published weights (pretrained=True is an error); dermkit trains them with
    ``dermkit pretrain vae`` and loads them from a local file.
    """
    if pretrained:
        raise ValueError(
            "dermkit_vae_encoder has no published weights; train it with "
            "`dermkit pretrain vae` and pass the run folder as weights"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory args
        kwargs.pop(key, None)
    return VaeEncoder(**kwargs)
