"""Ordinal targets and the CORN head: ordered classes from a metadata column.

Some targets are ordered: melanoma thickness (Breslow depth: in situ < 0.8 mm < 1 mm <
2 mm < thicker), or age in decades as HAM10000's stand-in. A plain softmax head treats
"1-2 mm" as unrelated to "0.8-1 mm"; an ordinal head knows the order and a mistake by one
class costs less than a mistake by three.

**Classes.** :class:`OrdinalTask` turns a manifest column into class codes 0..K-1, either
from a categorical column with an explicit order (lowest first) or from a continuous column
cut at increasing thresholds t_1 < ... < t_{K-1}: class k holds t_k < x <= t_{k+1}
(right-closed bins), so thresholds ``[0, 0.8, 1, 2]`` give in situ (x <= 0), (0, 0.8],
(0.8, 1], (1, 2] and > 2 mm. A missing value is an error naming the column and the rows.

**CORN** (Shi, Cao & Raschka 2021, "Deep neural networks for rank-consistent ordinal
regression based on conditional training"): the head has K-1 outputs; output k is the
logit of the *conditional* probability P(y > k | y > k-1), trained only on the rows with
y > k-1 (``coral_pytorch.losses.corn_loss``). The unconditional cumulative probabilities
are products, P(y > k) = prod_{j <= k} sigmoid(logit_j), hence non-increasing in k by
construction (rank consistency without weight sharing). Class probabilities are their
differences and sum to 1; the expected class is sum_k P(y > k).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from dermkit.config import ConfigError
from dermkit.core.predictions import write_predictions
from dermkit.eval.ordinal import (
    EXPECTED_VALUE_COLUMN,
    TRUTH_COLUMN,
    ordinal_metrics,
    write_ordinal_report,
)
from dermkit.tasks.settings import TaskConfig

log = logging.getLogger(__name__)

# Column added to a relabelled manifest: the original diagnosis, kept for colouring/analysis.
DIAGNOSIS_COLUMN = "diagnosis"
ORDINAL_FILE = "ordinal.json"
CLASSES_FILE = "classes.json"
SPLIT_NAMES = ("train", "val", "test")


class OrdinalLabelError(ValueError):
    """The ordinal column cannot be turned into classes; the message names the column/rows."""


def _fmt(v: float) -> str:
    return f"{v:g}"


def threshold_class_names(thresholds: list[float]) -> list[str]:
    """Readable names of the K = len(thresholds) + 1 right-closed bins.

    ``[0, 0.8, 1, 2]`` -> ``["<=0", "0-0.8", "0.8-1", "1-2", ">2"]``.
    """
    t = list(thresholds)
    inner = [f"{_fmt(a)}-{_fmt(b)}" for a, b in itertools.pairwise(t)]
    return [f"<={_fmt(t[0])}", *inner, f">{_fmt(t[-1])}"]


def _missing_rows(df: pd.DataFrame, mask: np.ndarray, column: str) -> str:
    rows = np.flatnonzero(mask)
    ids = df["image_id"].to_numpy()[rows[:5]].tolist() if "image_id" in df else []
    return (
        f"column '{column}' has no usable value in {len(rows)} rows (positions "
        f"{rows[:10].tolist()}{', ...' if len(rows) > 10 else ''}; image_id {ids})"
    )


def cut_thresholds(
    values: pd.Series | np.ndarray, thresholds: list[float], column: str
) -> np.ndarray:
    """Class codes (N,) int64 of continuous ``values`` cut at increasing ``thresholds``.

    Class k holds t_k < x <= t_{k+1} (t_0 = -inf, t_K = +inf): the number of thresholds
    strictly below x. NaN (or a non-number) is an :class:`OrdinalLabelError` naming the
    column and rows.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or np.any(np.diff(t) <= 0) or not np.all(np.isfinite(t)):
        raise OrdinalLabelError(
            f"thresholds for '{column}' must be finite and strictly increasing, got {thresholds}"
        )
    x = pd.to_numeric(pd.Series(np.asarray(values)), errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        frame = values.to_frame() if isinstance(values, pd.Series) else pd.DataFrame()
        raise OrdinalLabelError(_missing_rows(frame.reset_index(drop=True), bad, column))
    return np.searchsorted(t, x, side="left").astype(np.int64)


@dataclass
class OrdinalTask:
    """Ordered classes of one manifest column (see module docstring); a ``tasks.Task``.

    Attributes:
        column: the manifest column.
        class_names: K names, lowest class first.
        thresholds: cut points of a continuous column (K-1), or None.
        order: the K values of a categorical column, lowest first, or None.
        centres: (K,) a representative value per class (the training median of the column
            in that class; class index for a categorical column): the expected value of the
            target is sum_k P(k) * centres[k].
    """

    column: str
    class_names: list[str]
    thresholds: list[float] | None = None
    order: list[str] | None = None
    centres: list[float] = field(default_factory=list)
    kind: ClassVar[str] = "ordinal"
    selection_metric: ClassVar[str] = "qwk"
    selection_label: ClassVar[str] = "QWK"

    @classmethod
    def from_config(cls, task: TaskConfig) -> OrdinalTask:
        if task.kind != "ordinal" or not task.column:
            raise ConfigError("task: an ordinal task needs task.kind=ordinal and task.column")
        if task.thresholds:
            names = threshold_class_names(task.thresholds)
            return cls(task.column, names, thresholds=list(task.thresholds))
        if task.order:
            return cls(
                task.column, [str(v) for v in task.order], order=[str(v) for v in task.order]
            )
        raise ConfigError("task: an ordinal task needs task.thresholds or task.order")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def continuous(self) -> bool:
        return self.thresholds is not None

    def _column(self, df: pd.DataFrame) -> pd.Series:
        if self.column not in df.columns:
            raise OrdinalLabelError(
                f"task.column '{self.column}' is not a manifest column; have {list(df.columns)}"
            )
        return df[self.column].reset_index(drop=True)

    def missing(self, df: pd.DataFrame) -> np.ndarray:
        """(N,) bool: rows whose value cannot be classed (NaN, or not in ``order``)."""
        col = self._column(df)
        if self.continuous:
            return ~np.isfinite(pd.to_numeric(col, errors="coerce").to_numpy(np.float64))
        return ~col.astype(str).isin(self.order).to_numpy() | col.isna().to_numpy()

    def codes(self, df: pd.DataFrame) -> np.ndarray:
        """(N,) int64 class codes of the manifest rows; a row without a value is an error."""
        col = self._column(df)
        if self.continuous:
            frame = df.reset_index(drop=True)
            bad = self.missing(df)
            if bad.any():
                raise OrdinalLabelError(_missing_rows(frame, bad, self.column))
            return cut_thresholds(col, self.thresholds, self.column)
        bad = self.missing(df)
        if bad.any():
            raise OrdinalLabelError(
                _missing_rows(df.reset_index(drop=True), bad, self.column)
                + f"; allowed values, lowest first: {self.order}"
            )
        index = {v: i for i, v in enumerate(self.order)}
        return col.astype(str).map(index).to_numpy(np.int64)

    def truth(self, df: pd.DataFrame) -> np.ndarray:
        """(N,) float: the continuous value (class index for a categorical column)."""
        if self.continuous:
            return pd.to_numeric(self._column(df), errors="coerce").to_numpy(np.float64)
        return self.codes(df).astype(np.float64)

    def fit_centres(self, train: pd.DataFrame) -> OrdinalTask:
        """Set ``centres`` from the training rows: median value per class.

        A class without training rows falls back to its bin's midpoint (or its finite edge).
        """
        codes, values = self.codes(train), self.truth(train)
        centres = []
        for k in range(self.n_classes):
            v = values[codes == k]
            if len(v):
                centres.append(float(np.median(v)))
            elif self.continuous:
                # the bin's midpoint; the open-ended first/last bins use their finite edge
                t = self.thresholds
                lo, hi = (t[k - 1] if k > 0 else t[0]), (t[k] if k < len(t) else t[-1])
                centres.append(float((lo + hi) / 2))
            else:
                centres.append(float(k))
        self.centres = centres
        return self

    def relabel(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows with ``label`` replaced by the ordinal class name (diagnosis kept)."""
        names = np.asarray(self.class_names)[self.codes(df)]
        return df.assign(**{DIAGNOSIS_COLUMN: df["label"].to_numpy(), "label": names})

    def to_dict(self) -> dict:
        return {
            "column": self.column,
            "class_names": self.class_names,
            "thresholds": self.thresholds,
            "order": self.order,
            "centres": self.centres,
        }

    @classmethod
    def load(cls, run_dir: Path, task: TaskConfig) -> OrdinalTask:
        """A finished run's task: ``ordinal.json`` (with fitted centres), else the config's."""
        path = Path(run_dir) / ORDINAL_FILE
        if path.exists():
            return cls(**json.loads(path.read_text()))
        return cls.from_config(task)

    # ------------------------------------------------------------- the Task protocol

    @property
    def n_outputs(self) -> int:
        return self.n_classes - 1  # CORN: K-1 conditional logits

    def check_config(self, cfg: Any) -> None:
        if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
            raise ConfigError(
                "task.kind=ordinal: mixup/cutmix do not apply (CORN needs hard labels)"
            )

    def prepare(
        self, data: Any, synthetic_mask: np.ndarray, drop_missing: bool = False
    ) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
        """Relabelled rows (``ordinal_parts``); the centres are fitted on real train rows."""
        parts, synthetic_mask = ordinal_parts(data, self, drop_missing, synthetic_mask)
        self.fit_centres(parts["train"][~synthetic_mask])
        counts = np.bincount(self.codes(parts["train"]), minlength=self.n_classes)
        log.info("ordinal classes %s, train counts %s", self.class_names, counts.tolist())
        return parts, synthetic_mask

    @property
    def loop_criterion(self):
        return corn_criterion

    @property
    def loop_probs(self):
        return corn_class_probs

    def fit_probs(self, val_logits: np.ndarray, val_labels: np.ndarray, mode: str) -> None:
        """Nothing to fit: temperature/class scales are softmax-specific."""

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Conditional logits (N, K-1) -> class probabilities (N, K)."""
        return corn_class_probs(torch.as_tensor(np.asarray(logits))).numpy()

    def probs_rows(
        self, mode: str, test_logits: np.ndarray, y_test: np.ndarray, result: dict, seed: int
    ) -> dict[str, str]:
        return {}  # no decision rule

    def evaluate(
        self, y: np.ndarray, probs: np.ndarray, part: pd.DataFrame, cfg: Any, seed: int
    ) -> dict:
        """QWK, MAE, Spearman/Pearson (overall and per range) with lesion-level CIs."""
        return ordinal_metrics(
            y,
            probs,
            self.truth(part),
            self.class_names,
            expected_value=expected_value(probs, self.centres),
            groups=part["lesion_id"].to_numpy(),
            n_boot=cfg.n_boot,
            ci=cfg.ci,
            seed=seed,
        )

    def write_predictions(self, path: Path, part: pd.DataFrame, probs: np.ndarray) -> Path:
        """Class probabilities (N, K) + the column's value (``ordinal_truth``), expected value.

        ``ordinal_truth`` marks the file as ordinal for ``dermkit evaluate``.
        """
        path = write_predictions(path, part, probs, self.class_names)
        frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "label": str})
        frame[TRUTH_COLUMN] = self.truth(part)
        frame[EXPECTED_VALUE_COLUMN] = expected_value(probs, self.centres)
        frame[DIAGNOSIS_COLUMN] = part[DIAGNOSIS_COLUMN].to_numpy()
        frame.to_csv(path, index=False, float_format="%.6g")
        return path

    def report_figures(
        self, model: torch.nn.Module, dataset: Any, part: pd.DataFrame, out: Path
    ) -> dict[str, str]:
        """PCA of the test features coloured by the task column; {png name: caption}."""
        from dermkit.eval.embedding import pca_2d, plot_embedding
        from dermkit.eval.plots import save_figure
        from dermkit.eval.probe import extract_features

        if len(part) < 3:
            return {}
        coords, var = pca_2d(extract_features(model, dataset))
        fig = plot_embedding(
            coords,
            part[self.column],
            self.column,
            f"PCA of test features by {self.column}",
            ("PC1", "PC2"),
        )
        save_figure(fig, out / "features_pca.png")
        return {
            "features_pca.png": f"PCA of the penultimate test features ({var[0]:.0%} + "
            f"{var[1]:.0%} of the variance), coloured by {self.column}."
        }

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
        return write_ordinal_report(
            result,
            y,
            probs,
            self.truth(part),
            out,
            title=title,
            expected_value=expected_value(probs, self.centres),
            extra={"task": self.to_dict(), **extra},
            extra_figures=extra_figures,
        )

    def save(self, run_dir: Path) -> None:
        (run_dir / CLASSES_FILE).write_text(json.dumps(self.class_names))
        (run_dir / ORDINAL_FILE).write_text(json.dumps(self.to_dict(), indent=2))


