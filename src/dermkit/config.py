"""Typed configuration: one pydantic schema per stage, YAML presets, ``key=value`` overrides.

Resolution order (later wins): schema defaults < preset YAML (``configs/<preset>/<stage>.yaml``
shipped inside the package, so an installed dermkit finds its presets) < user YAML file <
command-line overrides such as ``data.image_size=64``. Unknown keys are errors that name the
key, so a typo never silently falls back to a default. Every run folder keeps the fully
resolved config as ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("tiny", "cpu", "gpu")
PRESET_DIR = Path(__file__).parent / "configs"


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where the images come from and how they are split and cached."""

    path: str = Field("demo/phantoms", description="dataset root (HAM10000, ISIC or folder layout)")
    layout: Literal["auto", "ham10000", "isic", "folder"] = "auto"
    image_size: int = Field(64, ge=16, le=1024, description="square side after crop (px)")
    crop: Literal["short_side_center", "full_frame"] = Field(
        "short_side_center",
        description="short_side_center: resize the short side, centre-crop square; "
        "full_frame: resize the long side, pad square by reflection (data/cache.py)",
    )
    colour_constancy: Literal["none", "shades_of_gray"] = Field(
        "none",
        description="colour constancy on every crop, at training and test time and in "
        "deployment: shades_of_gray (Finlayson & Trezzi 2004, p=6; data/cache.py)",
    )
    split_file: str | None = Field(None, description="CSV image_id,lesion_id,split to reuse")
    train: float = Field(0.7, ge=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.2, ge=0)
    split_seed: int = 0
    skip_bad: bool = Field(False, description="drop bad rows/files into rejects.csv")
    label_map: str | None = Field(None, description="YAML/JSON mapping source label -> class")
    classes: list[str] | None = Field(None, description="allowed classes (default: the source's)")
    cache_dir: str | None = Field(None, description="image cache root (default ~/.cache/dermkit)")
    near_duplicate_distance: int = Field(4, ge=-1, description="pHash distance; -1 disables")


class EvalConfig(Strict):
    """How test metrics and their confidence intervals are computed."""

    n_boot: int = Field(1000, ge=0, description="bootstrap replicates over lesions")
    ci: float = Field(0.95, gt=0, lt=1)
    positive_class: str = "mel"


