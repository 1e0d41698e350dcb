"""Data settings: where the images come from, how they are split and cached, how training
batches are augmented, and the shared pieces of every run config that reads a dataset.

What belongs here: pydantic schemas (and field types) about datasets, splits, the image
cache, augmentation and synthetic-row mixing. Schemas only: settings modules are read at
every layer (``tests/test_layers.py``), so they import nothing but ``dermkit.config`` and
lower settings modules.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from dermkit.config import RunSettings, Strict

# The crop policies and colour constancies of ``data/cache.py``'s ``crop_image``; the
# deployment model card records the same values (``deploy/model_card.py``).
CropPolicy = Literal["short_side_center", "full_frame"]
ColourConstancy = Literal["none", "shades_of_gray"]

# Mixing synthetic rows into training batches (finetune, pretrain mae|vae).
SyntheticRatio = Annotated[
    float, Field(ge=0, lt=1, description="share of synthetic rows in each training batch")
]
SyntheticManifest = Annotated[str | None, Field(description="manifest with synthetic rows")]


class DataConfig(Strict):
    """Where the images come from and how they are split and cached."""

    path: str = Field("demo/phantoms", description="dataset root (HAM10000, ISIC or folder layout)")
    layout: Literal["auto", "ham10000", "isic", "folder"] = "auto"
    image_size: int = Field(64, ge=16, le=1024, description="square side after crop (px)")
    crop: CropPolicy = Field(
        "short_side_center",
        description="short_side_center: resize the short side, centre-crop square; "
        "full_frame: resize the long side, pad square by reflection (data/cache.py)",
    )
    colour_constancy: ColourConstancy = Field(
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


class DataRunSettings(RunSettings):
    """The head of a run config that reads a dataset: seed, run folder, ``data`` section."""

    data: DataConfig = Field(default_factory=DataConfig)
