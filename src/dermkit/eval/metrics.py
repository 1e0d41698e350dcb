"""Classification metrics with lesion-level bootstrap confidence intervals.

:func:`evaluate_predictions` is called after every training run, so it has to be fast:
1000 bootstrap replicates of 2000 images with scikit-learn would mean ~7000
``roc_auc_score`` calls. Instead every metric is written once as a *weighted* statistic
of per-image quantities computed up front, and a bootstrap replicate is just a weight
vector (how often each image's lesion was drawn, see ``bootstrap.py``):

- counts (confusion matrix, ECE bin gaps, Brier sums) are one matrix product
  ``weights @ per_image_statistics`` for a whole chunk of replicates;
- AUROC is the Mann-Whitney statistic over scores sorted once per class, with tied scores
  merged into groups (``np.add.reduceat``), so ties count 1/2 exactly as in scikit-learn;
- sensitivity at a fixed specificity reads the same sorted, tie-grouped counts.

The point estimate is the same code with every weight equal to 1, and the tests check it
against scikit-learn (accuracy, balanced accuracy, F1, ROC AUC) on random data with ties.
Macro-F1 is :mod:`dermkit.core.metrics`' definition (all K classes, 0/0 counts 0); the
per-class ``f1`` stays NaN where undefined (a class neither true nor predicted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dermkit.core.metrics import macro_f1_from_counts
from dermkit.eval.bootstrap import group_index, lesion_bootstrap_weights, percentile_interval
from dermkit.eval.calibration import confidence_bins, reliability_curve

HEADLINE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_auroc",
    "ece",
    "brier",
)
SENSITIVITY_SPECIFICITIES: dict[str, float] = {"spec80": 0.80, "spec90": 0.90}
PER_CLASS_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "auroc")
_PROB_SUM_TOLERANCE = 1e-3


def sensitivity_metric_names(positive_class: str) -> list[str]:
    """Names of the sensitivity-at-specificity metrics, e.g. ``mel_sens_at_spec90``."""
    return [f"{positive_class}_sens_at_{suffix}" for suffix in SENSITIVITY_SPECIFICITIES]


@dataclass(frozen=True)
class _ScoreRanking:
    """One score column sorted once, with tied scores merged into groups.

    order: (N,) argsort of the scores; starts: (U,) index into the sorted order where each
    run of equal scores begins; is_positive: (N,) 1.0 for positives, in sorted order.
    """

    order: np.ndarray
    starts: np.ndarray
    is_positive: np.ndarray

    @classmethod
    def build(cls, scores: np.ndarray, is_positive: np.ndarray) -> _ScoreRanking:
        order = np.argsort(scores, kind="stable")
        ranked = scores[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        return cls(order, starts, is_positive[order].astype(np.float64))

    def tie_group_weights(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, N) image weights -> ((B, U) positive, (B, U) negative) weight per tie group,
        tie groups in increasing score order."""
        ranked = weights[:, self.order]
        pos = np.add.reduceat(ranked * self.is_positive, self.starts, axis=1)
        neg = np.add.reduceat(ranked, self.starts, axis=1) - pos
        return pos, neg


