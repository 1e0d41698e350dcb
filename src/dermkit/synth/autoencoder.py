"""``dermkit synth autoencoder``: the KL autoencoder that latent diffusion runs in.

Model: diffusers ``AutoencoderKL`` (Rombach et al. 2022). ``n`` encoder blocks downsample
by ``2^(n-1)``: at 64 px, 3 blocks give 16x16x4 latents (factor 4), 4 blocks 8x8x4
(factor 8). Loss per batch x in [-1, 1] (B, 3, S, S), z ~ q(z|x), x' = D(z):

    mse(x', x) + perceptual_weight * P(x', x) + kl_weight * KL(q(z|x) || N(0, I)) / (3 S^2)
    (+ colour_weight * mse(pool8(x'), pool8(x)): the mean colour of an 8 x 8 grid of tiles)
    (+ adversarial_weight * -mean(D_patch(x')) from ``adversarial_start_step``)

``P`` is a perceptual distance in a local VGG-16 or a dermkit encoder's feature space
(``perceptual.py``); the KL is divided by the pixel count so that ``kl_weight`` has LDM's
meaning (their reconstruction term is a per-image sum). The optional patch discriminator
is trained alongside with the hinge loss (``discriminator.py``).

The run folder holds ``autoencoder.safetensors``: the weights, with the diffusers config
and the latent scaling factor (1 / std of training latents, so the diffusion model sees
unit-variance latents) in its metadata; nothing else is needed to load it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from dermkit.config import ConfigError
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.eval.report import HtmlReport
from dermkit.runs import RunDir
from dermkit.synth.discriminator import (
    PatchDiscriminator,
    generator_adversarial_loss,
    hinge_discriminator_loss,
)
from dermkit.synth.images import apply_dihedral, save_grid, to_signed, to_uint8
from dermkit.synth.settings import AutoencoderModelConfig, AutoencoderRunConfig
from dermkit.synth.training import load_diffusers, save_diffusers, write_json
from dermkit.train.engine import Batch, EpochEnd, Rows, fit, make_accelerator, run_options
from dermkit.train.losses import sampling_weights

log = logging.getLogger(__name__)

WEIGHTS_FILE = "autoencoder.safetensors"


# ----------------------------------------------------------------------------- model


def downsample_factor(model: AutoencoderModelConfig) -> int:
    """Image side / latent side: 2^(number of blocks - 1)."""
    return 2 ** (len(model.block_out_channels) - 1)


def check_autoencoder_config(cfg: AutoencoderRunConfig) -> None:
    """Cross-field checks pydantic cannot express per field; errors name the fields."""
    m, loss = cfg.model, cfg.loss
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise ConfigError(
            f"model.block_out_channels {m.block_out_channels}: {bad} not divisible by "
            f"model.norm_num_groups={m.norm_num_groups}"
        )
    if cfg.data.image_size % downsample_factor(m):
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not divisible by the downsampling "
            f"factor {downsample_factor(m)} of {len(m.block_out_channels)} blocks"
        )
    if loss.loss == "mse+perceptual" and not (loss.perceptual_weights or loss.perceptual_encoder):
        raise ConfigError(
            "loss.loss=mse+perceptual needs loss.perceptual_encoder (a dermkit run folder) or "
            "loss.perceptual_weights (a local torchvision vgg16 features file)"
        )
    if loss.perceptual_weights and loss.perceptual_encoder:
        raise ConfigError("set only one of loss.perceptual_weights and loss.perceptual_encoder")
    if loss.colour_weight > 0 and cfg.data.image_size % 8:
        raise ConfigError(
            f"loss.colour_weight pools an 8 x 8 grid of tiles: data.image_size="
            f"{cfg.data.image_size} is not divisible by 8"
        )


def build_autoencoder(model: AutoencoderModelConfig, image_size: int) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL: (B, 3, S, S) <-> (B, C, S / f, S / f)."""
    n = len(model.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(model.block_out_channels),
        layers_per_block=model.layers_per_block,
        latent_channels=model.latent_channels,
        norm_num_groups=model.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=model.mid_block_attention,
    )


