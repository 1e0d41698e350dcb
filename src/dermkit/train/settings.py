"""Training settings: the optimizer and loss sections, and the run configs of the supervised
commands (``baseline``, ``finetune``, ``compare``, ``distill``).

What belongs here: schemas of ``train/`` (optimizer, schedule, imbalance loss, knowledge
distillation) and the run configs it owns, composed from the data, model, eval and task
sections. ``FinetuneRunConfig`` / ``DistillRunConfig`` also describe a finished classifier
run folder's ``config.yaml`` (``models/runs_io.py`` reads them), which is why settings
modules are importable from every layer (``tests/test_layers.py``). Schemas only.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dermkit.config import Strict
from dermkit.data.settings import (
    AugmentSettings,
    DataRunSettings,
    SyntheticManifest,
    SyntheticRatio,
)
from dermkit.eval.settings import EvalConfig
from dermkit.models.settings import BaselineConfig, ModelConfig
from dermkit.tasks.settings import TaskConfig

ClassSampling = Literal["random", "class_balanced", "sqrt_balanced"]
"""Which rows a training epoch draws (``train.losses.sampling_weights``): shuffled, every
class equally likely, or class probability proportional to sqrt(count)."""


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
    sampler: ClassSampling = "random"
    weight_power: float = Field(0.5, ge=0, le=1, description="class weight = count^-power")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    logit_tau: float = Field(1.0, ge=0)


class BaselineRunConfig(DataRunSettings):
    """``dermkit baseline``: features + gradient boosting, evaluated on the test split."""

    out_dir: str = "runs/baseline"
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class FinetuneRunConfig(DataRunSettings):
    """``dermkit finetune``: supervised classification, evaluated on the test split."""

    out_dir: str = "runs/finetune"
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    synthetic_ratio: SyntheticRatio = 0.0
    synthetic_manifest: SyntheticManifest = None
    decision_rule: Literal["none", "temperature", "temperature+class_scales", "auto"] = Field(
        "temperature+class_scales",
        description="post-hoc rule fitted on val logits (never test), saved as decision.json; "
        "auto: temperature, plus class scales only when scales tuned on half of val raise "
        "macro-F1 on the other half",
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

    preset_sections: ClassVar[dict[str, str]] = {"finetune": "finetune"}
    out_dir: str = "runs/compare"
    finetune: FinetuneRunConfig = Field(default_factory=FinetuneRunConfig)
    inits: dict[str, str | CompareArm | None] = Field(
        default_factory=lambda: {"random": None},
        description="name -> weights (local file, dermkit run folder, imagenet / pkg:<name>; "
        "null = random), or {model, weights} for an arm with its own architecture (e.g. "
        "ImageNet EfficientNet-Lite0 and its random-init twin beside ViT arms)",
    )
    probe: bool = Field(
        True, description="also a linear probe of each arm's initial encoder, frozen"
    )


class DistillConfig(Strict):
    """Soft-target knowledge distillation (Hinton et al. 2015), see ``train/kd.py``.

    Options: a DeiT distillation token (``models/distilled.py``), feature and attention
    matching (``train/distill_student.py``); ordinal tasks distil the CORN head's
    conditional probabilities (``kd.OrdinalKDLoss``).
    """

    alpha: float = Field(0.7, ge=0, le=1, description="weight of the KL term; 1-alpha on CE")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of both models")
    teacher_logits: Literal["online", "cached", "cached-dihedral", "auto"] = Field(
        "auto",
        description="online: teacher on each augmented batch; cached: once on the clean "
        "images (augmentation off only); cached-dihedral: once, the mean over each image's 8 "
        "flips/rotations (exact when flip/rot90 are the only augmentations); auto: cached "
        "when augmentation is off",
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
    teacher: str = Field(
        "runs/finetune",
        description="teacher run folder (finetune/distill), or a `dermkit ensemble` folder",
    )
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name="vit_student_patch8_64"),
        description="the student",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
