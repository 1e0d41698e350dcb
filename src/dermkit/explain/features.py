"""What an encoder's frozen features encode: 2-D maps coloured by manifest columns, and numbers.

Features are the penultimate representation of any dermkit backbone, exactly what its
head reads: ``model.forward_head(model.forward_features(x), pre_logits=True)`` (timm's
interface: pooled CLS/average token for a ViT, global-average-pooled map for a CNN, pooled
posterior mean for the VAE encoder), shape (N, D).

Maps: PCA (scikit-learn) always; UMAP (``umap-learn``, the optional ``explain`` extra) when
installed. Each map is drawn once per colouring: a categorical column (label, split,
source, synthetic, sex, localization...) gets a legend, a continuous one (age, thickness)
a colour bar. PNGs always; one interactive HTML page (plotly, also in the ``explain``
extra) when installed.

Numbers, because a picture can mislead:

- silhouette score (scikit-learn) of every categorical colouring, in the full feature
  space and in the 2-D PCA map: > 0 means images of one category sit closer together;
- class separation of the ``label`` column: k-NN purity per class (share of an image's k
  nearest neighbours with its own class, against the class's share = chance) and the mean
  distance to the own class centroid relative to the nearest other centroid;
- Spearman correlation of each map axis (PC1, PC2, UMAP1, UMAP2) with every continuous
  column: does a direction of the feature space follow age or thickness?
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.eval.embedding import is_continuous, pca_2d, plot_embedding
from dermkit.eval.plots import _new_figure, save_figure
from dermkit.eval.report import link_into_report
from dermkit.models.backbones import input_stats

log = logging.getLogger(__name__)

DEFAULT_COLOR_BY = ("label", "split", "source", "synthetic", "age", "sex", "localization")
SILHOUETTE_SAMPLE = 2000


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: CachedImageDataset,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Penultimate features (N, D) float32 of dataset rows (all rows when ``indices`` is None).

    The model must follow timm's interface (``forward_features``, ``forward_head``).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    out = []
    for i in range(0, len(indices), batch_size):
        x, _ = dataset.__getitems__(indices[i : i + batch_size])
        x = to_float(x.to(device), *input_stats(model))
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out).numpy()


def umap_2d(features: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray | None:
    """(N, D) -> UMAP coordinates (N, 2), or None (with a log line) when umap-learn is absent."""
    try:
        import umap
    except ImportError:
        log.info("umap-learn is not installed: PCA only (pip install 'dermkit[explain]' for UMAP)")
        return None
    n_neighbors = max(2, min(n_neighbors, len(features) - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed)
    return reducer.fit_transform(features)


def silhouette(points: np.ndarray, labels: pd.Series, seed: int = 0) -> float:
    """Silhouette score (scikit-learn, euclidean) of a categorical colouring; NaN if undefined.

    Rows with a missing value are left out; above SILHOUETTE_SAMPLE rows a random sample
    is scored (the score is an average over points, a sample estimates it well).
    """
    from sklearn.metrics import silhouette_score

    keep = ~labels.isna().to_numpy()
    y = labels[keep].astype(str).to_numpy()
    n_labels = len(np.unique(y))
    if n_labels < 2 or n_labels >= len(y):
        return float("nan")
    sample = SILHOUETTE_SAMPLE if len(y) > SILHOUETTE_SAMPLE else None
    return float(silhouette_score(points[keep], y, sample_size=sample, random_state=seed))


def class_separation(features: np.ndarray, labels: pd.Series, k: int = 10) -> pd.DataFrame:
    """Per class: n, share (chance level of purity), k-NN purity, centroid distance ratio.

    ``knn_purity``: mean share of an image's k nearest neighbours (itself excluded) with
    its class. ``centroid_ratio``: mean distance to the own class centroid / distance of
    the own centroid to the nearest other centroid (< 1: the class is a compact cluster).
    """
    from sklearn.neighbors import NearestNeighbors

    y = labels.astype(str).to_numpy()
    k = max(1, min(k, len(y) - 1))
    _, nn = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    same = (y[nn[:, 1:]] == y[:, None]).mean(1)
    classes = sorted(np.unique(y))
    centroids = np.stack([features[y == c].mean(0) for c in classes])
    rows = []
    for i, c in enumerate(classes):
        m = y == c
        others = np.delete(centroids, i, axis=0)
        spread = float(np.linalg.norm(features[m] - centroids[i], axis=1).mean())
        gap = float(np.linalg.norm(others - centroids[i], axis=1).min()) if len(others) else np.nan
        rows.append(
            {
                "class": c,
                "n": int(m.sum()),
                "share": float(m.mean()),
                "knn_purity": float(same[m].mean()),
                "centroid_ratio": spread / gap if gap else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def plot_class_separation(sep: pd.DataFrame, k: int) -> Figure:
    """Two panels: k-NN purity against chance (the class share), and the centroid ratio."""
    fig = _new_figure(max(6.0, 0.9 * len(sep) + 3), 4.0)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(sep))
    left.bar(x - 0.2, sep["knn_purity"], 0.4, label=f"{k}-NN purity")
    left.bar(x + 0.2, sep["share"], 0.4, label="chance (class share)", color="lightgrey")
    left.set_xticks(x, sep["class"], rotation=45)
    left.set_ylim(0, 1.05)
    left.legend(fontsize=8)
    left.set_title("Neighbours of the same class")
    right.bar(x, sep["centroid_ratio"], color="tab:orange")
    right.axhline(1.0, color="grey", lw=1, ls="--")
    right.set_xticks(x, sep["class"], rotation=45)
    right.set_title("Spread / distance to nearest other centroid")
    return fig


def axis_correlations(maps: dict[str, np.ndarray], frame: pd.DataFrame, columns: list[str]):
    """Spearman rho (and p) of each map axis with each continuous column (NaN rows dropped)."""
    rows = []
    for column in columns:
        v = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(v)
        for method, coords in maps.items():
            for axis in range(2):
                a = coords[ok, axis]
                if ok.sum() < 3 or np.ptp(v[ok]) == 0 or np.ptp(a) == 0:
                    rho, p = float("nan"), float("nan")
                else:
                    rho, p = spearmanr(a, v[ok])
                rows.append(
                    {
                        "column": column,
                        "axis": f"{method}{axis + 1}",
                        "spearman": float(rho),
                        "p_value": float(p),
                        "n": int(ok.sum()),
                    }
                )
    return pd.DataFrame(rows)


def write_interactive(
    maps: dict[str, np.ndarray], frame: pd.DataFrame, columns: list[str], path: Path
) -> Path | None:
    """One offline HTML page with a plotly scatter per (map, column); None without plotly."""
    try:
        import plotly.express as px
    except ImportError:
        log.info("plotly is not installed: no interactive HTML (pip install 'dermkit[explain]')")
        return None
    hover = [c for c in ("image_id", "lesion_id", "label", "split") if c in frame.columns]
    parts, first = [], True
    for method, coords in maps.items():
        for column in columns:
            data = frame[hover].copy()
            data["x"], data["y"] = coords[:, 0], coords[:, 1]
            color = frame[column].reset_index(drop=True)
            key = column if column not in data else f"{column} (colour)"
            data[key] = color if is_continuous(color) else color.astype(str)
            fig = px.scatter(
                data,
                x="x",
                y="y",
                color=key,
                hover_data=hover,
                title=f"{method} coloured by {column}",
                labels={"x": f"{method}1", "y": f"{method}2"},
            )
            # plotly.js is embedded once (offline page); later figures reuse it
            parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
            first = False
    html = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dermkit features</title>"
    path.write_text(html + "</head><body>" + "\n".join(parts) + "</body></html>")
    return path


def explain_features(
    features: np.ndarray,
    frame: pd.DataFrame,
    color_by: list[str],
    out_dir: str | Path,
    title: str = "dermkit features",
    seed: int = 0,
    use_umap: bool = True,
    k: int = 10,
    interactive: bool = True,
) -> dict:
    """Maps, plots and numbers of features (N, D) for manifest rows ``frame`` (N rows).

    Writes into ``out_dir``: ``{pca,umap}_<column>.png``, ``class_separation.png``,
    ``embedding.csv`` (coordinates + columns), ``embedding.html`` (plotly, when installed),
    ``features_metrics.json`` and ``report.html``. Returns the metrics dict.
    """
    import json

    from dermkit.eval.report import HtmlReport, to_jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.reset_index(drop=True)
    if len(frame) != len(features):
        raise ValueError(f"{len(features)} feature rows for {len(frame)} manifest rows")
    unknown = [c for c in color_by if c not in frame.columns]
    if unknown:
        raise ValueError(f"--color-by columns {unknown} are not in the manifest {list(frame)}")
    pca, var = pca_2d(features, seed)
    maps = {"PC": pca}
    emb = umap_2d(features, seed) if use_umap else None
    if emb is None and use_umap:
        log.info("feature maps: PCA only")
    if emb is not None:
        maps["UMAP"] = emb
    continuous = [c for c in color_by if is_continuous(frame[c])]
    categorical = [c for c in color_by if c not in continuous]

    report = HtmlReport(title)
    report.add_paragraph(
        f"{len(frame)} images, {features.shape[1]}-dimensional penultimate features. PCA "
        f"explains {var[0]:.1%} (PC1) and {var[1]:.1%} (PC2) of the variance. "
        + ("UMAP as well." if emb is not None else "UMAP not computed (PCA only).")
    )
    sil_rows = []
    for column in categorical:
        sil_rows.append(
            {
                "column": column,
                "categories": int(frame[column].nunique()),
                "silhouette (features)": silhouette(features, frame[column], seed),
                "silhouette (PCA 2-D)": silhouette(pca, frame[column], seed),
                **(
                    {"silhouette (UMAP 2-D)": silhouette(emb, frame[column], seed)}
                    if emb is not None
                    else {}
                ),
            }
        )
    if sil_rows:
        report.add_table(sil_rows, "Silhouette score per categorical colouring (-1 to 1)")
    corr = axis_correlations(maps, frame, continuous)
    if len(corr):
        report.add_table(corr, "Spearman correlation of map axes with continuous columns")
    sep = None
    if "label" in frame.columns and frame["label"].nunique() >= 2:
        sep = class_separation(features, frame["label"], k)
        save_figure(plot_class_separation(sep, k), out / "class_separation.png")
        report.add_table(sep, f"Class separation of 'label' in feature space (k = {k})")
        report.add_figure(out / "class_separation.png", "k-NN purity vs chance; centroid ratio.")
    for method, coords in maps.items():
        axes = (f"{method}1", f"{method}2")
        for column in color_by:
            name = f"{'pca' if method == 'PC' else 'umap'}_{column}.png"
            kind = "continuous" if column in continuous else "categorical"
            fig = plot_embedding(coords, frame[column], column, f"{method} by {column}", axes)
            save_figure(fig, out / name)
            report.add_figure(out / name, f"{method} map coloured by {column} ({kind}).")
    table = frame[[c for c in ("image_id", "lesion_id", *color_by) if c in frame.columns]].copy()
    table = table.loc[:, ~table.columns.duplicated()]
    for method, coords in maps.items():
        table[f"{method}1"], table[f"{method}2"] = coords[:, 0], coords[:, 1]
    table.to_csv(out / "embedding.csv", index=False)
    html = write_interactive(maps, frame, color_by, out / "embedding.html") if interactive else None
    if html is not None:
        report.add_link("embedding.html", "interactive maps (plotly)")
    metrics = {
        "n_images": len(frame),
        "feature_dim": int(features.shape[1]),
        "pca_explained_variance": var.tolist(),
        "umap": emb is not None,
        "silhouette": sil_rows,
        "axis_spearman": corr.to_dict(orient="records"),
        "class_separation": None if sep is None else sep.to_dict(orient="records"),
        "continuous": continuous,
        "categorical": categorical,
    }
    (out / "features_metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2))
    report.add_link("features_metrics.json", "features_metrics.json")
    report.write(out / "report.html")
    return metrics


def run_explain_features(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    data_path: str | Path | None = None,
    splits: tuple[str, ...] = ("test",),
    color_by: list[str] | None = None,
    max_images: int | None = None,
    seed: int = 0,
    use_umap: bool = True,
) -> Path:
    """``dermkit explain features RUN``: features of the run's encoder on its own splits.

    ``color_by`` None: the DEFAULT_COLOR_BY columns present, plus ``thickness`` and the
    ordinal column of an ordinal run. Returns the report path.
    """
    from dermkit.tasks.runs import open_run, run_data

    run = open_run(run_dir)
    data = run_data(run, data_path)
    frame = data.manifest[data.manifest["split"].isin(splits)].reset_index(drop=True)
    if not len(frame):
        raise ValueError(f"no images in splits {list(splits)} of {run.path}")
    if max_images is not None and len(frame) > max_images:
        frame = frame.sample(max_images, random_state=seed).reset_index(drop=True)
    extra = ["thickness"]
    if run.ordinal is not None:  # the run's ordered classes as one more colouring
        known = ~run.ordinal.missing(frame)
        names = pd.Series(np.nan, index=frame.index, dtype=object)
        names[known] = np.asarray(run.ordinal.class_names)[run.ordinal.codes(frame[known])]
        frame["ordinal_class"] = names
        extra += [run.ordinal.column, "ordinal_class"]
    if color_by is None:
        color_by = [c for c in dict.fromkeys([*DEFAULT_COLOR_BY, *extra]) if c in frame.columns]
    dataset = CachedImageDataset(data.cache, frame, data.classes)
    features = extract_features(run.model, dataset)
    out = Path(out_dir) if out_dir else run.path / "explain-features"
    explain_features(
        features,
        frame,
        color_by,
        out,
        title=f"dermkit explain features: {run.cfg.model.name} ({', '.join(splits)})",
        seed=seed,
        use_umap=use_umap,
    )
    link_into_report(run.path / "report.html", out / "report.html", "explain: feature maps")
    return out / "report.html"
