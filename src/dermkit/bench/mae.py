"""``dermkit bench mae``: how much cheaper is an MAE training step than a supervised one?

Measures, on the same batches, in one run, the training images/s of

* ``mae``: the MAE step (encoder on the visible 1 - mask_ratio of the patches, light
  decoder on all of them, masked-patch MSE) + AdamW, and
* ``supervised``: the same ViT with a classification head on all patches, cross-entropy
  + AdamW,

at the same batch size and precision (``resolve_precision`` of ``optim.precision``).
The two are interleaved (mae, supervised, mae, ...) so machine noise hits both alike;
the best round of each is kept and the ratio mae/supervised is reported.

``attention`` picks timm's attention kernel for both models alike: ``timm`` (its default,
what the training loops run: ``F.scaled_dot_product_attention``), ``fused`` (the same,
explicitly) or ``math`` (matmul + softmax + matmul). On CPUs running bf16 the fused
kernel is several times slower than the math path for these short sequences (measured on
an AMD EPYC with AVX512-BF16: a 65-token ViT-Tiny/8 step 6.2 s fused vs 2.1 s math at
batch 128), which is why the option exists.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.data.settings import AugmentSettings
from dermkit.data.transforms import BatchAugment, normalize
from dermkit.models.backbones import create_backbone
from dermkit.runs import machine_info
from dermkit.ssl.mae import MaskedAutoencoder
from dermkit.ssl.settings import MaePretrainRunConfig
from dermkit.train.engine import bare_step, fused_adamw, plan_epoch, resolve_precision, seed_step

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
ATTENTION = ("timm", "fused", "math")


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"attention must be timm, fused or math, got {attention!r}")


def set_attention(model: torch.nn.Module, attention: str) -> str:
    """Set every timm attention module of ``model`` to ``fused`` or ``math``; returns the kind.

    ``timm`` leaves timm's default and returns what it is.
    """
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    _check_attention(attention)
    if attention != "timm":
        for m in layers:
            m.fused_attn = attention == "fused"
    return "fused" if layers and all(m.fused_attn for m in layers) else "math"


def bench_mae(
    cfg: MaePretrainRunConfig, steps: int = 10, rounds: int = 3, attention: str = "timm"
) -> dict:
    """Images/s of the MAE step vs the supervised step on the same batches; a result dict."""
    _check_attention(attention)  # before minutes of data preparation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.optim.precision, device)
    dtype = _DTYPES[precision]
    data = prepare_data(cfg.data)
    ds = CachedImageDataset(data.cache, data.part("train"), data.classes)
    B, m = cfg.optim.batch_size, cfg.mae
    torch.manual_seed(cfg.seed)
    mae = MaskedAutoencoder.from_config(cfg).to(device)  # the model pretraining trains
    supervised = create_backbone(
        cfg.model.name,
        num_classes=len(data.classes),
        img_size=cfg.data.image_size,
        drop_path_rate=cfg.model.drop_path_rate,  # as the MAE's encoder: the same ViT
    ).to(device)
    kinds = {set_attention(mae, attention), set_attention(supervised, attention)}
    if len(kinds) != 1:
        raise RuntimeError(f"the two models ended with different attention kernels: {kinds}")
    opts = {
        name: torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=1e-4,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            **fused_adamw(),  # as the pretraining and fine-tuning loops
        )
        for name, model in (("mae", mae), ("supervised", supervised))
    }

    # Pre-built inputs (normalised, flipped/rotated) so only the model step is timed.
    no_warp = dict(max_rotate_deg=0, max_scale=0, max_translate=0)
    no_colour = dict(brightness=0, contrast=0, saturation=0, hue=0)
    augment = BatchAugment(AugmentSettings(**no_warp, **no_colour))
    plan = plan_epoch(np.arange(len(ds)), np.array([], int), B, cfg.seed, 0)
    batches = []
    for b in range(steps):
        x, y = ds.__getitems__(plan[b % len(plan)])
        params = augment.sample(B, seed_step(cfg.seed, b))
        x = normalize(augment.apply(x.float().div_(255), params))
        batches.append((x.to(device), y.to(device)))

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def mae_step(x, y):
        with autocast():
            loss = mae(x)[0]
        bare_step(loss, opts["mae"])

    def supervised_step(x, y):
        with autocast():
            loss = F.cross_entropy(supervised(x), y)
        bare_step(loss, opts["supervised"])

    def run(step_fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x, y in batches:
            step_fn(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    mae.train()
    supervised.train()
    for fn in (mae_step, supervised_step):  # warm-up: allocator, kernels, optimizer state
        fn(*batches[0])
    times = {"mae": [], "supervised": []}
    for _ in range(rounds):
        times["mae"].append(run(mae_step))
        times["supervised"].append(run(supervised_step))
    best = {k: steps * B / min(v) for k, v in times.items()}
    return {
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "batch_size": B,
        "precision": precision,
        "device": str(device),
        "attention": kinds.pop(),
        "mask_ratio": m.mask_ratio,
        "decoder": {"depth": m.decoder_depth, "dim": m.decoder_dim, "heads": m.decoder_heads},
        "patches": mae.num_patches,
        "visible_patches": round(mae.num_patches * (1 - m.mask_ratio)),
        "steps_per_round": steps,
        "rounds": rounds,
        "mae_images_per_s": round(best["mae"], 1),
        "supervised_images_per_s": round(best["supervised"], 1),
        "ratio_mae_over_supervised": round(best["mae"] / best["supervised"], 3),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
