"""``dermkit distill task.kind=ordinal``: a CORN student distilled from a CORN teacher run.

Teacher and student predict the same ordered classes of one manifest column (same column,
thresholds or order: ``distill.check_teacher_task``). The KD term matches the K-1
conditional probabilities P(y > k | y > k-1) of the two CORN heads (``kd.OrdinalKDLoss``);
the label term is the CORN loss. Everything else is ordinal fine-tuning
(``ordinal_finetune.py``): labels from the task column, selection on val QWK, no decision
rule, predictions with the column's value and the expected value, ordinal metrics (QWK,
MAE, Spearman/Pearson with lesion-level CIs), plus the teacher's metrics on the same test
images and bootstrap draws, side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dermkit.config import ConfigError, DistillRunConfig
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import write_split_file
from dermkit.eval.ordinal import ordinal_metrics, write_ordinal_report
from dermkit.models.backbones import input_norm_of
from dermkit.models.runs_io import WEIGHTS_FILE
from dermkit.models.weights import save_weights
from dermkit.runs import RunDir
from dermkit.train.distill import (
    ResizeInput,
    check_teacher_split,
    distillation_info,
    options_text,
    split_logits,
    teacher_student_figures,
    train_student,
)
from dermkit.train.finetune import load_training_data
from dermkit.train.loop import make_accelerator
from dermkit.train.ordinal import OrdinalTask, corn_class_probs, expected_value
from dermkit.train.ordinal_finetune import ordinal_parts, write_ordinal_predictions


def _class_probs(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conditional logits (N, K-1) per split -> class probabilities (N, K)."""
    return {s: corn_class_probs(torch.from_numpy(v)).numpy() for s, v in logits.items()}


def run_ordinal_distill(
    cfg: DistillRunConfig,
    teacher: tuple,
    student: tuple,
    teacher_logits: tuple[str, str],
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Distil an ordinal run end to end; returns the path of report.html.

    Args:
        teacher: (model, run config, class names) of the teacher run (``distill.load_teacher``).
        student: (model with a K-1 head, initialisation report) (``distill.build_student``).
        teacher_logits: ("online" | "cached", reason) (``distill.resolve_teacher_logits``).
    """
    teacher_model, teacher_cfg, teacher_classes = teacher
    student_model, weights_report = student
    mode, reason = teacher_logits
    if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
        raise ConfigError("task.kind=ordinal: mixup/cutmix do not apply (CORN needs hard labels)")
    task = OrdinalTask.from_config(cfg.task)
    classes = task.class_names
    teacher_dir = Path(cfg.teacher)
    if list(teacher_classes) != classes:
        raise ConfigError(
            f"classes differ: teacher {teacher_dir} has {teacher_classes}, this run's ordinal "
            f"task has {classes} (check task.column/thresholds/order against the teacher's)"
        )
    accelerator = make_accelerator(cfg.optim.precision)
    with RunDir(cfg.out_dir, cfg, "distill", write=accelerator.is_main_process) as run:
        with accelerator.main_process_first():
            data, synthetic_mask = load_training_data(cfg, run)
        check_teacher_split(teacher_dir, data.manifest)
        if accelerator.is_main_process:
            write_split_file(data.manifest, run / "split.csv")
        parts, synthetic_mask = ordinal_parts(data, task, cfg.task.drop_missing, synthetic_mask)
        task.fit_centres(parts["train"][~synthetic_mask])
        datasets = {s: CachedImageDataset(data.cache, p, classes) for s, p in parts.items()}

        size = teacher_cfg.data.image_size
        resized = ResizeInput(teacher_model, size, input_norm_of(student_model))
        resized = resized.to(accelerator.device).eval()
        resized.requires_grad_(False)
        student_model, summary, cache_file = train_student(
            cfg,
            run.path,
            accelerator,
            student_model,
            resized,
            teacher_dir,
            datasets,
            synthetic_mask,
            mode,
            resume,
            progress,
            to_probs=corn_class_probs,
        )
        eval_sets = {s: datasets[s] for s in ("val", "test")}
        probs = _class_probs(split_logits(student_model, eval_sets, accelerator, cfg.augment.tta))
        teacher_probs = _class_probs(
            split_logits(resized, eval_sets, accelerator, teacher_cfg.augment.tta)
        )
        if not accelerator.is_main_process:
            return run / "report.html"
        save_weights(student_model, run / WEIGHTS_FILE)  # the student alone
        (run / "classes.json").write_text(json.dumps(classes))
        (run / "ordinal.json").write_text(json.dumps(task.to_dict(), indent=2))
        for s in ("val", "test"):
            write_ordinal_predictions(run / f"predictions_{s}.csv", parts[s], probs[s], task)

        test = parts["test"]
        y_test = datasets["test"].labels.numpy()
        truth = task.truth(test)
        value = expected_value(probs["test"], task.centres)

        def evaluate(p: np.ndarray) -> dict:  # same images, lesions and bootstrap draws
            return ordinal_metrics(
                y_test,
                p,
                truth,
                classes,
                expected_value=expected_value(p, task.centres),
                groups=test["lesion_id"].to_numpy(),
                n_boot=cfg.eval.n_boot,
                ci=cfg.eval.ci,
                seed=cfg.seed,
            )

        result, teacher_result = evaluate(probs["test"]), evaluate(teacher_probs["test"])
        from dermkit.models.cost import model_cost

        cost = {
            "teacher": model_cost(teacher_model, size),
            "student": model_cost(student_model, cfg.data.image_size),
        }
        result["distillation"] = {
            **distillation_info(cfg, teacher_dir, teacher_cfg, mode, reason),
            "teacher_logits_file": cache_file.name if cache_file else None,
            "cost": cost,
            "teacher_metrics": teacher_result["metrics"],
        }
        side_by_side = teacher_student_figures(
            run.path, cfg, teacher_cfg, teacher_result, result, summary["history"]
        )
        return write_ordinal_report(
            result,
            y_test,
            probs["test"],
            truth,
            run.path,
            title=f"dermkit distill (ordinal '{task.column}'): {teacher_cfg.model.name} -> "
            f"{cfg.model.name} (test split)",
            expected_value=value,
            extra={
                "teacher run": str(teacher_dir),
                "teacher logits": f"{mode} ({reason})",
                "distillation terms": options_text(cfg),
                **side_by_side,
                "student initialisation": weights_report,
                "task": task.to_dict(),
                "best epoch (val QWK)": summary["best_epoch"],
                "best val QWK": round(summary["best_val_macro_f1"], 4),
                "epochs run": summary["epochs_run"],
                "training": {k: v for k, v in summary.items() if k != "history"},
                "history": summary["history"],
            },
            extra_figures={
                "teacher_vs_student.png": "Teacher vs student on the same test images: ordinal "
                "metrics with lesion-level bootstrap CIs (same bootstrap draws for both).",
                "learning_curves.png": "Student learning curves (val: solid, clean train "
                "subset: dashed); the best epoch is the best val QWK.",
            },
        )
