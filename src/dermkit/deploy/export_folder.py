"""``dermkit export``: a classifier run exported into a folder that explains itself.

:func:`export_folder` is :func:`dermkit.deploy.export.export_run` (ONNX + INT8 files,
``export.json``, the model card) plus ``metrics.json`` (the run and its exported files)
and ``report.html``; the command and the pipeline's ``export`` stage both call it.
"""

from __future__ import annotations

from pathlib import Path

from dermkit.core.files import write_json_atomic
from dermkit.deploy.export import export_run
from dermkit.eval.report import HtmlReport


def export_folder(
    run_dir: str | Path,
    out_dir: str | Path,
    int8: str | None = "both",
    n_parity: int = 512,
    n_calibration: int = 64,
) -> dict:
    """Export ``run_dir`` into ``out_dir`` with its metrics and report; returns ``export.json``."""
    export = export_run(run_dir, out_dir, int8, n_parity, n_calibration)
    write_export_report(export, Path(out_dir))
    return export


def write_export_report(export: dict, out_dir: Path) -> Path:
    """``metrics.json`` and ``report.html`` of an export (``export``: its ``export.json``)."""
    write_json_atomic(
        out_dir / "metrics.json", {"model_run": export["run"], "files": export["files"]}
    )
    report = HtmlReport(f"dermkit export: {export['model']}")
    report.add_paragraph(
        f"ONNX export of {export['run']}: input {export['input']}, output {export['output']}, "
        f"opset {export['opset']}. Parity against PyTorch on {export['parity_images']} val "
        "images. Model card: model_card.json."
    )
    report.add_table(
        [{"key": k, **f} for k, f in export["files"].items()], caption="Exported files"
    )
    report.add_link("model_card.json", "model card (JSON)")
    report.add_link("export.json", "export.json (all numbers)")
    return report.write(out_dir / "report.html")
