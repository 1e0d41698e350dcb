"""The backbone factory: every dermkit network is a timm model, built without any download.

``create_backbone`` takes a dermkit variant name (``registry.py``) or any timm model name
(ViTs at any resolution and patch size, ResNets, EfficientNets, MobileNetV3...) and always
calls ``timm.create_model(..., pretrained=False)``: no hub, no cache directory, no network.
Pretrained weights come only from local files, through
:func:`dermkit.models.weights.load_pretrained`, which reports every key it did not load.

The model returned is the timm model itself, so the whole timm interface works on it:
``forward_features`` (tokens or feature maps), ``forward_head(x, pre_logits=True)`` (pooled
features, ``feature_dim`` wide), ``forward_intermediates`` (per-block outputs),
``reset_classifier``. Nothing is wrapped, which keeps timm's checkpoints, ONNX export and
feature extraction working unchanged.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg
from torch import nn

import dermkit.models.vae_encoder  # noqa: F401  (registers dermkit_vae_encoder with timm)
from dermkit.models.packaged import INPUT_NORMS, resolve_input_norm
from dermkit.models.registry import get_variant, list_variants

log = logging.getLogger(__name__)


def configure_attention_kernel() -> str:
    """Choose timm's attention kernel for every model built after this call; returns it.

    On CPUs dermkit uses timm's plain matmul + softmax attention instead of
    ``F.scaled_dot_product_attention``: for the short sequences of its 64 px ViTs (65 tokens)
    the fused CPU kernel is far slower under bf16 autocast. Measured on the 2-core AMD EPYC
    (AVX512-BF16) benchmark machine, ViT-Tiny/8 at 64 px, batch 128, bf16: training 87-126
    img/s fused vs 200-209 img/s matmul; inference 511-546 vs 654-672 img/s. On CUDA the
    fused (flash / memory-efficient) kernel wins and stays on. ``DERMKIT_ATTENTION=fused``
    or ``=math`` overrides the choice.
    """
    import torch
    from timm.layers import set_fused_attn

    kind = os.environ.get("DERMKIT_ATTENTION") or ("fused" if torch.cuda.is_available() else "math")
    if kind not in ("fused", "math"):
        raise ValueError(f"DERMKIT_ATTENTION must be 'fused' or 'math', got {kind!r}")
    set_fused_attn(kind == "fused")
    return kind


ATTENTION_KERNEL = configure_attention_kernel()

SPEC_ATTR = "dermkit_spec"
"""Attribute the factory sets on each model: {name, timm_name, img_size, in_chans}."""


def _resolve_timm_name(name: str) -> str:
    """Check ``name`` is a timm architecture (optionally with a ``.tag``) and return it."""
    if ":" in name:
        # timm treats "hf-hub:..." / "local-dir:..." as sources and fetches their config.
        raise ValueError(
            f"backbone name {name!r} names a model source, not an architecture: dermkit never "
            "downloads at run time. Give the architecture name (e.g. 'vit_small_patch16_224') "
            "and a local weights file via weights=PATH."
        )
    if timm.is_model(name):
        return name
    candidates = list_variants() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}: neither a dermkit variant ({', '.join(list_variants())}) "
        f"nor a timm model name.{hint}"
    )


def _takes_img_size(timm_name: str) -> bool:
    """True when the architecture's input size is fixed at construction (ViTs, Swin...).

    timm marks such models with ``fixed_input_size`` in their pretrained config and itself
    passes ``img_size`` only to them; CNNs take any input size and reject the argument.
    """
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError as e:  # a valid architecture with an unknown ``.tag``
        raise ValueError(f"backbone {timm_name!r}: {e}") from e
    return bool(cfg is not None and cfg.fixed_input_size)


def create_backbone(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    in_chans: int = 3,
    weights: str | Path | None = None,
    drop_path_rate: float = 0.0,
    input_norm: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone with a ``num_classes`` head for ``(B, in_chans, img_size, img_size)`` input.

    Args:
        name: a dermkit variant (see ``registry.list_variants()``) or any timm model name.
        num_classes: classifier outputs; 0 builds the backbone without a head.
        img_size: input side in px. Passed to models whose input size is fixed at
            construction (ViTs: it sets the patch grid and ``pos_embed``); CNNs take any size,
            it is only recorded for ``describe``.
        in_chans: input channels.
        weights: optional local weights (file or dermkit run folder), loaded non-strictly
            with :func:`~dermkit.models.weights.load_pretrained`; the key report is logged and
            kept on the model as ``model.dermkit_weights_report``.
        drop_path_rate: stochastic depth; only passed when > 0 (not every timm model takes it).
        input_norm: ``imagenet`` / ``symmetric`` (``packaged.INPUT_NORMS``) or ``auto`` (the
            weights source's own, else imagenet); recorded in ``model.dermkit_spec`` and
            read back by :func:`input_stats`.
        **kwargs: further timm constructor arguments (``drop_rate``, ``global_pool``...),
            overriding a variant's own.

    Returns:
        The timm model (``pretrained=False`` always): ``model(x)`` -> ``(B, num_classes)``.

    Raises:
        ValueError: unknown name, a hub name, ``pretrained=True``, bad sizes, or arguments
            the timm constructor rejects.
    """
    if kwargs.pop("pretrained", False) or kwargs.pop("checkpoint_path", None):
        raise ValueError(
            f"backbone {name!r}: dermkit never downloads weights and loads local ones only "
            "through weights=PATH (which reports the keys it loaded); drop pretrained/"
            "checkpoint_path."
        )
    if num_classes < 0:
        raise ValueError(f"backbone {name!r}: num_classes must be >= 0, got {num_classes}")
    if img_size <= 0 or in_chans <= 0:
        raise ValueError(f"backbone {name!r}: img_size and in_chans must be > 0")

    variant = get_variant(name)
    timm_name = variant.timm_name if variant else _resolve_timm_name(name)
    model_kwargs: dict[str, Any] = {**(variant.kwargs if variant else {}), **kwargs}
    model_kwargs.update(num_classes=num_classes, in_chans=in_chans)
    if drop_path_rate > 0:
        model_kwargs["drop_path_rate"] = drop_path_rate
    if _takes_img_size(timm_name):
        model_kwargs["img_size"] = img_size
    try:
        model = timm.create_model(timm_name, pretrained=False, **model_kwargs)
    except TypeError as e:
        raise ValueError(
            f"backbone {name!r} (timm {timm_name!r}) rejected its arguments "
            f"{sorted(model_kwargs)}: {e}"
        ) from e
    if variant is not None and variant.adapt is not None:
        variant.adapt(model)

    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and "img_size" in model_kwargs:
        ph, pw = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        if img_size % ph or img_size % pw:
            raise ValueError(
                f"backbone {name!r}: img_size {img_size} is not a multiple of its patch size "
                f"{ph}x{pw}"
            )

    norm = resolve_input_norm(input_norm, None if weights is None else str(weights))
    if norm not in INPUT_NORMS:
        raise ValueError(f"backbone {name!r}: input_norm must be one of {list(INPUT_NORMS)}")
    setattr(
        model,
        SPEC_ATTR,
        {
            "name": name,
            "timm_name": timm_name,
            "img_size": img_size,
            "in_chans": in_chans,
            "input_norm": norm,
        },
    )
    if weights is not None:
        from dermkit.models.weights import load_pretrained

        report = load_pretrained(model, weights)
        model.dermkit_weights_report = report
        (log.info if report.ok else log.warning)("%s: %s", name, report)
    return model


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel that ``model`` expects of pixels in [0, 1]."""
    return INPUT_NORMS[input_norm_of(model)]


def input_norm_of(model: nn.Module) -> str:
    """The name (a key of ``INPUT_NORMS``) of the input normalisation ``model`` expects.

    Read from ``model.dermkit_spec["input_norm"]``, looking through wrappers (DDP's
    ``module``, ``torch.compile``'s ``_orig_mod``, an EMA copy's ``module``, dermkit's
    ``model`` attribute); ImageNet mean/std for a model that records none, which is what
    every dermkit run trained with before ``input_norm`` existed.
    """
    for _ in range(4):
        spec = getattr(model, SPEC_ATTR, None)
        if isinstance(spec, dict) and spec.get("input_norm") in INPUT_NORMS:
            return spec["input_norm"]
        inner = next(
            (
                getattr(model, a)
                for a in ("module", "_orig_mod", "model", "vit")
                if isinstance(getattr(model, a, None), nn.Module)
            ),
            None,
        )
        if inner is None:
            break
        model = inner
    return "imagenet"


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features ``forward_head(forward_features(x), pre_logits=True)``: (B, D).

    timm's ``head_hidden_size`` when the head has a hidden layer (MobileNetV3's 1280-wide
    conv head), else ``num_features``.
    """
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise TypeError(f"{type(model).__name__} is not a timm model (no num_features)")
    return int(width)


def describe(model: nn.Module) -> dict[str, Any]:
    """A JSON-able summary: name, timm architecture, img_size, in_chans, classes, widths, params."""
    spec = dict(getattr(model, SPEC_ATTR, {}))
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    architecture = spec.get("timm_name") or pretrained_cfg.get("architecture")
    img_size = spec.get("img_size")
    if img_size is None and hasattr(getattr(model, "patch_embed", None), "img_size"):
        img_size = model.patch_embed.img_size[0]
    params = sum(p.numel() for p in model.parameters())
    return {
        "name": spec.get("name") or architecture or type(model).__name__,
        "timm_name": architecture,
        "img_size": img_size,
        "in_chans": spec.get("in_chans"),
        "num_classes": getattr(model, "num_classes", None),
        "feature_dim": feature_dim(model),
        "params": params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
