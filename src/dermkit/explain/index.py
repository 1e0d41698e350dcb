"""``dermkit explain all``: feature maps and saliency of one classifier run, in one folder.

Writes ``features/`` (``dermkit explain features``) and ``saliency/`` (``dermkit explain
saliency``) into ``out``, then ``metrics.json`` (both parts' numbers) and an index
``report.html`` linking the two reports. The pipeline's ``explain`` stage calls this.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermkit.core.files import write_json_atomic
from dermkit.eval.report import HtmlReport, to_jsonable


def run_explain(
    run_dir: str | Path,
    out: str | Path,
    features: bool = True,
    saliency: bool = True,
    splits: tuple[str, ...] = ("test",),
    max_images: int | None = 2000,
    use_umap: bool = False,
    per_class: int = 2,
    sanity_images: int = 16,
    random_copies: int = 3,
    seed: int = 0,
) -> Path:
    """Explain ``run_dir`` into ``out``; returns the index report's path."""
    from dermkit.explain.features import run_explain_features
    from dermkit.explain.saliency import run_explain_saliency

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, links = {}, []
    if features:
        report = run_explain_features(
            run_dir,
            out / "features",
            splits=tuple(splits),
            max_images=max_images,
            seed=seed,
            use_umap=use_umap,
        )
        metrics["features"] = json.loads((out / "features" / "features_metrics.json").read_text())
        links.append((report, "feature maps (PCA/UMAP) and class separation"))
    if saliency:
        report = run_explain_saliency(
            run_dir,
            out / "saliency",
            split=splits[0],
            per_class=per_class,
            sanity_images=sanity_images,
            seed=seed,
            random_copies=random_copies,
        )
        metrics["saliency"] = json.loads((out / "saliency" / "saliency_metrics.json").read_text())
        links.append((report, "saliency overlays and the randomisation sanity check"))
    write_json_atomic(out / "metrics.json", to_jsonable(metrics), default=str)
    index = HtmlReport(f"dermkit explain: {Path(run_dir).name}")
    index.add_paragraph(f"What the classifier of {run_dir} encodes and where it looks.")
    for report, text in links:
        index.add_link(str(Path(report).relative_to(out)), text)
    return index.write(out / "report.html")