def ordinal_parts(data, task: OrdinalTask, drop_missing: bool, synthetic_mask: np.ndarray):
    """Relabelled train/val/test rows and the train synthetic mask, rows without value dropped."""
    parts = {s: data.part(s) for s in SPLIT_NAMES}
    for s, part in parts.items():
        missing = task.missing(part)
        if missing.any() and drop_missing:
            log.info("%s: leaving out %d rows without '%s'", s, missing.sum(), task.column)
            if s == "train":
                synthetic_mask = synthetic_mask[~missing]
            parts[s] = part[~missing].reset_index(drop=True)
    try:
        parts = {s: task.relabel(p) for s, p in parts.items()}
    except ValueError as e:
        raise ConfigError(f"{e} (set task.drop_missing=true to leave these rows out)") from e
    return parts, synthetic_mask


# ----------------------------------------------------------------------------- CORN


def corn_cumulative(logits: torch.Tensor) -> torch.Tensor:
    """Conditional logits (B, K-1) -> cumulative P(y > k), (B, K-1), non-increasing in k.

    Computed as exp(cumsum(logsigmoid)) so a long chain of small probabilities does not
    underflow before the product is formed.
    """
    return torch.exp(torch.cumsum(torch.nn.functional.logsigmoid(logits.float()), dim=-1))


