"""The one macro-F1 definition: selection (best epoch, ensemble, exit policy) and reports use it.

Macro-F1 is the mean over ALL K classes of the task of F1_k = 2 tp_k / (2 tp_k + fp_k + fn_k),
with F1_k = 0 where that is 0/0 (class k neither true nor predicted): scikit-learn's
``f1_score(y, pred, average="macro", labels=range(K), zero_division=0)``.

Why all K classes: scores stay comparable across splits and runs (a split that lacks a class
does not silently become a (K-1)-class problem), and predicting a class absent from the
labels costs exactly the false negatives it makes. A split missing class k scales every
candidate's score by the same (K-1)/K against "classes present in the labels", so model
selection on such a split is unchanged by the choice.

:func:`tune_class_scales` maximises it over per-class probability multipliers: the decision
rule of a calibrated run (``eval/calibration.py``) and of the classical baseline
(``models/classical.py``) both use it, so it sits below both.
"""

from __future__ import annotations

import numpy as np


def macro_f1_from_counts(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """Macro-F1 from per-class counts; vectorised over leading axes.

    Args:
        tp: (..., K) true positives (may be weighted, e.g. bootstrap multiplicities).
        n_true: (..., K) images whose label is k (tp + fn).
        n_pred: (..., K) images predicted as k (tp + fp).

    Returns:
        (...) macro-F1 over the K classes (a float array; 0-d for 1-d inputs).
    """
    tp, n_true, n_pred = (np.asarray(a, dtype=np.float64) for a in (tp, n_true, n_pred))
    denom = n_true + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros(np.broadcast(tp, denom).shape), where=denom > 0)
    return f1.mean(axis=-1)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 of integer predictions (N,) against labels (N,), both in [0, n_classes)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} must be (N,)")
    for name, a in (("labels", y_true), ("predictions", y_pred)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} must lie in [0, {n_classes}), got {a.min()}..{a.max()}")
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    n_true = np.bincount(y_true, minlength=n_classes)
    n_pred = np.bincount(y_pred, minlength=n_classes)
    return float(macro_f1_from_counts(tp, n_true, n_pred))


def tune_class_scales(probs: np.ndarray, y: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per-class multipliers (C,) on probabilities that maximise macro-F1 on (probs, y).

    Coordinate ascent over a log grid; run it on validation predictions only. Rescaling
    moves decision boundaries between rare and common classes (what a balanced loss does
    at training time) without touching the ranking that AUROC measures.
    """
    c = probs.shape[1]
    scales = np.ones(c)
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 25))
    best = macro_f1(y, probs.argmax(1), c)
    for _ in range(rounds):
        for k in range(c):
            for g in grid:
                trial = scales.copy()
                trial[k] = g
                f1 = macro_f1(y, (probs * trial).argmax(1), c)
                if f1 > best + 1e-9:
                    best, scales = f1, trial
    return scales
