"""``dermkit thickness study``: the whole melanoma-thickness study in one command.

Steps (each explained in its module):

1. read the thickness folder (``data/thickness.py``: HAM layout + thickness columns);
2. extract frozen features for every feature set (``explain/thickness.py``);
3. per grouping (3-class clinical, 4 categories): nested CV of linear probes, CORN and
   softmax heads, every choice on inner validation (``explain/thickness_cv.py``);
   optionally (``finetune``) the fine-tuning arm on the same outer folds: the network
   itself trained per fold, CORN and softmax heads (``explain/thickness_ft.py``);
4. analyses of the headline (``selected``) model's pooled out-of-fold predictions (the
   mean of the seeds' out-of-fold probabilities, one row per image): confusion matrix,
   ROC of invasive vs in situ and >= 0.76 mm vs below with bootstrap CIs, error and recall
   per true category, adjacent-category AUROC (does ordering improve with thickness?),
   Spearman; PCA/UMAP of the features with separability scores and a shuffled-label
   control; Grad-CAM panels per category with the randomisation sanity check;
5. ``report.html`` + ``metrics.json`` + ``folds.csv`` + ``oof_<grouping>.csv`` in ``out``
   (with the fine-tuning arm also ``oof_<grouping>_finetune_<head>.csv`` and
   ``finetune_curves_<grouping>.json``, the holdout score of every epoch).

Nothing from the data folder is copied: outputs hold image ids and numbers only, plus the
Grad-CAM panels (a few images, drawn into the run folder, never into the project).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermkit.data.thickness import BINARY_CUTS, GROUPINGS, THICKNESS_CATEGORIES, load_thickness
from dermkit.eval.plots import _new_figure, plot_confusion_matrix, save_figure
from dermkit.eval.report import HtmlReport, format_estimate, to_jsonable
from dermkit.explain.thickness import (
    FeatureSpec,
    build_encoder,
    embeddings,
    extract,
    gradcam_rows,
    load_images,
    probe_model,
    reduce_detail,
    separability,
)
from dermkit.explain.thickness_cv import (
    DEFAULT_CS,
    HEADS,
    SELECTED,
    FamilyResult,
    candidate_grid,
    cut_scores,
    nested_cv,
)
from dermkit.explain.thickness_ft import FinetuneArmConfig, finetune_cv

log = logging.getLogger(__name__)

HEADLINE_METRICS = (
    "balanced_accuracy",
    "qwk",
    "spearman",
    "auroc_invasive_vs_in_situ",
    "auroc_ge_0.76mm_vs_below",
    "accuracy",
    "mae",
)


@dataclass
class ThicknessStudyConfig:
    """Everything the study reads; defaults are the benchmark's settings."""

    data: Path
    out: Path
    features: list[str] = field(default_factory=lambda: ["tf_efficientnet_lite0@224:imagenet"])
    groupings: list[str] = field(default_factory=lambda: ["3class", "4class"])
    n_folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    inner_folds: int = 3
    cs: tuple[float, ...] = DEFAULT_CS
    heads: tuple[str, ...] = HEADS
    balanced: tuple[bool, ...] = (True, False)
    gradcam_per_class: int = 3
    n_random: int = 3
    n_shuffle: int = 200
    n_boot: int = 1000
    cache_dir: Path | None = None
    seed: int = 0
    n_jobs: int = 1
    finetune: FinetuneArmConfig | None = None  # None: probes only
    use_umap: bool = True  # UMAP beside PCA when umap-learn is installed

    def check(self) -> None:
        unknown = [g for g in self.groupings if g not in GROUPINGS]
        if unknown:
            raise ValueError(f"unknown grouping(s) {unknown}; expected {list(GROUPINGS)}")
        if not self.features:
            raise ValueError("at least one feature set is needed (--features)")
        if self.n_folds < 2 or self.inner_folds < 2 or not self.seeds:
            raise ValueError("n_folds and inner_folds must be >= 2, and seeds non-empty")
        if self.finetune is not None:
            self.finetune.check()


