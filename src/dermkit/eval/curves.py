"""Learning curves and overfitting gaps, for one run or several side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

CURVES = (
    ("loss", "cross-entropy"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
)
GAPS = (("macro_f1", "-"), ("balanced_accuracy", "--"), ("accuracy", ":"))


def plot_learning_curves(histories: dict[str, list[dict]]) -> Figure:
    """Per-epoch loss, accuracy, balanced accuracy, macro-F1 and the overfitting gaps.

    Args:
        histories: run name -> per-epoch rows with ``train_``/``val_`` metrics and
            ``gap_<metric>`` = train - val (``TrainState.history``). One colour per run;
            solid = val, dashed = the clean train subset. The last panel has one line per
            gap: macro-F1 (solid), balanced accuracy (dashed), accuracy (dotted). Metrics
            a history lacks (runs from before they were logged) are left out.
    """
    fig = Figure(figsize=(16, 3.8))
    axes = fig.subplots(1, len(CURVES) + 1)
    for i, (name, rows) in enumerate(histories.items()):
        colour = f"C{i}"
        epochs = [r["epoch"] + 1 for r in rows]
        for ax, (key, _) in zip(axes, CURVES):
            for side, ls in (("val", "-"), ("train", "--")):
                if rows and f"{side}_{key}" in rows[0]:
                    ax.plot(
                        epochs,
                        [r[f"{side}_{key}"] for r in rows],
                        color=colour,
                        ls=ls,
                        label=f"{name} {side}",
                    )
        for key, ls in GAPS:
            if rows and f"gap_{key}" in rows[0]:
                label = name if key == "macro_f1" else None
                axes[-1].plot(
                    epochs, [r[f"gap_{key}"] for r in rows], color=colour, ls=ls, label=label
                )
    for ax, (_, title) in zip(axes, CURVES):
        ax.set(title=title, xlabel="epoch")
    axes[-1].set(title="overfitting gap (train − val)", xlabel="epoch")
    axes[-1].axhline(0, color="grey", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-2].legend(fontsize=7)
    axes[-1].legend(fontsize=7, title="solid F1, dashed bal. acc., dotted acc.", title_fontsize=7)
    fig.tight_layout()
    return fig


def curve_summary(rows: list[dict], metric: str = "macro_f1", share: float = 0.9) -> dict:
    """How fast a run converges and how its overfitting gap moves, from its per-epoch history.

    The two claims the transfer studies make about initialisations (e.g. arXiv 2505.16773:
    ImageNet converges faster but its gap grows; domain self-supervised starts improve
    steadily with a near-zero gap) are read off these numbers, one row per run.

    Args:
        rows: per-epoch dicts with ``val_<metric>`` and ``gap_<metric>`` (train - val).
        share: convergence is the first epoch whose val score reaches ``share`` x the best.
    Returns: ``epochs_to_<share>_best`` (1-based), ``best_epoch``, ``gap_first``,
        ``gap_last``, ``gap_slope`` (least-squares change of the gap per epoch),
        ``val_slope_second_half`` (least-squares change of val per epoch over the second half
        of training: ~0 = converged, > 0 = still improving). Empty dict for no history.
    """
    if not rows or f"val_{metric}" not in rows[0]:
        return {}
    val = np.array([r[f"val_{metric}"] for r in rows], dtype=float)
    epochs = np.arange(1, len(val) + 1, dtype=float)
    best = float(val.max())
    summary = {
        f"epochs_to_{int(share * 100)}pct_best": int(np.argmax(val >= share * best)) + 1,
        "best_epoch": int(val.argmax()) + 1,
    }
    half = len(val) // 2
    summary["val_slope_second_half"] = (
        float(np.polyfit(epochs[half:], val[half:], 1)[0]) if len(val) - half >= 2 else None
    )
    if f"gap_{metric}" in rows[0]:
        gap = np.array([r[f"gap_{metric}"] for r in rows], dtype=float)
        summary |= {
            "gap_first": float(gap[0]),
            "gap_last": float(gap[-1]),
            "gap_slope": float(np.polyfit(epochs, gap, 1)[0]) if len(gap) >= 2 else None,
        }
    return summary
