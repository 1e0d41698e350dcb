"""Calibration: top-label expected calibration error, reliability curves, temperature scaling.

A classifier is calibrated when, among images it labels with confidence p, a fraction p is
right. ECE measures the gap with equal-width confidence bins (Guo et al., 2017, "On
Calibration of Modern Neural Networks"); temperature scaling is that paper's one-parameter
fix, fitted on validation logits and reused by later stages.

ECE and the reliability curve are written here rather than taken from a library because
scikit-learn only has a binary ``calibration_curve``; the binning helper
(:func:`confidence_bins`) is shared with the vectorised bootstrap in ``metrics.py`` so the
point estimate and its confidence interval use the exact same bins.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from dermkit.core.metrics import macro_f1, tune_class_scales

# Search range for the inverse temperature 1/T (T from 0.01 to 100). The NLL is convex in
# 1/T, so a bounded scalar search over this range finds the global minimum inside it.
_LOG_INV_TEMPERATURE_BOUNDS = (float(np.log(1e-2)), float(np.log(1e2)))


def confidence_bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign confidences to equal-width bins over [0, 1].

    Bins are right-closed, ``(lo, hi]``, with the first bin also taking 0, so a confidence of
    exactly 1.0 lands in the last bin.

    Args:
        confidence: (N,) values in [0, 1].
        n_bins: number of equal-width bins (>= 1).

    Returns:
        ``(bin_index, bin_edges)``: (N,) int bin index per value and (n_bins + 1,) edges.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    return index.astype(np.int64), edges


def _top_label(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probs, (N,) labels -> ((N,) top-label confidence, (N,) float 1.0 where correct)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if probs.ndim != 2 or y_true.shape != (probs.shape[0],):
        raise ValueError(
            f"probs must be (N, C) and y_true (N,); got probs {probs.shape}, y_true {y_true.shape}"
        )
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    return confidence, correct


def reliability_curve(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict:
    """Top-label reliability curve with equal-width confidence bins.

    Args:
        probs: (N, C) class probabilities.
        y_true: (N,) int class indices.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        JSON-serialisable dict: ``bin_edges`` (n_bins + 1 floats), ``bin_acc`` and
        ``bin_conf`` (n_bins floats, None for an empty bin: accuracy and mean confidence of
        the images in the bin) and ``bin_count`` (n_bins ints).
    """
    confidence, correct = _top_label(probs, y_true)
    index, edges = confidence_bins(confidence, n_bins)
    count = np.bincount(index, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    nonempty = count > 0
    return {
        "bin_edges": [float(e) for e in edges],
        "bin_acc": [float(c / n) if ok else None for c, n, ok in zip(correct_sum, count, nonempty)],
        "bin_conf": [
            float(c / n) if ok else None for c, n, ok in zip(confidence_sum, count, nonempty)
        ],
        "bin_count": [int(n) for n in count],
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (bin size / N) * |accuracy - mean confidence|.

    Args:
        probs: (N, C) class probabilities.
        y_true: (N,) int class indices.
        n_bins: number of equal-width confidence bins over [0, 1].

    Returns:
        ECE in [0, 1]; 0 means perfectly calibrated at this binning.
    """
    confidence, correct = _top_label(probs, y_true)
    if confidence.size == 0:
        raise ValueError("probs is empty: ECE needs at least one prediction")
    index, _ = confidence_bins(confidence, n_bins)
    gap = np.bincount(index, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / confidence.size)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Fit the softmax temperature T that minimises the NLL of ``softmax(logits / T)``.

    The NLL is convex in the inverse temperature 1/T, so a bounded scalar search (Brent's
    method on log(1/T)) finds its minimum; T is searched in [0.01, 100]. T > 1 softens an
    overconfident model, T < 1 sharpens an underconfident one.

    Args:
        logits: (N, C) unnormalised scores (not probabilities).
        y_true: (N,) int class indices.

    Returns:
        The fitted temperature T > 0.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) array, got shape {logits.shape}")
    if y_true.shape != (logits.shape[0],):
        raise ValueError(f"y_true must have shape ({logits.shape[0]},), got {y_true.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= logits.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {logits.shape[1] - 1}]")
    rows = np.arange(logits.shape[0])

    def nll(log_inv_temperature: float) -> float:
        scaled = logits * np.exp(log_inv_temperature)
        return float(-log_softmax(scaled, axis=1)[rows, y_true].mean())

    result = minimize_scalar(
        nll, bounds=_LOG_INV_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6}
    )
    return float(np.exp(-result.x))


