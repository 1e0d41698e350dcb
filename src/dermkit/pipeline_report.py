"""The pipeline's summary ``report.html``: what ran, what came out, and each stage's picture.

One self-contained HTML file (figures are base64 PNGs, no external asset) with, in order:
a notice when the data are phantoms (the models are demo models, not for real lesions);
the evaluate stage's table of every classifier; one table of the stages (whether each ran,
resumed, was reused from the cache or is off, its times, key figure and folder); then per
stage its key figure as pictures, reused from the PNGs the stage already drew into its
folder (:data:`STAGE_FIGURES`: the phantom grid, the autoencoder's reconstructions,
samples per class, learning curves, confusion matrices, the exits' accuracy against
compute, saliency panels) and a link to its own report; last, the pipeline config as YAML.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dermkit.eval.report import HtmlReport, markdown_rows

DEMO_DATA_NOTICE = (
    "Demo data: every image in this pipeline is a phantom drawn by dermkit's generator, not "
    "a real lesion. Its models are demo models: not for real lesions."
)


@dataclass(frozen=True)
class FigureSpec:
    """PNG(s) of a stage folder to show: ``pattern`` (a glob relative to the folder),
    which matches to take (``first``, ``last`` or ``all``, in name order) and a caption
    (``{name}``: the file name without ``.png`` and the pattern's fixed prefix)."""

    pattern: str
    caption: str
    take: str = "first"


MAX_PER_SPEC = 8  # "all" shows at most this many (one per class for 7 classes)

STAGE_FIGURES: dict[str, tuple[FigureSpec, ...]] = {
    "data": (FigureSpec("phantom_grid.png", "input images, one per class first"),),
    "baseline": (FigureSpec("confusion_matrix.png", "confusion matrix (test)"),),
    "autoencoder": (FigureSpec("reconstructions.png", "images and their reconstructions"),),
    "diffusion": (FigureSpec("samples.png", "samples of the generator"),),
    "sample": (FigureSpec("grid_*.png", "synthetic {name}", "all"),),
    "pretrain": (FigureSpec("grids/epoch-*.png", "MAE reconstructions, last epoch", "last"),),
    "teacher": (
        FigureSpec("learning_curves.png", "learning curves"),
        FigureSpec("confusion_matrix.png", "confusion matrix (test)"),
    ),
    "distill": (
        FigureSpec("learning_curves.png", "learning curves"),
        FigureSpec("confusion_matrix.png", "confusion matrix (test)"),
        FigureSpec("teacher_vs_student.png", "teacher against student"),
    ),
    "exits": (FigureSpec("curves.png", "accuracy and macro-F1 against compute"),),
    "explain": (
        FigureSpec("saliency/saliency/class_*.png", "saliency: {name}", "all"),
        FigureSpec("features/pca_label.png", "features (PCA) by class"),
    ),
}


def stage_figures(stage: str, folder: Path) -> list[tuple[Path, str]]:
    """(PNG path, caption) of a finished stage folder, in :data:`STAGE_FIGURES` order;
    files a stage did not draw (another method, a switched-off part) are left out."""
    shown = []
    for spec in STAGE_FIGURES.get(stage, ()):
        matches = sorted(folder.glob(spec.pattern))
        if spec.take == "first":
            matches = matches[:1]
        elif spec.take == "last":
            matches = matches[-1:]
        prefix = Path(spec.pattern).name.split("*")[0]
        for path in matches[:MAX_PER_SPEC]:
            name = path.stem.removeprefix(prefix)
            shown.append((path, spec.caption.format(name=name)))
    return shown


def config_yaml(cfg) -> str:
    """The pipeline config as readable YAML (what ``yaml.safe_load`` reads back)."""
    data = cfg.model_dump(mode="json", exclude={"source"})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=88)


def _source_text(result) -> str:
    d = result.config.data
    if d.phantoms is not None:
        p = d.phantoms
        return f"{p.n_lesions} phantom lesions (seed {p.seed}), drawn offline"
    split = f"split file {d.split_file}" if d.split_file else f"split seed {result.config.seed}"
    return f"{d.path} ({split})"


def write_summary_report(result, seconds: float) -> Path:
    """Write ``<out_dir>/report.html`` for a :class:`dermkit.pipeline.PipelineResult`."""
    cfg = result.config
    out = Path(cfg.out_dir)
    report = HtmlReport(f"dermkit pipeline {cfg.name}")
    ran = result.executed
    if cfg.data.phantoms is not None:
        report.add_paragraph(DEMO_DATA_NOTICE, css_class="demo")
    report.add_paragraph(
        f"Pipeline file {cfg.source}, preset {cfg.preset}, seed {cfg.seed}; data: "
        f"{_source_text(result)}. This run: {len(ran)} stage(s) computed "
        f"({', '.join(ran) or 'none'}), the others reused from {out} where their key "
        f"(config + inputs) was unchanged. Wall time {seconds:.0f} s, finished "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}."
    )
    _add_classifiers(report, result)
    rows = []
    for name, r in result.records.items():
        rows.append(
            {
                "stage": name,
                "what": r.title,
                "status": r.status,
                "key": r.key[:10] if r.key else None,
                "this run (s)": r.seconds,
                "this run CPU (s)": r.cpu_s,
                "stage wall (s)": r.wall_s,
                "key figure": r.error or r.metric,
                "folder": os.path.relpath(r.path, out) if r.path else None,
            }
        )
    report.add_heading("Stages")
    report.add_table(rows, caption="ran / resumed: computed now; cached: reused (same key)")
    _add_stage_sections(report, result)
    report.add_heading("Pipeline config")
    report.add_preformatted(config_yaml(cfg), css_class="config")
    return report.write(out / "report.html")


def _add_classifiers(report: HtmlReport, result) -> None:
    """The evaluate stage's table of every classifier, when it has one."""
    evaluate = result.records.get("evaluate")
    if evaluate is None or not evaluate.path or evaluate.status not in _FINISHED:
        return
    table = Path(evaluate.path) / "table.md"
    if table.exists():
        report.add_heading("Classifiers (evaluate stage)")
        report.add_table(markdown_rows(table.read_text()), caption="test split")


_FINISHED = ("ran", "resumed", "cached")


def _add_stage_sections(report: HtmlReport, result) -> None:
    """Per finished stage: its key figure, its pictures and the link to its own report."""
    report.add_heading("Stage by stage")
    for name, r in result.records.items():
        if r.status not in _FINISHED or not r.path:
            continue
        report.add_heading(f"{name}: {r.title}", level=3)
        if r.metric:
            report.add_paragraph(r.metric, css_class="note")
        figures = stage_figures(name, Path(r.path))
        if figures:
            report.begin_group("figures")
            for path, caption in figures:
                report.add_figure(path, f"{name}: {caption}")
            report.end_group()
        if r.report:
            report.add_link(r.report, f"{name}: full report")
