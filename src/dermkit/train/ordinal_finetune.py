"""``dermkit finetune task.kind=ordinal``: fine-tuning on ordered classes with a CORN head.

The same data preparation, backbone and training loop as ``train/finetune.py``; what
changes (see ``train/ordinal.py``):

- labels: the task column cut into ordered classes (``label`` becomes the class name; the
  diagnosis stays in a ``diagnosis`` column), rows without a value are an error, or are
  left out with ``task.drop_missing=true``;
- head: K-1 outputs; loss: CORN (the configured ``loss.loss`` does not apply; the sampler
  does, over the ordinal classes); mixup/cutmix are errors (CORN needs hard labels);
- selection: best val quadratic weighted kappa of the CORN class probabilities;
- no post-hoc decision rule (temperature/class scales are softmax-specific);
- outputs: predictions_{val,test}.csv with class probabilities plus ``ordinal_truth`` (the
  column's value) and ``ordinal_expected_value``; ordinal.json (classes, thresholds,
  class centres); metrics.json with QWK, MAE, Spearman/Pearson (overall and per range)
  with lesion-level CIs; report.html with a PCA of the features coloured by the column.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dermkit.config import ConfigError, FinetuneRunConfig
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import write_split_file
from dermkit.eval.curves import plot_learning_curves
from dermkit.eval.ordinal import (
    EXPECTED_VALUE_COLUMN,
    TRUTH_COLUMN,
    ordinal_metrics,
    write_ordinal_report,
)
from dermkit.eval.predictions import write_predictions
from dermkit.runs import RunDir
from dermkit.train.loop import load_best, make_accelerator, predict_logits, train_classifier
from dermkit.train.ordinal import (
    DIAGNOSIS_COLUMN,
    OrdinalTask,
    corn_class_probs,
    corn_criterion,
    expected_value,
)

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")


def _check(cfg: FinetuneRunConfig) -> None:
    if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
        raise ConfigError("task.kind=ordinal: mixup/cutmix do not apply (CORN needs hard labels)")


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


def write_ordinal_predictions(
    path: Path, part: pd.DataFrame, probs: np.ndarray, task: OrdinalTask
) -> Path:
    """predictions CSV of relabelled rows: class probabilities (N, K) + truth, expected value.

    ``ordinal_truth`` (the column's value) marks the file as ordinal for ``dermkit evaluate``.
    """
    path = write_predictions(path, part, probs, task.class_names)
    frame = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "label": str})
    frame[TRUTH_COLUMN] = task.truth(part)
    frame[EXPECTED_VALUE_COLUMN] = expected_value(probs, task.centres)
    frame[DIAGNOSIS_COLUMN] = part[DIAGNOSIS_COLUMN].to_numpy()
    frame.to_csv(path, index=False, float_format="%.6g")
    return path


def run_ordinal_finetune(
    cfg: FinetuneRunConfig,
    resume: bool = False,
    progress: bool = True,
    *,
    build_model: Callable[[FinetuneRunConfig, int], tuple[torch.nn.Module, str]],
    load_training_data: Callable[[FinetuneRunConfig, RunDir], tuple[Any, np.ndarray]],
) -> Path:
    """Fine-tune an ordinal (CORN) classifier end to end; returns the path of report.html.

    ``build_model`` and ``load_training_data`` are ``dermkit.train.finetune``'s, passed in by
    ``run_finetune`` (the caller that dispatches on ``task.kind``), so this module does not
    import finetune back: no import circle.
    """
    _check(cfg)
    accelerator = make_accelerator(cfg.optim.precision)
    with RunDir(cfg.out_dir, cfg, "finetune", write=accelerator.is_main_process) as run:
        with accelerator.main_process_first():
            data, synthetic_mask = load_training_data(cfg, run)
        if accelerator.is_main_process:
            write_split_file(data.manifest, run / "split.csv")
        task = OrdinalTask.from_config(cfg.task)
        parts, synthetic_mask = ordinal_parts(data, task, cfg.task.drop_missing, synthetic_mask)
        task.fit_centres(parts["train"][~synthetic_mask])
        classes = task.class_names
        datasets = {s: CachedImageDataset(data.cache, p, classes) for s, p in parts.items()}
        counts = np.bincount(datasets["train"].labels.numpy(), minlength=len(classes))
        log.info("ordinal classes %s, train counts %s", classes, counts.tolist())
        torch.manual_seed(cfg.seed)
        model, weights_report = build_model(cfg, len(classes) - 1)  # CORN: K-1 outputs
        summary = train_classifier(
            cfg,
            model,
            datasets["train"],
            datasets["val"],
            run.path,
            synthetic_mask=synthetic_mask,
            resume=resume,
            progress=progress,
            accelerator=accelerator,
            criterion=corn_criterion,
            to_probs=corn_class_probs,
        )
        model = load_best(model, run.path)
        probs = {
            s: corn_class_probs(
                predict_logits(
                    model,
                    datasets[s],
                    np.arange(len(datasets[s])),
                    accelerator,
                    tta=cfg.augment.tta,
                )
            ).numpy()
            for s in ("val", "test")
        }
        if not accelerator.is_main_process:
            return run / "report.html"
        shutil.copyfile(run / "best.safetensors", run / "model.safetensors")
        (run / "classes.json").write_text(json.dumps(classes))
        (run / "ordinal.json").write_text(json.dumps(task.to_dict(), indent=2))
        for s in ("val", "test"):
            write_ordinal_predictions(run / f"predictions_{s}.csv", parts[s], probs[s], task)
        test = parts["test"]
        y_test = datasets["test"].labels.numpy()
        truth = task.truth(test)
        value = expected_value(probs["test"], task.centres)
        result = ordinal_metrics(
            y_test,
            probs["test"],
            truth,
            classes,
            expected_value=value,
            groups=test["lesion_id"].to_numpy(),
            n_boot=cfg.eval.n_boot,
            ci=cfg.eval.ci,
            seed=cfg.seed,
        )
        curves = plot_learning_curves({cfg.model.name: summary["history"]})
        curves.savefig(run / "learning_curves.png", dpi=110)
        figures = {
            "learning_curves.png": "Learning curves (val: solid, clean train subset: dashed)."
        }
        figures.update(_feature_map(model, datasets["test"], test, task, run.path))
        return write_ordinal_report(
            result,
            y_test,
            probs["test"],
            truth,
            run.path,
            title=f"dermkit finetune (ordinal '{task.column}'): {cfg.model.name} (test split)",
            expected_value=value,
            extra={
                "model": cfg.model.name,
                "initialisation": weights_report,
                "task": task.to_dict(),
                "best epoch (val QWK)": summary["best_epoch"],
                "best val QWK": round(summary["best_val_macro_f1"], 4),
                "epochs run": summary["epochs_run"],
                "training": {k: v for k, v in summary.items() if k != "history"},
                "history": summary["history"],
            },
            extra_figures=figures,
        )


def _feature_map(model, dataset, frame, task: OrdinalTask, out: Path) -> dict[str, str]:
    """PCA of the test features coloured by the task column; {png name: caption}."""
    from dermkit.eval.plots import save_figure
    from dermkit.explain.features import extract_features, pca_2d, plot_embedding

    if len(frame) < 3:
        return {}
    features = extract_features(model, dataset)
    coords, var = pca_2d(features)
    fig = plot_embedding(
        coords,
        frame[task.column],
        task.column,
        f"PCA of test features by {task.column}",
        ("PC1", "PC2"),
    )
    save_figure(fig, out / "features_pca.png")
    return {
        "features_pca.png": f"PCA of the penultimate test features ({var[0]:.0%} + {var[1]:.0%} "
        f"of the variance), coloured by {task.column}."
    }
