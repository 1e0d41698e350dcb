"""Classification: one softmax output per class, selected on val macro-F1.

Probabilities go through the post-hoc decision rule (temperature and class scales, fitted
on val only: ``eval.calibration.DecisionRule``), stored in the run folder as decision.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax

from dermkit.core.predictions import write_predictions
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.report import write_evaluation_report

DECISION_FILE = "decision.json"
CLASSES_FILE = "classes.json"


@dataclass
class ClassificationTask:
    """Softmax classification over ``class_names`` (set from the data by ``prepare``)."""

    class_names: list[str] = field(default_factory=list)
    rule: DecisionRule | None = None
    kind: ClassVar[str] = "classification"
    selection_metric: ClassVar[str] = "macro_f1"
    selection_label: ClassVar[str] = "macro-F1"

    @property
    def n_outputs(self) -> int:
        return len(self.class_names)

    def check_config(self, cfg: Any) -> None:
        """Every classification setting applies."""

    def prepare(
        self, data: Any, synthetic_mask: np.ndarray, drop_missing: bool = False
    ) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
        self.class_names = list(data.classes)
        return {s: data.part(s) for s in ("train", "val", "test")}, synthetic_mask

    @property
    def loop_criterion(self):
        return None  # the loop's configured ClassificationLoss

    @property
    def loop_probs(self):
        return None  # softmax

    def fit_probs(self, val_logits: np.ndarray, val_labels: np.ndarray, mode: str) -> None:
        self.rule = DecisionRule.fit(val_logits, val_labels, mode)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Logits (N, C) -> the decision rule's probabilities (N, C) (softmax before a fit)."""
        return (self.rule or DecisionRule()).probs(logits)

    def probs_rows(
        self, mode: str, test_logits: np.ndarray, y_test: np.ndarray, result: dict, seed: int
    ) -> dict[str, str]:
        """Report rows of the decision rule; records it and the test metrics without it in
        ``result["decision_rule"]``."""
        if self.rule is None:
            return {}
        rule = self.rule
        raw = evaluate_predictions(
            y_test, softmax(test_logits, axis=1), self.class_names, n_boot=0, seed=seed
        )["metrics"]
        result["decision_rule"] = {
            "mode": mode,
            **asdict(rule),
            "test_without_rule": {
                k: raw[k]["value"] for k in ("macro_f1", "balanced_accuracy", "ece") if k in raw
            },
        }
        scales = [round(x, 2) for x in rule.class_scales] if rule.class_scales else "none"
        return {
            "decision rule (fitted on val)": f"{mode}: T={rule.temperature:.3f}, "
            f"class scales {scales}",
            "test macro-F1 / bal. acc. without the rule": "{:.3f} / {:.3f}".format(
                raw["macro_f1"]["value"], raw["balanced_accuracy"]["value"]
            ),
        }

    def evaluate(
        self, y: np.ndarray, probs: np.ndarray, part: pd.DataFrame, cfg: Any, seed: int
    ) -> dict:
        return evaluate_predictions(
            y,
            probs,
            self.class_names,
            groups=part["lesion_id"].to_numpy(),
            n_boot=cfg.n_boot,
            ci=cfg.ci,
            seed=seed,
            positive_class=cfg.positive_class,
        )

    def write_predictions(self, path: Path, part: pd.DataFrame, probs: np.ndarray) -> Path:
        return write_predictions(path, part, probs, self.class_names)

    def report_figures(
        self, model: torch.nn.Module, dataset: Any, part: pd.DataFrame, out: Path
    ) -> dict[str, str]:
        return {}

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
        return write_evaluation_report(
            result,
            y,
            probs,
            self.class_names,
            out,
            title=title,
            extra=extra,
            extra_figures=extra_figures,
        )

    def save(self, run_dir: Path) -> None:
        (run_dir / CLASSES_FILE).write_text(json.dumps(self.class_names))
        if self.rule is not None:
            self.rule.save(run_dir / DECISION_FILE)

    @classmethod
    def load(cls, run_dir: Path, class_names: list[str]) -> ClassificationTask:
        """The task of a finished run: its classes and decision rule (identity without one)."""
        return cls(list(class_names), DecisionRule.load(Path(run_dir) / DECISION_FILE))
