"""``dermkit baseline``: the classical floor (colour/texture features + gradient boosting).

Trains on train, picks boosting rounds and class scales on val, reports on test once.
The fitted sklearn model is not saved: sklearn models serialise only as pickles, and
dermkit never writes pickles. The run keeps what evaluation needs instead: predictions
for val and test, the split ids and the resolved config (a re-run is deterministic).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from dermkit.core.predictions import write_predictions
from dermkit.data.prepare import images_for, prepare_data, write_split_file
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.report import write_evaluation_report
from dermkit.models.classical import ClassicalBaseline
from dermkit.models.metadata import MetadataEncoder
from dermkit.runs import RunDir
from dermkit.train.settings import BaselineRunConfig

log = logging.getLogger(__name__)


def run_baseline(cfg: BaselineRunConfig, progress: bool = False) -> Path:
    """Run the baseline end to end; returns the path of its report.html."""
    with RunDir(cfg.out_dir, cfg, "baseline") as run:
        data = prepare_data(cfg.data, rejects_path=run / "rejects.csv", progress=progress)
        write_split_file(data.manifest, run / "split.csv")
        index = {c: i for i, c in enumerate(data.classes)}
        parts = {s: data.part(s) for s in ("train", "val", "test")}
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
        t2 = time.time()
        probs = {s: model.predict_proba(feats[s]) for s in ("val", "test")}
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
        timing = {"features_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2)}
        result["fit"] = fit_log | timing
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
