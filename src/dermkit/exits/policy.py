"""When does a sample leave? Confidence measures, the exit policy and threshold calibration.

A sample leaves at the first early exit whose (temperature-scaled) confidence reaches that
exit's threshold, unless the exit predicts a protected class: a melanoma-suspect
prediction is never answered early, it always gets the full network. Samples that never
qualify leave at the last exit, which takes everyone left.

Confidence measures, all in [0, 1] so that threshold 0 means "always leave" and any
threshold above 1 means "never leave":

* ``max_prob``: the top softmax probability;
* ``margin``: top-1 minus top-2 probability;
* ``neg_entropy``: 1 - H(p) / log(C), the negative entropy rescaled to [0, 1].

:func:`calibrate` picks the thresholds on validation logits for one of two objectives:
the largest compute saving whose macro-F1 is at most X below the final exit's, or the best
macro-F1 within an average compute budget B. The search (a shared quantile grid, then
coordinate descent over per-exit quantile grids) only ever moves to operating points that
meet the constraint on val, so the returned policy meets it on val by construction.

Everything here works on numpy arrays, so the PyTorch inference and the onnxruntime
runner apply literally the same decision code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dermkit.core.metrics import macro_f1
from dermkit.eval.calibration import fit_temperature

MEASURES = ("max_prob", "margin", "neg_entropy")
NEVER = 2.0
"""A threshold above every confidence: the exit never lets a sample leave."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of logits (N, C) / temperature, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confidence(
    logits: np.ndarray, measure: str = "max_prob", temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (N,) in [0, 1] and predicted class (N,) of logits (N, C)."""
    p = softmax(logits, temperature)
    if p.shape[1] < 2:
        raise ValueError(f"confidence needs at least 2 classes, got logits {p.shape}")
    pred = p.argmax(axis=1)
    if measure == "max_prob":
        conf = p.max(axis=1)
    elif measure == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        conf = top2[:, 1] - top2[:, 0]
    elif measure == "neg_entropy":
        entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
        conf = 1.0 - entropy / np.log(p.shape[1])
    else:
        raise ValueError(f"unknown confidence measure {measure!r}; expected one of {MEASURES}")
    return np.clip(conf, 0.0, 1.0), pred


@dataclass
class ExitPolicy:
    """Per-exit thresholds on a confidence measure, with protected classes.

    Attributes:
        thresholds: one per early exit (n_exits - 1); the last exit takes everyone left.
        measure: one of ``MEASURES``.
        temperatures: softmax temperature per exit (n_exits), fitted on val; None = 1.
        protected_classes: class indices never answered at an early exit.
    """

    thresholds: list[float]
    measure: str = "max_prob"
    temperatures: list[float] | None = None
    protected_classes: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}")
        self.thresholds = [float(t) for t in self.thresholds]
        self.protected_classes = [int(c) for c in self.protected_classes]
        if self.temperatures is not None:
            self.temperatures = [float(t) for t in self.temperatures]
            if len(self.temperatures) != self.n_exits:
                raise ValueError(
                    f"{len(self.temperatures)} temperatures for {self.n_exits} exits "
                    f"({len(self.thresholds)} thresholds + the final exit)"
                )

    @property
    def n_exits(self) -> int:
        return len(self.thresholds) + 1

    def temperature(self, j: int) -> float:
        return 1.0 if self.temperatures is None else self.temperatures[j]

    def confidence(self, logits: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(N,) confidence and (N,) predicted class at exit j from its logits (N, C)."""
        return confidence(logits, self.measure, self.temperature(j))

    def exits_now(self, logits: np.ndarray, j: int) -> np.ndarray:
        """Bool (N,): which samples with these exit-j logits (N, C) leave at exit j."""
        logits = np.asarray(logits)
        if j == self.n_exits - 1:
            return np.ones(len(logits), dtype=bool)
        conf, pred = self.confidence(logits, j)
        return (conf >= self.thresholds[j]) & ~np.isin(pred, self.protected_classes)

    def assign(self, per_exit_logits: Sequence[np.ndarray]) -> np.ndarray:
        """Exit index (N,) of each sample given every exit's logits, a list of (N, C)."""
        if len(per_exit_logits) != self.n_exits:
            raise ValueError(
                f"{len(per_exit_logits)} exits of logits for a {self.n_exits}-exit policy"
            )
        leave = np.stack([self.exits_now(lg, j) for j, lg in enumerate(per_exit_logits)], axis=1)
        return leave.argmax(axis=1)  # the first True; the last column is all True

    def select(self, per_exit_logits: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C) of the exit each sample takes, exit index (N,))."""
        exit_index = self.assign(per_exit_logits)
        stacked = np.stack([np.asarray(lg) for lg in per_exit_logits])  # (E, N, C)
        return stacked[exit_index, np.arange(stacked.shape[1])], exit_index

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        out = asdict(self)
        if class_names is not None:
            out["protected_class_names"] = [class_names[c] for c in self.protected_classes]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ExitPolicy:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**data)

    def save(self, path: str | Path, class_names: Sequence[str] | None = None, **extra) -> Path:
        path = Path(path)
        path.write_text(json.dumps({**self.to_dict(class_names), **extra}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExitPolicy:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid exit policy: {e}") from e


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Objective:
    """``f1_drop``: largest saving with macro-F1 >= final - value; ``compute``: cost <= value."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind.replace('_', '-')}={self.value:g}"


