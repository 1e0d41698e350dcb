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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    crop: Literal["short_side_center"] = "short_side_center"
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
        None, description="local .safetensors/.pth file or dermkit run folder; never a hub"
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
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    tta: bool = Field(False, description="average predictions over flips and rotations")


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


class CompareRunConfig(Strict):
    """``dermkit compare``: identical fine-tuning from several initialisations."""

    out_dir: str = "runs/compare"
    finetune: FinetuneRunConfig = Field(default_factory=FinetuneRunConfig)
    inits: dict[str, str | None] = Field(
        default_factory=lambda: {"random": None},
        description="name -> weights (local file or dermkit run folder; null = random)",
    )


class DemoConfig(Strict):
    """``dermkit demo``: phantoms -> split -> every available stage -> one report."""

    out_dir: str = "demo"
    n_lesions: int = Field(300, ge=14)
    seed: int = 0
    image_size: int = 48


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
