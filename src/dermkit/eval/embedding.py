"""2-D maps of feature vectors: PCA coordinates and a scatter coloured by a manifest column.

Shared by ``dermkit explain features`` and the ordinal fine-tuning report (a PCA of the
test features coloured by the task column). A categorical column gets a legend, a
continuous one (age, thickness) a colour bar.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermkit.eval.plots import _new_figure

# A numeric column with more distinct values than this is drawn with a colour bar.
MAX_CATEGORIES_NUMERIC = 12
# Continuous by meaning, even where a small subset has few distinct values.
CONTINUOUS_COLUMNS = frozenset({"age", "thickness"})
MAX_LEGEND = 20


def is_continuous(values: pd.Series) -> bool:
    """A measurement, drawn with a colour bar: a known continuous column (age, thickness), or
    numeric (not bool) with fractional values or more than MAX_CATEGORIES_NUMERIC values."""
    if values.name in CONTINUOUS_COLUMNS:
        return True
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return False
    v = values.dropna().to_numpy(np.float64)
    fractional = bool(np.any(v != np.round(v)))
    return fractional or values.nunique(dropna=True) > MAX_CATEGORIES_NUMERIC


def pca_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (coordinates (N, 2), explained variance ratio (2,)) of PC1 and PC2."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(features)
    return pca.transform(features), pca.explained_variance_ratio_


def plot_embedding(
    coords: np.ndarray, values: pd.Series, column: str, title: str, axes: tuple[str, str]
) -> Figure:
    """Scatter of coordinates (N, 2) coloured by ``values`` (N,): legend or colour bar.

    Missing values (NaN) are drawn as small grey points.
    """
    fig = _new_figure(6.5, 5.0)
    ax = fig.subplots()
    values = values.reset_index(drop=True)
    missing = values.isna().to_numpy()
    if missing.any():
        ax.scatter(*coords[missing].T, s=6, c="lightgrey", label="missing")
    if is_continuous(values):
        v = values.to_numpy(np.float64)
        sc = ax.scatter(*coords[~missing].T, s=12, c=v[~missing], cmap="viridis", alpha=0.8)
        fig.colorbar(sc, ax=ax, label=column)
    else:
        text = values.astype(str)
        cats = text[~missing].value_counts().index.tolist()
        from matplotlib import colormaps

        cmap = colormaps["tab20" if len(cats) > 10 else "tab10"]
        for i, cat in enumerate(cats):
            m = (text == cat).to_numpy() & ~missing
            label = cat if i < MAX_LEGEND else None
            ax.scatter(*coords[m].T, s=12, color=cmap(i % cmap.N), alpha=0.8, label=label)
        ax.legend(title=column, fontsize=7, markerscale=1.5, loc="best")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return fig
