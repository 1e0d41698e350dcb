"""Size and compute of a model: parameters and FLOPs of one image forward.

Used by training (distillation reports teacher vs student cost), the run summary and the
latency bench; it lives with the models so none of them reaches up into ``deploy``.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def model_cost(model: torch.nn.Module, image_size: int) -> dict:
    """{"params": trainable + frozen parameter count, "gflops": GFLOPs of one image forward}.

    FLOPs count a multiply-add as 2 (FlopCounterMode's convention) on a (1, 3, S, S) input.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
    }
