"""``dermkit baseline``: the classical floor (colour/texture features + gradient boosting).

Trains on train, picks boosting rounds and class scales on val, reports on test once.
The fitted sklearn model is not saved: sklearn models serialise only as pickles, and
dermkit never writes pickles. The run keeps what evaluation needs instead: predictions
for val and test, the split ids and the resolved config. A re-run is deterministic, so
:func:`refit_baseline_run` rebuilds the model of a finished run folder when new images
must be scored (the synthetic-image filter), checked against the run's val predictions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dermkit.config import ConfigError
from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.data.prepare import PreparedData, images_for, prepare_data, write_split_file
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.report import write_evaluation_report
from dermkit.models.classical import ClassicalBaseline
from dermkit.models.metadata import MetadataEncoder
from dermkit.runs import RunDir
from dermkit.train.settings import BaselineRunConfig

log = logging.getLogger(__name__)


@dataclass
class FittedBaseline:
    """A baseline fitted on a prepared split, with what evaluation reads of the fit."""

    model: ClassicalBaseline
    meta: MetadataEncoder | None
    parts: dict[str, pd.DataFrame]  # split -> its manifest rows
    y: dict[str, np.ndarray]  # split -> class indices (N,)
    feats: dict[str, np.ndarray]  # split -> features (N, F)
    fit_log: dict  # ClassicalBaseline.fit's log
    timing: dict  # features_s, fit_s


def fit_baseline(
    cfg: BaselineRunConfig, data: PreparedData, splits: tuple[str, ...] = ("train", "val", "test")
) -> FittedBaseline:
    """Features of ``splits`` (train and val among them); fit on train, tune on val."""
    index = {c: i for i, c in enumerate(data.classes)}
    parts = {s: data.part(s) for s in splits}
    for name, part in parts.items():
        if len(part) == 0:
            raise ValueError(f"the {name} split is empty: check the split ratios or split file")
    model = ClassicalBaseline(
        n_classes=len(data.classes),
        seed=cfg.seed,
        **cfg.baseline.model_dump(exclude={"metadata"}),
    )
    # fail on a bad column name before the minutes of feature extraction
    meta = (
        MetadataEncoder(cfg.baseline.metadata).fit(parts["train"])
        if cfg.baseline.metadata
        else None
    )
    t0 = time.time()
    feats = {s: model.features(images_for(data, p)) for s, p in parts.items()}
    if meta is not None:
        feats = {s: np.concatenate([f, meta.transform(parts[s])], 1) for s, f in feats.items()}
    y = {s: p["label"].map(index).to_numpy() for s, p in parts.items()}
    t1 = time.time()
    fit_log = model.fit(feats["train"], y["train"], feats["val"], y["val"])
    timing = {"features_s": round(t1 - t0, 2), "fit_s": round(time.time() - t1, 2)}
    return FittedBaseline(model, meta, parts, y, feats, fit_log, timing)


def refit_baseline_run(
    run_dir: str | Path,
) -> tuple[ClassicalBaseline, BaselineRunConfig, list[str]]:
    """(model, run config, class order) of a finished ``dermkit baseline`` run, refitted.

    The run saved no model, but its config and ``split.csv`` fix the fit, so fitting again
    gives its model. The refit's val probabilities must match the run's
    ``predictions_val.csv``; if they do not, the data or dermkit changed since the run and
    the model would not be the one it reported (ConfigError). Costs one fit (train and val
    features). A run with ``baseline.metadata`` is refused: new images have no metadata.
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "split.csv", "predictions_val.csv"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: not a finished baseline run")
    cfg = BaselineRunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.baseline.metadata:
        raise ConfigError(
            f"{run_dir}: a baseline with patient metadata {cfg.baseline.metadata} cannot score "
            "images that carry none: use a run without baseline.metadata"
        )
    data = prepare_data(cfg.data.model_copy(update={"split_file": str(run_dir / "split.csv")}))
    fitted = fit_baseline(cfg, data, splits=("train", "val"))
    frame, _, recorded, classes = read_predictions(run_dir / "predictions_val.csv")
    same_rows = frame["image_id"].tolist() == fitted.parts["val"]["image_id"].tolist()
    if classes != data.classes or not same_rows:
        raise ConfigError(f"{run_dir}: its val split or classes differ from its split.csv")
    gap = float(np.abs(fitted.model.predict_proba(fitted.feats["val"]) - recorded).max())
    if gap > 1e-4:  # predictions_val.csv keeps 6 significant digits
        raise ConfigError(
            f"{run_dir}: refitting does not reproduce the run's val probabilities (max gap "
            f"{gap:.2g}); the data or dermkit changed since it ran: run the baseline again"
        )
    return fitted.model, cfg, classes


def run_baseline(cfg: BaselineRunConfig, progress: bool = False) -> Path:
    """Run the baseline end to end; returns the path of its report.html."""
    with RunDir(cfg.out_dir, cfg, "baseline") as run:
        data = prepare_data(cfg.data, rejects_path=run / "rejects.csv", progress=progress)
        write_split_file(data.manifest, run / "split.csv")
        fitted = fit_baseline(cfg, data)
        parts, y, meta, fit_log = fitted.parts, fitted.y, fitted.meta, fitted.fit_log
        probs = {s: fitted.model.predict_proba(fitted.feats[s]) for s in ("val", "test")}
        for s in ("val", "test"):
            write_predictions(run / f"predictions_{s}.csv", parts[s], probs[s], data.classes)
        result = evaluate_predictions(
            y["test"],
            probs["test"],
            data.classes,
            groups=parts["test"]["lesion_id"].to_numpy(),
            n_boot=cfg.eval.n_boot,
            ci=cfg.eval.ci,
            seed=cfg.seed,
            positive_class=cfg.eval.positive_class,
        )
        result["fit"] = fit_log | fitted.timing
        result["fit"]["metadata_features"] = meta.feature_names() if meta is not None else []
        result["data"] = {
            "images": {s: len(p) for s, p in parts.items()},
            "lesions": {s: int(p["lesion_id"].nunique()) for s, p in parts.items()},
            "rejected": len(data.rejects),
            "near_duplicate_pairs_across_splits": len(data.leakage.near_duplicates),
            "image_size": cfg.data.image_size,
        }
        report = write_evaluation_report(
            result,
            y["test"],
            probs["test"],
            data.classes,
            run.path,
            title="dermkit baseline: colour/texture features + gradient boosting (test split)",
            extra={
                "model": "HistGradientBoosting on colour histograms, colour moments, LBP"
                + (f" + metadata {meta.feature_names()}" if meta is not None else ""),
                "best boosting rounds (val)": fit_log["best_iter"],
                "class scales (val)": np.round(fit_log["class_scales"], 3).tolist(),
                "images train/val/test": str(result["data"]["images"]),
                "lesions train/val/test": str(result["data"]["lesions"]),
                "leakage": data.leakage.summary(),
            },
        )
        log.info("baseline macro-F1 %.3f", result["metrics"]["macro_f1"]["value"])
        return report