# ----------------------------------------------------------------------------- numbers


def bootstrap_auroc(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUROC with a percentile bootstrap interval (one image per case: image-level draws)."""
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return {"value": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            reps.append(roc_auc_score(y[i], score[i]))
    lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (None, None)
    return {"value": float(roc_auc_score(y, score)), "ci_low": lo, "ci_high": hi}


def pooled_analysis(y: np.ndarray, probs: np.ndarray, n_boot: int, seed: int) -> dict:
    """Analyses of pooled out-of-fold probabilities (N, K) against class codes y (N,)."""
    from sklearn.metrics import balanced_accuracy_score

    from dermkit.eval.ordinal import ordinal_metrics

    k = probs.shape[1]
    names = [str(i) for i in range(k)]
    ordinal = ordinal_metrics(y, probs, y.astype(float), names, n_boot=n_boot, seed=seed)
    expected = probs @ np.arange(k, dtype=np.float64)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, probs.argmax(1))),
        "qwk": ordinal["metrics"]["qwk"],
        "spearman": ordinal["metrics"]["spearman"],
        "confusion": ordinal["confusion"],
        "auroc": {
            name: bootstrap_auroc((y >= cut).astype(int), cut_scores(probs, cut), n_boot, seed)
            for name, cut in BINARY_CUTS.items()
        },
        # Ordering of neighbouring categories: does it improve with thickness?
        "adjacent_auroc": {
            f"{c} vs {c + 1}": bootstrap_auroc(
                (y[np.isin(y, [c, c + 1])] == c + 1).astype(int),
                expected[np.isin(y, [c, c + 1])],
                n_boot,
                seed,
            )
            for c in range(k - 1)
        },
    }


# ----------------------------------------------------------------------------- figures


def plot_rocs(y: np.ndarray, probs: np.ndarray) -> Figure:
    """ROC of P(class >= cut) for each binary cut of the seed study."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _new_figure(5.5, 5.0)
    ax = fig.subplots()
    for name, cut in BINARY_CUTS.items():
        truth = (y >= cut).astype(int)
        fpr, tpr, _ = roc_curve(truth, cut_scores(probs, cut))
        auc = roc_auc_score(truth, cut_scores(probs, cut))
        ax.plot(fpr, tpr, lw=1.5, label=f"{name.replace('_', ' ')} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Pooled out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_per_category(summary: dict, class_names: tuple[str, ...]) -> Figure:
    """Error (mean |predicted - true| class) and recall per true category, fold mean + CI."""
    fig = _new_figure(8.0, 3.6)
    axes = fig.subplots(1, 2)
    x = np.arange(len(class_names))
    for ax, (prefix, title) in zip(
        axes, (("mae", "error |pred - true| (classes)"), ("recall", "recall")), strict=True
    ):
        entries = [summary[f"{prefix}_{c}"] for c in range(len(class_names))]
        mean = np.asarray([e["value"] if e["value"] is not None else np.nan for e in entries])
        lo = np.asarray([e["ci_low"] if e["ci_low"] is not None else np.nan for e in entries])
        hi = np.asarray([e["ci_high"] if e["ci_high"] is not None else np.nan for e in entries])
        ax.bar(x, mean, color="tab:blue", alpha=0.8)
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="none", color="k", capsize=3)
        ax.set_xticks(x, class_names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return fig


def _same_size(images: list[np.ndarray]) -> np.ndarray:
    """uint8 (S_i, S_i, 3) images of feature sets of different sizes -> (B, S, S, 3)."""
    from PIL import Image

    size = max(im.shape[0] for im in images)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size))) for im in images])


def _plot_gradcam(images, trained, random, titles) -> Figure:
    from dermkit.explain.saliency import plot_overlays

    return plot_overlays(
        images, {"Grad-CAM": trained, "randomised": random}, titles, ["Grad-CAM", "randomised"]
    )