COLOUR_TILES = 8  # the colour band: the mean of each tile of an 8 x 8 grid (codec_check too)


def tile_colour_loss(
    recon: torch.Tensor, x: torch.Tensor, tiles: int = COLOUR_TILES
) -> torch.Tensor:
    """MSE between the mean colours of a ``tiles`` x ``tiles`` grid of both images.

    Args:
        recon, x: (B, 3, S, S), S divisible by ``tiles``.
    Returns:
        scalar: the low-pass part of the reconstruction error, which ``colour_weight``
        weights up (see ``AutoencoderLossConfig.colour_weight``).
    """
    k = x.shape[-1] // tiles
    return F.mse_loss(F.avg_pool2d(recon, k), F.avg_pool2d(x, k))


class AutoencoderGAN(nn.ModuleDict):
    """What the engine trains: {"autoencoder": vae, "discriminator": patch D (optional)}.

    ``forward`` is one training pass (a module, so DDP can wrap it): x (B, 3, S, S) in
    [-1, 1] -> (loss, {term: float}). With ``adversarial`` the loss also holds the
    generator term (computed with D frozen, so it does not train D) and D's hinge loss on
    [x; x'.detach()] (which trains D only): their sum trains each part as two separate
    backward passes would.
    """

    def __init__(self, vae: AutoencoderKL, disc: nn.Module | None, cfg, perceptual=None):
        super().__init__({"autoencoder": vae, **({"discriminator": disc} if disc else {})})
        self.lc = cfg.loss
        self.__dict__["perceptual"] = perceptual  # frozen: neither trained nor saved

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, adversarial: bool
    ) -> tuple[torch.Tensor, dict]:
        """``eps`` (B, C, h, w) standard normal: z = mean + std * eps from the posterior."""
        lc, vae = self.lc, self["autoencoder"]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + posterior.std * eps.to(x)).sample
        rec = F.mse_loss(recon.float(), x)
        kl_term = posterior.kl().float().mean() / x[0].numel()
        loss = rec + lc.kl_weight * kl_term
        terms = {"mse": rec.item(), "kl": kl_term.item()}
        if lc.colour_weight > 0:
            colour = tile_colour_loss(recon.float(), x)
            loss = loss + lc.colour_weight * colour
            terms["colour"] = colour.item()
        if self.perceptual is not None:
            p = self.perceptual(recon.float(), x)
            loss = loss + lc.perceptual_weight * p
            terms["perceptual"] = p.item()
        if adversarial:
            disc = self["discriminator"]
            disc.requires_grad_(False)  # the generator term must not train D
            g_adv = generator_adversarial_loss(disc(recon))
            disc.requires_grad_(True)
            loss = loss + lc.adversarial_weight * g_adv
            terms["g_adv"] = g_adv.item()
            logits = disc(torch.cat([x, recon.detach()]))
            d_loss = hinge_discriminator_loss(*logits.float().chunk(2))
            loss = loss + d_loss
            terms["d_loss"] = d_loss.item()
        return loss, terms


