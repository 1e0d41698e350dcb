"""Evaluation figures: confusion matrix, one-vs-rest ROC, reliability diagram, per-class bars.

Figures are built as ``matplotlib.figure.Figure`` objects on the Agg canvas directly, not
through ``pyplot``: no global backend switch, no figure registry to leak memory across
hundreds of training runs, and it works on headless machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_confusion_matrix(confusion: np.ndarray | list, class_names: list[str]) -> Figure:
    """Two panels: raw counts and row-normalised (recall per true class).

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted class.
        class_names: C class names.
    """
    counts = np.asarray(confusion, dtype=np.float64)
    row_totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    c = len(class_names)
    size = max(4.0, 0.6 * c + 2.0)
    fig = _new_figure(2 * size + 1.0, size)
    panels = fig.subplots(1, 2)
    for ax, values, title, fmt in (
        (panels[0], counts, "Counts", "{:.0f}"),
        (panels[1], normalised, "Row-normalised (recall)", "{:.2f}"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        top = values.max() if values.size else 0.0
        for i in range(c):
            for j in range(c):
                colour = "white" if top > 0 and values[i, j] > 0.6 * top else "black"
                ax.text(
                    j,
                    i,
                    fmt.format(values[i, j]),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=8,
                )
        ax.set_xticks(range(c), class_names, rotation=45, ha="right")
        ax.set_yticks(range(c), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    return fig


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> Figure:
    """One-vs-rest ROC curve per class with its AUROC in the legend.

    Classes without both positives and negatives in ``y_true`` have no ROC curve and are
    listed in the legend as "n/a".

    Args:
        y_true: (N,) int class indices.
        probs: (N, C) class probabilities.
        class_names: C class names.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    fig = _new_figure(6.0, 5.5)
    ax = fig.subplots()
    for k, name in enumerate(class_names):
        is_positive = y_true == k
        if is_positive.all() or not is_positive.any():
            ax.plot([], [], label=f"{name} (AUROC n/a)")
            continue
        fpr, tpr, _ = roc_curve(is_positive, probs[:, k])
        auc = roc_auc_score(is_positive, probs[:, k])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("One-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_reliability_diagram(reliability: dict, ece: float | None = None) -> Figure:
    """Accuracy vs confidence per bin (top) and the histogram of confidences (bottom).

    Args:
        reliability: dict with ``bin_edges`` (B+1), ``bin_acc``, ``bin_conf`` and
            ``bin_count`` (B each; None for empty bins), as from ``reliability_curve``.
        ece: expected calibration error shown in the title, if given.
    """
    edges = np.asarray(reliability["bin_edges"], dtype=np.float64)
    acc = np.array([np.nan if a is None else a for a in reliability["bin_acc"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in reliability["bin_conf"]], dtype=float)
    count = np.asarray(reliability["bin_count"], dtype=np.float64)
    lefts, widths = edges[:-1], np.diff(edges)
    fig = _new_figure(5.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = ~np.isnan(acc)
    top.bar(
        lefts[filled],
        acc[filled],
        width=widths[filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    # The hatched box spans accuracy to mean confidence: above the bar = overconfident.
    top.bar(
        lefts[filled],
        np.abs(conf - acc)[filled],
        bottom=np.minimum(acc, conf)[filled],
        width=widths[filled],
        align="edge",
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    title = "Reliability diagram (top-label)"
    top.set_title(title if ece is None else f"{title}, ECE = {ece:.3f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lefts, count, width=widths, align="edge", edgecolor="black", color="tab:grey")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("images")
    return fig


def plot_per_class_metrics(per_class: dict) -> Figure:
    """Grouped precision / recall / F1 bars per class, with bootstrap CIs as error bars.

    Args:
        per_class: {class: {"precision", "recall", "f1", ...}} as in the ``per_class`` part
            of ``evaluate_predictions``; an optional ``ci`` entry
            ({metric: {"ci_low", "ci_high"}}) adds error bars. None values are drawn as 0
            without an error bar.
    """
    names = list(per_class)
    metrics = ("precision", "recall", "f1")
    x = np.arange(len(names))
    width = 0.27
    fig = _new_figure(max(6.0, 1.1 * len(names) + 2.0), 4.5)
    ax = fig.subplots()
    for offset, metric in zip((-width, 0.0, width), metrics):
        values = np.array([per_class[c].get(metric) or 0.0 for c in names], dtype=float)
        lower, upper = np.zeros_like(values), np.zeros_like(values)
        for i, c in enumerate(names):
            interval = per_class[c].get("ci", {}).get(metric, {})
            low, high = interval.get("ci_low"), interval.get("ci_high")
            if per_class[c].get(metric) is not None and low is not None and high is not None:
                lower[i], upper[i] = max(values[i] - low, 0.0), max(high - values[i], 0.0)
        has_ci = bool((lower + upper).any())
        ax.bar(
            x + offset,
            values,
            width,
            label=metric,
            yerr=np.vstack([lower, upper]) if has_ci else None,
            capsize=2,
        )
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("Per-class precision / recall / F1")
    ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as a PNG at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
