"""Learning curves and overfitting gaps, for one run or several side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
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
