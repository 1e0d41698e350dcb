"""External evaluation: a trained classifier run scored on another dataset.

run folder (model, config, decision.json) + a dataset in HAM10000, ISIC or class-per-folder
layout + a label map (the dataset's labels -> the run's classes, null drops) ->
same image size and crop policy as the run (decode-once cache) -> logits as the run
predicted its own test split (same precision and test-time augmentation) -> the run's
decision rule -> probabilities restricted to the classes both sides have -> metrics with
lesion-level bootstrap CIs -> ``predictions_external.csv``, ``metrics.json``,
``report.html``.

Only classes present on both sides are scored: a model class no external image maps to
is left out (its probability column removed and the rest renormalised, so the model
chooses among the classes that can be right), and source labels the map sends to null
are dropped before any image is decoded. Both are reported with their image counts.
The bootstrap resamples lesions when the dataset has lesion ids; otherwise (ISIC ground
truth without a lesion_id column, class-per-folder trees) every image is its own group,
which is said in the report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.config import ConfigError
from dermkit.core.files import atomic_path
from dermkit.core.predictions import write_predictions
from dermkit.data.labels import load_label_map
from dermkit.eval.adapt import RunAdapter, write_adapted_run
from dermkit.eval.adapt import summary_lines as adaptation_rows
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.report import write_evaluation_report

log = logging.getLogger(__name__)

EXTERNAL_PREDICTIONS = "predictions_external.csv"


def read_checked_label_map(path: str | Path, classes: list[str]) -> dict[str, str | None]:
    """The label map in ``path``; every non-null target must be one of the model's classes.

    Raises:
        ConfigError: the file is not a mapping, or a target is not a class of the model
            (the message names the file, the source labels and the targets).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label map {path} not found")
    try:
        label_map = load_label_map(path)
    except ValueError as e:  # YAML/JSON that is not a mapping
        raise ConfigError(str(e)) from e
    unknown = {s: t for s, t in label_map.items() if t is not None and t not in classes}
    if unknown:
        pairs = ", ".join(f"{s!r} -> {t!r}" for s, t in sorted(unknown.items()))
        raise ConfigError(
            f"{path}: label-map targets that the model does not have: {pairs}; the run's "
            f"classes are {classes} (map a label to one of them, or to null to drop it)"
        )
    return label_map


def _write_external_predictions(
    path: Path, manifest: pd.DataFrame, probs: np.ndarray, classes: list[str], top_all: np.ndarray
) -> Path:
    """``predictions.csv`` format (read by ``dermkit evaluate``) plus ``source_label`` and
    ``top_class_all`` (the argmax over every model class, before restriction); atomic."""
    with atomic_path(path) as tmp:
        write_predictions(tmp, manifest, probs, classes)
        # Re-read as text so the probability columns keep write_predictions' formatting.
        df = pd.read_csv(tmp, dtype=str, keep_default_na=False)
        position = df.columns.get_loc("pred") + 1
        df.insert(position, "top_class_all", top_all)
        if "source_label" in manifest.columns:
            df.insert(position, "source_label", manifest["source_label"].to_numpy())
        df.to_csv(tmp, index=False)
    return path


def _adaptation_record(adapted) -> dict | None:
    if adapted is None:
        return None
    return {
        "applied": adapted.applied,
        "bn": adapted.bn,
        "priors": adapted.priors.to_dict() if adapted.priors is not None else None,
        "tta_scales": adapted.tta_scales,
    }


def _ood_record(run_dir: Path, model, dataset, logits, batch_size: int, adapted) -> dict | None:
    """Images flagged unfamiliar by the run's ``ood.json`` (None when never fitted)."""
    from dermkit.eval.ood import flag_counts, load_ood, score_dataset

    rule = load_ood(run_dir)
    if rule is None:
        return None
    scores = {"energy": rule.scores(logits), "mahalanobis": None}
    if rule.mahalanobis_file:
        scores["mahalanobis"] = score_dataset(model, dataset, rule, run_dir, batch_size)[
            "mahalanobis"
        ]
    record = {"quantile": rule.quantile, **flag_counts(scores, rule)}
    if adapted is not None and adapted.applied:
        record["note"] = "scored by the adapted model; thresholds fitted before adaptation"
    return record