# ----------------------------------------------------------------------------- steps


@dataclass
class _FeatureSet:
    spec: FeatureSpec
    encoder: object
    mean: tuple
    std: tuple
    images: np.ndarray
    features: np.ndarray
    seconds: float


def _extract_all(cfg: ThicknessStudyConfig, manifest: pd.DataFrame) -> dict[str, _FeatureSet]:
    out = {}
    for text in cfg.features:
        spec = FeatureSpec.parse(text)
        start = time.perf_counter()
        encoder, mean, std = build_encoder(spec)
        images = load_images(manifest, spec.size, cfg.cache_dir)
        if spec.detail:
            images = reduce_detail(images, spec.detail)
        features = extract(encoder, images, mean, std, spec.tta)
        seconds = time.perf_counter() - start
        log.info("features %s: %s in %.1f s", spec, features.shape, seconds)
        out[str(spec)] = _FeatureSet(spec, encoder, mean, std, images, features, seconds)
    return out


def gradcam_family(results: dict[str, FamilyResult], sets: dict[str, _FeatureSet]) -> str | None:
    """The family whose probes Grad-CAM explains: the selected model when every choice it
    made has a network; else the network family the selection chose most (None: none)."""
    chosen = results[SELECTED].chosen_counts()
    deep = {c: n for c, n in chosen.items() if sets[c.split(" | ")[1]].encoder is not None}
    if deep and len(deep) == len(chosen):
        return SELECTED
    by_family = Counter()
    for c, n in deep.items():
        by_family[" | ".join(c.split(" | ")[:2])] += n
    networks = [f for f in results if f != SELECTED and sets[f.split(" | ")[1]].encoder]
    if by_family:
        return by_family.most_common(1)[0][0]
    return networks[0] if networks else None


def _gradcam_panels(
    cfg: ThicknessStudyConfig,
    sets: dict[str, _FeatureSet],
    result: FamilyResult,
    y: np.ndarray,
    grouping,
    manifest: pd.DataFrame,
    out: Path,
) -> tuple[dict[str, str], list[float]]:
    """One PNG per true class: images, out-of-fold Grad-CAM, randomised-copy Grad-CAM.

    Images are drawn per class, then explained in one batch per outer fold (seed of the
    first CV repeat), each by the probe of the fold that held it out (``result``: a family
    whose probes all read network features, see :func:`gradcam_family`).
    """
    seed = min(result.oof)
    fold_of = {}
    for (s, fold), test in result.test_index.items():
        if s == seed:
            fold_of.update({int(i): fold for i in test})
    rng = np.random.default_rng(cfg.seed)
    chosen = {
        c: np.sort(rng.choice(rows, min(cfg.gradcam_per_class, len(rows)), replace=False))
        for c in range(grouping.n_classes)
        if len(rows := np.flatnonzero(y == c))
    }
    maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rhos: list[float] = []
    every = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, np.int64)
    for fold in sorted({fold_of[int(i)] for i in every}):
        rows = np.asarray([i for i in every if fold_of[int(i)] == fold])
        probe = result.probes[(seed, fold)]
        fs = sets[probe.spec.features]
        model = probe_model(fs.encoder, probe.weight, probe.bias)
        ordinal = probe.spec.head == "corn"
        trained, random, rho = gradcam_rows(
            model, fs.images[rows], fs.mean, fs.std, ordinal, cfg.n_random, cfg.seed
        )
        rhos.extend(r for r in rho if np.isfinite(r))
        maps.update({int(i): (fs.images[i], trained[j], random[j]) for j, i in enumerate(rows)})
    figures = {}
    for c, rows in chosen.items():
        name = grouping.class_names[c]
        preds = [grouping.class_names[int(result.oof[seed][i].argmax())] for i in rows]
        titles = [
            f"{manifest['image_id'].iloc[i]}\ntrue {name}, pred {p}"
            for i, p in zip(rows, preds, strict=True)
        ]
        fig = _plot_gradcam(
            _same_size([maps[int(i)][0] for i in rows]),
            [maps[int(i)][1] for i in rows],  # maps of feature sets of different sizes:
            [maps[int(i)][2] for i in rows],  # a list, each upsampled to the image size
            titles,
        )
        png = f"gradcam_{grouping.name}_class{c}.png"
        save_figure(fig, out / png)
        figures[png] = f"{grouping.name}: true {name}; out-of-fold probe (seed {seed})"
    return figures, rhos


