"""Self-contained HTML reports: a small builder every stage reuses, and the evaluation report.

A report is one ``.html`` file that opens offline: figures are embedded as base64 PNG data
URIs, the CSS is inline, there is no JavaScript and no external asset. All text passes
through ``html.escape``, so class names or config values can never inject markup.

:func:`write_evaluation_report` writes a run's evaluation folder: ``metrics.json`` (the
result of ``evaluate_predictions``), the PNG figures and ``report.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermkit.core.files import write_text_atomic
from dermkit.eval.metrics import PER_CLASS_METRICS
from dermkit.eval.plots import (
    plot_confusion_matrix,
    plot_per_class_metrics,
    plot_reliability_diagram,
    plot_roc_curves,
    save_figure,
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
.note { color: #555; font-size: .9rem; }
.demo { background: #fde8e8; color: #8a1c1c; border-left: 4px solid #c62828;
        padding: .5rem .8rem; font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: .6rem .8rem; overflow-x: auto;
      font-size: .85rem; line-height: 1.35; }
.figures { display: flex; flex-wrap: wrap; gap: .8rem; align-items: flex-start; }
.figures figure { margin: .4rem 0; flex: 1 1 460px; max-width: 100%; }
"""


def _format_cell(value) -> tuple[str, bool]:
    """Cell text and whether it is numeric (right-aligned): floats to 3 decimals, None -> —."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}", True
    return str(value), False


def format_estimate(entry: dict) -> str:
    """``{"value", "ci_low", "ci_high"}`` -> "0.812 [0.764, 0.863]" (— when undefined)."""
    if entry.get("value") is None:
        return "—"
    text = f"{entry['value']:.3f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
    return text


def to_jsonable(obj):
    """Recursively convert numpy scalars/arrays and non-finite floats (-> None) for JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


