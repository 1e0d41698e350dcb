"""One table of several classifier runs on their test split (the pipeline's evaluate stage).

Each run is summarised by the given ``summarize`` (the pipeline passes
:func:`dermkit.exits.summary.summarize_run`, which knows every run kind: test metrics with
lesion-level bootstrap CIs, params, GFLOPs, batch-1 latency); writes ``table.md``,
``metrics.json`` (every row's numbers) and ``report.html`` linking each run's own report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dermkit.core.files import write_json_atomic
from dermkit.eval.report import HtmlReport, markdown_rows, to_jsonable
from dermkit.eval.summary import ablation_table_markdown


def run_table(
    runs: dict[str, str | Path],
    out: str | Path,
    summarize: Callable[..., dict],
    latency: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> Path:
    """Summarise ``runs`` (row name -> run folder) into ``out``; returns its report path.

    ``summarize(run_dir, latency=, n_boot=, seed=) -> summary dict`` summarises one run
    (:func:`dermkit.eval.summary.summarize_classifier_run` for classifier runs only).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        (name, summarize(Path(run), latency=latency, n_boot=n_boot, seed=seed))
        for name, run in runs.items()
    ]
    table = ablation_table_markdown(rows)
    (out / "table.md").write_text(table)
    rows_json = {"rows": [{"name": n, **s} for n, s in rows]}
    write_json_atomic(out / "metrics.json", to_jsonable(rows_json), default=str)
    report = HtmlReport("dermkit evaluate: every classifier of the pipeline on the test split")
    report.add_paragraph(
        f"Test metrics with 95% lesion-level bootstrap CIs (B = {n_boot}); params, GFLOPs "
        "per image and batch-1 CPU latency where the run has a torch model."
    )
    report.add_table(markdown_rows(table), caption="test split")
    for name, run in runs.items():
        report.add_link(os.path.relpath(Path(run, "report.html"), out), f"{name}: full report")
    return report.write(out / "report.html")
