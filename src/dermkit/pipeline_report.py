"""The pipeline's summary ``report.html``: one table of the stages and a link to each report.

Per stage: what it does, whether it ran, resumed, was reused from the cache (same key) or
is off, its wall time (this run's, and that of the run that produced the folder), its key
figure and the folder. The evaluate stage's table of every classifier is repeated here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dermkit.eval.report import HtmlReport, markdown_rows


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
    report.add_paragraph(
        f"Pipeline file {cfg.source}, preset {cfg.preset}, seed {cfg.seed}; data: "
        f"{_source_text(result)}. This run: {len(ran)} stage(s) computed "
        f"({', '.join(ran) or 'none'}), the others reused from {out} where their key "
        f"(config + inputs) was unchanged. Wall time {seconds:.0f} s, finished "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}."
    )
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
    links = [(n, r) for n, r in result.records.items() if r.report and r.status != "failed"]
    if links:
        report.add_heading("Stage reports")
        for name, r in links:
            report.add_link(r.report, f"{name}: {r.title}")
    evaluate = result.records.get("evaluate")
    if evaluate is not None and evaluate.path and evaluate.status in ("ran", "resumed", "cached"):
        table = Path(evaluate.path) / "table.md"
        if table.exists():
            report.add_heading("Classifiers (evaluate stage)")
            report.add_table(markdown_rows(table.read_text()), caption="test split")
    report.add_heading("Pipeline")
    report.add_paragraph(json.dumps(cfg.model_dump(mode="json", exclude={"source"}), indent=1))
    return report.write(out / "report.html")
