"""Batch-1 latency of early exits: what each exit costs, and what leaving at it costs.

:func:`measure_overhead` times the parts of an :class:`EarlyExitModel` one image at a time,
in ONNX Runtime (each part exported as its own graph, a fixed number of intra-op threads)
and in PyTorch eager, in interleaved rounds (every part once per round, rotated), and
reports medians in milliseconds:

* ``embed``, ``block``: the stem (a ViT's patch embedding), one block (all blocks of a ViT
  have the same shape, so one stands for each; a CNN's stages do not, so each is timed
  as ``block_{i}``);
* ``head``: an early-exit head; ``head_gate``: the head fused with its exit decision (one
  graph returning logits + exit flag; per exit, ``head_gate_{j}``, on a CNN);
  ``final``: the backbone's own head (a ViT's norm + head; a CNN's conv head, pooling
  and classifier);
* ``scan_sequential`` / ``scan_parallel`` (SSM heads): the head with mambapy's
  token-by-token scan vs the parallel form;
* ``call``: a session call that does nothing but copy the first exit's input (the cost
  of switching segments); ``check_numpy`` / ``check_torch``: the confidence check outside the graph.

:func:`latency_costs` turns such a profile into the cost of leaving at each exit as a
fraction of the plain model (the latency objective of calibration), for any subset of the
exits: a pruned exit costs neither its head nor a segment switch.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermkit.core.onnx import cpu_session
from dermkit.exits.gate import ExitGate
from dermkit.exits.heads import SSMHead
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.policy import ExitPolicy


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``rounds`` interleaved rounds.

    Each round runs every function once, in an order rotated per round, so slow drifts of
    a shared machine hit all of them alike; one untimed warm-up call each comes first.
    """
    names = list(fns)
    for n in names:
        fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return times


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {n: 1e3 * float(np.median(t)) for n, t in times.items()}


class _Fn(nn.Module):
    """A callable as a module, for export."""

    def __init__(self, fn: Callable, *modules: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    # eval(): the exporter restores the module's mode afterwards; a wrapper left in
    # training mode would switch the backbone it wraps to training (BatchNorm updates)
    module.eval()
    with warnings.catch_warnings():  # tracer warnings on python-int shape arithmetic
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), opset_version=17, dynamo=False)
    return path


class HeadGate(nn.Module):
    """An exit head and its decision in one graph: tokens (B, N, D) -> (logits, exit (B,))."""

    def __init__(self, head: nn.Module, gate: ExitGate):
        super().__init__()
        self.head, self.gate = head, gate

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(tokens)
        return logits, self.gate(logits)


