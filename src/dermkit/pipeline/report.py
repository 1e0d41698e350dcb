"""The pipeline's summary ``report.html``: what ran, what came out, and each stage's picture.

One self-contained HTML file (figures are base64 PNGs, no external asset) with, in order:
a notice when the data are phantoms (the models are demo models, not for real lesions);
the evaluate stage's table of every classifier; one table of the stages (whether each ran,
resumed, was reused from the cache or is off, its times, key figure and folder); then per
stage its key figure as pictures, reused from the PNGs the stage already drew into its
folder (each :class:`~dermkit.pipeline.runner.Stage`'s ``figures``: the phantom grid, the
autoencoder's reconstructions, samples per class, learning curves, confusion matrices,
the exits' accuracy against compute, saliency panels), its table where it has one (the
synthetic images drawn and kept per class) and a link to its own report; last, the
pipeline config as YAML.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from dermkit.eval.report import HtmlReport, markdown_rows
from dermkit.pipeline.product import add_product_section
from dermkit.pipeline.runner import PipelineResult, stage_figures

DEMO_DATA_NOTICE = (
    "Demo data: every image in this pipeline is a phantom drawn by dermkit's generator, not "
    "a real lesion. Its models are demo models: not for real lesions."
)


def config_yaml(cfg) -> str:
    """The pipeline config as readable YAML (what ``yaml.safe_load`` reads back)."""
    data = cfg.model_dump(mode="json", exclude={"source"})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=88)


def _source_text(result: PipelineResult) -> str:
    d = result.config.data
    if d.phantoms is not None:
        p = d.phantoms
        return f"{p.n_lesions} phantom lesions (seed {p.seed}), drawn offline"
    split = f"split file {d.split_file}" if d.split_file else f"split seed {result.config.seed}"
    return f"{d.path} ({split})"


def write_summary_report(result: PipelineResult, seconds: float) -> Path:
    """Write ``<out_dir>/report.html`` of a DerMAE pipeline's run (``run_pipeline``'s
    ``summary``)."""
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
    _add_product(report, result)
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


def _add_product(report: HtmlReport, result: PipelineResult) -> None:
    """What the pipeline ships (``pipeline/product.py``): the student when distill ran, else
    the fine-tune, with its export and its speed against the teacher."""
    shipped = next(
        (
            r
            for name in ("distill", "finetune")
            if (r := result.records.get(name)) is not None and r.path and r.status in _FINISHED
        ),
        None,
    )
    if shipped is None:
        return
    export = result.records.get("export")
    exported = Path(export.path) if export and export.path and export.status in _FINISHED else None
    add_product_section(report, Path(shipped.path), exported)


def _add_classifiers(report: HtmlReport, result: PipelineResult) -> None:
    """The evaluate stage's table of every classifier, when it has one."""
    evaluate = result.records.get("evaluate")
    if evaluate is None or not evaluate.path or evaluate.status not in _FINISHED:
        return
    table = Path(evaluate.path) / "table.md"
    if table.exists():
        report.add_heading("Classifiers (evaluate stage)")
        report.add_table(markdown_rows(table.read_text()), caption="test split")


_FINISHED = ("ran", "resumed", "cached")


def _add_stage_sections(report: HtmlReport, result: PipelineResult) -> None:
    """Per finished stage: its key figure, its pictures and the link to its own report."""
    report.add_heading("Stage by stage")
    for name, r in result.records.items():
        if r.status not in _FINISHED or not r.path:
            continue
        report.add_heading(f"{name}: {r.title}", level=3)
        if r.metric:
            report.add_paragraph(r.metric, css_class="note")
        stage = result.stages.get(name)
        table = stage.table(Path(r.path)) if stage is not None and stage.table else None
        if table is not None:
            report.add_table(table[1], caption=f"{name}: {table[0]}")
        figures = stage_figures(stage, Path(r.path)) if stage is not None else []
        if figures:
            report.begin_group("figures")
            for path, caption in figures:
                report.add_figure(path, f"{name}: {caption}")
            report.end_group()
        if r.report:
            report.add_link(r.report, f"{name}: full report")
