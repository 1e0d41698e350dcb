"""Learning curves and overfitting gaps, for one run or several side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure


def plot_learning_curves(histories: dict[str, list[dict]]) -> Figure:
    """Loss, macro-F1 and the train-minus-val macro-F1 gap per epoch.

    Args:
        histories: run name -> per-epoch rows with train_/val_ loss and macro_f1 and
            gap_macro_f1 (``TrainState.history``). One colour per run; solid = val,
            dashed = train.
    """
    fig = Figure(figsize=(13, 3.8))
    ax_loss, ax_f1, ax_gap = fig.subplots(1, 3)
    for i, (name, rows) in enumerate(histories.items()):
        colour = f"C{i}"
        epochs = [r["epoch"] + 1 for r in rows]
        for ax, key in ((ax_loss, "loss"), (ax_f1, "macro_f1")):
            ax.plot(epochs, [r[f"val_{key}"] for r in rows], color=colour, label=f"{name} val")
            if rows and f"train_{key}" in rows[0]:
                ax.plot(
                    epochs,
                    [r[f"train_{key}"] for r in rows],
                    color=colour,
                    ls="--",
                    label=f"{name} train",
                )
        if rows and "gap_macro_f1" in rows[0]:
            ax_gap.plot(epochs, [r["gap_macro_f1"] for r in rows], color=colour, label=name)
    ax_loss.set(title="cross-entropy", xlabel="epoch")
    ax_f1.set(title="macro-F1", xlabel="epoch")
    ax_gap.set(title="overfitting gap (train − val macro-F1)", xlabel="epoch")
    ax_gap.axhline(0, color="grey", lw=0.8)
    for ax in (ax_loss, ax_f1, ax_gap):
        ax.grid(alpha=0.3)
    ax_f1.legend(fontsize=7)
    fig.tight_layout()
    return fig
