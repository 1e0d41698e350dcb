"""Batched inference: a classifier's logits over cached dataset rows, on every rank.

Training scores val with it at each epoch end (``train/loop.py``); evaluation scores a
finished run on external or shifted images with it, in the run's own precision and TTA.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.models.backbones import input_stats


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Flips and 90-degree rotations: 8 views of (B, 3, S, S)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, r.flip(-1)]
    return views


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    dataset: CachedImageDataset,
    indices: np.ndarray,
    accelerator: Accelerator,
    batch_size: int = 256,
    tta: bool = False,
) -> torch.Tensor:
    """Logits (len(indices), C) for dataset rows, computed in shards on every rank.

    Each rank scores a contiguous shard; the shards are gathered so every rank returns the
    full result (needed for early stopping decisions that all ranks must agree on).
    """
    model.eval()
    stats = input_stats(model)  # the model's own input normalisation (mean, std)
    world, rank = accelerator.num_processes, accelerator.process_index
    shards = np.array_split(np.asarray(indices), world)
    longest = max(len(s) for s in shards)
    out = []
    mine = shards[rank]
    for i in range(0, len(mine), batch_size):
        x, _ = dataset.__getitems__(mine[i : i + batch_size])
        x = to_float(x.to(accelerator.device), *stats)
        with accelerator.autocast():
            if tta:
                logits = torch.stack([model(v).float() for v in dihedral_views(x)]).mean(0)
            else:
                logits = model(x).float()
        out.append(logits)
    # outputs per row: the head's width (K-1 for an ordinal CORN head), else one per class
    n_classes = getattr(model, "num_classes", None) or len(dataset.class_names)
    local = torch.cat(out) if out else torch.zeros(0, n_classes, device=accelerator.device)
    if world == 1:
        return local.cpu()
    padded = torch.zeros(longest, n_classes, device=accelerator.device)
    padded[: len(local)] = local
    gathered = accelerator.gather(padded).view(world, longest, n_classes)
    return torch.cat([gathered[r, : len(s)] for r, s in enumerate(shards)]).cpu()
