"""Named dermkit backbones: a timm architecture plus the constructor overrides of each preset.

timm registers an architecture per function (``vit_tiny_patch16_224``...); dermkit needs a
few shapes timm does not ship (ViT-Tiny with 8 px patches at 64 px, a 4 px-patch ViT for
32 px tests). Rather than new model classes, a variant is the timm base name plus keyword
overrides that timm's entrypoints forward to the model constructor (``embed_dim``,
``depth``, ``patch_size``...), so every variant is a plain timm model with timm's whole
interface (``forward_features``, ``forward_head``, ``forward_intermediates``) and loads
timm checkpoints key for key.

| variant               | preset | base                 | shape                                  |
|-----------------------|--------|----------------------|----------------------------------------|
| vit_nano_patch4_32    | tiny   | vit_tiny_patch16_224 | width 64, 2 blocks, 2 heads, patch 4   |
| vit_micro_patch4_32   | tiny   | vit_tiny_patch16_224 | width 96, 4 blocks, 3 heads, patch 4   |
| vit_tiny_patch8_64    | cpu    | vit_tiny_patch16_224 | width 192, 12 blocks, 3 heads, patch 8 |
| vit_student_patch8_64 | cpu    | vit_tiny_patch16_224 | width 128, 6 blocks, 2 heads, patch 8  |
| resnet18_64           | cpu    | resnet18             | stem max-pool removed (see below)      |
| resnet18d_64          | cpu    | resnet18d            | deep stem, stem max-pool removed       |
| vit_huge_patch14_224  | gpu    | vit_huge_patch14_224 | timm's ViT-H/14 (632 M parameters)     |
| vae_encoder_32        | tiny   | dermkit_vae_encoder  | VAE encoder, widths 16-32, latent 16   |
| vae_encoder_64        | cpu    | dermkit_vae_encoder  | VAE encoder, widths 32-128, latent 64  |

Resolutions are the design points; ViT variants accept any ``img_size`` divisible by the
patch size (the factory passes it through).

Every variant is also a timm architecture: importing this module registers each one with
timm's ``@register_model`` (as ``vae_encoder.py`` registers ``dermkit_vae_encoder``), so
``timm.create_model("resnet18d_64", num_classes=7)`` builds the same model as
``create_backbone`` and ``timm.list_models("*_64")`` lists them. A variant named like a timm
model (``vit_huge_patch14_224``) is timm's own and is left to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import timm
from timm.models import get_pretrained_cfg, register_model
from torch import nn

import dermkit.models.vae_encoder  # noqa: F401  (registers dermkit_vae_encoder with timm)


@dataclass(frozen=True)
class BackboneVariant:
    """One named backbone.

    Attributes:
        timm_name: the timm architecture it is built from (``timm.create_model`` name).
        kwargs: constructor overrides forwarded to timm (``embed_dim``, ``depth``...).
        img_size: the resolution (px) the variant is designed for.
        preset: the scale it serves: ``tiny``, ``cpu`` or ``gpu`` (DESIGN.md, "Scales").
        doc: one paragraph on what it is and why.
        adapt: optional in-place change applied after timm builds the model.
    """

    timm_name: str
    kwargs: Mapping[str, Any]
    img_size: int
    preset: str
    doc: str
    adapt: Callable[[nn.Module], None] | None = field(default=None, compare=False)


def remove_stem_max_pool(model: nn.Module) -> None:
    """Replace a timm ResNet's stem max-pool by identity (stride 4 -> 2 before ``layer1``).

    Why: at 64 px the ImageNet stem (7x7 stride-2 conv, then a stride-2 max-pool) leaves
    16x16 maps for ``layer1`` and only 2x2 for ``layer4``, where the 3x3 convolutions read
    mostly zero padding. Dropping the pool gives 32x32 -> 4x4, the maps resnet18 has at
    128 px, for 0.56 instead of 0.15 GMACs per 64 px image (the ViT-Tiny/8 teacher at 64 px
    is 0.35): the usual small-image ResNet change (CIFAR / Tiny-ImageNet ResNets remove it
    too). The strided 7x7 conv is kept and a max-pool has no parameters, so an ImageNet
    resnet18 checkpoint still loads key for key; a stride-1 stem conv would cost 4x more
    for the same map sizes.
    """
    if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        raise TypeError(f"{type(model).__name__} has no stem max-pool to remove")
    model.maxpool = nn.Identity()
    # timm's feature_info records each stage's stride; everything after the stem halves.
    for info in getattr(model, "feature_info", []):
        if info.get("module") != "act1" and "reduction" in info:
            info["reduction"] //= 2


_VIT = "vit_tiny_patch16_224"

_VARIANTS: dict[str, BackboneVariant] = {
    "vit_nano_patch4_32": BackboneVariant(
        timm_name=_VIT,
        kwargs={"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
        img_size=32,
        preset="tiny",
        doc="The tiny preset's student: a 2-block, width-64 ViT on 8x8 patches of 4 px; "
        "builds and trains in milliseconds for tests and `dermkit demo`.",
    ),
    "vit_micro_patch4_32": BackboneVariant(
        timm_name=_VIT,
        kwargs={"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
        img_size=32,
        preset="tiny",
        doc="The tiny preset's teacher: a 4-block, width-96 ViT on 8x8 patches of 4 px.",
    ),
    "vit_tiny_patch8_64": BackboneVariant(
        timm_name=_VIT,
        kwargs={"patch_size": 8},
        img_size=64,
        preset="cpu",
        doc="The cpu preset's teacher: ViT-Tiny (width 192, 12 blocks, 3 heads) with 8 px "
        "patches, so a 64 px image gives the 8x8 grid of 64 tokens that ViT-Ti/16 "
        "has at 128 px; 5.4 M parameters, 0.35 GMACs per image.",
    ),
    "vit_student_patch8_64": BackboneVariant(
        timm_name=_VIT,
        kwargs={"patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 2},
        img_size=64,
        preset="cpu",
        doc="The cpu preset's student: width 128, 6 blocks, 2 heads of 64, patch 8; "
        "1.2 M parameters and 0.08 GMACs, about 4.5x cheaper than the teacher.",
    ),
    "resnet18_64": BackboneVariant(
        timm_name="resnet18",
        kwargs={},
        img_size=64,
        preset="cpu",
        doc="timm's resnet18 without the stem max-pool, the CNN reference at 64 px "
        "(see remove_stem_max_pool for why).",
        adapt=remove_stem_max_pool,
    ),
    "resnet18d_64": BackboneVariant(
        timm_name="resnet18d",
        kwargs={},
        img_size=64,
        preset="cpu",
        doc="timm's resnet18d (ResNet-D: a deep stem of three 3x3 convs instead of one "
        "7x7, average-pool shortcuts when downsampling) without the stem max-pool. At "
        "64 px a lesion's texture spans few pixels: three 3x3 convs read it at finer "
        "steps than one strided 7x7, for 0.58 vs 0.56 GMACs and 11.2 M params, as resnet18_64.",
        adapt=remove_stem_max_pool,
    ),
    "vit_huge_patch14_224": BackboneVariant(
        timm_name="vit_huge_patch14_224",
        kwargs={},
        img_size=224,
        preset="gpu",
        doc="The gpu preset's MAE teacher: timm's ViT-H/14 (width 1280, 32 blocks, "
        "16 heads, patch 14) at 224 px, as in the MAE paper.",
    ),
    # The encoder of `dermkit pretrain vae` (dermkit.models.vae_encoder registers the
    # architecture with timm); features are the pooled posterior mean.
    "vae_encoder_32": BackboneVariant(
        timm_name="dermkit_vae_encoder",
        kwargs={"widths": (16, 32), "latent_channels": 16},
        img_size=32,
        preset="tiny",
        doc="The tiny preset's VAE encoder: two stride-2 stages (16, 32 channels) to an "
        "8x8x16 posterior mean at 32 px.",
    ),
    "vae_encoder_64": BackboneVariant(
        timm_name="dermkit_vae_encoder",
        kwargs={"widths": (32, 64, 128), "latent_channels": 64},
        img_size=64,
        preset="cpu",
        doc="The cpu preset's VAE encoder: three stride-2 stages (32, 64, 128 channels) to "
        "an 8x8x64 posterior mean at 64 px; 0.5 M parameters.",
    ),
}

VARIANTS: Mapping[str, BackboneVariant] = MappingProxyType(_VARIANTS)
"""Every registered variant by name (read only; add with :func:`register_variant`)."""


def _timm_entrypoint(name: str, variant: BackboneVariant) -> Callable[..., nn.Module]:
    """A timm entrypoint ``name(pretrained=False, **kwargs)`` that builds ``variant``."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{name} has no published weights; dermkit loads local ones only "
                "(create_backbone(..., weights=PATH))"
            )
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's own
            kwargs.pop(key, None)
        base_cfg = get_pretrained_cfg(variant.timm_name)
        if base_cfg is not None and base_cfg.fixed_input_size:  # ViTs: patch grid from size
            kwargs.setdefault("img_size", variant.img_size)
        model = timm.create_model(variant.timm_name, pretrained=False, **variant.kwargs | kwargs)
        if variant.adapt is not None:
            variant.adapt(model)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name  # timm registers by function name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entrypoint of dermkit's {name}: {variant.doc}"
    return entrypoint


def _register_with_timm(name: str, variant: BackboneVariant) -> None:
    if name == variant.timm_name or (timm.is_model(name) and name not in _OURS):
        return  # timm's own architecture under its own name
    register_model(_timm_entrypoint(name, variant))
    _OURS.add(name)


def register_variant(name: str, variant: BackboneVariant) -> None:
    """Add a named variant (also to timm); re-registering a name is an error (no shadowing)."""
    if name in _VARIANTS:
        raise ValueError(f"backbone variant {name!r} is already registered")
    _VARIANTS[name] = variant
    _register_with_timm(name, variant)


def get_variant(name: str) -> BackboneVariant | None:
    """The registered variant called ``name``, or None for a plain timm name."""
    return _VARIANTS.get(name)


def list_variants(preset: str | None = None) -> list[str]:
    """Registered variant names, optionally only those of one preset (tiny / cpu / gpu)."""
    return sorted(n for n, v in _VARIANTS.items() if preset is None or v.preset == preset)


_OURS: set[str] = set()
for _name, _variant in _VARIANTS.items():
    _register_with_timm(_name, _variant)