def _ood_rows(record: dict | None) -> dict:
    if record is None:
        return {"unfamiliar images (OOD flag)": "not fitted (dermkit evaluate RUN --fit-ood)"}
    rows = {}
    for name in ("energy", "mahalanobis"):
        if name in record:
            r = record[name]
            rows[f"unfamiliar images ({name} > val {record['quantile']:.0%} quantile)"] = (
                f"{r['flagged']} of {r['of']} ({r['fraction']:.1%})"
            )
    return rows


def evaluate_external(
    run_dir: str | Path,
    data: str | Path,
    label_map: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    layout: str = "auto",
    skip_bad: bool = False,
    cache_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
    adapt: str | list[str] | None = None,
    save_adaptation: str | Path | None = None,
    priors_max_error: float | None = 0.1,
) -> dict:
    """Score the classifier in ``run_dir`` on the dataset ``data``; see the module doc.

    Args:
        run_dir: finetune or distill run folder (model.safetensors + config.yaml).
        data: dataset root in HAM10000, ISIC or class-per-folder layout.
        label_map: YAML/JSON {dataset label: run class or null}; None: the dataset's labels
            must already be the run's class names.
        out_dir: output folder (default ``run_dir/external-<dataset folder name>``).
        layout: "auto", "ham10000", "isic" or "folder".
        skip_bad: drop unreadable rows/files (listed in ``out_dir/rejects.csv``).
        cache_dir: image cache root (default: the run's ``data.cache_dir``).
        n_boot, seed: lesion-level bootstrap replicates and seed.
        positive_class: class for sensitivity at fixed specificity (default: the run's).
        adapt: label-free adaptation to the data's images, any of "bn", "priors", "tta"
            (a comma list or a list; :mod:`dermkit.eval.adapt`).
        save_adaptation: with ``adapt``: write an adapted copy of the run folder there
            (adapted BN statistics, priors folded into the class scales) for
            ``dermkit export`` / ``serve``.
        priors_max_error: the EM check's limit (:func:`dermkit.eval.adapt.em_check`):
            priors are applied only when EM on the run's own val set lands within this
            total variation of val's label frequencies; None: always applied.

    Returns:
        {"report", "predictions", "metrics": paths, "result": the metrics dict, whose
        "external" entry says what was scored and what was dropped}.
    """
    from dermkit.core.devices import make_accelerator
    from dermkit.data.cache import build_cache
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.readers import load_dataset
    from dermkit.eval.inference import predict_logits
    from dermkit.models.runs_io import load_trained_classifier

    run_dir, data = Path(run_dir), Path(data)
    model, cfg, classes = load_trained_classifier(run_dir, "external evaluation")
    mapping = read_checked_label_map(label_map, classes) if label_map is not None else None
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"external-{data.name}"
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = load_dataset(
        data,
        layout=layout,
        skip_bad=skip_bad,
        label_map=mapping,
        classes=classes if mapping is None else None,
        rejects_path=out_dir / "rejects.csv" if skip_bad else None,
    )
    manifest = loaded.manifest
    present = set(manifest["label"])
    shared = [c for c in classes if c in present]
    keep = np.array([classes.index(c) for c in shared])

    cache = build_cache(
        manifest,
        cfg.data.image_size,
        cfg.data.crop,
        cache_dir if cache_dir is not None else cfg.data.cache_dir,
        progress=progress,
        colour_constancy=cfg.data.colour_constancy,  # the run's own preprocessing
    )
    # in_memory=False: an external set may be large; rows are gathered from the memmap.
    dataset = CachedImageDataset(cache, manifest, classes, in_memory=False)
    rule_path = run_dir / "decision.json"
    rule = DecisionRule.load(rule_path)

    def run_logits(model) -> np.ndarray:
        """Logits as the run predicted its own test split (its precision and TTA)."""
        return predict_logits(
            model,
            dataset,
            np.arange(len(dataset)),
            make_accelerator(cfg.optim.precision),
            batch_size=batch_size,
            tta=cfg.augment.tta,
        ).numpy()

    adapted = None
    if adapt:
        adapter = RunAdapter(
            run_dir, model, cfg, classes, rule, adapt, priors_max_error=priors_max_error
        )
        adapted = adapter(dataset, run_logits)
        logits, probs_all = adapted.logits, adapted.probs
    else:
        if save_adaptation is not None:
            raise ConfigError("--save-adaptation needs --adapt (which adaptations to save)")
        logits = run_logits(model)
        probs_all = rule.probs(logits)
    probs = probs_all[:, keep]
    probs = probs / probs.sum(axis=1, keepdims=True)
    y = manifest["label"].map({c: i for i, c in enumerate(shared)}).to_numpy()

    has_lesions = bool((manifest["lesion_id"] != manifest["image_id"]).any())
    top_all = np.asarray(classes)[probs_all.argmax(axis=1)]
    external = {
        "run": str(run_dir),
        "model": cfg.model.name,
        "data": str(data),
        "layout": loaded.layout,
        "label_map": str(label_map) if label_map is not None else None,
        "image_size": cfg.data.image_size,
        "crop": cfg.data.crop,
        "tta": cfg.augment.tta,
        "decision_rule": asdict(rule) if rule_path.exists() else None,
        "model_classes": classes,
        "scored_classes": shared,
        "model_classes_not_in_data": [c for c in classes if c not in present],
        "source_labels_dropped": loaded.dropped_by_label_map,
        "images_dropped_by_label_map": int(sum(loaded.dropped_by_label_map.values())),
        "images_rejected": len(loaded.rejects),
        "images_scored": len(manifest),
        "images_top_class_not_scored": int((~np.isin(top_all, shared)).sum()),
        "images_per_class": {c: int((manifest["label"] == c).sum()) for c in shared},
        "bootstrap_unit": "lesion_id" if has_lesions else "image_id (no lesion ids in the data)",
        "adaptation": _adaptation_record(adapted),
        "ood": _ood_record(run_dir, model, dataset, logits, batch_size, adapted),
    }
    if "source_label" in manifest.columns:
        merged = manifest.groupby("label")["source_label"].unique()
        external["merged_source_labels"] = {
            c: sorted(merged[c].tolist()) for c in shared if len(merged[c]) > 1
        }
    positive = positive_class or cfg.eval.positive_class
    result = evaluate_predictions(
        y,
        probs,
        shared,
        groups=manifest["lesion_id"].to_numpy(),
        n_boot=n_boot,
        ci=cfg.eval.ci,
        seed=seed,
        positive_class=positive,
    )
    result["grouped"] = has_lesions
    result["external"] = external
    predictions = _write_external_predictions(
        out_dir / EXTERNAL_PREDICTIONS, manifest, probs, shared, top_all
    )
    dropped = ", ".join(f"{k}: {v}" for k, v in external["source_labels_dropped"].items())
    report = write_evaluation_report(
        result,
        y,
        probs,
        shared,
        out_dir,
        title=f"dermkit external evaluation: {cfg.model.name} on {data.name}",
        extra={
            "run": str(run_dir),
            "dataset": f"{data} ({loaded.layout} layout)",
            "label map": external["label_map"] or "none (labels are the run's class names)",
            "preprocessing": f"{cfg.data.image_size} px, {cfg.data.crop}, TTA {cfg.augment.tta}",
            "decision rule": external["decision_rule"] or "none (no decision.json)",
            "scored classes": ", ".join(shared),
            "model classes not in the data (not scored)": ", ".join(
                external["model_classes_not_in_data"]
            )
            or "none",
            "source labels dropped by the label map (images)": dropped or "none",
            "source labels merged into one class": external.get("merged_source_labels") or "none",
            "images scored / rejected": f"{len(manifest)} / {len(loaded.rejects)}",
            "images whose top class over all model classes is not scored": external[
                "images_top_class_not_scored"
            ],
            "bootstrap unit": external["bootstrap_unit"],
            **(adaptation_rows(adapted) if adapted is not None else {}),
            **_ood_rows(external["ood"]),
        },
    )
    if save_adaptation is not None:
        saved = write_adapted_run(
            run_dir,
            save_adaptation,
            model,
            rule,
            adapted,
            {"target_data": str(data), "target_images": len(manifest), "layout": loaded.layout},
        )
        external["adaptation"]["saved_to"] = str(saved)
    log.info(
        "external evaluation: %d images, classes %s; not in data: %s; dropped by map: %s",
        len(manifest),
        shared,
        external["model_classes_not_in_data"],
        external["source_labels_dropped"],
    )
    return {
        "report": report,
        "predictions": predictions,
        "metrics": out_dir / "metrics.json",
        "result": result,
    }
