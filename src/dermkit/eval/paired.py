"""Paired lesion-level bootstrap comparison of two models on the same test images.

Two models scored on one test split are not independent samples: both see the same
lesions, and most of their errors are on the same hard images. Comparing their separate
95% intervals therefore overstates the uncertainty of the difference (the intervals
overlap long after the difference is clear). The paired bootstrap resamples lesions once
per replicate and evaluates *both* prediction sets on that same resample, so the spread
of ``metric(A) - metric(B)`` over replicates reflects only the images where they differ.

The metrics come from :func:`dermkit.eval.metrics.metric_replicates`, the code behind
:func:`~dermkit.eval.metrics.evaluate_predictions`, with both probability matrices on one
(B, N) lesion-weight matrix per chunk; nothing here re-implements a metric.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.core.files import write_json_atomic, write_text_atomic
from dermkit.core.predictions import read_predictions
from dermkit.eval.bootstrap import percentile_interval
from dermkit.eval.metrics import (
    metric_replicates,
    positive_class_index,
    result_header,
    validate_predictions,
)
from dermkit.eval.ordinal import TRUTH_COLUMN

# Headline metrics of the comparison (name -> higher is better). ECE is the one where
# lower is better, so "A better" means delta < 0 there.
PAIRED_METRICS: dict[str, bool] = {
    "macro_f1": True,
    "balanced_accuracy": True,
    "accuracy": True,
    "macro_auroc": True,
    "ece": False,
}
PAIRED_PER_CLASS: tuple[str, ...] = ("recall", "f1")
# The benchmark protocol reports sensitivity at 90% specificity for the positive class
# (a key of metrics.SENSITIVITY_SPECIFICITIES).
_SENSITIVITY_SUFFIX = "spec90"
# Replicate differences this small are float noise (e.g. the same per-class F1 values
# averaged in another order), not one model beating the other.
_TIE_TOLERANCE = 1e-12
DEFAULT_PREDICTIONS = "predictions_test.csv"
_MAX_IDS_NAMED = 10


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _paired_summary(
    value_a: float,
    value_b: float,
    boot_a: np.ndarray | None,
    boot_b: np.ndarray | None,
    ci: float,
    higher_is_better: bool,
) -> dict:
    """One metric of the comparison.

    Args:
        value_a, value_b: point estimates (NaN when undefined).
        boot_a, boot_b: (B,) replicates on the same lesion resamples, or None (no bootstrap).
        ci: central coverage of the interval.
        higher_is_better: direction of the metric (False for ECE).

    Returns:
        {value_a, value_b, delta (= a - b), ci_low, ci_high (percentile interval of the
        replicate deltas), n_valid (replicates where both are defined), p_a_better /
        p_b_better (share of valid replicates where A / B is better; ties count for
        neither), higher_is_better}; None where undefined.
    """
    entry: dict = {
        "value_a": _finite_or_none(value_a),
        "value_b": _finite_or_none(value_b),
        "delta": None,
        "ci_low": None,
        "ci_high": None,
        "n_valid": 0,
        "p_a_better": None,
        "p_b_better": None,
        "higher_is_better": higher_is_better,
    }
    if entry["value_a"] is None or entry["value_b"] is None:
        return entry  # an undefined point estimate gets no interval either
    delta = value_a - value_b
    entry["delta"] = 0.0 if abs(delta) <= _TIE_TOLERANCE else float(delta)
    if boot_a is None or boot_b is None:
        return entry
    deltas = boot_a - boot_b  # NaN where either model's metric is undefined
    deltas = np.where(np.abs(deltas) <= _TIE_TOLERANCE, 0.0, deltas)
    low, high, n_valid = percentile_interval(deltas, ci)
    entry.update(ci_low=low, ci_high=high, n_valid=n_valid)
    valid = deltas[np.isfinite(deltas)]
    if valid.size:
        a_wins, b_wins = (valid > 0, valid < 0) if higher_is_better else (valid < 0, valid > 0)
        entry["p_a_better"] = float(a_wins.mean())
        entry["p_b_better"] = float(b_wins.mean())
    return entry


def compare_predictions(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    class_names: list[str],
    groups: np.ndarray | None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    positive_class: str = "mel",
) -> dict:
    """Compare models A and B on the same images with a paired lesion-level bootstrap.

    Each replicate draws G lesions with replacement (all images of a drawn lesion kept)
    and evaluates both models on that one resample; the interval is the percentile
    interval of ``metric(A) - metric(B)`` over the replicates where both are defined.
    Metrics and their definitions are those of
    :func:`~dermkit.eval.metrics.evaluate_predictions`: ``macro_f1``,
    ``balanced_accuracy``, ``accuracy``, ``macro_auroc``, ``ece`` and
    ``{positive_class}_sens_at_spec90``, plus per-class ``recall`` and ``f1``.

    Args:
        y_true: (N,) int class indices into ``class_names``.
        probs_a: (N, C) probabilities of model A, rows summing to 1.
        probs_b: (N, C) probabilities of model B for the same images in the same order.
        class_names: C class names, in column order of both matrices.
        groups: (N,) lesion id per image; None treats every image as its own lesion.
        n_boot: number of paired replicates B (0: point estimates only).
        seed: seed of the lesion draws.
        ci: central coverage of the intervals, e.g. 0.95.
        positive_class: class for the sensitivity-at-90%-specificity row.

    Returns:
        JSON-serialisable dict: ``n``, ``n_groups``, ``grouped``, ``classes``,
        ``positive_class``, ``ci_level``, ``n_boot``, ``seed``, ``n_pred_differ`` (images
        whose top class differs between A and B), ``metrics`` ({name: summary}) and
        ``per_class`` ({class: {support, recall: summary, f1: summary}}), where a summary
        is {value_a, value_b, delta, ci_low, ci_high, n_valid, p_a_better, p_b_better,
        higher_is_better}. ``p_a_better`` is the share of valid replicates where A is
        better: delta > 0, or delta < 0 for ECE (lower is better).
    """
    class_names = [str(c) for c in class_names]
    checked = []
    for name, probs in (("probs_a", probs_a), ("probs_b", probs_b)):
        try:
            checked.append(validate_predictions(y_true, probs, class_names))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    (y_true, probs_a), (_, probs_b) = checked
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")

    positive_index = positive_class_index(y_true, class_names, positive_class)
    n_groups, [(point_a, boot_a), (point_b, boot_b)] = metric_replicates(
        y_true,
        [probs_a, probs_b],
        groups,
        n_boot=n_boot,
        seed=seed,
        positive_index=positive_index,
    )

    def summary(key: str, higher_is_better: bool, column: int | None = None) -> dict:
        def pick(values: dict | None, row: int | slice):
            if values is None:
                return None
            return values[key][row] if column is None else values[key][row, column]

        return _paired_summary(
            pick(point_a, 0),
            pick(point_b, 0),
            pick(boot_a, slice(None)),
            pick(boot_b, slice(None)),
            ci,
            higher_is_better,
        )

    metrics = {name: summary(name, up) for name, up in PAIRED_METRICS.items()}
    metrics[f"{positive_class}_sens_at_{_SENSITIVITY_SUFFIX}"] = summary(_SENSITIVITY_SUFFIX, True)
    support = np.bincount(y_true, minlength=len(class_names))
    per_class = {
        name: {"support": int(support[k])}
        | {metric: summary(metric, True, k) for metric in PAIRED_PER_CLASS}
        for k, name in enumerate(class_names)
    }
    n = int(y_true.shape[0])
    return {
        **result_header(n, n_groups, groups, class_names, positive_class, ci, n_boot, seed),
        "n_pred_differ": int((probs_a.argmax(1) != probs_b.argmax(1)).sum()),
        "metrics": metrics,
        "per_class": per_class,
    }


# ------------------------------------------------------------------------ files


def resolve_predictions(path: str | Path) -> Path:
    """A predictions file as given, or a run folder's ``predictions_test.csv``."""
    path = Path(path)
    return path / DEFAULT_PREDICTIONS if path.is_dir() else path


