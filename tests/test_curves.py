"""Learning-curve summaries: how fast a run converges and where its overfitting gap goes."""

import pytest

from dermkit.eval.curves import curve_summary, plot_learning_curves


def _history(val, gap):
    return [
        {"epoch": i, "val_macro_f1": v, "train_macro_f1": v + g, "gap_macro_f1": g}
        for i, (v, g) in enumerate(zip(val, gap, strict=True))
    ]


def test_curve_summary_tells_a_fast_overfitting_run_from_a_steady_one():
    # "ImageNet-like": near its best after 2 epochs, gap widening 0.05 per epoch
    fast = curve_summary(
        _history([0.60, 0.68, 0.70, 0.70, 0.69, 0.70], [0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    )
    # "self-supervised-like": climbs every epoch, gap flat at ~0
    steady = curve_summary(
        _history([0.40, 0.46, 0.52, 0.58, 0.63, 0.68], [0.01, -0.01, 0.0, 0.01, 0.0, 0.0])
    )
    assert fast["epochs_to_90pct_best"] == 2 and steady["epochs_to_90pct_best"] == 5
    assert fast["best_epoch"] == 3 and steady["best_epoch"] == 6  # the first of tied bests
    assert fast["gap_slope"] == pytest.approx(0.05) and abs(steady["gap_slope"]) < 0.005
    assert (fast["gap_first"], fast["gap_last"]) == (0.0, 0.25)
    # second half (epochs 4-6): flat for the fast run, still rising 0.05 / epoch for the other
    assert abs(fast["val_slope_second_half"]) < 0.01
    assert steady["val_slope_second_half"] == pytest.approx(0.05)


def test_curve_summary_of_short_or_missing_histories():
    assert curve_summary([]) == {}
    assert curve_summary([{"epoch": 0, "val_loss": 1.0}]) == {}
    one = curve_summary(_history([0.5], [0.1]))
    assert one["epochs_to_90pct_best"] == 1 and one["gap_slope"] is None
    assert one["val_slope_second_half"] is None
    no_gap = curve_summary([{"epoch": 0, "val_macro_f1": 0.3}, {"epoch": 1, "val_macro_f1": 0.5}])
    assert "gap_slope" not in no_gap and no_gap["epochs_to_90pct_best"] == 2


def test_learning_curves_figure_has_a_panel_per_metric_and_the_gap():
    hist = _history([0.4, 0.5], [0.0, 0.1])
    fig = plot_learning_curves({"a": hist, "b": hist})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[-1].startswith("overfitting gap") and "macro-F1" in titles
    assert len(fig.axes[-1].lines) == 2 + 1  # one gap line per run + the zero line
