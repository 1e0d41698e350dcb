"""``dermkit compare``: the same fine-tuning recipe from several initialisations, side by side.

This is the comparison the domain-pretraining studies make (e.g. VAE vs ImageNet weights,
arXiv 2505.16773; MAE vs ImageNet, arXiv 2602.19848): identical data, split, schedule and
seed; only ``model.weights`` differs. Each initialisation is an ordinary finetune run in
``out_dir/<name>`` (so it resumes and can be inspected alone); the comparison adds the
learning curves and overfitting gaps on one figure and a table of test metrics with CIs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from dermkit.eval.curves import plot_learning_curves
from dermkit.eval.report import HtmlReport, format_estimate
from dermkit.models.weights import pretrain_backbone
from dermkit.runs import RunDir
from dermkit.train.finetune import resolve_model_config, run_finetune
from dermkit.train.settings import CompareArm, CompareRunConfig, FinetuneRunConfig

log = logging.getLogger(__name__)

TABLE_METRICS = ("macro_f1", "balanced_accuracy", "macro_auroc", "mel_sens_at_spec90", "ece")


def finished_with_config(run_dir: Path, cfg: FinetuneRunConfig) -> bool:
    """True when ``run_dir`` holds a finished fine-tune whose resolved config equals ``cfg``.

    Such a run is reused rather than repeated: adding an initialisation to a comparison
    (say, an MAE run next to an existing random-init one) costs one fine-tune, not all.
    """
    if not (run_dir / "metrics.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        return FinetuneRunConfig.model_validate(saved) == cfg
    except (yaml.YAMLError, ValueError):
        return False


def parse_init(text: str) -> tuple[str, str | CompareArm | None]:
    """``NAME=WEIGHTS`` or ``NAME=WEIGHTS@MODEL`` (the CLI's ``--init``) -> (name, init).

    ``random`` as WEIGHTS means no weights; ``@MODEL`` gives the arm its own backbone.
    """
    name, sep, value = text.partition("=")
    weights, at, model = value.rpartition("@") if "@" in value else (value, "", "")
    if not sep or not name or not weights or (at and not model):
        raise ValueError(f"--init {text!r} must look like NAME=WEIGHTS or NAME=WEIGHTS@MODEL")
    weights = None if weights == "random" else weights
    return name, CompareArm(model=model, weights=weights) if at else weights


def compare_overrides(overrides: list[str]) -> list[str]:
    """Overrides of a compare run, where a bare key addresses the shared fine-tuning recipe.

    ``optim.epochs=3`` -> ``finetune.optim.epochs=3``; keys of the compare run itself
    (``out_dir``, ``inits``, ``finetune``) stay as they are.
    """
    own = tuple(CompareRunConfig.model_fields)
    return [o if o.split("=", 1)[0].split(".")[0] in own else f"finetune.{o}" for o in overrides]


def run_compare(cfg: CompareRunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune once per initialisation, then write the comparison report; returns its path."""
    if not cfg.inits:
        raise ValueError("compare needs at least one entry under 'inits'")
    with RunDir(cfg.out_dir, cfg, "compare") as run:
        results, models, sources = {}, {}, {}
        for name, init in cfg.inits.items():
            sub = cfg.finetune.model_copy(deep=True)
            weights = init.weights if isinstance(init, CompareArm) else init
            if isinstance(init, CompareArm) and init.model:
                sub.model.name = init.model
            sub.model.weights = weights
            # A pretraining run names its backbone (encoder.json): the VAE arm is a CNN
            # encoder beside ViT arms, so the arm's architecture follows its weights.
            backbone = pretrain_backbone(weights)
            if backbone and backbone != sub.model.name:
                log.info("compare: '%s' uses its encoder's backbone %s", name, backbone)
                sub.model.name = backbone
            sub.out_dir = str(run / name)
            resolve_model_config(sub)  # as run_finetune writes it, so a finished arm matches
            done = run / name / "metrics.json"
            if finished_with_config(run / name, sub):
                log.info("compare: reusing finished run '%s' (identical config)", name)
            else:
                log.info("compare: fine-tuning '%s' from %s", name, weights or "random init")
                run_finetune(sub, resume=resume, progress=progress)
            results[name] = json.loads(done.read_text())
            models[name] = sub.model.name
            sources[name] = weights or "random"
        histories = {n: r["history"] for n, r in results.items()}
        plot_learning_curves(histories).savefig(run / "compare_curves.png", dpi=110)
        rows = []
        for name, r in results.items():
            m, hist = r["metrics"], r["history"]
            best = max(hist, key=lambda h: h["val_macro_f1"]) if hist else {}
            rows.append(
                {
                    "init": name,
                    "model": models[name],
                    "weights": sources[name],
                    **{k: format_estimate(m[k]) for k in TABLE_METRICS if k in m},
                    "best val macro-F1": best.get("val_macro_f1"),
                    "gap at best epoch": best.get("gap_macro_f1"),
                    "final gap": hist[-1].get("gap_macro_f1") if hist else None,
                }
            )
        (run / "compare.json").write_text(json.dumps(rows, indent=2))
        report = HtmlReport("dermkit compare: initialisations under identical fine-tuning")
        report.add_paragraph(
            f"Model {cfg.finetune.model.name} (unless a pretraining run names another "
            f"backbone), {cfg.finetune.optim.epochs} epochs, seed "
            f"{cfg.finetune.seed}, image size {cfg.finetune.data.image_size}; only the "
            "initial weights differ. Test metrics with 95% lesion-level bootstrap CIs; the "
            "gap is clean-train minus val macro-F1 (larger = more overfitting)."
        )
        report.add_table(rows, caption="test split")
        report.add_figure(
            run / "compare_curves.png",
            "learning curves (dashed train, solid val) and overfitting gap",
        )
        for name in results:
            report.add_link(f"{name}/report.html", f"{name}: full report")
        return report.write(run / "report.html")