def _read(path: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Read one predictions file for the comparison -> (frame, probs (N, C), classes)."""
    df, _, probs, classes = read_predictions(path)
    if TRUTH_COLUMN in df.columns:
        raise ValueError(
            f"{path}: an ordinal run's predictions (column '{TRUTH_COLUMN}'); the paired "
            f"comparison covers classification predictions only"
        )
    duplicated = df["image_id"][df["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{path}: image ids appear more than once: {_named_ids(duplicated)}")
    return df, probs, classes


def _named_ids(ids: list[str]) -> str:
    extra = len(ids) - _MAX_IDS_NAMED
    return f"{ids[:_MAX_IDS_NAMED]}" + (f" and {extra} more" if extra > 0 else "")


def align_prediction_files(
    path_a: str | Path, path_b: str | Path
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str]]:
    """Read two predictions files and line B's rows up with A's by image_id.

    Args:
        path_a, path_b: predictions.csv files or run folders (their predictions_test.csv).

    Returns:
        ``(frame_a, probs_a (N, C), probs_b (N, C), classes)``: A's frame (image_id,
        lesion_id, label in A's row order) and both probability matrices in A's class
        order (B's columns are reordered when it lists the same classes in another order).

    Raises:
        ValueError: naming both files when the class sets differ; the file and up to 10
            image ids when an id is in one file only; the image ids whose label or lesion
            id differ between the files.
    """
    path_a, path_b = resolve_predictions(path_a), resolve_predictions(path_b)
    df_a, probs_a, classes_a = _read(path_a)
    df_b, probs_b, classes_b = _read(path_b)
    if set(classes_a) != set(classes_b):
        raise ValueError(
            f"the files have different classes: {path_a} has {classes_a}, {path_b} has {classes_b}"
        )
    probs_b = probs_b[:, [classes_b.index(c) for c in classes_a]]

    ids_a, ids_b = df_a["image_id"].tolist(), df_b["image_id"].tolist()
    set_a, set_b = set(ids_a), set(ids_b)
    for path, ids, other_path, other in (
        (path_a, ids_a, path_b, set_b),
        (path_b, ids_b, path_a, set_a),
    ):
        only = [i for i in ids if i not in other]
        if only:
            raise ValueError(
                f"{path} has {len(only)} image ids that {other_path} lacks: {_named_ids(only)}"
            )
    row_b = pd.Series(np.arange(len(ids_b)), index=ids_b)[ids_a].to_numpy()
    df_b, probs_b = df_b.iloc[row_b].reset_index(drop=True), probs_b[row_b]

    for column, what in (("label", "labels"), ("lesion_id", "lesion ids")):
        a = df_a[column].fillna("").astype(str).to_numpy()
        b = df_b[column].fillna("").astype(str).to_numpy()
        differ = np.flatnonzero(a != b)
        if differ.size:
            shown = [f"{ids_a[i]} ({a[i]!r} vs {b[i]!r})" for i in differ[:_MAX_IDS_NAMED]]
            raise ValueError(
                f"{path_a} and {path_b} give different {what} for {differ.size} image ids: "
                + ", ".join(shown)
                + (
                    f" and {differ.size - _MAX_IDS_NAMED} more"
                    if differ.size > _MAX_IDS_NAMED
                    else ""
                )
            )
    return df_a, probs_a, probs_b, classes_a


def compare_prediction_files(
    path_a: str | Path,
    path_b: str | Path,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    positive_class: str = "mel",
) -> dict:
    """:func:`compare_predictions` on two predictions files (or run folders) aligned by
    image_id, lesion-grouped by their lesion_id column; the result also names ``a`` and
    ``b`` (the files read)."""
    df, probs_a, probs_b, classes = align_prediction_files(path_a, path_b)
    index = {c: k for k, c in enumerate(classes)}
    result = compare_predictions(
        df["label"].map(index).to_numpy(),
        probs_a,
        probs_b,
        classes,
        groups=df["lesion_id"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
        ci=ci,
        positive_class=positive_class,
    )
    return {"a": str(resolve_predictions(path_a)), "b": str(resolve_predictions(path_b))} | result


# ----------------------------------------------------------------------- output


def default_output_dir(path_a: str | Path, path_b: str | Path) -> Path:
    """``<A's folder>/paired-vs-<B's name>``: B's name is its run folder's name (for a run
    folder or its predictions_test.csv), else ``<folder>-<file stem>``."""
    path_a, path_b = Path(path_a), Path(path_b)
    folder_a = path_a if path_a.is_dir() else path_a.parent
    if path_b.is_dir():
        name_b = path_b.resolve().name
    elif path_b.name == DEFAULT_PREDICTIONS:
        name_b = path_b.resolve().parent.name
    else:
        name_b = f"{path_b.resolve().parent.name}-{path_b.stem}"
    return folder_a / f"paired-vs-{name_b}"


def comparison_rows(result: dict) -> list[dict]:
    """The comparison as table rows: {metric, a, b, delta, ci, p_a_better, clear} strings
    (``clear``: the interval excludes 0), headline metrics first, then per class."""
    entries = list(result["metrics"].items())
    for name, per_class in result["per_class"].items():
        entries += [(f"{metric} {name}", per_class[metric]) for metric in PAIRED_PER_CLASS]

    def fmt(x: float | None, signed: bool = False) -> str:
        return "n/a" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")

    rows = []
    for name, e in entries:
        has_ci = e["ci_low"] is not None
        rows.append(
            {
                "metric": name,
                "a": fmt(e["value_a"]),
                "b": fmt(e["value_b"]),
                "delta": fmt(e["delta"], signed=True),
                "ci": f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]" if has_ci else "",
                "p_a_better": fmt(e["p_a_better"]),
                "clear": has_ci and (e["ci_low"] > 0 or e["ci_high"] < 0),
            }
        )
    return rows


def comparison_markdown(result: dict) -> str:
    """A short markdown report: what was compared and one table row per metric."""
    level = round(100 * result["ci_level"])
    lines = [
        "# Paired comparison A - B",
        "",
        f"- A: `{result.get('a', 'probs_a')}`",
        f"- B: `{result.get('b', 'probs_b')}`",
        f"- {result['n']} images of {result['n_groups']} "
        + ("lesions" if result["grouped"] else "images as their own groups")
        + f"; top class differs on {result['n_pred_differ']} images",
        f"- {level}% percentile intervals of the difference from {result['n_boot']} paired "
        f"lesion-bootstrap replicates (seed {result['seed']}); P(A better) is the share of "
        "replicates where A is better (for ECE: lower; ties count for neither). **Bold**: the "
        "interval excludes 0.",
        "",
        f"| metric | A | B | A - B [{level}% CI] | P(A better) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in comparison_rows(result):
        delta = f"{row['delta']} {row['ci']}".strip()
        if row["clear"]:
            delta = f"**{delta}**"
        lines.append(
            f"| {row['metric']} | {row['a']} | {row['b']} | {delta} | {row['p_a_better']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_table(result: dict):
    """The comparison as a ``rich.table.Table`` for the terminal."""
    from rich.markup import escape
    from rich.table import Table

    level = round(100 * result["ci_level"])
    table = Table(
        title=f"A - B on {result['n']} images / {result['n_groups']} lesions "
        f"({result['n_boot']} paired replicates)",
        caption=escape(f"A: {result.get('a', 'probs_a')}\nB: {result.get('b', 'probs_b')}"),
    )
    table.add_column("metric")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column(f"delta [{level}% CI]", justify="right")
    table.add_column("P(A better)", justify="right")
    for row in comparison_rows(result):
        delta = escape(f"{row['delta']} {row['ci']}".strip())
        table.add_row(
            escape(row["metric"]),
            row["a"],
            row["b"],
            f"[bold]{delta}[/]" if row["clear"] else delta,
            row["p_a_better"],
        )
    return table


def write_comparison(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``paired.json`` and ``paired.md`` into ``out_dir`` (atomically) -> their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "paired.json", out_dir / "paired.md"
    write_json_atomic(json_path, result, allow_nan=False)
    write_text_atomic(md_path, comparison_markdown(result))
    return json_path, md_path