class HtmlReport:
    """Build a single-file HTML report section by section, then :meth:`write` it.

    Every ``add_*`` method returns the report, so calls can be chained.
    """

    def __init__(self, title: str):
        self.title = title
        self._body: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def add_heading(self, text: str, level: int = 2) -> HtmlReport:
        """Add a heading ``<h{level}>``; level 1..6."""
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, got {level}")
        self._body.append(f"<h{level}>{html.escape(str(text))}</h{level}>")
        return self

    def add_paragraph(self, text: str, css_class: str | None = None) -> HtmlReport:
        """Add a paragraph of plain (escaped) text."""
        attr = f' class="{html.escape(css_class)}"' if css_class else ""
        self._body.append(f"<p{attr}>{html.escape(str(text))}</p>")
        return self

    def add_table(self, rows: list[dict] | pd.DataFrame, caption: str | None = None) -> HtmlReport:
        """Add a table from row dicts or a DataFrame; columns in order of first appearance.

        Floats are shown with 3 decimals, None/NaN as "—"; a missing key is an empty cell.
        """
        if isinstance(rows, pd.DataFrame):
            rows = rows.to_dict(orient="records")
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        parts = ["<table>"]
        if caption:
            parts.append(f"<caption>{html.escape(str(caption))}</caption>")
        parts.append(
            "<thead><tr>"
            + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            + "</tr></thead><tbody>"
        )
        for row in rows:
            cells = []
            for column in columns:
                text, numeric = _format_cell(row.get(column, ""))
                cls = ' class="num"' if numeric else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._body.append("".join(parts))
        return self

    def add_figure(
        self, fig_or_png_path: Figure | str | Path, caption: str | None = None
    ) -> HtmlReport:
        """Embed a matplotlib Figure or an existing PNG file as a base64 data URI."""
        if isinstance(fig_or_png_path, Figure):
            buffer = io.BytesIO()
            fig_or_png_path.savefig(buffer, format="png", dpi=110)
            png = buffer.getvalue()
        else:
            path = Path(fig_or_png_path)
            if not path.is_file():
                raise FileNotFoundError(f"figure file not found: {path}")
            png = path.read_bytes()
            if not png.startswith(_PNG_SIGNATURE):
                raise ValueError(f"{path} is not a PNG file; only PNG figures can be embedded")
        data = base64.b64encode(png).decode("ascii")
        alt = html.escape(caption or "figure")
        parts = [f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">']
        if caption:
            parts.append(f"<figcaption>{html.escape(caption)}</figcaption>")
        parts.append("</figure>")
        self._body.append("".join(parts))
        return self

    def add_preformatted(self, text: str, css_class: str | None = None) -> HtmlReport:
        """Add a ``<pre>`` block of plain (escaped) text, e.g. a config as YAML."""
        attr = f' class="{html.escape(css_class)}"' if css_class else ""
        self._body.append(f"<pre{attr}>{html.escape(str(text))}</pre>")
        return self

    def begin_group(self, css_class: str) -> HtmlReport:
        """Open a ``<div class=...>`` (e.g. ``figures``: figures side by side) until
        :meth:`end_group`."""
        self._body.append(f'<div class="{html.escape(css_class)}">')
        return self

    def end_group(self) -> HtmlReport:
        self._body.append("</div>")
        return self

    def add_metrics_table(self, result: dict, caption: str | None = None) -> HtmlReport:
        """Add the headline metrics of an ``evaluate_predictions`` result with their CIs.

        One row per metric: "value [ci_low, ci_high]" to 3 decimals and the number of valid
        bootstrap replicates.
        """
        level = result.get("ci_level", 0.95)
        rows = [
            {
                "metric": name,
                f"estimate [{level:.0%} CI]": format_estimate(entry),
                "valid replicates": f"{entry.get('n_valid', 0)} / {result.get('n_boot', 0)}",
            }
            for name, entry in result["metrics"].items()
        ]
        return self.add_table(rows, caption=caption or "Headline metrics")

    def add_link(self, href: str, text: str) -> HtmlReport:
        """Add a paragraph with one link (e.g. to metrics.json next to the report)."""
        self._body.append(
            f'<p><a href="{html.escape(str(href), quote=True)}">{html.escape(str(text))}</a></p>'
        )
        return self

    def to_html(self) -> str:
        """The whole document as a string."""
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(self._body) + "\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the report (UTF-8) to ``path``, creating parent folders; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _detail_text(value) -> str | float | int | None:
    """A run-details value for a table cell: numbers as they are, containers as JSON."""
    value = to_jsonable(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return value


def ci_method_note(result: dict) -> str:
    """Plain-language description of how the intervals were computed."""
    level = f"{result['ci_level']:.0%}"
    if result.get("n_boot", 0) == 0:
        return "No bootstrap was run (B=0): estimates are shown without confidence intervals."
    unit = (
        "lesions"
        if result.get("grouped", True)
        else ("images (no lesion ids given, so every image was treated as its own lesion)")
    )
    return (
        f"{level} percentile bootstrap over {unit}, B={result['n_boot']}: each replicate "
        "redraws lesions with replacement and keeps all of their images. A replicate where a "
        "metric is undefined (e.g. no melanoma drawn) is dropped for that metric only; "
        "'valid replicates' counts those used."
    )


def markdown_rows(table: str) -> list[dict]:
    """The rows of a GitHub markdown table as dicts (for an HtmlReport table)."""
    lines = [ln for ln in table.strip().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def link_into_report(report_path: str | Path, target: str | Path, text: str) -> bool:
    """Add a link to ``target`` at the end of an existing report.html; True when added.

    A later stage (explain features/saliency) writes its own report next to a finished
    run; linking it from the run's report keeps one entry point per run. The link is
    relative, added once (a re-run does not duplicate it), and nothing happens when the
    report does not exist or ``target`` is not below the report's folder.
    """
    report_path, target = Path(report_path), Path(target)
    if not report_path.is_file():
        return False
    try:
        href = target.resolve().relative_to(report_path.parent.resolve()).as_posix()
    except ValueError:
        return False
    page = report_path.read_text(encoding="utf-8")
    link = f'<p><a href="{html.escape(href, quote=True)}">{html.escape(text)}</a></p>'
    if link in page or "</body>" not in page:
        return False
    write_text_atomic(report_path, page.replace("</body>", link + "\n</body>", 1))
    return True


def write_evaluation_report(
    result: dict,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    out_dir: str | Path,
    *,
    title: str,
    extra: dict | None = None,
    extra_figures: dict[str, str] | None = None,
) -> Path:
    """Write ``metrics.json``, the evaluation PNGs and ``report.html`` into ``out_dir``.

    Args:
        result: the dict from ``evaluate_predictions`` for these predictions.
        y_true: (N,) int class indices (for the ROC curves).
        probs: (N, C) class probabilities (for the ROC curves).
        class_names: C class names, in column order of ``probs``.
        out_dir: run folder; created if missing.
        title: report title.
        extra: optional run details (config, checkpoint, commit, ...) shown as a table and
            stored under ``"extra"`` in metrics.json.
        extra_figures: optional stage figures {PNG file name in ``out_dir``: caption}, e.g.
            learning curves, embedded after the evaluation figures.

    Returns:
        Path of ``report.html``.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    if y_true.shape[0] != result["n"] or probs.shape != (result["n"], len(class_names)):
        raise ValueError(
            f"y_true {y_true.shape} / probs {probs.shape} do not match the result "
            f"(n={result['n']}, {len(class_names)} classes)"
        )
    if list(class_names) != list(result["classes"]):
        raise ValueError(
            f"class_names {list(class_names)} differ from result classes {result['classes']}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    payload = to_jsonable(dict(result, extra=extra) if extra is not None else result)
    (out_dir / "metrics.json").write_text(
        json.dumps(payload, indent=2, allow_nan=False, default=str)
    )

    figures = {
        "confusion_matrix.png": (
            plot_confusion_matrix(result["confusion_matrix"], class_names),
            "Confusion matrix: counts (left) and row-normalised (right); rows are true classes.",
        ),
        "roc.png": (
            plot_roc_curves(y_true, probs, class_names),
            "One-vs-rest ROC curves with AUROC per class.",
        ),
        "reliability.png": (
            plot_reliability_diagram(result["reliability"], result["metrics"]["ece"]["value"]),
            "Top-label reliability diagram and histogram of confidences.",
        ),
        "per_class.png": (
            plot_per_class_metrics(result["per_class"]),
            "Per-class precision, recall and F1 with bootstrap CIs.",
        ),
    }
    for name, (fig, _) in figures.items():
        save_figure(fig, out_dir / name)

    report = HtmlReport(title)
    report.add_paragraph(
        f"{result['n']} images from {result['n_groups']} lesions; "
        f"{len(class_names)} classes: {', '.join(class_names)}."
    )
    report.add_paragraph(ci_method_note(result), css_class="note")
    report.add_heading("Headline metrics")
    report.add_metrics_table(result)
    report.add_heading("Per class")
    per_class_rows = []
    for name, entry in result["per_class"].items():
        row = {"class": name, "support": entry["support"]}
        for metric in PER_CLASS_METRICS:
            interval = entry.get("ci", {}).get(metric, {})
            row[metric] = format_estimate({"value": entry[metric], **interval})
        per_class_rows.append(row)
    report.add_table(per_class_rows, caption=f"Per-class metrics [{result['ci_level']:.0%} CI]")
    report.add_heading("Figures")
    for name, (_, caption) in figures.items():
        report.add_figure(out_dir / name, caption)
    for name, caption in (extra_figures or {}).items():
        report.add_figure(out_dir / name, caption)
    if extra:
        report.add_heading("Run details")
        report.add_table([{"key": k, "value": _detail_text(v)} for k, v in extra.items()])
    report.add_link("metrics.json", "metrics.json (all numbers in this report)")
    return report.write(out_dir / "report.html")