class BaselineConfig(Strict):
    """Colour + texture features with class-balanced gradient boosting."""

    color_bins: int = Field(16, ge=4)
    lbp_radii: list[int] = Field(default_factory=lambda: [1, 2, 3])
    max_iter: int = Field(400, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    max_leaf_nodes: int = Field(31, ge=2)
    l2_regularization: float = Field(1.0, ge=0)
    class_balanced: bool = True
    tune_priors_on_val: bool = Field(
        True, description="rescale class probabilities to maximise val macro-F1 (never test)"
    )
    metadata: list[str] = Field(
        default_factory=list,
        description="manifest columns added as features, e.g. [age, sex, localization]",
    )


class BaselineRunConfig(Strict):
    """``dermkit baseline``: features + gradient boosting, evaluated on the test split."""

    seed: int = 0
    out_dir: str = "runs/baseline"
    data: DataConfig = Field(default_factory=DataConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class ModelConfig(Strict):
    """Which network, initialised from where."""

    name: str = Field("vit_tiny_patch8_64", description="dermkit variant or any timm name")
    weights: str | None = Field(
        None,
        description="local .safetensors/.pth file, dermkit run folder, or a weights file "
        "shipped inside an installed package: 'imagenet' / 'pkg:<name>' "
        "(models/packaged.py); never a hub",
    )
    input_norm: Literal["auto", "imagenet", "symmetric"] = Field(
        "auto",
        description="input normalisation: imagenet mean/std or symmetric [-1, 1] (TF-Lite); "
        "auto = the weights source's own (packaged source or run folder), else imagenet",
    )
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)


class OptimConfig(Strict):
    """AdamW + cosine schedule; learning rate scaled by the effective batch size."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1, description="effective batch per optimizer step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    base_lr: float = Field(1e-3, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    warmup_epochs: float = Field(2.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = Field(None, gt=0, le=1, description="ViT layer-wise lr decay")
    clip_grad: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights; None off")
    patience: int = Field(0, ge=0, description="early stop after N epochs w/o val gain; 0 off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device supports it, else fp32"
    )


class LossConfig(Strict):
    """Imbalance strategy: loss, sampler, label smoothing."""

    loss: Literal["ce", "weighted_ce", "focal", "logit_adjusted"] = "weighted_ce"
    sampler: Literal["random", "class_balanced", "sqrt_balanced"] = "random"
    weight_power: float = Field(0.5, ge=0, le=1, description="class weight = count^-power")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    logit_tau: float = Field(1.0, ge=0)


class AugmentSettings(Strict):
    """Training-time augmentation (batch tensor ops) and optional mixup/cutmix, TTA."""

    flip: bool = True
    rot90: bool = True
    max_rotate_deg: float = Field(15.0, ge=0)
    max_scale: float = Field(0.1, ge=0)
    max_translate: float = Field(0.05, ge=0)
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    saturation: float = Field(0.1, ge=0)
    hue: float = Field(0.02, ge=0)
    scale_range: tuple[float, float] | None = Field(
        None,
        description="zoom drawn log-uniformly from [lo, hi] per image, replacing max_scale: "
        "> 1 zooms in (a random crop resized up), < 1 zooms out (shrunk into a frame of the "
        "image's border colour); "
        "e.g. [0.6, 1.8]",
    )
    white_balance: float = Field(
        0.0, ge=0, description="colour temperature: red x e^t, blue x e^-t, t ~ U(-w, w)"
    )
    tint: float = Field(0.0, ge=0, description="green x e^g, g ~ U(-v, v) (magenta/green)")
    gamma: float = Field(0.0, ge=0, description="tone curve: x^(e^u), u ~ U(-g, g)")
    blur: float = Field(
        0.0, ge=0, le=0.2, description="half the images blurred, sigma ~ U(0, v) x short side"
    )
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    tta: bool = Field(False, description="average predictions over flips and rotations")

    @field_validator("scale_range")
    @classmethod
    def _check_scale_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"augment.scale_range needs 0 < lo <= hi, got {list(v)}")
        return v


class TaskConfig(Strict):
    """What the classifier predicts: the ``label`` column, or ordered classes of a column.

    ordinal (``tasks/ordinal.py``): a continuous column cut at ``thresholds`` (class k holds
    t_k < x <= t_{k+1}; e.g. thickness [0, 0.8, 1, 2]) or a categorical column whose values
    ``order`` lists lowest first; a CORN head with K-1 outputs.
    """

    kind: Literal["classification", "ordinal"] = "classification"
    column: str | None = Field(None, description="ordinal: the manifest column to predict")
    thresholds: list[float] | None = Field(None, description="ordinal: increasing cut points")
    order: list[str] | None = Field(None, description="ordinal: categorical values, lowest first")
    drop_missing: bool = Field(False, description="ordinal: leave out rows without a value")

    @model_validator(mode="after")
    def _check_ordinal(self) -> TaskConfig:
        if self.kind != "ordinal":
            return self
        if not self.column:
            raise ValueError("task.kind=ordinal needs task.column")
        if (self.thresholds is None) == (self.order is None):
            raise ValueError("task.kind=ordinal needs exactly one of task.thresholds, task.order")
        t = self.thresholds
        if t is not None and (not t or sorted(set(t)) != list(t)):
            raise ValueError(f"task.thresholds must be non-empty and strictly increasing: {t}")
        o = self.order
        if o is not None and (len(o) < 2 or len(set(o)) < len(o)):
            raise ValueError(f"task.order needs >= 2 distinct values: {self.order}")
        return self


class FinetuneRunConfig(Strict):
    """``dermkit finetune``: supervised classification, evaluated on the test split."""

    seed: int = 0
    out_dir: str = "runs/finetune"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    synthetic_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of synthetic rows in each training batch"
    )
    synthetic_manifest: str | None = Field(None, description="manifest with synthetic rows")
    decision_rule: Literal["none", "temperature", "temperature+class_scales"] = Field(
        "temperature+class_scales",
        description="post-hoc rule fitted on val logits (never test), saved as decision.json",
    )
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    train_eval_images: int = Field(
        2000, ge=0, description="train images (no augmentation) scored each epoch for the gap"
    )
    task: TaskConfig = Field(default_factory=TaskConfig, description="label or ordinal column")


class CompareArm(Strict):
    """One initialisation of ``dermkit compare`` whose architecture differs from the default."""

    model: str | None = Field(None, description="backbone (default: finetune.model.name)")
    weights: str | None = Field(None, description="as model.weights; null = random init")


class CompareRunConfig(Strict):
    """``dermkit compare``: identical fine-tuning from several initialisations."""

    out_dir: str = "runs/compare"
    finetune: FinetuneRunConfig = Field(default_factory=FinetuneRunConfig)
    inits: dict[str, str | CompareArm | None] = Field(
        default_factory=lambda: {"random": None},
        description="name -> weights (local file, dermkit run folder, imagenet / pkg:<name>; "
        "null = random), or {model, weights} for an arm with its own architecture (e.g. "
        "ImageNet EfficientNet-Lite0 and its random-init twin beside ViT arms)",
    )


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


class VaeOptimConfig(OptimConfig):
    """OptimConfig defaults for the VAE: Adam-like (0.9, 0.999), no weight decay, clipping."""

    base_lr: float = Field(2e-3, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)


class MaePretrainRunConfig(Strict):
    """``dermkit pretrain mae``: masked-autoencoder pretraining of a ViT encoder.

    ``optim.ema_decay``, ``optim.layer_decay`` and ``optim.patience`` do not apply (errors).
    """

    seed: int = 0
    out_dir: str = "runs/pretrain-mae"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(drop_path_rate=0.0),
        description="the ViT encoder; weights: optional initial encoder weights",
    )
    mae: MaeConfig = Field(default_factory=MaeConfig)
    optim: MaeOptimConfig = Field(default_factory=MaeOptimConfig)
    augment: bool = Field(True, description="random flips and 90-degree rotations")
    synthetic_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of synthetic rows in each training batch"
    )
    synthetic_manifest: str | None = Field(None, description="manifest with synthetic rows")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    grid_every: int = Field(1, ge=1, description="epochs between reconstruction grids")
    probe_every: int = Field(0, ge=0, description="epochs between probes; 0: only at the end")
    probe_k: int = Field(20, ge=1, description="neighbours of the k-NN probe")


class VaeConfig(Strict):
    """Convolutional VAE settings; see ``ssl/vae.py``."""

    beta: float = Field(1.0, ge=0, description="KL weight after warm-up")
    kl_warmup_steps: int = Field(500, ge=0, description="linear KL warm-up; 0: none")
    n_samples: int = Field(8, ge=0, description="prior samples shown in each grid")


class VaePretrainRunConfig(Strict):
    """``dermkit pretrain vae``: a convolutional VAE; its encoder becomes a backbone.

    ``optim.ema_decay``, ``optim.layer_decay`` and ``optim.patience`` do not apply (errors).
    """

    seed: int = 0
    out_dir: str = "runs/pretrain-vae"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="vae_encoder_64", drop_path_rate=0.0),
        description="the encoder: a dermkit_vae_encoder variant (vae_encoder_32/_64)",
    )
    vae: VaeConfig = Field(default_factory=VaeConfig)
    optim: VaeOptimConfig = Field(default_factory=VaeOptimConfig)
    augment: bool = Field(True, description="random flips and 90-degree rotations")
    synthetic_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of synthetic rows in each training batch"
    )
    synthetic_manifest: str | None = Field(None, description="manifest with synthetic rows")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    log_every: int = Field(10, ge=1)
    grid_every: int = Field(1, ge=1, description="epochs between reconstruction grids")
    probe_every: int = Field(0, ge=0, description="epochs between probes; 0: only at the end")
    probe_k: int = Field(20, ge=1, description="neighbours of the k-NN probe")


class DistillConfig(Strict):
    """Soft-target knowledge distillation (Hinton et al. 2015), see ``train/kd.py``.

    Options: a DeiT distillation token (``models/distilled.py``), feature and attention
    matching (``train/distill_student.py``); ordinal tasks distil the CORN head's
    conditional probabilities (``kd.OrdinalKDLoss``).
    """

    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KL term; 1-alpha on CE")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of both models")
    teacher_logits: Literal["online", "cached", "auto"] = Field(
        "auto",
        description="online: teacher on each augmented batch; cached: once on the clean "
        "images (augmentation off only); auto: cached when augmentation is off",
    )
    dist_token: bool = Field(
        False,
        description="DeiT distillation token + head (ViT students): the CLS head learns the "
        "labels, the distillation head the teacher; inference averages both heads",
    )
    dist_target: Literal["soft", "hard"] = Field(
        "soft", description="teacher term: soft KL at temperature, or the teacher's argmax"
    )
    feature_weight: float = Field(
        0.0, ge=0, description="w * MSE(projected student pooled features, teacher's)"
    )
    attention_weight: float = Field(
        0.0, ge=0, description="w * KL of the last block's CLS-to-patch attention (ViTs)"
    )


class DistillRunConfig(FinetuneRunConfig):
    """``dermkit distill``: a student trained on a teacher run's soft targets + the labels.

    Every fine-tuning field applies to the student (``model`` is the student); ``task``
    must match the teacher run's (same kind; for ordinal the same column and thresholds or
    order), checked by ``run_distill``.
    """

    out_dir: str = "runs/distill"
    teacher: str = Field("runs/finetune", description="teacher run folder (finetune/distill)")
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="vit_student_patch8_64"),
        description="the student",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)


class DemoConfig(Strict):
    """``dermkit demo``: phantoms -> split -> every available stage -> one report."""

    out_dir: str = "demo"
    n_lesions: int = Field(300, ge=14)
    seed: int = 0
    image_size: int = 48


# --------------------------------------------------------------------------- synth (issue 5)


class SynthOptimConfig(OptimConfig):
    """OptimConfig for the autoencoder: AdamW (0.9, 0.999), no weight decay, cosine, no EMA.

    ``layer_decay``, ``patience`` and ``grad_accum`` > 1 do not apply (errors at run time).
    """

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="effective batch per optimizer step")
    base_lr: float = Field(1e-3, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_epochs: float = Field(0.5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights; None off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"


class DiffusionOptimConfig(SynthOptimConfig):
    """SynthOptimConfig with the diffusion defaults (a partial ``optim:`` keeps them): EMA on."""

    base_lr: float = Field(4e-4, gt=0, description="lr at batch 256; lr = base_lr * B / 256")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of weights; None off")


class AutoencoderModelConfig(Strict):
    """diffusers AutoencoderKL: n blocks downsample by 2^(n-1) (3 blocks: 4, 4 blocks: 8)."""

    block_out_channels: list[int] = Field(
        default_factory=lambda: [64, 128, 128], min_length=1, max_length=5
    )
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(32, ge=1, description="must divide every block's channels")
    mid_block_attention: bool = Field(True, description="self-attention at the lowest scale")


class AutoencoderLossConfig(Strict):
    """Reconstruction loss: MSE (+ perceptual) + kl_weight * KL (+ optional patch adversary)."""

    loss: Literal["mse", "mse+perceptual"] = "mse"
    perceptual_weight: float = Field(0.5, ge=0)
    perceptual_weights: str | None = Field(
        None, description="local torchvision vgg16 (features) state dict, .safetensors/.pth"
    )
    perceptual_encoder: str | None = Field(
        None, description="dermkit run folder whose encoder gives the perceptual features"
    )
    kl_weight: float = Field(1e-6, ge=0, description="per-pixel KL weight (LDM's 1e-6)")
    adversarial_weight: float = Field(0.0, ge=0, description="PatchGAN hinge loss; 0 off")
    adversarial_start_step: int = Field(0, ge=0, description="generator adv. loss from here")
    discriminator_channels: int = Field(64, ge=4)
    discriminator_layers: int = Field(3, ge=1)


class AutoencoderRunConfig(Strict):
    """``dermkit synth autoencoder``: the image <-> latent codec of latent diffusion."""

    seed: int = 0
    out_dir: str = "runs/synth-autoencoder"
    data: DataConfig = Field(default_factory=DataConfig)
    model: AutoencoderModelConfig = Field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = Field(default_factory=AutoencoderLossConfig)
    optim: SynthOptimConfig = Field(default_factory=SynthOptimConfig)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps")
    augment: bool = Field(True, description="random flips and 90-degree rotations")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    val_images: int = Field(512, ge=1, description="val images scored (PSNR/SSIM)")
    eval_every: int = Field(1, ge=1, description="epochs between val PSNR/SSIM (and the last)")
    scaling_images: int = Field(2048, ge=1, description="train images for the latent std")


class UNetConfig(Strict):
    """diffusers UNet2DModel on the latents (one entry per resolution level)."""

    block_out_channels: list[int] = Field(
        default_factory=lambda: [64, 128, 128], min_length=1, max_length=5
    )
    attention: list[bool] = Field(
        default_factory=lambda: [False, True, True], description="self-attention per level"
    )
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class SamplerConfig(Strict):
    """Reverse process: DDIM or DPM-Solver++ with classifier-free guidance.

    eps = eps_uncond + guidance * (eps_cond - eps_uncond): 0 is unconditional, 1 plain
    conditional, > 1 stronger class adherence.
    """

    sampler: Literal["ddim", "dpm_solver"] = "ddim"
    steps: int = Field(25, ge=1)
    guidance: float = Field(2.0, ge=0)
    batch_size: int = Field(64, ge=1)


class DiffusionRunConfig(Strict):
    """``dermkit synth diffusion``: class-conditional DDPM on autoencoder latents."""

    seed: int = 0
    out_dir: str = "runs/synth-diffusion"
    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: str | None = Field(
        "runs/synth-autoencoder", description="autoencoder run folder; null: pixel space"
    )
    unet: UNetConfig = Field(default_factory=UNetConfig)
    unconditional: bool = Field(False, description="always the null class (ablation)")
    label_dropout: float = Field(0.1, ge=0, le=1, description="p of the null class (CFG)")
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "scaled_linear",
        description="scaled_linear: LDM's betas 0.00085-0.012; squaredcos_cap_v2 ends at "
        "alpha_bar ~ 1e-9, which few-step DDIM from t = T amplifies",
    )
    dihedral_views: Literal[1, 2, 4, 8] = Field(
        8, description="flip/rot90 views of each train image encoded once as latents"
    )
    optim: DiffusionOptimConfig = Field(default_factory=DiffusionOptimConfig)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(20, ge=1)
    preview: SamplerConfig = Field(default_factory=SamplerConfig)
    preview_per_class: int = Field(8, ge=0, description="samples per class in the run's grid")


class SampleConfig(Strict):
    """``dermkit synth sample``: a class-balanced synthetic set as PNGs + a manifest."""

    generator: str = Field("runs/synth-diffusion", description="diffusion run folder")
    out_dir: str = "runs/synth-samples"
    balance: str = Field(
        "uniform", description="'uniform' or a JSON of per-class totals, shares or generate counts"
    )
    seed: int = 0
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    # Here and not in SamplerConfig: the diffusion stage's previews use SamplerConfig, and
    # a new field there would change every trained generator's pipeline key.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="UNet autocast while sampling; auto: bf16 where training uses it"
    )
    grid_per_class: int = Field(16, ge=0)


class TstrConfig(Strict):
    """Train-on-synthetic/test-on-real vs train-on-real/test-on-real, at a small budget."""

    method: Literal["classical", "finetune", "none"] = "classical"
    baseline: BaselineConfig = Field(
        default_factory=lambda: BaselineConfig(max_iter=150, lbp_radii=[1, 2])
    )
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="resnet18_64"))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=5))
    loss: LossConfig = Field(default_factory=LossConfig)

    @field_validator("baseline")
    @classmethod
    def _no_metadata(cls, v: BaselineConfig) -> BaselineConfig:
        # checked at load time, not after minutes of feature extraction
        if v.metadata:
            raise ValueError("synthetic images carry no patient metadata: leave it empty")
        return v


class QualityConfig(Strict):
    """``dermkit synth quality``: fidelity, diversity, usefulness and memorisation."""

    seed: int = 0
    out_dir: str = "runs/synth-quality"
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic_manifest: str = Field(
        "runs/synth-samples/manifest.csv", description="manifest written by synth sample"
    )
    features: Literal["encoder", "inception", "classical"] = Field(
        "encoder", description="feature space: dermkit encoder, local Inception, colour/texture"
    )
    encoder: str | None = Field(None, description="dermkit run folder (features=encoder)")
    inception_weights: str | None = Field(None, description="torchvision inception_v3 file")
    max_images: int = Field(5000, ge=10, description="real/synthetic images compared, at random")
    kid_subset_size: int = Field(1000, ge=2)
    kid_subsets: int = Field(50, ge=1)
    pr_k: int = Field(3, ge=1, description="k of the k-NN manifolds (precision/recall)")
    memorisation_space: Literal["feature", "pixel", "both"] = "both"
    memorisation_percentile: float = Field(1.0, gt=0, lt=100)
    tstr: TstrConfig = Field(default_factory=TstrConfig)
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(n_boot=200))


# --------------------------------------------------------------------------- exits (issue 7)


class ExitsConfig(Strict):
    """Early-exit heads, how they are trained, and the exit policy (see ``exits/``)."""

    head_types: list[Literal["linear", "mlp", "attention", "ssm"]] = Field(
        default_factory=lambda: ["linear", "mlp", "attention", "ssm"],
        description="one early-exit model per head type; exits bench compares them",
    )
    exit_blocks: list[int] | None = Field(
        None, description="blocks computed before each early exit; null: a few in the latter half"
    )
    mode: Literal["frozen", "joint"] = Field(
        "frozen", description="frozen: train the exit heads only; joint: heads and backbone"
    )
    exit_loss_weights: list[float] | None = Field(
        None, description="joint: loss weight per exit, final included; null: equal"
    )
    distill_alpha: float = Field(
        0.0, ge=0, le=1, description="self-distillation: weight of the final exit's soft targets"
    )
    distill_temperature: float = Field(2.0, gt=0)
    mlp_hidden: int = Field(256, ge=1)
    attention_heads: int = Field(4, ge=1)
    ssm_d_model: int = Field(64, ge=4)
    ssm_layers: int = Field(1, ge=1, le=4)
    ssm_d_state: int = Field(8, ge=1)
    ssm_expand: int = Field(2, ge=1)
    ssm_grid_pool: int = Field(2, ge=1, description="average-pool the patch grid before the scan")
    measure: Literal["max_prob", "margin", "neg_entropy"] = "max_prob"
    objective: str = Field(
        "f1-drop=0.01",
        pattern=r"^(f1-drop|compute|latency)=[0-9.eE+-]+$",
        description="f1-drop=X: least compute within X macro-F1 of the final exit (val); "
        "compute=B: best macro-F1 at mean compute <= B (fraction of the plain model); "
        "latency=B: best macro-F1 at measured batch-1 latency <= B (fraction of the plain "
        "model's, exits/latency.py)",
    )
    compute: Literal["gflops", "blocks"] = Field("gflops", description="what compute counts")
    protect: list[str] = Field(default_factory=list, description="classes never answered early")
    grid: int = Field(50, ge=2, description="threshold quantiles tried per exit")
    bench_batch_size: int = Field(64, ge=1)
    bench_rounds: int = Field(3, ge=1, description="interleaved wall-time rounds")
    bench_max_images: int | None = Field(None, ge=1, description="test images timed; null: all")


class ExitsRunConfig(Strict):
    """``dermkit exits train``: exit heads on a trained classifier run (finetune/distill).

    ``loss`` and ``augment`` default to the base run's; ``optim.grad_accum``,
    ``layer_decay``, ``ema_decay`` and ``patience`` do not apply (errors).
    """

    seed: int = 0
    out_dir: str = "runs/exits"
    base_run: str = Field("runs/finetune", description="classifier run folder")
    data_path: str | None = Field(None, description="dataset root, if moved since the base run")
    cache_dir: str | None = Field(None, description="image cache root (default: the base run's)")
    exits: ExitsConfig = Field(default_factory=ExitsConfig)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(epochs=5, base_lr=1e-3, warmup_epochs=0.5)
    )
    loss: LossConfig | None = Field(None, description="null: the base run's")
    augment: AugmentSettings | None = Field(None, description="null: the base run's")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint_every: int = Field(
        200, ge=1, description="optimizer steps between checkpoints (and every epoch end)"
    )


T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has an empty key")
    return key.strip().split("."), yaml.safe_load(value) if value != "" else ""


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def preset_path(preset: str, stage: str) -> Path:
    return PRESET_DIR / preset / f"{stage}.yaml"


# A stage whose config nests another stage's config starts that section from the other
# stage's preset of the same scale, so e.g. `compare --preset cpu` fine-tunes exactly as
# `finetune --preset cpu` does and the two presets can never drift apart.
PRESET_SECTIONS: dict[str, dict[str, str]] = {"compare": {"finetune": "finetune"}}


def load_config(
    schema: type[T],
    stage: str,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> T:
    """Resolve a stage config: defaults < preset < file < overrides, validated by ``schema``."""
    data: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}', expected one of {PRESETS}")
        for section, other_stage in PRESET_SECTIONS.get(stage, {}).items():
            if (other := preset_path(preset, other_stage)).exists():
                data = _merge(data, {section: _read_yaml(other)})
        path = preset_path(preset, stage)
        if path.exists():
            data = _merge(data, _read_yaml(path))
    if file is not None:
        data = _merge(data, _read_yaml(Path(file)))
    for item in overrides:
        keys, value = parse_override(item)
        nested: dict = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            nested = {k: nested}
        data = _merge(data, nested)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {stage} config:\n  " + "\n  ".join(lines)) from e


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (the run folder's ``config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
