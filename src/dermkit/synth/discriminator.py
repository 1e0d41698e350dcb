"""A small PatchGAN discriminator and hinge losses (optional adversarial autoencoder loss).

An MSE/perceptual autoencoder blurs fine texture (pigment network, vessels); a patch
discriminator (pix2pix, Isola et al. 2017; used by the LDM/VQGAN autoencoders) penalises
that blur locally. Written here (a dozen lines) because diffusers ships no discriminator.
GroupNorm instead of BatchNorm keeps it independent of the batch split across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Real/fake logits per patch: (B, 3, H, W) in [-1, 1] -> (B, 1, H / 2^n, W / 2^n).

    Args:
        channels: width of the first layer (doubles per layer, capped at 8x).
        n_layers: stride-2 convolutions; each output logit sees a patch of about
            ``2^(n_layers + 2)`` px.
    """

    def __init__(self, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for i in range(1, n_layers):
            out = channels * min(2**i, 8)
            layers += [
                nn.Conv2d(width, out, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out
        layers += [nn.Conv2d(width, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game: -mean(D(fake))."""
    return -fake_logits.mean()
