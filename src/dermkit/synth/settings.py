"""Synthesis settings: the latent autoencoder, the diffusion generator, sampling and the
quality study (``dermkit synth autoencoder|diffusion|sample|quality``).

What belongs here: schemas of ``synth/`` and its run configs, built on the training
optimizer/loss sections and the data/model/eval sections. Schemas only (see
``dermkit.config``); settings modules are read at every layer (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from dermkit.config import KEY_NEUTRAL_DEFAULT, Strict
from dermkit.data.settings import DataRunSettings
from dermkit.eval.settings import EvalConfig
from dermkit.models.settings import BaselineConfig, ModelConfig
from dermkit.train.settings import ClassSampling, LossConfig, OptimConfig


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
    # Why: HAM10000's vasc is lost in the codec's low frequencies, not its detail. A real vasc
    # image with its reconstruction's 8x8-pooled colour swapped in is vasc to a real-trained
    # CNN 14% of the time (93% for the real image, 71% for the reconstruction's detail on the
    # real colour): plain MSE lets the rare purple drift toward the common browns.
    colour_weight: float = Field(
        0.0,
        ge=0,
        description="weight of an extra MSE between 8x8-average-pooled image and "
        "reconstruction (the colour of each 1/8 x 1/8 tile); 0 off",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )
    adversarial_weight: float = Field(0.0, ge=0, description="PatchGAN hinge loss; 0 off")
    adversarial_start_step: int = Field(0, ge=0, description="generator adv. loss from here")
    discriminator_channels: int = Field(64, ge=4)
    discriminator_layers: int = Field(3, ge=1)


class AutoencoderRunConfig(DataRunSettings):
    """``dermkit synth autoencoder``: the image <-> latent codec of latent diffusion."""

    out_dir: str = "runs/synth-autoencoder"
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
    class_sampling: ClassSampling = Field(
        "random",
        description="training batches: shuffled (random), every class equally likely "
        "(class_balanced) or class probability ~ sqrt(count) (sqrt_balanced); balanced "
        "batches teach the codec the rare classes' colours (vasc's red, BENCHMARKS.md)",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )


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


DEFAULT_GUIDANCE = 2.0
GuidanceScale = Annotated[float, Field(ge=0)]


class SamplerConfig(Strict):
    """Reverse process: DDIM or DPM-Solver++ with classifier-free guidance.

    eps = eps_uncond + guidance * (eps_cond - eps_uncond): 0 is unconditional, 1 plain
    conditional, > 1 stronger class adherence. ``guidance`` is one scale for every class
    or a scale per class, ``{mel: 2, df: 4, default: 3}``: a rare class the generator
    draws poorly may need a stronger pull than the others.
    """

    sampler: Literal["ddim", "dpm_solver"] = "ddim"
    steps: int = Field(25, ge=1)
    guidance: GuidanceScale | dict[str, GuidanceScale] = Field(
        DEFAULT_GUIDANCE,
        description="CFG scale, or {class: scale} where the key 'default' (else "
        f"{DEFAULT_GUIDANCE}) is the scale of the classes left out",
    )
    batch_size: int = Field(64, ge=1)


class DiffusionRunConfig(DataRunSettings):
    """``dermkit synth diffusion``: class-conditional DDPM on autoencoder latents."""

    out_dir: str = "runs/synth-diffusion"
    autoencoder: str | None = Field(
        "runs/synth-autoencoder", description="autoencoder run folder; null: pixel space"
    )
    unet: UNetConfig = Field(default_factory=UNetConfig)
    unconditional: bool = Field(False, description="always the null class (ablation)")
    label_dropout: float = Field(0.1, ge=0, le=1, description="p of the null class (CFG)")
    class_sampling: ClassSampling = Field(
        "random",
        description="training batches: shuffled (random), every class equally likely "
        "(class_balanced) or class probability ~ sqrt(count) (sqrt_balanced)",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )
    train_classes: list[str] | None = Field(
        None,
        description="train on these classes' images only (null: all); the generator keeps "
        "every class's real count for planning and refuses to draw the others. A cheap "
        "second generator for the classes the first loses (sample.pixel_classes)",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )
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


class FilterConfig(Strict):
    """Keep a synthetic image only when a classifier trained on the real train split labels
    it as the requested class and it is no near-copy of a generator training image.

    The sampler then draws in rounds until each class has its count of kept images or
    ``max_draw_factor`` times that count were drawn (``synth/filtering.py``).
    """

    classifier: str = Field(
        description="run folder of a classifier trained on the real train split: dermkit "
        "finetune/distill (its model), or dermkit baseline (refitted, as it saves no model)"
    )
    min_prob: float = Field(
        0.0, ge=0, le=1, description="also require this probability of the requested class"
    )
    # Why a looser bar exists: kept only when the classifier's argmax agrees, the v7 CNN
    # trained with the filtered set lost akiec recall (-0.17): the kept images are the
    # unmistakable ones (BENCHMARKS.md, "Does synthetic balancing help?"). top_k = 2 also
    # keeps images whose class is the classifier's second choice (more diverse, less sure).
    top_k: int = Field(
        1,
        ge=1,
        description="keep when the requested class is among the classifier's top k classes",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )
    memorisation: bool = Field(
        True, description="reject near-copies of the generator's train images (32 px pixels)"
    )
    memorisation_percentile: float = Field(
        1.0, gt=0, lt=100, description="near-copy: closer than this percentile of real pairs"
    )
    max_draw_factor: float = Field(
        4.0, ge=1, description="per class, draw at most this many times the images asked for"
    )


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
    filter: FilterConfig | None = Field(
        None,
        description="keep only images a real-trained classifier agrees with; null: all",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )
    from_real: float | None = Field(
        None,
        gt=0,
        le=1,
        description="SDEdit strength: start each image from a real train image of its class "
        "noised to t ~ strength * T (1: plain sampling); null: from noise",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )


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


class QualityConfig(DataRunSettings):
    """``dermkit synth quality``: fidelity, diversity, usefulness and memorisation."""

    out_dir: str = "runs/synth-quality"
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