def _parts(
    model: EarlyExitModel, policy: ExitPolicy, x: torch.Tensor
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (module, its batch-1 input) for every timed part of the model.

    Blocks of a ViT share one shape, so ``block`` (the first) stands for each and
    ``head_gate`` for every exit; a CNN's stages differ several-fold in cost, so each gets
    its own ``block_{i}`` and each early exit its own ``head_gate_{j}`` (see
    :func:`part_ms`).
    """
    states = [model.embed(x)]  # states[d]: the state after d blocks
    for i in range(model.depth):
        states.append(model.run_blocks(states[-1], i, i + 1))
    first = states[model.exit_depths[0]]
    parts = {
        "embed": (_Fn(model.embed, model.backbone), x),
        "head": (model.heads[0], first),
        "final": (
            _Fn(lambda t: model.exit_logits(t, model.n_exits - 1), model.backbone),
            states[-1],
        ),
        "call": (_Fn(lambda t: t + 0.0), first),
    }
    if model.parts.uniform_blocks:
        parts["block"] = (model.parts.block(0), states[0])
        parts["head_gate"] = (HeadGate(model.heads[0], ExitGate(policy, 0)), first)
    else:
        for i in range(model.depth):
            parts[f"block_{i}"] = (model.parts.block(i), states[i])
        for j, head in enumerate(model.heads):
            gate = HeadGate(head, ExitGate(policy, j))
            parts[f"head_gate_{j}"] = (gate, states[model.exit_depths[j]])
    return parts


@torch.no_grad()
def measure_overhead(
    model: EarlyExitModel,
    img_size: int,
    rounds: int = 300,
    threads: int = 2,
    policy: ExitPolicy | None = None,
    eager: bool = True,
) -> dict:
    """Median batch-1 milliseconds of each part, in ONNX Runtime and in PyTorch eager.

    Returns ``{"onnx": {part: ms}, "eager": {part: ms}, "threads", "rounds"}``. ``policy``
    sets the gate's measure/temperature/protected classes (default: max_prob, 0.5).
    ``eager=False`` skips the PyTorch timings (``"eager"`` is then None): calibration reads
    the ONNX ones only, and eager CNN stages at batch 1 are slow to time on a loaded CPU.
    """
    model = model.eval()
    if model.n_exits < 2:
        raise ValueError("the model has no early exit to measure")
    policy = policy or ExitPolicy([0.5] * (model.n_exits - 1))
    x = torch.randn(1, 3, img_size, img_size)
    parts = _parts(model, policy, x)
    tokens = parts["head"][1]  # the first exit's input
    ssm = isinstance(model.heads[0], SSMHead)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sessions, inputs = {}, {n: i for n, (_, i) in parts.items()}
            for name, (module, example) in parts.items():
                sessions[name] = cpu_session(
                    _export(module, example, Path(tmp) / f"{name}.onnx"), threads
                )
            if ssm:
                model.heads[0].eval_scan = "sequential"
                path = _export(model.heads[0], tokens, Path(tmp) / "seq.onnx")
                model.heads[0].eval_scan = "parallel"
                sessions["scan_sequential"] = cpu_session(path, threads)
                sessions["scan_parallel"] = sessions["head"]
                inputs["scan_sequential"] = inputs["scan_parallel"] = tokens
            feeds = {n: {s.get_inputs()[0].name: inputs[n].numpy()} for n, s in sessions.items()}
            onnx_fns = {n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}
            onnx = medians_ms(time_interleaved(onnx_fns, rounds))
        if not eager:
            return {"onnx": onnx, "eager": None, "threads": threads, "rounds": rounds, "ssm": ssm}
        logits = model.heads[0](tokens)
        eager_fns = {n: (lambda m=m, i=i: m(i)) for n, (m, i) in parts.items()}
        gate = ExitGate(policy, 0)
        eager_fns["check_numpy"] = lambda: policy.exits_now(logits.numpy(), 0)
        eager_fns["check_torch"] = lambda: gate(logits)
        if ssm:
            head = model.heads[0]

            def scan(mode):
                head.eval_scan = mode
                head(tokens)
                head.eval_scan = "parallel"

            eager_fns["scan_sequential"] = lambda: scan("sequential")
            eager_fns["scan_parallel"] = lambda: scan("parallel")
        eager_ms = medians_ms(time_interleaved(eager_fns, rounds))
    finally:
        torch.set_num_threads(torch_threads)
    return {"onnx": onnx, "eager": eager_ms, "threads": threads, "rounds": rounds, "ssm": ssm}


def part_ms(profile: dict[str, float], name: str, i: int) -> float:
    """Milliseconds of part ``name`` number ``i`` (block i, exit i's head_gate): its own
    entry ``{name}_{i}`` when the profile has one (CNN stages), else the shared ``name``."""
    return profile.get(f"{name}_{i}", profile.get(name, np.nan))


def _ms(profile: dict[str, float], name: str, n: int) -> str:
    """The n parts ``name`` as text, for messages: one value when they share a timing."""
    values = sorted({round(part_ms(profile, name, i), 3) for i in range(n)})
    return str(values[0]) if len(values) == 1 else str(values)


def latency_costs(
    profile: dict[str, float], exit_depths: Sequence[int], keep: Sequence[int]
) -> np.ndarray:
    """Cost of leaving at each kept exit and at the final one, / the plain model's latency.

    Args:
        profile: milliseconds of ``embed``, ``block`` (or ``block_{i}`` per block),
            ``head_gate`` (or ``head_gate_{j}`` per early exit), ``final``, ``call`` (one
            backend of :func:`measure_overhead`).
        exit_depths: blocks before each exit of the full model, the final exit's last.
        keep: early exits (indices) the model keeps; the others cost nothing.

    Returns:
        (len(keep) + 1,) fractions; the plain model (one call, every block, the final head)
        is 1. Leaving at kept exit i costs the blocks up to it, i + 1 gated heads and i + 1
        segment calls; the final exit adds every kept head and one more call.
    """
    p = profile
    depth = exit_depths[-1]
    blocks = np.cumsum([0.0] + [part_ms(p, "block", i) for i in range(depth)])  # (depth + 1,)
    if np.isnan(blocks[-1]):
        raise ValueError(f"the latency profile lacks block timings: {sorted(p)}")
    plain = p["call"] + p["embed"] + blocks[depth] + p["final"]
    gates = np.cumsum([p["call"] + part_ms(p, "head_gate", j) for j in sorted(keep)])
    costs = [gates[i] + p["embed"] + blocks[exit_depths[j]] for i, j in enumerate(sorted(keep))]
    costs.append(plain + (gates[-1] if len(keep) else 0.0))
    return np.asarray(costs) / plain


def calibrate_latency(
    per_exit_logits: Sequence[np.ndarray],
    y: np.ndarray,
    exit_depths: Sequence[int],
    profile: dict[str, float],
    budget: float,
    measure: str = "max_prob",
    protected_classes: Sequence[int] = (),
    temperatures: Sequence[float] | None = None,
    grid: int = 50,
    statistic: str = "mean",
):
    """Best val macro-F1 at mean (or ``statistic="median"``) batch-1 latency <= ``budget``
    (fraction of the plain model), searching which exits to keep as well as their thresholds.

    Every subset of the early exits is calibrated with its own latency costs
    (:func:`latency_costs`: a kept exit costs its head and a segment switch whether or not
    a sample leaves there); the best subset's dropped exits get threshold ``NEVER``, so
    ``export_segments(..., policy=...)`` prunes them. At most 10 early exits (1,024 subsets).

    Returns:
        A :class:`~dermkit.exits.policy.Calibration` over all exits; its ``compute`` is the
        val mean (or median) latency fraction.

    Raises:
        ValueError: no subset reaches the budget on val.
    """
    from itertools import combinations

    from dermkit.exits.policy import NEVER, Calibration, Objective, calibrate, fit_temperatures
    from dermkit.exits.policy import macro_f1 as f1

    E = len(per_exit_logits)
    if E - 1 > 10:
        raise ValueError(f"{E - 1} early exits: the subset search takes at most 10")
    y = np.asarray(y)
    if temperatures is None:
        temperatures = fit_temperatures(per_exit_logits, y)
    final_f1 = f1(y, np.asarray(per_exit_logits[-1]).argmax(1), per_exit_logits[-1].shape[1])
    best, best_key = None, None
    objective = Objective("latency" if statistic == "mean" else f"{statistic}_latency", budget)
    if budget >= 1.0:  # the plain model itself: no early exit
        best = Calibration(
            ExitPolicy([NEVER] * (E - 1), measure, list(temperatures), list(protected_classes)),
            str(objective),
            final_f1,
            final_f1,
            1.0,
            [0.0] * (E - 1) + [1.0],
            0,
        )
        best_key = (-final_f1, 1.0)
    for k in range(1, E):
        for keep in combinations(range(E - 1), k):
            idx = [*keep, E - 1]
            try:
                cal = calibrate(
                    [per_exit_logits[j] for j in idx],
                    y,
                    latency_costs(profile, exit_depths, keep),
                    objective,
                    measure=measure,
                    protected_classes=protected_classes,
                    temperatures=[temperatures[j] for j in idx],
                    grid=grid,
                    max_passes=3,
                    statistic=statistic,
                )
            except ValueError:
                continue
            key = (-cal.macro_f1, cal.compute)
            if best_key is None or key < best_key:
                thresholds = [NEVER] * (E - 1)
                fractions = [0.0] * E
                for i, j in enumerate(idx):
                    if j < E - 1:
                        thresholds[j] = cal.policy.thresholds[i]
                    fractions[j] = cal.exit_fractions[i]
                cal.policy = ExitPolicy(
                    thresholds, measure, list(temperatures), list(protected_classes)
                )
                cal.exit_fractions = fractions
                best, best_key = cal, key
    if best is None:
        raise ValueError(
            f"objective {objective}: no exits and thresholds reach it on val (measured "
            f"batch-1 latency; the blocks cost {_ms(profile, 'block', exit_depths[-1])} ms, "
            f"the gated heads {_ms(profile, 'head_gate', E - 1)} ms)"
        )
    return best
