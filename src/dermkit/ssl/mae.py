"""Masked autoencoder (He et al. 2022, facebookresearch/mae ``models_mae.py``) on a timm ViT.

The encoder is the plain timm ``VisionTransformer`` that ``create_backbone(name,
num_classes=0)`` builds, so its state dict has timm's keys (``patch_embed.*``,
``cls_token``, ``pos_embed``, ``blocks.*``, ``norm.*``) and :meth:`encoder_state_dict`
loads key for key into the classifier ``dermkit finetune`` builds from the same name. The
encoder's own modules are called one by one (patch_embed of the visible patches only ->
+ their pos_embed -> prepend the class token -> blocks -> norm), so it only ever sees the
visible 25% of the patches: that, not a cheaper model, is what makes MAE pretraining
about 3x faster per image than supervised training of the same ViT.

As in the paper:

* the encoder's ``pos_embed`` is set to fixed 2-D sin-cos values (class-token slot zero)
  and frozen during pretraining (it is exported, and becomes trainable when fine-tuned);
* the decoder (``decoder_depth`` timm ``Block``s of width ``decoder_dim``) adds its own
  fixed 2-D sin-cos position embedding (a non-persistent buffer, so it is never
  exported), fills the masked slots with one learned ``mask_token`` and predicts the
  pixels of every patch;
* the loss is the MSE over masked patches only, against per-patch normalised pixels when
  ``norm_pix_loss`` (the paper's default, which gives better features).

Shapes: B images, L = (S/p)^2 patches of p*p*C pixel values, D encoder width, K = round(L *
(1 - mask_ratio)) visible patches, P prefix tokens (1: the class token).
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from dermkit.models.backbones import create_backbone
from dermkit.ssl.settings import MaePretrainRunConfig


def random_masking(
    x: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of round(L * (1 - mask_ratio)) tokens of every sample.

    Per-sample shuffling by argsort of uniform noise (torch's global RNG), no loop over
    samples: the first K indices of the shuffle are kept and gathered.

    Args:
        x: tokens (B, L, D).
        mask_ratio: share of tokens to hide, in [0, 1).

    Returns:
        visible tokens (B, K, D); mask (B, L), 1 = hidden, 0 = visible, in the original
        order; ids_restore (B, L), the permutation that undoes the shuffle.
    """
    ids_keep, mask, ids_restore = masking_ids(x.shape[0], x.shape[1], mask_ratio, x.device)
    return keep_tokens(x, ids_keep), mask, ids_restore


