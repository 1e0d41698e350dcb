"""Evaluate a predictions file: metrics with lesion-level bootstrap CIs and an HTML report.

The default path of ``dermkit evaluate``: a classifier's ``predictions_*.csv`` gets the
classification metrics (``evaluate_predictions``); an ordinal run's file (it has the
``TRUTH_COLUMN``) gets the ordinal ones (``evaluate_ordinal_predictions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dermkit.core.predictions import read_predictions
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.ordinal import TRUTH_COLUMN, evaluate_ordinal_predictions, metrics_table
from dermkit.eval.report import write_evaluation_report


@dataclass
class FileEvaluation:
    """Where the report went, and for an ordinal file the "metric | estimate [CI]" rows."""

    report: Path
    result: dict
    ordinal_rows: list[dict] = field(default_factory=list)


def evaluate_file(
    predictions: str | Path,
    out: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
) -> FileEvaluation:
    """Evaluate ``predictions`` (a CSV, or a run folder: its predictions_test.csv).

    ``out``: the report folder, default ``eval-<file stem>`` beside the file. Raises
    ValueError/FileNotFoundError naming the file when it cannot be read.
    """
    predictions = Path(predictions)
    if predictions.is_dir():
        predictions = predictions / "predictions_test.csv"
    df, y, probs, classes = read_predictions(predictions)
    out = Path(out) if out is not None else predictions.parent / f"eval-{predictions.stem}"
    if TRUTH_COLUMN in df.columns:  # an ordinal run's predictions (task.kind=ordinal)
        title = f"dermkit ordinal evaluation of {predictions}"
        result, report = evaluate_ordinal_predictions(
            df, y, probs, classes, out, n_boot=n_boot, seed=seed, title=title
        )
        return FileEvaluation(report, result, metrics_table(result))
    result = evaluate_predictions(
        y,
        probs,
        classes,
        groups=df["lesion_id"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
        positive_class=positive_class,
    )
    report = write_evaluation_report(
        result, y, probs, classes, out, title=f"dermkit evaluation of {predictions}"
    )
    return FileEvaluation(report, result)
