"""The exit decision as graph ops, and pruning exits a policy never uses.

:class:`ExitGate` is :meth:`dermkit.exits.policy.ExitPolicy.exits_now` for one exit in
torch (softmax with the exit's temperature, the confidence measure, the threshold, the
protected classes), so an ONNX segment can return "leave or continue" with its logits and
a batch-1 caller needs no softmax of its own between calls. :func:`prune_exits` drops the
early exits whose threshold is above 1 (they never fire): their heads would only add
latency, so the exported model skips them and runs those blocks in one segment.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dermkit.exits.model import EarlyExitModel
from dermkit.exits.policy import ExitPolicy


class ExitGate(nn.Module):
    """Exit j's decision: logits (B, C) -> bool (B,), True where the sample leaves.

    Computed in float32 (the numpy policy uses float64): a confidence within ~1e-7 of the
    threshold may be decided differently, nothing else.
    """

    def __init__(self, policy: ExitPolicy, j: int):
        super().__init__()
        if not 0 <= j < policy.n_exits - 1:
            raise ValueError(f"exit {j} is not an early exit of a {policy.n_exits}-exit policy")
        self.measure = policy.measure
        self.temperature = policy.temperature(j)
        self.threshold = policy.thresholds[j]
        self.register_buffer(
            "protected", torch.tensor(policy.protected_classes, dtype=torch.long), persistent=False
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float() / self.temperature, dim=1)
        if self.measure == "max_prob":
            conf = p.max(dim=1).values
        elif self.measure == "margin":
            top2 = p.topk(2, dim=1).values
            conf = top2[:, 0] - top2[:, 1]
        else:  # neg_entropy
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
            conf = 1.0 - entropy / math.log(p.shape[1])
        leave = conf.clamp(0.0, 1.0) >= self.threshold
        if len(self.protected):
            pred = p.argmax(dim=1, keepdim=True)
            leave = leave & ~(pred == self.protected).any(dim=1)
        return leave


def kept_exits(policy: ExitPolicy) -> list[int]:
    """Early exits (indices) that can let a sample leave: threshold <= 1."""
    return [j for j, t in enumerate(policy.thresholds) if t <= 1.0]


def prune_exits(model: EarlyExitModel, policy: ExitPolicy) -> tuple[EarlyExitModel, ExitPolicy]:
    """The model and policy without the early exits that never fire.

    The returned model shares the backbone and the kept heads with ``model``; with no early
    exit kept it is the plain backbone as one segment. Predictions are unchanged: a pruned
    exit let no sample leave.
    """
    if policy.n_exits != model.n_exits:
        raise ValueError(f"policy has {policy.n_exits} exits, the model {model.n_exits}")
    keep = kept_exits(policy)
    pruned = model.keep_exits(keep)
    temps = None
    if policy.temperatures is not None:
        temps = [policy.temperatures[j] for j in keep] + [policy.temperatures[-1]]
    return pruned, ExitPolicy(
        [policy.thresholds[j] for j in keep],
        policy.measure,
        temps,
        list(policy.protected_classes),
    )
