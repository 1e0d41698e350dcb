"""Self-supervised pretraining settings: the MAE and VAE sections and their run configs.

What belongs here: schemas of ``ssl/`` (``dermkit pretrain mae|vae``), built on the
training optimizer section and the data/model sections. Schemas only (see
``dermkit.config``); settings modules are read at every layer (``tests/test_layers.py``).
"""

from __future__ import annotations

from pydantic import Field

from dermkit.config import Strict
from dermkit.data.settings import DataRunSettings, SyntheticManifest, SyntheticRatio
from dermkit.models.settings import ModelConfig
from dermkit.train.settings import OptimConfig


class MaeConfig(Strict):
    """Masked-autoencoder settings (He et al. 2022); see ``ssl/mae.py``."""

    mask_ratio: float = Field(0.75, ge=0, lt=1, description="share of patches hidden")
    decoder_depth: int = Field(2, ge=1, description="decoder transformer blocks")
    decoder_dim: int = Field(128, ge=8, description="decoder width (divisible by 4 and heads)")
    decoder_heads: int = Field(4, ge=1)
    norm_pix_loss: bool = Field(True, description="regress per-patch normalised pixels")


class MaeOptimConfig(OptimConfig):
    """OptimConfig with MAE's recipe as defaults (a partial ``optim:`` section keeps them).

    AdamW betas (0.9, 0.95), weight decay 0.05, lr = 1.5e-4 * B / 256, cosine to 0, no
    gradient clipping.
    """

    base_lr: float = Field(1.5e-4, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    clip_grad: float | None = Field(None, gt=0)


class VaeConfig(Strict):
    """Convolutional VAE settings; see ``ssl/vae.py``."""

    beta: float = Field(1.0, ge=0, description="KL weight after warm-up")
    kl_warmup_steps: int = Field(500, ge=0, description="linear KL warm-up; 0: none")
    n_samples: int = Field(8, ge=0, description="prior samples shown in each grid")


class VaeOptimConfig(OptimConfig):
    """OptimConfig defaults for the VAE: Adam-like (0.9, 0.999), no weight decay, clipping."""

    base_lr: float = Field(2e-3, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)


class PretrainRunSettings(DataRunSettings):
    """What ``dermkit pretrain mae`` and ``pretrain vae`` share: an encoder (``model``)
    trained on unlabelled images, with reconstruction grids and a k-NN probe.

    ``optim.ema_decay``, ``optim.layer_decay`` and ``optim.patience`` do not apply (errors).
    """

    model: ModelConfig  # each method sets its default encoder
    optim: OptimConfig  # each method sets its own recipe as the defaults
    augment: bool = Field(True, description="random flips and 90-degree rotations")
    synthetic_ratio: SyntheticRatio = 0.0
    synthetic_manifest: SyntheticManifest = None
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    grid_every: int = Field(1, ge=1, description="epochs between reconstruction grids")
    probe_every: int = Field(0, ge=0, description="epochs between probes; 0: only at the end")
    probe_k: int = Field(20, ge=1, description="neighbours of the k-NN probe")


class MaePretrainRunConfig(PretrainRunSettings):
    """``dermkit pretrain mae``: masked-autoencoder pretraining of a ViT encoder."""

    out_dir: str = "runs/pretrain-mae"
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(drop_path_rate=0.0),
        description="the ViT encoder; weights: optional initial encoder weights",
    )
    optim: MaeOptimConfig = Field(default_factory=MaeOptimConfig)
    mae: MaeConfig = Field(default_factory=MaeConfig)


class VaePretrainRunConfig(PretrainRunSettings):
    """``dermkit pretrain vae``: a convolutional VAE; its encoder becomes a backbone."""

    out_dir: str = "runs/pretrain-vae"
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="vae_encoder_64", drop_path_rate=0.0),
        description="the encoder: a dermkit_vae_encoder variant (vae_encoder_32/_64)",
    )
    optim: VaeOptimConfig = Field(default_factory=VaeOptimConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)
