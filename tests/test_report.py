"""Tests for dermkit.eval.report (HtmlReport, write_evaluation_report) and dermkit.eval.plots."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from scipy.special import softmax

from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.plots import (
    plot_confusion_matrix,
    plot_per_class_metrics,
    plot_reliability_diagram,
    plot_roc_curves,
)
from dermkit.eval.report import HtmlReport, write_evaluation_report

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("confusion_matrix.png", "roc.png", "reliability.png", "per_class.png")


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 7, size=n)
    logits = rng.normal(size=(n, 7))
    logits[np.arange(n), y] += 1.5
    groups = np.array([f"HAM_{i // 2:04d}" for i in range(n)])
    return y, softmax(logits, axis=1), groups


@pytest.fixture(scope="module")
def written_report(predictions, tmp_path_factory):
    y, probs, groups = predictions
    result = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=100)
    out_dir = tmp_path_factory.mktemp("eval")
    path = write_evaluation_report(
        result,
        y,
        probs,
        CLASSES,
        out_dir,
        title="Test run",
        extra={"model": "vit_tiny", "lr": 3e-4},
    )
    return result, out_dir, path


def embedded_pngs(text: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    ]


def test_evaluation_report_writes_every_artifact(written_report):
    _, out_dir, path = written_report
    assert path == out_dir / "report.html" and path.is_file()
    assert (out_dir / "metrics.json").is_file()
    for name in FIGURES:
        assert (out_dir / name).read_bytes().startswith(PNG_SIGNATURE), name


def test_evaluation_report_html_content(written_report):
    result, out_dir, path = written_report
    text = path.read_text(encoding="utf-8")
    for name in CLASSES:
        assert f"<td>{name}</td>" in text, name
    for metric in result["metrics"]:
        assert f"<td>{metric}</td>" in text, metric
    pngs = embedded_pngs(text)
    assert len(pngs) == len(FIGURES)
    assert {p for p in pngs} == {(out_dir / name).read_bytes() for name in FIGURES}
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower()
    assert "95% percentile bootstrap over lesions, B=100" in text
    assert "240 images from 120 lesions" in text
    m = result["metrics"]["macro_f1"]
    assert f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" in text
    assert "vit_tiny" in text  # extra run details


def test_metrics_json_round_trips(written_report):
    result, out_dir, _ = written_report
    stored = json.loads((out_dir / "metrics.json").read_text())
    assert stored.pop("extra") == {"model": "vit_tiny", "lr": 3e-4}
    assert stored == json.loads(json.dumps(result))
    assert stored["metrics"]["accuracy"]["value"] == result["metrics"]["accuracy"]["value"]


def test_image_level_bootstrap_is_described_honestly(predictions, tmp_path):
    y, probs, _ = predictions
    result = evaluate_predictions(y, probs, CLASSES, n_boot=30)
    text = write_evaluation_report(result, y, probs, CLASSES, tmp_path, title="t").read_text()
    assert "bootstrap over images" in text and "over lesions" not in text


def test_evaluation_report_rejects_mismatched_inputs(written_report, predictions, tmp_path):
    result, _, _ = written_report
    y, probs, _ = predictions
    with pytest.raises(ValueError, match="probs"):
        write_evaluation_report(result, y, probs[:10], CLASSES, tmp_path, title="t")
    with pytest.raises(ValueError, match="class_names"):
        write_evaluation_report(result, y, probs, CLASSES[::-1], tmp_path, title="t")


def test_html_report_escapes_text_and_embeds_figures(tmp_path, predictions):
    y, probs, _ = predictions
    report = HtmlReport("A <b>bold</b> title")
    report.add_heading("Section & more", level=3)
    report.add_paragraph("<script>alert(1)</script>")
    report.add_table(
        pd.DataFrame({"class": ["<mel>", "nv"], "score": [0.12345, None]}), caption="Scores"
    )
    report.add_table([{"a": 1}, {"b": True}])
    report.add_figure(plot_roc_curves(y, probs, CLASSES), caption="ROC")
    report.add_link("metrics.json?x=1&y=2", "numbers")
    path = report.write(tmp_path / "sub" / "r.html")
    text = path.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "A &lt;b&gt;bold&lt;/b&gt; title" in text
    assert "<h3>Section &amp; more</h3>" in text
    assert "&lt;mel&gt;" in text and "0.123" in text and "—" in text
    assert '<a href="metrics.json?x=1&amp;y=2">numbers</a>' in text
    assert len(embedded_pngs(text)) == 1 and embedded_pngs(text)[0].startswith(PNG_SIGNATURE)


def test_html_report_figure_from_png_path_and_bad_files(tmp_path):
    png = tmp_path / "f.png"
    plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["a", "b"]).savefig(png)
    text = HtmlReport("t").add_figure(png, "cm").to_html()
    assert embedded_pngs(text) == [png.read_bytes()]
    not_png = tmp_path / "f.txt"
    not_png.write_text("hello")
    with pytest.raises(ValueError, match=r"f\.txt"):
        HtmlReport("t").add_figure(not_png, "x")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        HtmlReport("t").add_figure(tmp_path / "missing.png", "x")


def test_metrics_table_formats_value_and_interval():
    result = {
        "ci_level": 0.95,
        "n_boot": 10,
        "metrics": {
            "accuracy": {"value": 0.81234, "ci_low": 0.7, "ci_high": 0.9, "n_valid": 10},
            "mel_sens_at_spec90": {"value": None, "ci_low": None, "ci_high": None, "n_valid": 0},
        },
    }
    text = HtmlReport("t").add_metrics_table(result).to_html()
    assert "0.812 [0.700, 0.900]" in text
    assert "<td>mel_sens_at_spec90</td><td>—</td><td>0 / 10</td>" in text


def test_plots_return_figures_with_expected_content(predictions):
    y, probs, groups = predictions
    result = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=30)
    roc = plot_roc_curves(y, probs, CLASSES)
    labels = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    auroc = result["per_class"]["mel"]["auroc"]
    assert f"mel (AUROC {auroc:.3f})" in labels
    reliability = plot_reliability_diagram(result["reliability"], result["metrics"]["ece"]["value"])
    assert f"ECE = {result['metrics']['ece']['value']:.3f}" in reliability.axes[0].get_title()
    cm = plot_confusion_matrix(result["confusion_matrix"], CLASSES)
    assert len([a for a in cm.axes if a.get_title()]) == 2
    bars = plot_per_class_metrics(result["per_class"])
    # precision, recall and F1 bars, each with error bars from the per-class CIs
    bar_groups = [c for c in bars.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bar_groups) == 3
    assert all(group.errorbar is not None for group in bar_groups)
    heights = [patch.get_height() for patch in bar_groups[2]]
    assert heights == pytest.approx([result["per_class"][c]["f1"] for c in CLASSES])


def test_link_into_report_adds_one_relative_link_below_the_run(tmp_path):
    from dermkit.eval.report import HtmlReport, link_into_report

    run_report = HtmlReport("run").add_paragraph("body").write(tmp_path / "report.html")
    stage_report = HtmlReport("explain").write(tmp_path / "explain" / "report.html")
    assert link_into_report(run_report, stage_report, "explain: feature maps")
    assert not link_into_report(run_report, stage_report, "explain: feature maps")  # once
    page = run_report.read_text()
    assert page.count('href="explain/report.html"') == 1
    assert page.index("explain: feature maps") < page.index("</body>")
    # a report outside the run folder, or a run without a report, is left alone
    outside = HtmlReport("x").write(tmp_path.parent / f"{tmp_path.name}-other" / "r.html")
    assert not link_into_report(run_report, outside, "elsewhere")
    assert not link_into_report(tmp_path / "missing" / "report.html", stage_report, "x")
