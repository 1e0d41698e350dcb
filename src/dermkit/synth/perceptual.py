"""Perceptual distance for autoencoder training, without any download.

LPIPS compares channel-normalised deep features of two images; its learned per-channel
weights and its VGG come from the internet. Here the features come either from a local
torchvision VGG-16 file (``perceptual_weights``, the LPIPS taps, uniform channel weights),
or from a dermkit domain encoder (any dermkit run folder): a network trained on skin
lesions measures the differences that matter for lesions, and works offline.

Hand-written (a few lines) because the ``lpips`` package downloads its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dermkit.synth.encoders import VGG16Features, encoder_intermediates, load_domain_encoder


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise each spatial position's feature vector to unit length (as LPIPS does)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Mean over layers of the squared distance of unit-normalised features.

    Exactly one of ``vgg_file`` (local torchvision vgg16 state dict) or ``encoder_run``
    (dermkit run folder) is used. forward(recon, target): (B, 3, H, W) in [-1, 1] -> scalar.
    The feature network is frozen; gradients flow into ``recon`` only.
    """

    def __init__(self, vgg_file: str | Path | None = None, encoder_run: str | Path | None = None):
        super().__init__()
        if (vgg_file is None) == (encoder_run is None):
            raise ValueError("PerceptualLoss needs exactly one of vgg_file or encoder_run")
        self.source = str(vgg_file or encoder_run)
        if vgg_file is not None:
            self.net = VGG16Features(vgg_file)
            self._features = self.net
        else:
            self.net = load_domain_encoder(encoder_run)
            self._features = lambda x: encoder_intermediates(self.net, x)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # The feature network stays in eval mode (no dropout, frozen norms) at all times.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        both = torch.cat([recon, target]).add(1).div(2).clamp(0, 1)
        feats = self._features(both)
        loss = recon.new_zeros(())
        for f in feats:
            a, b = _unit_channels(f.float()).chunk(2)
            loss = loss + (a - b.detach()).pow(2).sum(1).mean()
        return loss / len(feats)