class AutoencoderTraining:
    """The engine's method for the autoencoder: dihedral views of cached train images ->
    ``AutoencoderGAN``; PSNR/SSIM on val images every ``eval_every`` epochs and at the end."""

    select = None  # the last (EMA) weights are the autoencoder

    def __init__(self, cfg: AutoencoderRunConfig, train_ds, val_images, accelerator):
        self.cfg, self.train_ds, self.val_images = cfg, train_ds, val_images
        self.accelerator = accelerator

    def draws(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Dihedral views (B,) and posterior noise (B, C, h, w) for the global batch."""
        m = self.cfg.model
        side = self.cfg.data.image_size // 2 ** (len(m.block_out_channels) - 1)
        return (
            torch.randint(0, 8, (batch.size,), generator=batch.gen),
            torch.randn((batch.size, m.latent_channels, side, side), generator=batch.gen),
        )

    def step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        # every draw is made for the global batch, then sliced: N processes = 1 process
        mine = slice(batch.offset, batch.offset + len(batch.rows))
        views, eps = (v[mine] for v in batch.once("draws", lambda: self.draws(batch)))
        x = to_signed(self.train_ds.__getitems__(batch.rows)[0].to(self.accelerator.device))
        if self.cfg.augment:
            x = apply_dihedral(x, views)
        lc = self.cfg.loss
        return model(x, eps, lc.adversarial_weight > 0 and batch.step >= lc.adversarial_start_step)

    def evaluate(self, model, end: EpochEnd) -> dict | None:
        if not self.accelerator.is_main_process:
            return None
        if not ((end.epoch + 1) % self.cfg.eval_every == 0 or end.last):
            return None
        scores, _ = reconstruction_metrics(model["autoencoder"], self.val_images)
        log.info("epoch %d: val PSNR %.2f SSIM %.3f", end.epoch, scores["psnr"], scores["ssim"])
        return scores


# ----------------------------------------------------------------------------- codec


class LatentCodec:
    """Images <-> the scaled latents a diffusion model is trained on.

    With an autoencoder: z = scaling_factor * E(x); without (``vae=None``): pixel space,
    z = x in [-1, 1]. ``latent_shape`` is (C, h, w).
    """

    def __init__(self, vae: AutoencoderKL | None, scaling_factor: float, image_size: int):
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.scaling_factor = float(scaling_factor)
        self.image_size = int(image_size)
        if vae is None:
            self.latent_shape = (3, image_size, image_size)
        else:
            f = 2 ** (len(vae.config.block_out_channels) - 1)
            self.latent_shape = (vae.config.latent_channels, image_size // f, image_size // f)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device if self.vae is not None else torch.device("cpu")

    def to(self, device) -> LatentCodec:
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, S, S) -> scaled posterior mean and std, each (B, C, h, w)."""
        x = to_signed(images.to(self.device))
        if self.vae is None:
            return x, torch.zeros_like(x)
        post = self.vae.encode(x).latent_dist
        return post.mean * self.scaling_factor, post.std * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> uint8 images (B, 3, S, S)."""
        if self.vae is None:
            return to_uint8(z)
        return to_uint8(self.vae.decode(z.to(self.device) / self.scaling_factor).sample)


def save_autoencoder(vae: AutoencoderKL, scaling_factor: float, path: str | Path) -> Path:
    """Weights + diffusers config + scaling factor in one .safetensors file."""
    vae.register_to_config(scaling_factor=float(scaling_factor))
    return save_diffusers(
        vae,
        path,
        "autoencoder_kl",
        scaling_factor=repr(float(scaling_factor)),
        image_size=str(vae.config.sample_size),
    )


def load_codec(source: str | Path | None, image_size: int | None = None) -> LatentCodec:
    """The codec of an autoencoder run folder or its weights file; None: pixel space
    (then ``image_size`` is required)."""
    if source is None:
        if image_size is None:
            raise ValueError("a pixel-space codec needs image_size")
        return LatentCodec(None, 1.0, image_size)
    path = Path(source)
    path = path / WEIGHTS_FILE if path.is_dir() else path
    vae, meta = load_diffusers(path, AutoencoderKL, "autoencoder_kl", "autoencoder")
    return LatentCodec(vae, float(meta["scaling_factor"]), int(meta["image_size"]))


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def reconstruction_metrics(
    vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128
) -> tuple[dict, torch.Tensor]:
    """PSNR (dB) and SSIM of posterior-mean reconstructions of uint8 images (N, 3, S, S).

    Returns ({psnr, ssim, mse}, reconstructions uint8 (N, 3, S, S)).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    vae.eval()
    device = next(vae.parameters()).device
    recon = []
    for i in range(0, len(images), batch_size):
        x = to_signed(images[i : i + batch_size].to(device))
        recon.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample).cpu())
    recon = torch.cat(recon)
    a = images.permute(0, 2, 3, 1).numpy()
    b = recon.permute(0, 2, 3, 1).numpy()
    psnr = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
    ssim = [structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]
    mse = float(((a.astype(np.float32) - b) ** 2).mean())
    finite = [p for p in psnr if np.isfinite(p)]  # identical images have infinite PSNR
    return {
        "psnr": float(np.mean(finite)) if finite else float("inf"),
        "ssim": float(np.mean(ssim)),
        "mse": mse,
    }, recon


