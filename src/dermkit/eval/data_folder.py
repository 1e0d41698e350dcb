"""The data stage's folder: the split of one dataset, its numbers and its report.

``split.csv`` (the id list every later stage reads), ``metrics.json`` (images, lesions and
class counts per split, near-duplicate pairs across splits, rejects), ``report.html``
(those tables, the leakage summary, for phantoms a grid of the images) and
``rejects.csv``. Here rather than in ``data/`` because the report is an eval
:class:`~dermkit.eval.report.HtmlReport` (eval sits above data in the layers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermkit.core.files import write_json_atomic
from dermkit.data.settings import DataConfig
from dermkit.eval.report import HtmlReport, to_jsonable

PHANTOM_GRID = "phantom_grid.png"


def write_data_folder(cfg: DataConfig, run: Path, phantoms: bool = False) -> Path:
    """Split ``cfg.path`` as ``cfg`` says into the folder ``run``; returns its report path.

    ``phantoms``: the images are drawn phantoms (the report says so and shows a grid).
    """
    from dermkit.data.prepare import prepare_data, write_split_file

    root = Path(cfg.path)
    prepared = prepare_data(cfg, rejects_path=run / "rejects.csv")
    write_split_file(prepared.manifest, run / "split.csv")
    m = prepared.manifest
    counts = m.groupby(["split", "label"]).size().unstack(fill_value=0)
    metrics = {
        "source": str(root),
        "images": len(m),
        "lesions": int(m["lesion_id"].nunique()),
        "classes": prepared.classes,
        "split": {
            s: {
                "images": int((m["split"] == s).sum()),
                "lesions": int(m.loc[m["split"] == s, "lesion_id"].nunique()),
            }
            for s in ("train", "val", "test")
        },
        "class_counts": {s: counts.loc[s].to_dict() for s in counts.index},
        "near_duplicate_pairs_across_splits": len(prepared.leakage.near_duplicates),
        "rejected": len(prepared.rejects),
    }
    write_json_atomic(run / "metrics.json", to_jsonable(metrics), default=str)
    report = HtmlReport(f"dermkit data: {root.name}")
    report.add_paragraph(
        f"{metrics['images']} images of {metrics['lesions']} lesions from {root}; "
        + (
            f"split file {cfg.split_file}"
            if cfg.split_file
            else f"label-stratified, lesion-grouped {cfg.train}/{cfg.val}/{cfg.test} "
            f"split, seed {cfg.split_seed}"
        )
        + ". Every later stage reads this split (split.csv)."
    )
    report.add_table(
        [{"split": s, **v} for s, v in metrics["split"].items()], caption="Images per split"
    )
    report.add_table(
        counts.reset_index().rename(columns={"split": "split \\ class"}),
        caption="Images per split and class",
    )
    report.add_paragraph(prepared.leakage.summary())
    if phantoms:
        report.add_paragraph(
            "Phantoms are procedurally drawn lesions: they exercise the code path; their "
            "numbers say nothing about real dermoscopy."
        )
        import matplotlib.pyplot as plt

        from dermkit.eval.plots import save_figure

        fig = _phantom_grid(root)
        grid = save_figure(fig, run / PHANTOM_GRID)  # the pipeline's summary embeds it
        plt.close(fig)
        report.add_figure(grid, "phantom images, one per class first")
    return report.write(run / "report.html")


def _phantom_grid(root: Path, n: int = 14):
    """A figure with the first phantom image of each class, then more, with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from PIL import Image

    meta = pd.read_csv(root / "metadata.csv")
    first = meta.drop_duplicates("dx").head(n)
    meta = pd.concat([first, meta.drop(first.index).head(n - len(first))])
    cols = (len(meta) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.4))
    for ax, (_, row) in zip(np.ravel(axes), meta.iterrows(), strict=False):
        ax.imshow(Image.open(root / "images" / f"{row.image_id}.jpg"))
        ax.set_title(f"{row.dx}", fontsize=8)
        ax.axis("off")
    for ax in np.ravel(axes)[len(meta) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig
