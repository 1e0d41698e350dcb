"""Predictions files: the hand-off between a model and ``dermkit evaluate``.

``predictions.csv`` has one row per image: image_id, lesion_id, label (true class name),
pred (predicted class name) and one ``prob_<class>`` column per class in class order. Any
stage that predicts writes one, so metrics can always be recomputed from the folder.
The format sits in core because every layer reads or writes it: models (a run's class
list), tasks and training (test predictions), eval and bench (metrics from the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PROB_PREFIX = "prob_"


def prediction_classes(columns: list[str]) -> list[str]:
    """Class names, in class order, of a predictions file's columns (its ``prob_<class>``)."""
    return [c[len(PROB_PREFIX) :] for c in columns if c.startswith(PROB_PREFIX)]


def write_predictions(
    path: str | Path, manifest: pd.DataFrame, probs: np.ndarray, class_names: list[str]
) -> Path:
    """Write predictions for manifest rows (N) with probs (N, C) in ``class_names`` order."""
    if probs.shape != (len(manifest), len(class_names)):
        raise ValueError(
            f"probs shape {probs.shape} does not match {len(manifest)} rows x "
            f"{len(class_names)} classes"
        )
    out = pd.DataFrame(
        {
            "image_id": manifest["image_id"].to_numpy(),
            "lesion_id": manifest["lesion_id"].to_numpy(),
            "label": manifest["label"].to_numpy(),
            "pred": np.asarray(class_names)[probs.argmax(1)],
        }
    )
    for k, c in enumerate(class_names):
        out[PROB_PREFIX + c] = probs[:, k]
    path = Path(path)
    out.to_csv(path, index=False, float_format="%.6g")
    return path


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str]]:
    """Read a predictions file -> (frame, y_true (N,) int, probs (N, C), class_names)."""
    path = Path(path)
    df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "label": str})
    missing = {"image_id", "lesion_id", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    classes = prediction_classes(list(df.columns))
    if not classes:
        raise ValueError(f"{path}: no '{PROB_PREFIX}<class>' columns")
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} have no probability column")
    index = {c: i for i, c in enumerate(classes)}
    y = df["label"].map(index).to_numpy()
    probs = df[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=float)
    return df, y, probs, classes