def _write_oof(path: Path, manifest: pd.DataFrame, y: np.ndarray, probs: np.ndarray) -> None:
    """One row per image: image_id, true class code, class probabilities p_0..p_{K-1}."""
    oof = pd.DataFrame({"image_id": manifest["image_id"], "true": y})
    for c in range(probs.shape[1]):
        oof[f"p_{c}"] = probs[:, c]
    oof.to_csv(path, index=False, float_format="%.5f")


def _finetune_arm(
    cfg: ThicknessStudyConfig, manifest: pd.DataFrame, y: np.ndarray, grouping, out: Path
) -> tuple[dict[str, FamilyResult], dict]:
    """The fine-tuning arm on one grouping: ({family: result}, {family: pooled analyses}).

    Writes ``oof_<grouping>_finetune_<head>.csv`` (out-of-fold probabilities averaged
    over the seeds, the format of ``oof_<grouping>.csv``) and the holdout curves.
    """
    ft = cfg.finetune
    results, curves = finetune_cv(
        ft,
        manifest,
        y,
        grouping.class_names,
        cfg.n_folds,
        cfg.seeds,
        cfg.cache_dir,
        fold_store=out / "finetune_folds" / grouping.name,
    )
    info = {}
    for head in ft.heads:
        r = results[ft.family(head)]
        name = f"oof_{grouping.name}_finetune_{head}.csv"
        _write_oof(out / name, manifest, y, r.mean_oof())
        info[ft.family(head)] = {
            "oof_file": name,
            "chosen": r.chosen_counts(),
            "pooled": pooled_analysis(y, r.mean_oof(), cfg.n_boot, cfg.seed),
        }
    path = out / f"finetune_curves_{grouping.name}.json"
    path.write_text(json.dumps(to_jsonable(curves), indent=2))
    return results, info


def _finetune_rows(info: dict) -> list[dict]:
    """Pooled out-of-fold figures of the fine-tuned families (bootstrap 95% CIs)."""
    rows = []
    for family, entry in info.items():
        pooled = entry["pooled"]
        rows.append(
            {
                "model (family)": family,
                "balanced accuracy": f"{pooled['balanced_accuracy']:.3f}",
                "QWK": format_estimate(pooled["qwk"]),
                "Spearman": format_estimate(pooled["spearman"]),
                **{f"AUROC {k}": format_estimate(v) for k, v in pooled["auroc"].items()},
            }
        )
    return rows


def _family_rows(results: dict[str, FamilyResult]) -> list[dict]:
    rows = []
    for family, r in results.items():
        s = r.summary()
        row = {"model (family)": family}
        row.update({m: format_estimate(s[m]) for m in HEADLINE_METRICS})
        row["most chosen"] = next(iter(r.chosen_counts()))
        rows.append(row)
    return rows


def _embedding_section(
    cfg: ThicknessStudyConfig, fs: _FeatureSet, category: np.ndarray, out: Path
) -> tuple[dict, dict[str, str]]:
    from dermkit.explain.features import plot_embedding

    labels = pd.Series([THICKNESS_CATEGORIES[c] for c in category], name="category")
    maps = embeddings(fs.features, cfg.seed, cfg.use_umap)
    scores, figures = {}, {}
    for grouping in (GROUPINGS[g] for g in cfg.groupings):
        y = grouping.classes_of(category)
        scores[grouping.name] = {
            "full features": separability(fs.features, y, cfg.n_shuffle, seed=cfg.seed),
            **{
                name: separability(coords, y, cfg.n_shuffle, seed=cfg.seed)
                for name, (coords, _) in maps.items()
            },
        }
    for name, (coords, axes) in maps.items():
        png = f"features_{name.lower()}.png"
        fig = plot_embedding(coords, labels, "thickness category", f"{name} of {fs.spec}", axes)
        save_figure(fig, out / png)
        figures[png] = f"{name} of the frozen features ({fs.spec}), by thickness category."
    return scores, figures