def cross_fitted_scale_gain(
    probs: np.ndarray, y: np.ndarray, repeats: int = 10, seed: int = 0
) -> float:
    """Val macro-F1 gain of class scales tuned on one half of val, scored on the other half.

    Both directions of ``repeats`` random halvings, averaged. Scales tuned on all of val
    always look good on val (they were fitted there); this estimates, from val alone,
    whether they help on images they were not fitted on. Why it matters: a student
    distilled from an ensemble's rule-applied probabilities already carries that ensemble's
    class balance, and val-tuned scales on top of it lost 0.020 test macro-F1
    (BENCHMARKS.md, "The chain's student"); this estimate was -0.031 for it and positive for
    the two fine-tuned models whose scales helped on test.

    Args:
        probs: (N, C) val probabilities before scaling; y: (N,) int labels.
    """
    n, c = probs.shape
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(repeats):
        first = np.zeros(n, dtype=bool)
        first[rng.permutation(n)[: n // 2]] = True
        for fit, held in ((first, ~first), (~first, first)):
            scales = tune_class_scales(probs[fit], y[fit])
            scaled = macro_f1(y[held], (probs[held] * scales).argmax(1), c)
            gains.append(scaled - macro_f1(y[held], probs[held].argmax(1), c))
    return float(np.mean(gains))


@dataclass
class DecisionRule:
    """How a trained classifier's logits become reported probabilities, fitted on val only.

    ``probs = normalise(softmax(logits / temperature) * class_scales)``. The temperature
    fixes over/under-confidence (ECE); the class scales move decision boundaries between
    rare and common classes to maximise val macro-F1 (a balanced loss and sampler move them
    too, usually too far: see BENCHMARKS.md). Stored as ``decision.json`` in a run folder
    so export, distillation and serving apply the same rule.
    """

    temperature: float = 1.0
    class_scales: list[float] | None = None
    # A minimum-recall operating point folded into class_scales (eval/operating_point.py):
    # {"class", "target", "factor"}; recorded so a refit can undo it and the card can say so.
    min_recall: dict | None = None
    # mode "auto": the cross-fitted val gain that decided whether class scales were kept.
    class_scales_gain: float | None = None

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits -> (N, C) probabilities (rows sum to 1)."""
        p = softmax(np.asarray(logits, dtype=np.float64) / self.temperature, axis=1)
        if self.class_scales is not None:
            p = p * np.asarray(self.class_scales)
            p = p / p.sum(1, keepdims=True)
        return p

    @classmethod
    def fit(cls, val_logits: np.ndarray, y_val: np.ndarray, mode: str) -> DecisionRule:
        """Fit on val: ``mode`` is 'none', 'temperature', 'temperature+class_scales' or
        'auto' (class scales only when their cross-fitted val gain is positive)."""
        if mode == "none":
            return cls()
        rule = cls(temperature=fit_temperature(val_logits, y_val))
        if mode == "auto":
            rule.class_scales_gain = cross_fitted_scale_gain(rule.probs(val_logits), y_val)
        if mode == "temperature+class_scales" or (mode == "auto" and rule.class_scales_gain > 0):
            rule.class_scales = tune_class_scales(rule.probs(val_logits), y_val).tolist()
        return rule

    def save(self, path: str | Path) -> None:
        rule = asdict(self)
        for optional in ("min_recall", "class_scales_gain"):
            if rule[optional] is None:  # files without them stay as they always were
                del rule[optional]
        Path(path).write_text(json.dumps(rule, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DecisionRule:
        """The rule in ``path``; the identity rule when the file does not exist."""
        path = Path(path)
        return cls(**json.loads(path.read_text())) if path.exists() else cls()
