"""Metrics of ordinal predictions with lesion-level bootstrap confidence intervals.

Inputs are the true class codes y (N,), predicted class probabilities (N, K) (lowest class
first), the true target value (N,) (e.g. Breslow thickness in mm; the class index for a
categorical target) and optionally the expected target value per image (sum_k P(k) *
centre_k, see ``dermkit.tasks.ordinal``).

- ``qwk``: Cohen's kappa with quadratic weights of the most probable class (scikit-learn);
- ``mae_classes``: mean |predicted class - true class|;
- ``spearman`` / ``pearson``: between the expected class sum_k P(y > k) and the truth;
- ``mae_value`` / ``pearson_value``: of the expected target value (when given);
- the same per true class ("per range"): how well the model orders images inside a bin.

Intervals: the replicates of ``dermkit.eval.bootstrap`` (lesions drawn with replacement);
a replicate's image weights become repeated rows (rank correlations have no weighted form
in scipy). A metric undefined in a replicate (constant truth) is dropped for that metric.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import cohen_kappa_score

from dermkit.eval.bootstrap import group_index, lesion_bootstrap_weights, percentile_interval

# Columns an ordinal run adds to predictions_*.csv; their presence marks an ordinal file.
TRUTH_COLUMN = "ordinal_truth"
EXPECTED_VALUE_COLUMN = "ordinal_expected_value"
_MIN_ROWS = 3


def quadratic_kappa(
    y: np.ndarray, pred: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None
) -> float:
    """Quadratic weighted kappa over classes 0..n_classes-1; NaN when undefined."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(
            cohen_kappa_score(
                y,
                pred,
                labels=np.arange(n_classes),
                weights="quadratic",
                sample_weight=sample_weight,
            )
        )


def _corr(fn, a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < _MIN_ROWS or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(fn(a, b)[0])


def _point_metrics(
    y: np.ndarray,
    pred: np.ndarray,
    expected: np.ndarray,
    truth: np.ndarray,
    value: np.ndarray | None,
    n_classes: int,
) -> dict[str, float]:
    """Overall metrics of the rows given (rows may repeat: a bootstrap replicate)."""
    if not len(y):
        return {}
    out = {
        "qwk": quadratic_kappa(y, pred, n_classes),
        "mae_classes": float(np.mean(np.abs(pred - y))),
        "accuracy": float(np.mean(pred == y)),
        "spearman": _corr(spearmanr, expected, truth),
        "pearson": _corr(pearsonr, expected, truth),
    }
    if value is not None:
        out["mae_value"] = float(np.mean(np.abs(value - truth)))
        out["pearson_value"] = _corr(pearsonr, value, truth)
    return out


def _range_metrics(y: np.ndarray, pred: np.ndarray, expected: np.ndarray, truth: np.ndarray):
    """Per-range metrics: inside one true class only ordering and distance are meaningful."""
    return {
        "mae_classes": float(np.mean(np.abs(pred - y))) if len(y) else float("nan"),
        "spearman": _corr(spearmanr, expected, truth),
        "pearson": _corr(pearsonr, expected, truth),
    }


def ordinal_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    truth: np.ndarray,
    class_names: list[str],
    expected_value: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict:
    """Ordinal metrics with lesion-level bootstrap CIs, overall and per true class.

    Args:
        y: (N,) true class codes 0..K-1.
        probs: (N, K) class probabilities, lowest class first.
        truth: (N,) true target value (continuous, or the class index).
        class_names: K names.
        expected_value: (N,) expected target value per image, or None.
        groups: (N,) lesion ids (None: image-level bootstrap).

    Returns:
        ``{"metrics": {name: {value, ci_low, ci_high, n_valid}}, "per_range": [rows],
        "n_boot", "ci_level", "classes", "n_images"}``.
    """
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    truth = np.asarray(truth, np.float64)
    k = len(class_names)
    if probs.shape != (len(y), k):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y)} rows x {k} classes")
    pred = probs.argmax(1)
    expected = probs @ np.arange(k, dtype=np.float64)
    value = None if expected_value is None else np.asarray(expected_value, np.float64)

    def compute(rows: np.ndarray) -> tuple[dict, list[dict]]:
        v = None if value is None else value[rows]
        overall = _point_metrics(y[rows], pred[rows], expected[rows], truth[rows], v, k)
        per = []
        for c in range(k):
            r = rows[y[rows] == c]
            per.append(_range_metrics(y[r], pred[r], expected[r], truth[r]))
        return overall, per

    all_rows = np.arange(len(y))
    point, per_point = compute(all_rows)
    reps: dict[str, list[float]] = {name: [] for name in point}
    per_reps = [{name: [] for name in row} for row in per_point]
    if n_boot > 0 and len(y):
        index, n_groups = group_index(groups, len(y))
        rng = np.random.default_rng(seed)
        for chunk in lesion_bootstrap_weights(index, n_groups, n_boot, rng):
            for w in chunk.astype(np.int64):
                rows = np.repeat(all_rows, w)
                o, per = compute(rows)
                for name, v in o.items():
                    reps[name].append(v)
                for c, row in enumerate(per):
                    for name, v in row.items():
                        per_reps[c][name].append(v)

    def entry(v: float, r: list[float]) -> dict:
        lo, hi, n_valid = (
            percentile_interval(np.asarray(r, np.float64), ci) if r else (None, None, 0)
        )
        return {
            "value": None if np.isnan(v) else v,
            "ci_low": lo,
            "ci_high": hi,
            "n_valid": n_valid,
        }

    per_range = []
    for c, row in enumerate(per_point):
        mask = y == c
        item = {"class": class_names[c], "n": int(mask.sum())}
        if mask.any():
            item["truth_range"] = [float(truth[mask].min()), float(truth[mask].max())]
        for name, v in row.items():
            item[name] = entry(v, per_reps[c][name])
        per_range.append(item)
    return {
        "metrics": {name: entry(v, reps[name]) for name, v in point.items()},
        "per_range": per_range,
        "n_boot": n_boot,
        "ci_level": ci,
        "classes": list(class_names),
        "n_images": len(y),
        "confusion": np.bincount(y * k + pred, minlength=k * k).reshape(k, k).tolist(),
    }