def _separability_rows(scores: dict) -> list[dict]:
    rows = []
    for grouping, spaces in scores.items():
        for space, per_score in spaces.items():
            for score, e in per_score.items():
                rows.append(
                    {
                        "labels": grouping,
                        "space": space,
                        "score": score,
                        "value": e["value"],
                        "shuffled mean": e["shuffled_mean"],
                        "shuffled 95th pct": e["shuffled_p95"],
                        "p (permutation)": e["p_value"],
                    }
                )
    return rows


# ----------------------------------------------------------------------------- the study


def run_thickness_study(cfg: ThicknessStudyConfig) -> Path:
    """Run the study (see module docstring); returns the path of report.html."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = load_thickness(cfg.data)
    category = manifest["category"].to_numpy()
    sets = _extract_all(cfg, manifest)
    features = {name: fs.features for name, fs in sets.items()}
    report = HtmlReport("dermkit thickness study: Breslow category from dermoscopy")
    report.add_paragraph(
        f"{len(manifest)} images (one per case) from {cfg.data}; categories "
        + ", ".join(
            f"{n}: {int((category == i).sum())}" for i, n in enumerate(THICKNESS_CATEGORIES)
        )
        + f". Outer {cfg.n_folds}-fold stratified CV x seeds {list(cfg.seeds)}; every choice "
        f"(feature set, head, C, class weighting) on an inner {cfg.inner_folds}-fold CV of the "
        "training fold. Fold metrics: mean [95% t-interval] over folds x seeds. Figures: the "
        "'selected' model's out-of-fold probabilities averaged over seeds."
    )
    metrics: dict = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "groupings": {}}
    fold_frames = []
    for gname in cfg.groupings:
        grouping = GROUPINGS[gname]
        y = grouping.classes_of(category)
        grid = candidate_grid(list(features), cfg.cs, cfg.heads, cfg.balanced)
        results = nested_cv(
            features,
            y,
            grouping.n_classes,
            grid,
            cfg.n_folds,
            cfg.seeds,
            cfg.inner_folds,
            cfg.n_jobs,
        )
        ft_results, ft_info = (
            _finetune_arm(cfg, manifest, y, grouping, out) if cfg.finetune else ({}, {})
        )
        for family, r in {**results, **ft_results}.items():
            fold_frames.append(pd.DataFrame(r.folds).assign(grouping=gname, family=family))
        headline = results[SELECTED]
        pooled_probs = headline.mean_oof()
        pooled = pooled_analysis(y, pooled_probs, cfg.n_boot, cfg.seed)
        summary = headline.summary()
        _write_oof(out / f"oof_{gname}.csv", manifest, y, pooled_probs)
        pngs = {
            f"confusion_{gname}.png": plot_confusion_matrix(
                pooled["confusion"], list(grouping.class_names)
            ),
            f"roc_{gname}.png": plot_rocs(y, pooled_probs),
            f"per_category_{gname}.png": plot_per_category(summary, grouping.class_names),
        }
        for png, fig in pngs.items():
            save_figure(fig, out / png)
        cam_family = gradcam_family(results, sets)
        gradcams, rhos = (
            _gradcam_panels(cfg, sets, results[cam_family], y, grouping, manifest, out)
            if cam_family
            else ({}, [])
        )
        metrics["groupings"][gname] = {
            "class_names": grouping.class_names,
            "families": {f: r.summary() for f, r in {**results, **ft_results}.items()},
            "chosen": headline.chosen_counts(),
            "finetune": ft_info,
            "pooled": pooled,
            "gradcam_family": cam_family,
            "gradcam_sanity_rho_mean": float(np.mean(rhos)) if rhos else None,
        }
        report.add_heading(f"{gname}: {' / '.join(grouping.class_names)}")
        report.add_table(
            _family_rows({**results, **ft_results}), "Fold mean [95% CI] per model family"
        )
        if ft_info:
            ft = cfg.finetune
            report.add_paragraph(
                f"Fine-tuned rows: {ft.name} trained in each outer training fold ({ft.epochs} "
                f"epochs, batch {ft.batch_size}, head lr {ft.head_lr:g}, layer decay "
                f"{ft.layer_decay:g}, EMA {ft.ema_decay}, class-weighted loss, flips/rot90/"
                f"affine/colour augmentation); the epoch kept is the best balanced accuracy "
                f"on a stratified {ft.holdout:.0%} holdout of the training fold ('most "
                "chosen'). The 'selected' row chooses among the probes only."
            )
            report.add_table(
                _finetune_rows(ft_info),
                "Fine-tuned: pooled out-of-fold (mean of the seeds), bootstrap 95% CI",
            )
        report.add_table(
            [{"candidate": k, "folds chosen": v} for k, v in headline.chosen_counts().items()],
            "What the inner validation chose (selected family)",
        )
        report.add_table(
            [
                {
                    "true class": n,
                    "n": int((y == c).sum()),
                    "error (classes)": format_estimate(summary[f"mae_{c}"]),
                    "recall": format_estimate(summary[f"recall_{c}"]),
                }
                for c, n in enumerate(grouping.class_names)
            ],
            "Per true category (fold mean [95% CI])",
        )
        report.add_table(
            [
                {"analysis": f"AUROC {k}", "pooled [bootstrap 95% CI]": format_estimate(v)}
                for k, v in {**pooled["auroc"], **pooled["adjacent_auroc"]}.items()
            ]
            + [
                {"analysis": m, "pooled [bootstrap 95% CI]": format_estimate(pooled[m])}
                for m in ("qwk", "spearman")
            ],
            "Pooled out-of-fold analyses (adjacent: expected class separating neighbours)",
        )
        for png in pngs:
            report.add_figure(out / png, png.removesuffix(".png").replace("_", " "))
        if rhos:
            report.add_paragraph(
                f"Grad-CAM of the '{cam_family}' probes. Sanity check: mean Spearman rho "
                "between trained and randomised "
                f"maps {np.mean(rhos):.3f} over {len(rhos)} images (low: the maps depend "
                "on the learned weights)."
            )
        for png, caption in gradcams.items():
            report.add_figure(out / png, caption)
    first = metrics["groupings"][cfg.groupings[0]]["chosen"]
    top = Counter({c.split(" | ")[1]: n for c, n in first.items()}).most_common(1)[0][0]
    sep, emb_figs = _embedding_section(cfg, sets[top], category, out)
    metrics["separability"] = {"features": top, "scores": sep}
    report.add_heading("Deep features: maps and separability")
    report.add_table(
        _separability_rows(sep),
        f"Separability of {top} by true category; shuffled: labels permuted {cfg.n_shuffle}x",
    )
    for png, caption in emb_figs.items():
        report.add_figure(out / png, caption)
    metrics["feature_seconds"] = {k: fs.seconds for k, fs in sets.items()}
    metrics["wall_seconds"] = time.perf_counter() - start
    pd.concat(fold_frames).to_csv(out / "folds.csv", index=False, float_format="%.5f")
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
    report.add_paragraph(f"Wall time {metrics['wall_seconds']:.0f} s.")
    report.add_link("metrics.json", "metrics.json")
    report.add_link("folds.csv", "folds.csv (every fold of every family)")
    return report.write(out / "report.html")