@torch.no_grad()
def per_class_reconstruction(
    vae: AutoencoderKL, dataset: CachedImageDataset, batch_size: int = 128
) -> list[dict]:
    """Per class of ``dataset`` (every image): PSNR and the colour shift of reconstructions.

    colour shift: mean over images of the distance (0-255 RGB units) between the mean
    colour of the central half of the image (where the lesion is) and of its
    reconstruction. PSNR hides a codec that turns a rare class's red into the common
    classes' brown (measured on HAM10000's vasc, BENCHMARKS.md); this does not.
    """
    from skimage.metrics import peak_signal_noise_ratio

    vae.eval()
    device = next(vae.parameters()).device
    labels = dataset.labels.numpy()
    psnr, shift = np.zeros(len(dataset)), np.zeros(len(dataset))
    for i in range(0, len(dataset), batch_size):
        idx = np.arange(i, min(i + batch_size, len(dataset)))
        images = dataset.__getitems__(idx)[0]
        x = to_signed(images.to(device))
        recon = to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample).cpu()
        s = images.shape[-1]
        centre = (slice(None), slice(None), slice(s // 4, s - s // 4), slice(s // 4, s - s // 4))
        mean_real = images[centre].float().mean((2, 3))  # (B, 3)
        mean_recon = recon[centre].float().mean((2, 3))
        shift[idx] = (mean_real - mean_recon).norm(dim=1).numpy()
        for k, (a, b) in zip(idx, zip(images.numpy(), recon.numpy())):
            psnr[k] = peak_signal_noise_ratio(a, b, data_range=255)
    rows = []
    for c, name in enumerate(dataset.class_names):
        mine = labels == c
        if mine.any():
            finite = psnr[mine & np.isfinite(psnr)]  # an exact reconstruction has PSNR inf
            rows.append(
                {
                    "class": name,
                    "images": int(mine.sum()),
                    "psnr": float(finite.mean()) if len(finite) else float("inf"),
                    "colour_shift": float(shift[mine].mean()),
                }
            )
    return rows


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128) -> float:
    """1 / std of posterior samples z ~ q(z|x) over uint8 images (N, 3, S, S) (as LDM)."""
    vae.eval()
    device = next(vae.parameters()).device
    z = [
        vae.encode(to_signed(images[i : i + batch_size].to(device))).latent_dist.sample().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return float(1.0 / torch.cat(z).float().std().clamp_min(1e-8))


# ----------------------------------------------------------------------------- training


def train_autoencoder(
    cfg: AutoencoderRunConfig, resume: bool = False, progress: bool = True
) -> Path:
    """Train the autoencoder end to end; returns the path of report.html."""
    check_autoencoder_config(cfg)
    oc, lc = cfg.optim, cfg.loss
    # the discriminator joins the loss at adversarial_start_step: DDP must allow that
    accelerator = make_accelerator(oc.precision, find_unused=lc.adversarial_weight > 0)
    main = accelerator.is_main_process
    device = accelerator.device
    with RunDir(cfg.out_dir, cfg, "synth_autoencoder", write=main) as run:
        # --- data: the TRAIN split's cached images; val for PSNR/SSIM
        with accelerator.main_process_first():
            data = prepare_data(cfg.data, rejects_path=run / "rejects.csv")
        train_ds = CachedImageDataset(data.cache, data.part("train"), data.classes)
        val_part = data.part("val")
        if len(val_part) == 0:
            raise ConfigError("data: the val split is empty (needed for PSNR/SSIM)")
        val_ds = CachedImageDataset(data.cache, val_part, data.classes)
        rng = np.random.default_rng(cfg.seed)
        val_idx = np.sort(rng.permutation(len(val_ds))[: cfg.val_images])
        val_images = val_ds.__getitems__(val_idx)[0]

        # --- model and losses; the engine trains
        torch.manual_seed(cfg.seed)
        vae = build_autoencoder(cfg.model, cfg.data.image_size)
        disc = None
        if lc.adversarial_weight > 0:
            disc = PatchDiscriminator(lc.discriminator_channels, lc.discriminator_layers)
        perceptual = None
        if lc.loss == "mse+perceptual":
            from dermkit.synth.perceptual import PerceptualLoss

            perceptual = PerceptualLoss(lc.perceptual_weights, lc.perceptual_encoder).to(device)
        weights = sampling_weights(train_ds.labels, cfg.class_sampling, len(data.classes))
        rows = Rows(np.arange(len(train_ds)), weights=None if weights is None else weights.numpy())
        state, trained = fit(
            AutoencoderTraining(cfg, train_ds, val_images, accelerator),
            AutoencoderGAN(vae, disc, cfg, perceptual),
            rows,
            oc,
            run.path,
            accelerator=accelerator,
            name="autoencoder",
            **run_options(cfg, resume=resume, progress=progress),
        )
        step = state.step
        if not main:
            return run / "report.html"

        # --- final weights, latent scale, metrics, report
        final = trained["autoencoder"]  # the EMA weights when optim.ema_decay
        n_scale = min(cfg.scaling_images, len(train_ds))
        scale_idx = np.sort(rng.permutation(len(train_ds))[:n_scale])
        scaling = latent_scaling_factor(final, train_ds.__getitems__(scale_idx)[0])
        save_autoencoder(final.float().cpu(), scaling, run / WEIGHTS_FILE)
        final.to(device)
        scores, recon = reconstruction_metrics(final, val_images)
        n_grid = min(16, len(val_images))
        pairs = torch.stack([val_images[:n_grid], recon[:n_grid]], 1).flatten(0, 1)
        save_grid(pairs, run / "reconstructions.png", nrow=8)
        metrics = {
            "val": scores,
            "val_per_class": per_class_reconstruction(final, val_ds),
            "val_images": len(val_images),
            "scaling_factor": scaling,
            "latent_shape": list(load_codec(run / WEIGHTS_FILE).latent_shape),
            "downsample_factor": downsample_factor(cfg.model),
            "params": sum(p.numel() for p in vae.parameters()),
            "steps": step,
            "loss": lc.loss,
            "perceptual_source": lc.perceptual_weights or lc.perceptual_encoder,
            "history": state.history,
        }
        write_json(metrics, run / "metrics.json")
        return _write_report(run.path, cfg, metrics)


def _write_report(run_dir: Path, cfg: AutoencoderRunConfig, metrics: dict) -> Path:
    report = HtmlReport("dermkit synth autoencoder: reconstruction on the val split")
    report.add_table(
        [
            {"quantity": "val PSNR (dB)", "value": metrics["val"]["psnr"]},
            {"quantity": "val SSIM", "value": metrics["val"]["ssim"]},
            {"quantity": "latent shape (C, h, w)", "value": str(tuple(metrics["latent_shape"]))},
            {"quantity": "latent scaling factor", "value": metrics["scaling_factor"]},
            {"quantity": "loss", "value": metrics["loss"]},
            {"quantity": "parameters", "value": metrics["params"]},
            {"quantity": "optimizer steps", "value": metrics["steps"]},
        ],
        caption=f"{metrics['val_images']} val images, posterior-mean reconstructions",
    )
    report.add_table(
        metrics["val_per_class"],
        caption="Per class, every val image: PSNR and colour shift (RGB distance between the "
        "mean colours of the central half of image and reconstruction)",
    )
    report.add_table(metrics["history"], caption="Per epoch (val)")
    report.add_figure(
        run_dir / "reconstructions.png",
        caption="Pairs: original (left) and reconstruction (right), val split",
    )
    report.add_link("metrics.json", "metrics.json")
    return report.write(run_dir / "report.html")
