"""A convolutional VAE trained from scratch, whose encoder becomes a classification backbone.

Encoder: the ``dermkit_vae_encoder`` backbone (``dermkit.models.vae_encoder``, built with
``num_classes=0``) gives the hidden map and the posterior mean mu; one extra 1x1 conv here
gives log sigma^2 from the same hidden map. The latent is spatial, (B, Z, S/r, S/r), so
reconstructions keep the lesion's layout. Decoder: the mirror image (1x1 conv up from Z,
per stage a residual block then nearest-neighbour 2x upsampling + 3x3 conv) back to
(B, C, S, S) in the normalised input units.

Loss (per pixel, so its scale does not depend on image size):

    recon = mean over pixels of (x_hat - x)^2
    kl    = sum over latent units of KL(N(mu, sigma^2) || N(0, 1)) / (C * S * S)
    loss  = recon + beta_t * kl,   beta_t = beta * min(1, (step + 1) / kl_warmup_steps)

which is the negative ELBO of a Gaussian decoder with fixed variance 1/2 (times a
constant) when beta = 1; the KL weight warms up linearly from 0 so the decoder learns
to use the latent before the prior pulls it in (avoids posterior collapse).

Written here (not from diffusers' ``AutoencoderKL``) because the encoder must be the
registered classifier backbone, key for key, which a library model cannot be.
"""

from __future__ import annotations

import torch
from torch import nn

from dermkit.models.backbones import create_backbone
from dermkit.models.vae_encoder import ResBlock, VaeEncoder, group_norm


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """beta_t: linear warm-up of the KL weight from beta/warmup_steps to beta over the steps."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


class VaeDecoder(nn.Module):
    """Latent (B, Z, h, w) -> image (B, out_chans, h * 2^n, w * 2^n) for n = len(widths)."""

    def __init__(self, latent_channels: int, widths: tuple[int, ...], out_chans: int = 3):
        super().__init__()
        rev = tuple(reversed(widths))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        stages, prev = [], rev[0]
        for w in (*rev[1:], rev[-1]):  # each stage doubles the size and moves to the next width
            stages.append(
                nn.Sequential(
                    ResBlock(prev),
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(prev, w, 3, padding=1),
                )
            )
            prev = w
        self.stages = nn.Sequential(*stages)
        self.norm = group_norm(prev)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(prev, out_chans, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.act(self.norm(self.stages(self.conv_in(z)))))


class ConvVAE(nn.Module):
    """VAE with the ``encoder_name`` backbone as encoder and a mirrored decoder.

    Args:
        encoder_name: a ``dermkit_vae_encoder`` variant (``vae_encoder_32``, ``vae_encoder_64``).
        img_size: input side S (a multiple of the encoder's reduction r).
        beta: KL weight after warm-up.
        kl_warmup_steps: optimizer steps of the linear KL warm-up (0: none).
        in_chans: image channels.
    """

    def __init__(
        self,
        encoder_name: str,
        img_size: int,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.encoder = create_backbone(
            encoder_name, num_classes=0, img_size=img_size, in_chans=in_chans
        )
        if not isinstance(self.encoder, VaeEncoder):
            raise ValueError(
                f"VAE encoder {encoder_name!r} is a {type(self.encoder).__name__}, not a "
                "dermkit_vae_encoder variant (e.g. vae_encoder_64)"
            )
        enc = self.encoder
        if img_size % enc.reduction:
            raise ValueError(f"img_size {img_size} is not a multiple of {enc.reduction}")
        self.img_size, self.beta, self.kl_warmup_steps = img_size, beta, kl_warmup_steps
        self.latent_shape = (
            enc.latent_channels,
            img_size // enc.reduction,
            img_size // enc.reduction,
        )
        self.to_logvar = nn.Conv2d(enc.hidden_channels, enc.latent_channels, 1)
        self.decoder = VaeDecoder(enc.latent_channels, enc.widths, in_chans)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) -> (mu, logvar), each (B, Z, S/r, S/r)."""
        hidden = self.encoder.forward_hidden(x)
        # clamp: a huge log-variance early in training would overflow exp() under bf16
        return self.encoder.to_mu(hidden), self.to_logvar(hidden).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z, h, w) -> reconstruction (B, C, S, S), normalised input units."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, step: int = 0, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """x (B, C, S, S) -> (loss, {recon, kl, beta}, reconstruction (B, C, S, S)).

        ``step`` sets the KL weight of the warm-up. In eval mode z = mu (no sampling).
        ``eps`` (B, Z, h, w) standard normal: the reparameterisation noise (a data-parallel
        process passes its rows of noise drawn for the global batch); None draws it.
        """
        mu, logvar = self.encode(x)
        z = mu
        if self.training:  # reparameterisation: z = mu + sigma * eps
            eps = torch.randn_like(mu) if eps is None else eps.to(mu)
            z = mu + eps * torch.exp(0.5 * logvar)
        x_hat = self.decode(z)
        recon = (x_hat.float() - x.float()).pow(2).mean()
        kl_sum = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum()
        kl = kl_sum / x[0].numel() / x.shape[0]
        beta_t = kl_weight(step, self.beta, self.kl_warmup_steps)
        loss = recon + beta_t * kl
        return loss, {"recon": recon.detach(), "kl": kl.detach(), "beta": beta_t}, x_hat

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, S, S) decoded from z ~ N(0, I) of the latent shape."""
        device = next(self.parameters()).device
        z = torch.randn(n, *self.latent_shape, generator=generator).to(device)
        return self.decode(z)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, keyed like ``create_backbone(encoder_name)`` (no head)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
