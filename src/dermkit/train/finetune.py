"""``dermkit finetune``: supervised training of a classifier with the shared training loop.

prepare data (split, cache, leakage check) -> the task's rows and labels
(``dermkit.tasks``: classification, or ordinal classes of a column) -> backbone (random
init, a local weights file, or a dermkit run) with the task's head width ->
``train_classifier`` (the task's loss; select on the task's val metric) -> best weights ->
predict test once -> the task's metrics with lesion-level CIs, learning curves,
report.html. The run folder holds ``model.safetensors`` (the selected weights),
``config.yaml`` and the task's files (classes.json, decision.json or ordinal.json), which
is all that later stages (distill, exits, export) need to load the model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermkit.core.devices import make_accelerator
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.manifest import read_synthetic_rows
from dermkit.data.prepare import PreparedData, prepare_data, write_split_file
from dermkit.eval.curves import plot_learning_curves
from dermkit.eval.inference import predict_logits
from dermkit.models.backbones import create_backbone
from dermkit.models.runs_io import architecture_kwargs
from dermkit.runs import RunDir
from dermkit.tasks import summary_rows, task_from_config
from dermkit.train.loop import load_best, train_classifier
from dermkit.train.settings import FinetuneRunConfig

log = logging.getLogger(__name__)


def build_model(cfg: FinetuneRunConfig, n_classes: int) -> tuple[torch.nn.Module, str]:
    """The configured backbone with a fresh head; returns (model, weights report text)."""
    m = cfg.model
    model = create_backbone(m.name, **architecture_kwargs(cfg, n_classes, m.input_norm))
    report = "random initialisation"
    if m.weights:
        from dermkit.models.weights import load_pretrained

        key_report = load_pretrained(model, m.weights)
        report = f"weights from {m.weights}: {key_report}"
        if key_report.provenance:
            model.dermkit_weights_provenance = key_report.provenance
        log.info("%s", report)
    return model, report


def resolve_model_config(cfg: FinetuneRunConfig) -> None:
    """Fix ``model.input_norm`` from the weights source, so config.yaml records the value.

    Why here: the normalisation must travel with the run (distill, export, serve and the
    web page read it from config.yaml), and ``auto`` would mean something else once the
    weights source is gone.
    """
    from dermkit.models.packaged import resolve_input_norm

    cfg.model.input_norm = resolve_input_norm(cfg.model.input_norm, cfg.model.weights)


def load_training_data(cfg: FinetuneRunConfig, run: RunDir) -> tuple[PreparedData, np.ndarray]:
    """Prepared data with synthetic rows appended when configured; returns (data, synth mask)."""
    manifest = None
    if cfg.synthetic_manifest:
        from dermkit.data.labels import load_label_map
        from dermkit.data.readers import load_dataset

        real = load_dataset(
            cfg.data.path,
            layout=cfg.data.layout,
            skip_bad=cfg.data.skip_bad,
            label_map=load_label_map(cfg.data.label_map) if cfg.data.label_map else None,
            classes=cfg.data.classes,
            rejects_path=run / "rejects.csv",
        ).manifest
        synth = read_synthetic_rows(cfg.synthetic_manifest)
        manifest = pd.concat([real, synth.assign(split="")], ignore_index=True)
    data = prepare_data(cfg.data, rejects_path=run / "rejects.csv", manifest=manifest)
    return data, data.part("train")["synthetic"].astype(bool).to_numpy()


def run_finetune(cfg: FinetuneRunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune end to end; returns the path of report.html."""
    resolve_model_config(cfg)
    task = task_from_config(cfg.task)
    task.check_config(cfg)
    accelerator = make_accelerator(cfg.optim.precision)
    # Under DDP every rank runs this function; rank 0 builds the image cache first and
    # writes every file, the others reuse its cache and only train.
    with RunDir(cfg.out_dir, cfg, "finetune", write=accelerator.is_main_process) as run:
        with accelerator.main_process_first():
            data, synthetic_mask = load_training_data(cfg, run)
        if accelerator.is_main_process:
            write_split_file(data.manifest, run / "split.csv")
        parts, synthetic_mask = task.prepare(data, synthetic_mask, cfg.task.drop_missing)
        classes = task.class_names
        datasets = {s: CachedImageDataset(data.cache, p, classes) for s, p in parts.items()}
        torch.manual_seed(cfg.seed)
        model, weights_report = build_model(cfg, task.n_outputs)
        if getattr(model, "dermkit_weights_provenance", None):
            run.info["pretrained_weights"] = model.dermkit_weights_provenance
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
            criterion=task.loop_criterion,
            to_probs=task.loop_probs,
        )
        model = load_best(model, run.path)
        logits = {
            s: predict_logits(
                model, datasets[s], np.arange(len(datasets[s])), accelerator, tta=cfg.augment.tta
            ).numpy()
            for s in ("val", "test")
        }
        if not accelerator.is_main_process:  # every rank predicted its shard; rank 0 writes
            return run / "report.html"
        # What maps logits to probabilities (the decision rule) is fitted on val only;
        # test is scored once with it.
        task.fit_probs(logits["val"], datasets["val"].labels.numpy(), cfg.decision_rule)
        probs = {s: task.probs(v) for s, v in logits.items()}
        shutil.copyfile(run / "best.safetensors", run / "model.safetensors")
        task.save(run.path)
        for s in ("val", "test"):
            task.write_predictions(run / f"predictions_{s}.csv", parts[s], probs[s])
        y_test = datasets["test"].labels.numpy()
        result = task.evaluate(y_test, probs["test"], parts["test"], cfg.eval, cfg.seed)
        extra = {
            "model": cfg.model.name,
            "initialisation": weights_report,
            **summary_rows(task, summary),
            "epochs run": summary["epochs_run"],
            "precision": summary["precision"],
            **task.probs_rows(cfg.decision_rule, logits["test"], y_test, result, cfg.seed),
            "processes": summary["processes"],
        }
        result["training"] = {k: v for k, v in summary.items() if k != "history"}
        result["history"] = summary["history"]
        curves = plot_learning_curves({cfg.model.name: summary["history"]})
        curves.savefig(run / "learning_curves.png", dpi=110)
        figures = {
            "learning_curves.png": f"Learning curves: loss and {task.selection_label} per "
            "epoch (dashed: clean train subset, solid: val) and the overfitting gap (train - "
            "val macro-F1)."
        }
        figures.update(task.report_figures(model, datasets["test"], parts["test"], run.path))
        kind = "" if task.kind == "classification" else f" ({task.kind} '{cfg.task.column}')"
        return task.write_report(
            result,
            y_test,
            probs["test"],
            parts["test"],
            run.path,
            title=f"dermkit finetune{kind}: {cfg.model.name} (test split)",
            extra=extra,
            extra_figures=figures,
        )