def masking_ids(
    batch: int,
    length: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample random subsets of :func:`random_masking`, without the tokens.

    ``noise`` (B, L) uniform: given, it fixes the subsets (a data-parallel process passes
    its rows of noise drawn for the global batch); None draws it from torch's global RNG.

    Returns:
        ids_keep (B, K), the kept token indices; mask (B, L), 1 = hidden; ids_restore (B, L).
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = round(length * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {length}")
    if noise is None:
        noise = torch.rand(batch, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def keep_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Rows ``ids_keep`` (B, K) of every sample of ``x`` (B, L, D) -> (B, K, D)."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix_tokens: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, prefix_tokens + H*W, dim); prefix rows zero."""
    table = build_sincos2d_pos_embed(list(grid), dim=dim)  # (H*W, dim), row-major like patches
    return torch.cat([torch.zeros(prefix_tokens, dim), table]).unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """MAE with a timm ViT encoder and a light transformer decoder.

    Args:
        encoder_name: a dermkit ViT variant or timm ViT name (``create_backbone``).
        img_size: input side S in px.
        mask_ratio: share of patches hidden from the encoder.
        decoder_dim, decoder_depth, decoder_heads: the decoder's width, blocks and heads.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, var 1 per patch).
        drop_path_rate: stochastic depth of the encoder (the paper uses none).
        in_chans: input channels.
    """

    def __init__(
        self,
        encoder_name: str,
        img_size: int,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.encoder = create_backbone(
            encoder_name,
            num_classes=0,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )
        enc = self.encoder
        needed = ("patch_embed", "pos_embed", "blocks", "norm", "num_prefix_tokens")
        if not all(hasattr(enc, a) for a in needed) or enc.pos_embed is None:
            raise ValueError(
                f"MAE encoder {encoder_name!r} is not a timm VisionTransformer with an "
                "absolute pos_embed (needs patch_embed, pos_embed, blocks, norm)"
            )
        if getattr(enc, "reg_token", None) is not None or getattr(enc, "dynamic_img_size", False):
            raise ValueError(
                f"MAE encoder {encoder_name!r}: register tokens and dynamic "
                "image size are not supported"
            )
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.patch = enc.patch_embed.patch_size[0]
        self.grid = tuple(enc.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.prefix = enc.num_prefix_tokens  # class token
        # timm's "no_embed_class" ViTs keep no pos_embed row for the class token.
        self.pos_prefix = 0 if enc.no_embed_class else self.prefix
        width = enc.embed_dim

        # timm's PatchEmbed is a conv with kernel = stride = patch: a linear map of each
        # patch, so the encoder can embed only the visible quarter of the patches.
        conv = getattr(enc.patch_embed, "proj", None)
        self.embed_visible_only = (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == conv.stride == (self.patch, self.patch)
            and conv.padding == (0, 0)
            and conv.groups == 1
            and getattr(enc.patch_embed, "flatten", False)
            and not getattr(enc.patch_embed, "dynamic_img_pad", False)
        )

        with torch.no_grad():  # fixed sin-cos, as in the paper; frozen while pretraining
            enc.pos_embed.copy_(sincos_pos_embed(self.grid, width, self.pos_prefix))
        enc.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed(self.grid, decoder_dim, self.prefix),
            persistent=False,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * in_chans)
        self._init_decoder()

    @classmethod
    def from_config(cls, cfg: MaePretrainRunConfig) -> MaskedAutoencoder:
        """The MAE of a pretraining run config: ``model`` (name, drop path), the image size
        and the ``mae`` section."""
        m = cfg.mae
        return cls(
            cfg.model.name,
            cfg.data.image_size,
            mask_ratio=m.mask_ratio,
            decoder_dim=m.decoder_dim,
            decoder_depth=m.decoder_depth,
            decoder_heads=m.decoder_heads,
            norm_pix_loss=m.norm_pix_loss,
            drop_path_rate=cfg.model.drop_path_rate,
        )

    def _init_decoder(self) -> None:
        # The paper's init (xavier linear layers, N(0, .02) mask token); the encoder keeps
        # timm's own initialisation.
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if not name.startswith("decoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings are not decayed (timm convention)."""
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    # --------------------------------------------------------------- patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, L, p*p*C), patches in row-major order, pixels (p, p, C)."""
        B, C, _, _ = imgs.shape
        p, (h, w) = self.patch, self.grid
        x = imgs.reshape(B, C, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)

    def embed_patches(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder's patch embedding of the kept patches only: (B, K, D).

        Equal to ``patch_embed(imgs)`` then keeping rows ``ids_keep`` (B, K), at K/L of its
        cost in the forward and the backward pass (the conv's weight as a matrix applied
        to the kept patches, pixels in the conv's (C, p, p) order).
        """
        B, C, _, _ = imgs.shape
        p, (h, w) = self.patch, self.grid
        patches = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
        conv = self.encoder.patch_embed.proj
        weight = conv.weight.reshape(conv.out_channels, -1)
        x = F.linear(keep_tokens(patches, ids_keep), weight, conv.bias)
        return self.encoder.patch_embed.norm(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, S, S); the inverse of :meth:`patchify`."""
        B = x.shape[0]
        p, (h, w), C = self.patch, self.grid, self.in_chans
        x = x.reshape(B, h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, h * p, w * p)

    # --------------------------------------------------------------- model

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only (``noise`` (B, L): see :func:`masking_ids`).

        Returns:
            latent (B, P + K, D); mask (B, L), 1 = hidden; ids_restore (B, L).
        """
        enc = self.encoder
        ids_keep, mask, ids_restore = masking_ids(
            imgs.shape[0], self.num_patches, mask_ratio, imgs.device, noise
        )
        pos = enc.pos_embed[:, self.pos_prefix :].expand(imgs.shape[0], -1, -1)
        if self.embed_visible_only:
            x = self.embed_patches(imgs, ids_keep)  # (B, K, D)
        else:
            x = keep_tokens(enc.patch_embed(imgs), ids_keep)  # (B, L, D) -> (B, K, D)
        x = x + keep_tokens(pos, ids_keep)
        cls = enc.cls_token
        if cls is not None:
            if self.pos_prefix:
                cls = cls + enc.pos_embed[:, : self.pos_prefix]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, P + K, D), ids_restore (B, L) -> predicted patches (B, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        B, n, Dd = x.shape
        L, P = ids_restore.shape[1], self.prefix
        tokens = torch.cat([x[:, P:], self.mask_token.expand(B, L + P - n, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        x = torch.cat([x[:, :P], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, L, p*p*C): patches, normalised per patch if norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)  # one pass, not two
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the hidden patches only.

        Args:
            imgs: (B, C, S, S); pred: (B, L, p*p*C); mask: (B, L), 1 = hidden.

        Returns:
            scalar loss: sum over hidden patches of their per-pixel MSE / number hidden.
        """
        per_patch = (pred.float() - self.target(imgs.float())).pow(2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (B, C, S, S) -> (loss, pred (B, L, p*p*C), mask (B, L)).

        ``noise`` (B, L) uniform fixes the masks (see :func:`masking_ids`).
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: (masked input, reconstruction), each (B, C, S, S) in input units.

        Hidden patches of the masked input are 0 (the mean pixel after normalisation);
        the reconstruction shows the prediction at hidden patches (de-normalised with
        each patch's true mean/std when ``norm_pix_loss``) and the input at visible ones.
        """
        _, pred, mask = self(imgs)
        pred = pred.float()
        patches = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        hidden = mask.unsqueeze(-1)
        masked = self.unpatchify(patches * (1 - hidden))
        recon = self.unpatchify(patches * (1 - hidden) + pred * hidden)
        return masked, recon

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm keys (no decoder, no mask token)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