# ----------------------------------------------------------------------------- reporting


def metrics_table(result: dict) -> list[dict]:
    """Rows "metric | estimate [CI]" of an :func:`ordinal_metrics` result."""
    from dermkit.eval.report import format_estimate

    level = result.get("ci_level", 0.95)
    return [
        {"metric": name, f"estimate [{level:.0%} CI]": format_estimate(e)}
        for name, e in result["metrics"].items()
    ]


def per_range_table(result: dict) -> list[dict]:
    """One row per true class: n, truth range, MAE and correlations with their CIs."""
    from dermkit.eval.report import format_estimate

    rows = []
    for item in result["per_range"]:
        lo_hi = item.get("truth_range")
        rows.append(
            {
                "true class": item["class"],
                "n": item["n"],
                "truth range": f"{lo_hi[0]:g} to {lo_hi[1]:g}" if lo_hi else "—",
                **{
                    name: format_estimate(item[name])
                    for name in ("mae_classes", "spearman", "pearson")
                },
            }
        )
    return rows


def plot_expected_vs_truth(
    truth: np.ndarray, expected: np.ndarray, y: np.ndarray, class_names: list[str], ylabel: str
):
    """Scatter of the predicted expected value (N,) against the truth (N,), by true class."""
    from matplotlib import colormaps

    from dermkit.eval.plots import _new_figure

    fig = _new_figure(6.0, 4.5)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    k = len(class_names)
    for c in range(k):
        m = y == c
        if m.any():
            ax.scatter(
                truth[m],
                expected[m],
                s=14,
                alpha=0.7,
                color=cmap(c / max(k - 1, 1)),
                label=class_names[c],
            )
    ax.set_xlabel("truth")
    ax.set_ylabel(ylabel)
    ax.legend(title="true class", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_ordinal_report(
    result: dict,
    y: np.ndarray,
    probs: np.ndarray,
    truth: np.ndarray,
    out_dir: str | Path,
    title: str,
    expected_value: np.ndarray | None = None,
    extra: dict | None = None,
    extra_figures: dict[str, str] | None = None,
) -> Path:
    """Write metrics.json, figures and report.html of an ordinal evaluation; returns the report.

    ``extra_figures``: PNG file names already in ``out_dir`` -> caption, added at the end.
    """
    import json

    from dermkit.eval.plots import plot_confusion_matrix, save_figure
    from dermkit.eval.report import HtmlReport, to_jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = result["classes"]
    (out / "metrics.json").write_text(
        json.dumps(to_jsonable({**result, **(extra or {})}), indent=2)
    )
    expected = np.asarray(probs) @ np.arange(len(classes), dtype=np.float64)
    save_figure(plot_confusion_matrix(result["confusion"], classes), out / "confusion_matrix.png")
    save_figure(
        plot_expected_vs_truth(truth, expected, y, classes, "expected class sum P(y > k)"),
        out / "expected_vs_truth.png",
    )
    report = HtmlReport(title)
    report.add_paragraph(
        f"{result['n_images']} images, {len(classes)} ordered classes (lowest first): "
        f"{', '.join(classes)}. {result['ci_level']:.0%} intervals: {result['n_boot']} "
        "lesion-level bootstrap replicates. Predicted class: the most probable class."
    )
    if extra:
        report.add_table([{"item": k, "value": str(v)} for k, v in extra.items()], "Run details")
    report.add_table(metrics_table(result), "Ordinal metrics")
    report.add_table(per_range_table(result), "Per true class (range): ordering inside the bin")
    report.add_figure(out / "expected_vs_truth.png", "Expected class (sum of P(y > k)) vs truth.")
    if expected_value is not None:
        save_figure(
            plot_expected_vs_truth(truth, expected_value, y, classes, "expected value"),
            out / "expected_value_vs_truth.png",
        )
        report.add_figure(
            out / "expected_value_vs_truth.png",
            "Expected target value (sum of P(k) x class centre) vs truth.",
        )
    report.add_figure(out / "confusion_matrix.png", "Confusion matrix of the ordered classes.")
    for name, caption in (extra_figures or {}).items():
        report.add_figure(out / name, caption)
    report.add_link("metrics.json", "metrics.json")
    return report.write(out / "report.html")


def evaluate_ordinal_predictions(
    df: pd.DataFrame,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    out_dir: str | Path,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    title: str = "dermkit ordinal evaluation",
) -> tuple[dict, Path]:
    """Metrics + report of a predictions file written by an ordinal run (``ordinal_truth``)."""
    if TRUTH_COLUMN not in df.columns:
        raise ValueError(f"predictions have no '{TRUTH_COLUMN}' column: not an ordinal run")
    truth = df[TRUTH_COLUMN].to_numpy(np.float64)
    value = df[EXPECTED_VALUE_COLUMN].to_numpy(np.float64) if EXPECTED_VALUE_COLUMN in df else None
    result = ordinal_metrics(
        y, probs, truth, classes, value, df["lesion_id"].to_numpy(), n_boot, ci, seed
    )
    report = write_ordinal_report(result, y, probs, truth, out_dir, title, expected_value=value)
    return result, report
