"""The ``Task`` protocol: what a classifier run predicts, how it is trained, scored and stored.

A task is everything that differs between a softmax classifier and an ordinal (CORN)
classifier, so that ``dermkit finetune`` and ``dermkit distill`` are one pipeline each:

- rows and labels: ``prepare`` turns the prepared data into the train/val/test rows whose
  ``label`` column holds the task's class names (ordinal: the cut column, rows without a
  value dropped or refused);
- head: ``n_outputs`` per image (C for classification, K-1 for a CORN head);
- loss: ``loop_criterion`` replaces the loop's configured ``ClassificationLoss`` (None: keep
  it); ``loop_probs`` maps head outputs to class probabilities for scoring (None: softmax);
- probabilities: ``fit_probs`` fits what is fitted on val (the decision rule) and ``probs``
  maps logits (N, n_outputs) to class probabilities (N, K);
- selection: ``selection_metric`` (the loop's val score that picks the epoch: ``macro_f1``
  or ``qwk``) and its readable ``selection_label``;
- evaluation: ``evaluate`` (metrics with lesion-level CIs), ``write_predictions``,
  ``report_figures`` and ``write_report``;
- files: ``save`` writes the task's files into the run folder (classes.json, and
  decision.json or ordinal.json), which ``dermkit.tasks.runs.load_task`` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch


@runtime_checkable
class Task(Protocol):
    kind: str  # "classification" | "ordinal": config.yaml's task.kind
    class_names: list[str]
    selection_metric: str  # key of the loop's val scores that selects the epoch
    selection_label: str  # its name in reports

    @property
    def n_outputs(self) -> int:
        """Head outputs per image."""

    def check_config(self, cfg: Any) -> None:
        """Refuse run settings the task cannot train with (a ``ConfigError``)."""

    def prepare(
        self, data: Any, synthetic_mask: np.ndarray, drop_missing: bool = False
    ) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
        """{split: rows labelled with the task's classes}, and the train synthetic mask."""

    @property
    def loop_criterion(self):
        """``(logits (b, n_outputs), labels (b,), images) -> loss``, or None (configured loss)."""

    @property
    def loop_probs(self):
        """``logits (N, n_outputs) -> probabilities (N, K)`` tensor map, or None (softmax)."""

    def fit_probs(self, val_logits: np.ndarray, val_labels: np.ndarray, mode: str) -> None:
        """Fit what maps logits to probabilities on val only (the decision rule)."""

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Logits (N, n_outputs) -> class probabilities (N, K), rows sum to 1."""

    def probs_rows(
        self, mode: str, test_logits: np.ndarray, y_test: np.ndarray, result: dict, seed: int
    ) -> dict[str, str]:
        """Report rows on the fitted probability map (may record it in ``result``)."""

    def evaluate(
        self, y: np.ndarray, probs: np.ndarray, part: pd.DataFrame, cfg: Any, seed: int
    ) -> dict:
        """Test metrics with lesion-level bootstrap CIs (``cfg``: the run's eval settings)."""

    def write_predictions(self, path: Path, part: pd.DataFrame, probs: np.ndarray) -> Path:
        """The predictions CSV of ``part``'s rows and their probabilities (N, K)."""

    def report_figures(
        self, model: torch.nn.Module, dataset: Any, part: pd.DataFrame, out: Path
    ) -> dict[str, str]:
        """Task-specific figures written into ``out``: {png name: caption}."""

    def write_report(
        self,
        result: dict,
        y: np.ndarray,
        probs: np.ndarray,
        part: pd.DataFrame,
        out: Path,
        title: str,
        extra: dict,
        extra_figures: dict[str, str],
    ) -> Path:
        """metrics.json, figures and report.html; returns the report's path."""

    def save(self, run_dir: Path) -> None:
        """Write the task's files into a run folder (classes.json and its own)."""


def summary_rows(task: Task, summary: dict) -> dict[str, Any]:
    """Report rows of the loop's selection: the best epoch and value, named by the metric."""
    label = task.selection_label
    return {
        f"best epoch (val {label})": summary["best_epoch"],
        f"best val {label}": round(summary["best_val_metric"], 4),
    }
