"""The pipeline's product: the classifier it ships, exported, beside the teacher it came from.

A chain that distils exists to hand over a small model that keeps most of a large one's
accuracy at a fraction of its cost (issue 19: the student is the pipeline's final product,
exported to ONNX INT8, and at least 4x faster than its teacher in PyTorch at batch 1). So the
``export`` stage, after ``dermkit export``, times the exported student against its teacher
the way ``dermkit bench latency --teacher T --student EXPORT --out EXPORT/latency`` does
(``deploy/latency.py``: the four models interleaved in one run, so the ratios survive a
busy machine), and the summary report opens with what shipped: the deployed model's test
scores, its files, its cost against the teacher's and the measured speed-up.

When the deployed model is a plain fine-tune (distillation off) there is no teacher to
compare with, and the section shows the model and its files only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from dermkit.config import Strict
from dermkit.eval.report import HtmlReport, format_estimate, markdown_rows

LATENCY_DIR = "latency"
_TEACHER_ROW = "teacher PyTorch FP32"


def teacher_of(model_run: Path) -> Path | None:
    """The teacher folder a distilled run learnt from (its config's ``teacher``), or None."""
    config = Path(model_run) / "config.yaml"
    teacher = yaml.safe_load(config.read_text()).get("teacher") if config.exists() else None
    return Path(teacher) if teacher else None


def timed_int8(export_dir: Path) -> str | None:
    """The INT8 file to time: static where it was exported (the usable one for CNNs, whose
    ReLU6 ranges dynamic INT8 cannot know), else dynamic; None without INT8."""
    # deploy.export imports onnxruntime: lazily, so the pipeline imports without the extra
    from dermkit.deploy.export import INT8_FILES

    for kind in ("static", "dynamic"):
        if (Path(export_dir) / INT8_FILES[kind]).exists():
            return kind
    return None


def measure_latency(model_run: Path, export_dir: Path, rounds: int) -> dict | None:
    """Time the exported student against its teacher (``deploy.latency.bench_latency``) and
    write ``latency.json`` / ``latency.md`` into ``export_dir/latency``; None when there is
    no teacher, no INT8 file or ``rounds`` is 0."""
    from dermkit.deploy.latency import bench_latency, write_latency

    teacher, int8 = teacher_of(model_run), timed_int8(export_dir)
    if teacher is None or int8 is None or rounds == 0:
        return None
    result = bench_latency(teacher, export_dir, int8=int8, rounds=rounds, calls=5, threads=1)
    write_latency(result, Path(export_dir) / LATENCY_DIR)
    return result


def latency_rows(export_dir: Path) -> dict[str, dict] | None:
    """{model name: row} of the export's ``latency/latency.json``, or None when not timed."""
    path = Path(export_dir) / LATENCY_DIR / "latency.json"
    if not path.exists():
        return None
    return {r["model"]: r for r in json.loads(path.read_text())["rows"]}


def int8_speedup(export_dir: Path) -> tuple[float, dict] | None:
    """(batch-1 speed-up of the INT8 student over the teacher in PyTorch, the INT8 row)."""
    rows = latency_rows(export_dir)
    if rows is None:
        return None
    int8 = next(r for name, r in rows.items() if "INT8" in name)
    return int8["speedup_b1_vs_teacher"], int8


# The headline scores of a shipped model, in this order, as far as its task reports them
# (a classifier: macro-F1, balanced accuracy; an ordinal model: QWK, mean absolute error).
_HEADLINE = {
    "macro_f1": "macro-F1",
    "balanced_accuracy": "balanced accuracy",
    "qwk": "QWK",
    "mae": "mean absolute error",
}


def _scores(metrics: dict) -> str:
    found = [
        f"{label} {format_estimate(metrics[k])}" for k, label in _HEADLINE.items() if k in metrics
    ]
    return ", ".join(found) or "scores: see the run's metrics.json"


def add_product_section(report: HtmlReport, model_run: Path, export_dir: Path | None) -> None:
    """The report's first table: the shipped model, its scores, files, cost and speed."""
    metrics = json.loads((Path(model_run) / "metrics.json").read_text())["metrics"]
    config = yaml.safe_load((Path(model_run) / "config.yaml").read_text())
    teacher = teacher_of(model_run)
    report.add_heading("The product")
    lines = [
        f"Shipped model: {config['model']['name']} at {config['data']['image_size']} px "
        f"({'distilled from ' + str(teacher) if teacher else 'fine-tuned'}), run folder "
        f"{model_run}. Test {_scores(metrics)}."
    ]
    if export_dir is not None and (Path(export_dir) / "metrics.json").exists():
        exported = json.loads((Path(export_dir) / "metrics.json").read_text())["files"]
        files = [f"model.onnx {exported['fp32']['size_bytes'] / 1e6:.2f} MB"]
        for kind in ("static", "dynamic"):
            if kind in exported:
                f = exported[kind]
                files.append(
                    f"INT8 {kind} {f['size_bytes'] / 1e6:.2f} MB (agrees with FP32 on "
                    f"{f['prediction_agreement']:.1%} of the parity images)"
                )
        lines.append(f"Exported ({export_dir}): {'; '.join(files)}.")
    speed = int8_speedup(export_dir) if export_dir is not None else None
    if speed is not None:
        ratio, row = speed
        teacher_row = latency_rows(export_dir)[_TEACHER_ROW]
        share = row["gflops_per_image"] / teacher_row["gflops_per_image"]
        lines.append(
            f"At batch 1 the {row['model']} is {ratio:.1f}x faster than its teacher in PyTorch "
            f"(timed interleaved in one run, 1 thread) at {share:.0%} of its GFLOPs."
        )
    for line in lines:
        report.add_paragraph(line)
    if speed is not None:
        latency_md = (Path(export_dir) / LATENCY_DIR / "latency.md").read_text()
        table = markdown_rows(latency_md.split("\n\n")[0])  # the table, not the note below it
        report.add_table(table, caption="student vs teacher, timed interleaved (latency.md)")


# ----------------------------------------------------------------------------- the export stage


class ExportStageConfig(Strict):
    """``export``: the deployed classifier as ONNX (+ INT8), and its exit segments."""

    model_run: str = ""
    exits_run: str | None = None
    int8: Literal["dynamic", "static", "both"] | None = "dynamic"
    parity_images: int = Field(512, ge=1)
    calibration_images: int = Field(64, ge=1)
    exits: bool = Field(True, description="also export the exit segments when exits is on")
    # the INT8 student against its teacher in PyTorch, batch 1 (measure_latency)
    latency_rounds: int = Field(5, ge=0, description="interleaved timing rounds (0: off)")


def run_export(cfg: ExportStageConfig, out: Path, resume: bool) -> None:
    """``dermkit export`` of the deployed model (+ its best exit head), then the timing."""
    from dermkit.deploy.export_folder import export_folder

    export_folder(cfg.model_run, out, cfg.int8, cfg.parity_images, cfg.calibration_images)
    if cfg.exits_run is not None:  # `dermkit exits export --no-fused` of the best head
        from dermkit.exits.bench import best_head
        from dermkit.exits.onnx_segments import export_exit_run

        head = best_head(cfg.exits_run)
        if head is not None:
            export_exit_run(cfg.exits_run, head, out / "exits", fused=False)
    measure_latency(Path(cfg.model_run), out, cfg.latency_rounds)


def export_metric(path: Path) -> str:
    """The export stage's key line: file size, INT8 agreement, speed-up over the teacher."""
    files = json.loads((Path(path) / "metrics.json").read_text())["files"]
    text = f"model.onnx {files['fp32']['size_bytes'] / 1e6:.2f} MB"
    for key in ("dynamic", "static"):
        if key in files:
            text += f", INT8 {key} agreement {files[key]['prediction_agreement']:.3f}"
    if (speed := int8_speedup(path)) is not None:
        text += f", INT8 {speed[0]:.1f}x faster than the teacher at batch 1"
    return text
