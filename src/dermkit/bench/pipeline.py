"""``dermkit bench pipeline``: is the input pipeline the bottleneck of training?

Measures, on the same batches and in one run, the training images/s of

* ``model``: forward + backward + optimizer step on batches already in memory as
  normalised float tensors (the ceiling: no data work at all), and
* ``loop``: the training step as ``train_classifier`` does it: gather the batch from the
  decode-once cache, draw and apply the augmentation, normalise, then the same step.

The two are interleaved (model, loop, model, loop, ...) so machine noise hits both
alike, and the ratio loop/model is reported; 1.0 means data loading costs nothing.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.data.transforms import BatchAugment, normalize
from dermkit.models.backbones import create_backbone
from dermkit.runs import machine_info
from dermkit.train.engine import bare_step, plan_epoch, resolve_precision, seed_step
from dermkit.train.settings import FinetuneRunConfig


def bench_pipeline(cfg: FinetuneRunConfig, steps: int = 10, rounds: int = 3) -> dict:
    """Images/s of the full training step vs the model-only step; returns a result dict."""
    data = prepare_data(cfg.data)
    train = data.part("train")
    ds = CachedImageDataset(data.cache, train, data.classes)
    model = create_backbone(
        cfg.model.name, num_classes=len(data.classes), img_size=cfg.data.image_size
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = resolve_precision(cfg.optim.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    augment = BatchAugment(cfg.augment)
    B = cfg.optim.batch_size
    batches = plan_epoch(np.arange(len(ds)), np.array([], int), B, cfg.seed, 0)[:steps]
    ready = []
    for b, idx in enumerate(batches):  # pre-built inputs for the model-only measurement
        x, y = ds.__getitems__(idx)
        params = augment.sample(B, seed_step(cfg.seed, b))
        ready.append((normalize(augment.apply(x.float().div_(255), params)), y))

    def step(x, y):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        bare_step(loss, opt)

    def run_model():
        for x, y in ready:
            step(x, y)

    def run_loop():
        for b, idx in enumerate(batches):
            gen = seed_step(cfg.seed, b)
            x, y = ds.__getitems__(idx)
            params = augment.sample(B, gen)
            step(normalize(augment.apply(x.float().div_(255), params)), y)

    model.train()
    run_model()  # warm-up (allocator, kernels)
    times = {"model": [], "loop": []}
    for _ in range(rounds):
        for name, fn in (("model", run_model), ("loop", run_loop)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    n = steps * B
    best = {k: n / min(v) for k, v in times.items()}
    return {
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "batch_size": B,
        "precision": precision,
        "steps_per_round": steps,
        "rounds": rounds,
        "model_only_images_per_s": round(best["model"], 1),
        "full_loop_images_per_s": round(best["loop"], 1),
        "ratio_loop_over_model": round(best["loop"] / best["model"], 3),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
