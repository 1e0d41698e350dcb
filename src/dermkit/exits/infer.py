"""Early-exit inference that really stops, a reference path, and GFLOPs per exit.

:func:`predict_early_exit` runs a batch segment by segment; after each exit the samples
that leave are removed from the batch (``index_select``) before the next block, so the
remaining blocks run on fewer rows and the wall time falls with the exit rate.
:func:`predict_reference` computes every exit for every sample and applies the same
policy afterwards: the answer the dropping path must reproduce per sample.
:func:`exit_gflops` counts each segment's FLOPs with ``torch.utils.flop_counter`` (matrix
products and convolutions; element-wise ops such as the SSM scan's are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dermkit.exits.model import EarlyExitModel
from dermkit.exits.policy import ExitPolicy


@dataclass
class ExitOutput:
    """Per-sample result of early-exit inference.

    Attributes:
        logits: (B, C) logits of the exit each sample took (not temperature-scaled).
        exit_index: (B,) long, index of that exit (n_exits - 1 = the final one).
        blocks_used: (B,) long, transformer blocks computed for the sample.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    blocks_used: torch.Tensor


@torch.no_grad()
def predict_early_exit(model: EarlyExitModel, x: torch.Tensor, policy: ExitPolicy) -> ExitOutput:
    """Dropping inference: images (B, 3, H, W) -> :class:`ExitOutput`.

    After exit j the rows that leave are written out and the token tensor shrinks to the
    rows still running; a batch where everyone left stops without running further blocks.
    """
    if policy.n_exits != model.n_exits:
        raise ValueError(f"policy has {policy.n_exits} exits, the model {model.n_exits}")
    B = x.shape[0]
    depths = torch.tensor(model.exit_depths)
    logits_out = torch.zeros(B, model.num_classes, device=x.device)
    exit_index = torch.full((B,), model.n_exits - 1, dtype=torch.long)
    active = torch.arange(B)  # original row of each row still in the batch
    h = x
    for j in range(model.n_exits):
        h, logits = model.segment(h, j)
        leave = torch.from_numpy(policy.exits_now(logits.float().cpu().numpy(), j))
        rows = active[leave]
        logits_out[rows.to(x.device)] = logits[leave.to(x.device)].float()
        exit_index[rows] = j
        stay = (~leave).nonzero().squeeze(1)
        if len(stay) == 0:
            break
        h = h.index_select(0, stay.to(h.device))
        active = active[stay]
    return ExitOutput(logits_out, exit_index, depths[exit_index])


@torch.no_grad()
def predict_reference(model: EarlyExitModel, x: torch.Tensor, policy: ExitPolicy) -> ExitOutput:
    """Every exit for every sample, then the policy: the ground truth for the dropping path."""
    per_exit = [lg.float().cpu().numpy() for lg in model.forward_all(x)]
    logits, exit_index = policy.select(per_exit)
    exit_index = torch.from_numpy(exit_index).long()
    return ExitOutput(
        torch.from_numpy(logits).to(x.device),
        exit_index,
        torch.tensor(model.exit_depths)[exit_index],
    )


@torch.no_grad()
def predict_plain(model: EarlyExitModel, x: torch.Tensor) -> torch.Tensor:
    """The plain backbone (no exit heads): images (B, 3, H, W) -> logits (B, C)."""
    return model.backbone(x)


def exit_gflops(model: EarlyExitModel, img_size: int, in_chans: int = 3) -> dict:
    """GFLOPs per image of each segment and exit, counted on a batch of one.

    Returns:
        ``segment_gflops`` (E,): segment j = its blocks (+ the embedding for j = 0) and
        exit head j; ``cumulative_gflops`` (E,): the cost of leaving at exit j (every
        segment up to j, early heads included); ``plain_gflops``: ``backbone(x)`` alone;
        ``cost_fraction`` (E,): cumulative / plain; ``block_fraction`` (E,): depth share.

    Runs with autograd on (forward FLOPs are the same): FlopCounterMode's module tracker
    fails under ``no_grad`` on parameters that are expanded (the attention head's query).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    segments, h = [], x
    for j in range(model.n_exits):
        with FlopCounterMode(display=False) as counter:
            h, _ = model.segment(h, j)
        segments.append(counter.get_total_flops() / 1e9)
    with FlopCounterMode(display=False) as counter:
        model.backbone(x)
    plain = counter.get_total_flops() / 1e9
    model.train(was_training)
    cumulative = np.cumsum(segments)
    return {
        "segment_gflops": [float(s) for s in segments],
        "cumulative_gflops": [float(c) for c in cumulative],
        "plain_gflops": float(plain),
        "cost_fraction": [float(c / plain) for c in cumulative],
        "block_fraction": [d / model.depth for d in model.exit_depths],
        "exit_depths": list(model.exit_depths),
    }