def parse_objective(text: str) -> Objective:
    """``"f1-drop=0.01"`` or ``"compute=0.5"`` -> Objective."""
    m = re.fullmatch(r"\s*(f1-drop|compute)\s*=\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ValueError(f"objective {text!r} must look like 'f1-drop=0.01' or 'compute=0.5'")
    kind, value = m.group(1).replace("-", "_"), float(m.group(2))
    if value < 0 or (kind == "compute" and value <= 0):
        raise ValueError(f"objective {text!r}: the value must be positive")
    return Objective(kind, value)


def fit_temperatures(per_exit_logits: Sequence[np.ndarray], y: np.ndarray) -> list[float]:
    """Temperature per exit minimising its val NLL (``dermkit.eval.calibration``)."""
    return [fit_temperature(np.asarray(lg), np.asarray(y)) for lg in per_exit_logits]


@dataclass
class Calibration:
    """The chosen policy and its val operating point."""

    policy: ExitPolicy
    objective: str
    macro_f1: float
    final_macro_f1: float
    compute: float
    exit_fractions: list[float]
    evaluated: int

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        out = asdict(self)
        out["policy"] = self.policy.to_dict(class_names)
        return out


# How a policy's per-sample costs become its one cost figure. The mean is what the budget
# pays on average (throughput); the median is the latency a typical image sees, the figure
# batch-1 latency benchmarks quote (issue 22's done-when is a median ratio).
STATISTICS = {"mean": np.mean, "median": np.median}


class _Evaluator:
    """Fast evaluation of threshold vectors on precomputed per-exit val predictions."""

    def __init__(self, conf, pred, protected, y, costs, n_classes, statistic="mean"):
        self.conf, self.pred, self.y, self.costs = conf, pred, y, np.asarray(costs, float)
        self.statistic = STATISTICS[statistic]
        self.allowed = ~np.isin(pred, protected)  # (N, E): exit j may answer this sample
        self.allowed[:, -1] = True
        self.n_classes = n_classes
        self.count = 0

    def __call__(self, thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
        """thresholds (E-1,) -> (macro-F1, mean or median cost, exit index (N,))."""
        self.count += 1
        leave = self.allowed.copy()
        leave[:, :-1] &= self.conf[:, :-1] >= thresholds
        exit_index = leave.argmax(axis=1)
        pred = self.pred[np.arange(len(self.y)), exit_index]
        return (
            macro_f1(self.y, pred, self.n_classes),
            float(self.statistic(self.costs[exit_index])),
            exit_index,
        )


def calibrate(
    per_exit_logits: Sequence[np.ndarray],
    y: np.ndarray,
    costs: Sequence[float],
    objective: Objective | str,
    measure: str = "max_prob",
    protected_classes: Sequence[int] = (),
    temperatures: Sequence[float] | None = None,
    grid: int = 50,
    max_passes: int = 10,
    statistic: str = "mean",
) -> Calibration:
    """Choose per-exit thresholds on validation predictions.

    Args:
        per_exit_logits: every exit's val logits, a list of E arrays (N, C).
        y: (N,) val labels.
        costs: (E,) cost of leaving at each exit as a fraction of the plain model
            (cumulative GFLOPs or blocks); the average over samples is the compute.
        objective: ``"f1-drop=X"`` (least compute with macro-F1 >= final exit's - X) or
            ``"compute=B"`` (best macro-F1 with mean compute <= B).
        measure: confidence measure (``MEASURES``).
        protected_classes: class indices never answered early.
        temperatures: (E,) per-exit softmax temperatures; None fits them on these logits.
        grid: quantiles of each exit's val confidence tried as thresholds.
        max_passes: coordinate-descent sweeps over the exits (stops early when stable).
        statistic: ``"mean"`` or ``"median"`` of the per-sample costs, the figure the
            objective bounds or minimises (``STATISTICS``).

    Returns:
        A :class:`Calibration` whose policy meets the constraint on these val predictions.

    Raises:
        ValueError: a compute budget below the least compute any thresholds reach (e.g.
            when protected predictions must run the whole network).
    """
    objective = parse_objective(objective) if isinstance(objective, str) else objective
    y = np.asarray(y)
    E = len(per_exit_logits)
    if len(costs) != E:
        raise ValueError(f"{len(costs)} costs for {E} exits")
    if temperatures is None:
        temperatures = fit_temperatures(per_exit_logits, y)
    n_classes = np.asarray(per_exit_logits[0]).shape[1]
    conf, pred = zip(
        *(confidence(lg, measure, t) for lg, t in zip(per_exit_logits, temperatures)), strict=True
    )
    conf, pred = np.stack(conf, axis=1), np.stack(pred, axis=1)  # (N, E)
    evaluate = _Evaluator(conf, pred, list(protected_classes), y, costs, n_classes, statistic)
    final_f1 = macro_f1(y, pred[:, -1], n_classes)

    def feasible(f1: float, cost: float) -> bool:
        if objective.kind == "f1_drop":
            return f1 >= final_f1 - objective.value - 1e-12
        return cost <= objective.value + 1e-12

    def key(f1: float, cost: float) -> tuple[float, float]:  # smaller is better
        return (cost, -f1) if objective.kind == "f1_drop" else (-f1, cost)

    qs = np.linspace(0.0, 1.0, grid)
    candidates = [np.unique(np.r_[0.0, np.quantile(conf[:, j], qs), NEVER]) for j in range(E - 1)]

    # 1. shared quantile grid: thresholds_j = the q-quantile of exit j's confidence.
    best, best_key = None, None
    shared = [np.quantile(conf[:, :-1], q, axis=0) for q in qs]
    for thr in [np.zeros(E - 1), *shared, np.full(E - 1, NEVER)]:
        f1, cost, _ = evaluate(thr)
        if feasible(f1, cost) and (best_key is None or key(f1, cost) < best_key):
            best, best_key = np.array(thr, float), key(f1, cost)
    if best is None:
        least = evaluate(np.zeros(E - 1))[1]
        raise ValueError(
            f"objective {objective}: no thresholds reach it on val; the least average compute "
            f"is {least:.3f} (every sample leaving as early as the protected classes allow)"
        )
    # 2. coordinate descent: one exit at a time over its own grid, others fixed.
    for _ in range(max_passes):
        changed = False
        for j in range(E - 1):
            for t in candidates[j]:
                thr = best.copy()
                thr[j] = t
                f1, cost, _ = evaluate(thr)
                if feasible(f1, cost) and key(f1, cost) < best_key:
                    best, best_key, changed = thr, key(f1, cost), True
        if not changed:
            break

    f1, cost, exit_index = evaluate(best)
    policy = ExitPolicy(
        thresholds=[float(t) for t in best],
        measure=measure,
        temperatures=[float(t) for t in temperatures],
        protected_classes=list(protected_classes),
    )
    return Calibration(
        policy=policy,
        objective=str(objective),
        macro_f1=f1,
        final_macro_f1=final_f1,
        compute=cost,
        exit_fractions=(np.bincount(exit_index, minlength=E) / len(y)).tolist(),
        evaluated=evaluate.count,
    )
