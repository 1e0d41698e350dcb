"""``dermkit compare``: the same fine-tuning recipe from several initialisations, side by side.

This is the comparison the domain-pretraining studies make (e.g. VAE vs ImageNet weights,
arXiv 2505.16773; MAE vs ImageNet, arXiv 2602.19848): identical data, split, schedule and
seed; only ``model.weights`` differs. Each initialisation is an ordinary finetune run in
``out_dir/<name>`` (so it resumes and can be inspected alone); the comparison adds the
learning curves and overfitting gaps on one figure and a table of test metrics with CIs.

Beside each fine-tune, a linear probe of the arm's *initial* encoder, frozen (``probe``,
on by default): the paper reports both read-outs, and the probe says what a start is worth
before any fine-tuning can make up for it (random init gives the floor). Cached in
``out_dir/probe-<name>.json``, keyed by model, weights, size and seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from dermkit.core.files import write_json_atomic
from dermkit.eval.curves import curve_summary, plot_learning_curves
from dermkit.eval.report import HtmlReport, format_estimate
from dermkit.models.weights import pretrain_backbone
from dermkit.runs import RunDir
from dermkit.train.finetune import resolve_model_config, run_finetune
from dermkit.train.settings import CompareArm, CompareRunConfig, FinetuneRunConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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
        results, models, sources, probes = {}, {}, {}, {}
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
            if cfg.probe:
                probes[name] = arm_probe(sub, run / f"probe-{name}.json")
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
                    **_probe_columns(probes.get(name)),
                    "best val macro-F1": best.get("val_macro_f1"),
                    "gap at best epoch": best.get("gap_macro_f1"),
                    "final gap": hist[-1].get("gap_macro_f1") if hist else None,
                    **_curve_columns(curve_summary(hist)),
                }
            )
        (run / "compare.json").write_text(json.dumps(rows, indent=2))
        report = HtmlReport("dermkit compare: initialisations under identical fine-tuning")
        report.add_paragraph(
            f"Model {cfg.finetune.model.name} (unless a pretraining run names another "
            f"backbone), {cfg.finetune.optim.epochs} epochs, seed "
            f"{cfg.finetune.seed}, image size {cfg.finetune.data.image_size}; only the "
            "initial weights differ. Test metrics with 95% lesion-level bootstrap CIs; the "
            "gap is clean-train minus val macro-F1 (larger = more overfitting). Probe: a "
            "class-balanced logistic regression on the initial encoder's frozen features "
            "(eval/probe.py), before any fine-tuning. Convergence: the first epoch whose "
            "val macro-F1 reaches 90% of the run's best; gap slope: the least-squares change "
            "of the gap per epoch (> 0: overfitting grows); val slope: the change of val "
            "macro-F1 per epoch over the second half (> 0: still improving)."
        )
        report.add_table(rows, caption="test split")
        report.add_figure(
            run / "compare_curves.png",
            "learning curves (dashed train, solid val) and overfitting gap",
        )
        for name in results:
            report.add_link(f"{name}/report.html", f"{name}: full report")
        return report.write(run / "report.html")


def arm_probe(cfg: FinetuneRunConfig, path: Path) -> dict:
    """Linear-probe and k-NN macro-F1 (val, test) of the arm's initial encoder, frozen.

    The encoder is the arm's backbone with its initial weights (random init: seeded by the
    recipe's seed), at the recipe's image size, probed on the recipe's split. Reused from
    ``path`` when it holds the same key.
    """
    import torch

    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.prepare import prepare_data
    from dermkit.eval.probe import probe_encoder
    from dermkit.models.backbones import create_backbone

    key = {
        "model": cfg.model.name,
        "weights": cfg.model.weights,
        "input_norm": cfg.model.input_norm,
        "image_size": cfg.data.image_size,
        "seed": cfg.seed,
    }
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    torch.manual_seed(cfg.seed)
    encoder = create_backbone(
        cfg.model.name,
        num_classes=0,
        img_size=cfg.data.image_size,
        weights=cfg.model.weights,
        input_norm=cfg.model.input_norm,
    )
    data = prepare_data(cfg.data)
    sets = {s: CachedImageDataset(data.cache, data.part(s), data.classes) for s in SPLITS}
    result = probe_encoder(encoder, sets["train"], sets["val"], sets["test"], seed=cfg.seed)
    log.info(
        "compare: linear probe of %s's start: val macro-F1 %.3f",
        path.stem,
        result["linear_val_macro_f1"],
    )
    record = {"key": key, **result}
    write_json_atomic(path, record)
    return record


def _probe_columns(probe: dict | None) -> dict:
    if probe is None:
        return {}
    return {
        "probe val macro-F1": round(probe["linear_val_macro_f1"], 3),
        "probe test macro-F1": round(probe["linear_test_macro_f1"], 3),
    }


def _curve_columns(summary: dict) -> dict:
    """The convergence and gap-trend columns of one arm (``eval.curves.curve_summary``)."""
    if not summary:
        return {}

    def r(v):
        return None if v is None else round(v, 4)

    return {
        "epochs to 90% of best val": summary["epochs_to_90pct_best"],
        "gap slope / epoch": r(summary.get("gap_slope")),
        "val slope / epoch, 2nd half": r(summary["val_slope_second_half"]),
    }