def corn_class_probs(logits: torch.Tensor) -> torch.Tensor:
    """Conditional logits (B, K-1) -> class probabilities (B, K), rows sum to 1.

    P(y = 0) = 1 - P(y > 0), P(y = k) = P(y > k-1) - P(y > k), P(y = K-1) = P(y > K-2);
    every term is >= 0 because the cumulative probabilities never increase.
    """
    cum = corn_cumulative(logits)
    ones = torch.ones_like(cum[..., :1])
    zeros = torch.zeros_like(cum[..., :1])
    upper = torch.cat([ones, cum], dim=-1)
    lower = torch.cat([cum, zeros], dim=-1)
    return (upper - lower).clamp_min(0.0)


def corn_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """CORN loss of conditional logits (B, K-1) for class codes (B,), a scalar.

    Unweighted: the maintained implementation of the paper's authors (``coral_pytorch``).
    ``class_weights`` (K,): each row's binary cross-entropies are scaled by the weight of
    its class (a class-weighted loss for small, imbalanced sets); the sum is divided by
    the number of (row, task) terms, as the unweighted loss is, so all-ones weights give
    the same value.
    """
    if class_weights is None:
        from coral_pytorch.losses import corn_loss as _corn_loss

        return _corn_loss(logits.float(), labels, num_classes=logits.shape[-1] + 1)
    tasks = torch.arange(logits.shape[-1], device=labels.device)
    # Task k is trained on the rows that passed task k-1 (y > k-1), to predict y > k.
    kept = (labels[:, None] > tasks - 1).float()  # (B, K-1)
    target = (labels[:, None] > tasks).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), target, reduction="none"
    )
    weight = class_weights.to(logits.device).float()[labels][:, None]
    return (bce * kept * weight).sum() / kept.sum().clamp_min(1.0)


def corn_criterion(
    logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor
) -> torch.Tensor:
    """``train_classifier`` criterion signature: (logits (b, K-1), labels (b,), images) -> loss."""
    if labels.ndim != 1:
        raise ValueError("the CORN loss needs hard class codes (b,); mixup/cutmix do not apply")
    return corn_loss(logits, labels)


def expected_class(probs: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities -> (N,) expected class index sum_k k P(k) = sum_k P(y > k)."""
    return np.asarray(probs, np.float64) @ np.arange(probs.shape[1], dtype=np.float64)


def expected_value(probs: np.ndarray, centres: list[float]) -> np.ndarray:
    """(N, K) class probabilities -> (N,) expected target value sum_k P(k) * centres[k]."""
    return np.asarray(probs, np.float64) @ np.asarray(centres, np.float64)