def _auroc_from_groups(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per replicate: P(score_pos > score_neg) + 1/2 P(tie).

    Args:
        pos, neg: (B, U) positive / negative weight per tie group, increasing score.

    Returns:
        (B,) AUROC, NaN where a replicate has no positives or no negatives.
    """
    neg_cum = np.cumsum(neg, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg_cum[:, -1]
    # Each positive beats the negatives in lower tie groups and ties half of its own group.
    wins = (pos * (neg_cum - 0.5 * neg)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = wins / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _sensitivity_from_groups(pos: np.ndarray, neg: np.ndarray, specificity: float) -> np.ndarray:
    """Highest sensitivity with specificity >= ``specificity``, per replicate.

    A threshold t calls ``score >= t`` positive. Specificity only grows and sensitivity only
    shrinks as t rises, so the best t is the lowest one that puts at least
    k = ceil(specificity * n_neg) negatives below it: just above the score v of the k-th
    lowest negative. Positives scoring above v are detected; those tied with v are not,
    since no threshold separates them from the tied negatives.

    Args:
        pos, neg: (B, U) positive / negative weight per tie group, increasing score.
        specificity: target in (0, 1].

    Returns:
        (B,) sensitivity, NaN where a replicate has no positives or no negatives.
    """
    neg_cum = np.cumsum(neg, axis=1)
    pos_cum = np.cumsum(pos, axis=1)
    n_pos, n_neg = pos_cum[:, -1], neg_cum[:, -1]
    # Round before ceil: float noise in the target (3 * 0.1 = 0.30000000000000004) must not
    # demand one more negative (ceil(3.0000000000000004) = 4 of 10 instead of 3).
    needed = np.ceil(np.round(specificity * n_neg, 9))
    cut = np.argmax(neg_cum >= needed[:, None], axis=1)
    detected = n_pos - pos_cum[np.arange(pos.shape[0]), cut]
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = detected / n_pos
    return np.where((n_pos > 0) & (n_neg > 0), sens, np.nan)


def sensitivity_at_specificity(
    scores: np.ndarray, is_positive: np.ndarray, specificity: float
) -> float:
    """Highest sensitivity over thresholds ``score >= t`` whose specificity is >= the target.

    Args:
        scores: (N,) scores, higher = more likely positive (e.g. P(mel)).
        is_positive: (N,) bool ground truth.
        specificity: target specificity in (0, 1], e.g. 0.9; compared with a 1e-9 tolerance
            on the count of negatives, so float noise in the target does not matter.

    Returns:
        Sensitivity in [0, 1] at the lowest threshold meeting the specificity target.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    if scores.ndim != 1 or is_positive.shape != scores.shape:
        raise ValueError(
            f"scores and is_positive must be 1-D of equal length, got {scores.shape} "
            f"and {is_positive.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    if is_positive.all() or not is_positive.any():
        raise ValueError("is_positive needs at least one positive and one negative")
    ranking = _ScoreRanking.build(scores, is_positive)
    pos, neg = ranking.tie_group_weights(np.ones((1, scores.size)))
    return float(_sensitivity_from_groups(pos, neg, specificity)[0])


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """(B, C) -> (B,) mean over finite entries per row; NaN for a row with none."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class _PerImageStatistics:
    """Everything a replicate needs, computed once from (y_true, probs).

    linear: (N, C*C + n_bins + 1) columns whose weighted sums give the confusion matrix
    (one-hot of true*C + pred), the per-bin ECE gap (correct - confidence in the image's
    confidence bin) and the Brier score; rankings: one per class, on P(class).
    """

    n_classes: int
    n_bins: int
    linear: np.ndarray
    rankings: tuple[_ScoreRanking, ...]

    @classmethod
    def build(cls, y_true: np.ndarray, probs: np.ndarray, n_bins: int) -> _PerImageStatistics:
        n, c = probs.shape
        rows = np.arange(n)
        y_pred = probs.argmax(axis=1)
        confidence = probs[rows, y_pred]
        correct = (y_pred == y_true).astype(np.float64)
        bins, _ = confidence_bins(confidence, n_bins)
        pair = np.zeros((n, c * c))
        pair[rows, y_true * c + y_pred] = 1.0
        ece_gap = np.zeros((n, n_bins))
        ece_gap[rows, bins] = correct - confidence
        onehot = np.zeros((n, c))
        onehot[rows, y_true] = 1.0
        brier = ((probs - onehot) ** 2).sum(axis=1, keepdims=True)
        rankings = tuple(_ScoreRanking.build(probs[:, k], y_true == k) for k in range(c))
        return cls(c, n_bins, np.hstack([pair, ece_gap, brier]), rankings)

    def replicate_metrics(self, weights: np.ndarray, positive_index: int | None) -> dict:
        """Every metric for a batch of weightings.

        Args:
            weights: (B, N) non-negative image weights (all ones = the plain estimate).
            positive_index: class index for sensitivity at specificity, None if absent.

        Returns:
            {headline or sensitivity name: (B,) array} plus {per-class name: (B, C) array};
            NaN marks an undefined value.
        """
        c = self.n_classes
        total = weights.sum(axis=1)
        sums = weights @ self.linear
        confusion = sums[:, : c * c].reshape(-1, c, c)
        ece_gap = sums[:, c * c : c * c + self.n_bins]
        brier = sums[:, -1]

        tp = np.diagonal(confusion, axis1=1, axis2=2)
        support = confusion.sum(axis=2)
        predicted = confusion.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(support > 0, tp / support, np.nan)
            precision = np.where(predicted > 0, tp / predicted, np.nan)
            # 2tp / (2tp + fp + fn); undefined only for a class neither true nor predicted.
            f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
            weighted_f1 = np.nansum(f1 * support, axis=1) / support.sum(axis=1)

        group_weights = [r.tie_group_weights(weights) for r in self.rankings]
        auroc = np.stack([_auroc_from_groups(p, n) for p, n in group_weights], axis=1)
        out = {
            "accuracy": tp.sum(axis=1) / total,
            "balanced_accuracy": _nanmean_rows(recall),
            # Over all K classes, an undefined F1 counting 0 (dermkit.core.metrics).
            "macro_f1": macro_f1_from_counts(tp, support, predicted),
            "weighted_f1": weighted_f1,
            "macro_auroc": _nanmean_rows(auroc),
            "ece": np.abs(ece_gap).sum(axis=1) / total,
            "brier": brier / total,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "auroc": auroc,
        }
        for suffix, specificity in SENSITIVITY_SPECIFICITIES.items():
            if positive_index is None:
                out[suffix] = np.full(weights.shape[0], np.nan)
            else:
                pos, neg = group_weights[positive_index]
                out[suffix] = _sensitivity_from_groups(pos, neg, specificity)
        return out


def validate_predictions(y_true, probs, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, ranges and finiteness; return (y_true int64 (N,), probs float64 (N, C))."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {list(class_names)}")
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(
            f"probs must have shape (N, {len(class_names)}) to match class_names, got {probs.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probs is empty: nothing to evaluate")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(
            f"y_true must have shape ({probs.shape[0]},) like probs, got {y_true.shape}"
        )
    if np.isnan(probs).any():
        raise ValueError(
            f"probs contains NaN (first at row {int(np.isnan(probs).any(1).argmax())})"
        )
    if y_true.dtype.kind == "f":
        if np.isnan(y_true).any():
            raise ValueError("y_true contains NaN")
        if not np.equal(np.mod(y_true, 1), 0).all():
            raise ValueError("y_true must hold integer class indices")
    elif y_true.dtype.kind not in "iu":
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    y_true = y_true.astype(np.int64)
    bad = (y_true < 0) | (y_true >= len(class_names))
    if bad.any():
        row = int(bad.argmax())
        raise ValueError(
            f"y_true row {row} is {y_true[row]}, outside [0, {len(class_names) - 1}] "
            f"(class_names has {len(class_names)} classes)"
        )
    if (probs < 0).any() or not np.isfinite(probs).all():
        raise ValueError("probs must be finite and non-negative")
    row_sums = probs.sum(axis=1)
    off = np.abs(row_sums - 1.0) > _PROB_SUM_TOLERANCE
    if off.any():
        row = int(off.argmax())
        raise ValueError(
            f"probs rows must sum to 1 (softmax outputs, not logits); "
            f"row {row} sums to {row_sums[row]:.6g}"
        )
    return y_true, probs


def _none_if_nan(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def positive_class_index(
    y_true: np.ndarray, class_names: list[str], positive_class: str
) -> int | None:
    """Column of ``positive_class`` for sensitivity at specificity; None when the class is
    not in ``class_names`` or has no image in ``y_true`` (the metric is then undefined)."""
    if positive_class not in class_names:
        return None
    k = class_names.index(positive_class)
    return k if (y_true == k).any() else None


def metric_replicates(
    y_true: np.ndarray,
    probs_sets: list[np.ndarray],
    groups: np.ndarray | None,
    *,
    n_boot: int,
    seed: int,
    positive_index: int | None,
    n_bins: int = 15,
) -> tuple[int, list[tuple[dict, dict | None]]]:
    """Point estimates and lesion-bootstrap replicates of every metric, for one or more
    prediction sets on the same images.

    Every set is evaluated on the *same* replicate weights (one draw per replicate), so
    with two sets the replicates are paired: ``boot_a[k] - boot_b[k]`` is the bootstrap
    distribution of the difference. With one set this is the unpaired bootstrap of
    :func:`evaluate_predictions` (same draws for the same seed).

    Args:
        y_true: (N,) validated int class indices.
        probs_sets: S validated (N, C) probability matrices.
        groups: (N,) lesion id per image; None = every image its own lesion.
        n_boot: replicates B (0: no bootstrap).
        seed: seed of the draws.
        positive_index: class column for sensitivity at specificity, or None.
        n_bins: ECE bins.

    Returns:
        ``(G, [(point, boot)] * S)``: the number of lesions G and, per set, ``point``
        ({name: (1,) or (1, C) array}, see ``_PerImageStatistics.replicate_metrics``) and
        ``boot`` (the same keys with B rows, NaN where undefined; None when n_boot is 0).
    """
    n = y_true.shape[0]
    index, n_groups = group_index(groups, n)
    stats = [_PerImageStatistics.build(y_true, probs, n_bins) for probs in probs_sets]
    points = [s.replicate_metrics(np.ones((1, n)), positive_index) for s in stats]
    chunks: list[list[dict]] = [[] for _ in stats]
    for w in lesion_bootstrap_weights(index, n_groups, n_boot, np.random.default_rng(seed)):
        for s, out in zip(stats, chunks):
            out.append(s.replicate_metrics(w, positive_index))
    boots = [
        {k: np.concatenate([ch[k] for ch in out]) for k in point} if out else None
        for point, out in zip(points, chunks)
    ]
    return n_groups, list(zip(points, boots))


def result_header(
    n: int,
    n_groups: int,
    groups,
    class_names: list[str],
    positive_class: str,
    ci: float,
    n_boot: int,
    seed: int,
) -> dict:
    """The leading fields of an evaluation result: what was evaluated and how."""
    return {
        "n": int(n),
        "n_groups": int(n_groups),
        "grouped": groups is not None,
        "classes": class_names,
        "positive_class": positive_class,
        "ci_level": float(ci),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    positive_class: str = "mel",
    n_bins: int = 15,
) -> dict:
    """Evaluate class probabilities with lesion-level percentile bootstrap CIs.

    Metrics: ``accuracy``, ``balanced_accuracy`` (mean recall over classes present in
    y_true), ``macro_f1`` / ``weighted_f1`` (over classes present in y_true or predictions,
    as scikit-learn), ``macro_auroc`` (one-vs-rest, averaged over classes with both
    positives and negatives), ``ece`` (top-label, ``n_bins`` equal-width bins), ``brier``
    (multiclass: mean over images of the squared error summed over classes), and
    ``{positive_class}_sens_at_spec80`` / ``_spec90`` (sensitivity for ``positive_class`` on
    P(positive_class) at the lowest threshold giving >= 80% / 90% specificity on all other
    classes; value None when the class is absent from class_names or y_true).

    The bootstrap draws G lesions with replacement B times and keeps all images of each
    drawn lesion; the CI is the percentile interval of the replicates. A replicate where a
    metric is undefined (e.g. a resample without a positive, so AUROC does not exist) is
    dropped *for that metric only*; ``n_valid`` in each metric dict counts the replicates
    used. CIs are None when ``n_boot`` is 0 or no replicate is valid.

    Args:
        y_true: (N,) int class indices into ``class_names``.
        probs: (N, C) probabilities, rows summing to 1.
        class_names: C class names, in column order of ``probs``.
        groups: (N,) lesion id per image; None treats every image as its own lesion.
        n_boot: number of bootstrap replicates B (0 skips the bootstrap).
        ci: central coverage of the intervals, e.g. 0.95.
        seed: seed of the bootstrap draws.
        positive_class: class for the sensitivity-at-specificity metrics.
        n_bins: confidence bins for ECE and the reliability curve.

    Returns:
        JSON-serialisable dict with ``n``, ``n_groups``, ``classes``, ``ci_level``,
        ``n_boot``, ``seed``, ``positive_class``, ``grouped`` (whether lesion ids were given),
        ``metrics`` ({name: {value, ci_low, ci_high, n_valid}}), ``per_class``
        ({class: {precision, recall, f1, support, auroc, ci: {metric: {ci_low, ci_high,
        n_valid}}}}), ``confusion_matrix`` (C x C ints, rows true, columns predicted) and
        ``reliability`` ({bin_edges, bin_acc, bin_conf, bin_count}).
    """
    class_names = [str(c) for c in class_names]
    y_true, probs = validate_predictions(y_true, probs, class_names)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n = y_true.shape[0]
    positive_index = positive_class_index(y_true, class_names, positive_class)
    n_groups, [(point, boot)] = metric_replicates(
        y_true,
        [probs],
        groups,
        n_boot=n_boot,
        seed=seed,
        positive_index=positive_index,
        n_bins=n_bins,
    )

    def summary(value: float, replicates: np.ndarray | None) -> dict:
        low, high, n_valid = (
            percentile_interval(replicates, ci) if replicates is not None else (None, None, 0)
        )
        value = _none_if_nan(value)
        if value is None:  # an undefined point estimate gets no interval either
            low, high = None, None
        return {"value": value, "ci_low": low, "ci_high": high, "n_valid": n_valid}

    def replicates(name: str) -> np.ndarray | None:
        return None if boot is None else boot[name]

    metrics = {name: summary(point[name][0], replicates(name)) for name in HEADLINE_METRICS}
    for name, suffix in zip(sensitivity_metric_names(positive_class), SENSITIVITY_SPECIFICITIES):
        metrics[name] = summary(point[suffix][0], replicates(suffix))

    confusion = np.zeros((len(class_names),) * 2, dtype=np.int64)
    np.add.at(confusion, (y_true, probs.argmax(axis=1)), 1)
    per_class = {}
    for k, name in enumerate(class_names):
        entry: dict = {"support": int(confusion[k].sum())}
        entry["ci"] = {}
        for metric in PER_CLASS_METRICS:
            s = summary(point[metric][0, k], None if boot is None else boot[metric][:, k])
            entry[metric] = s["value"]
            entry["ci"][metric] = {key: s[key] for key in ("ci_low", "ci_high", "n_valid")}
        per_class[name] = entry

    return {
        **result_header(n, n_groups, groups, class_names, positive_class, ci, n_boot, seed),
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "reliability": reliability_curve(probs, y_true, n_bins),
    }
