"""Patient metadata (age, sex, body site) as tabular features beside the image features.

ISIC 2019's task 2 and most dermatology papers fuse these with the image: a lesion on the
face of an 80-year-old is a different prior from one on the back of a 30-year-old. The
encoding is fitted on the train rows only:

* a numeric column (age) stays a float; a missing value stays NaN, which gradient boosting
  routes down its own learned branch (no imputation that could hide missingness);
* any other column is one-hot over the categories seen in train; a category that only
  val/test has, or a missing value, is all zeros.

Columns that are the label or identify the image are refused, and so is ``dx_type``: in
HAM10000 it leaks the label (every ``follow_up`` image is a naevus, by how the data were
collected), so a model using it would be scored on its knowledge of the collection, not
of the lesion.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermkit.config import ConfigError

NOT_FEATURES = frozenset(
    {"label", "dx", "dx_type", "lesion_id", "image_id", "path", "split", "source", "synthetic"}
)


class MetadataEncoder:
    """Encode manifest columns (N rows) -> (N, F) float32; fitted on the train rows."""

    def __init__(self, columns: list[str]):
        refused = sorted(set(columns) & NOT_FEATURES)
        if refused:
            raise ConfigError(
                f"baseline.metadata: {refused} cannot be features (the label, an id, or "
                f"dx_type, which leaks the label); use patient columns such as age, sex, "
                f"localization"
            )
        self.columns = list(columns)

    def fit(self, train: pd.DataFrame) -> MetadataEncoder:
        missing = [c for c in self.columns if c not in train.columns]
        if missing:
            available = sorted(set(train.columns) - NOT_FEATURES)
            raise ConfigError(
                f"baseline.metadata: the dataset has no column {missing}; it has {available}"
            )
        self.categories_: dict[str, list | None] = {}
        for c in self.columns:
            values = train[c]
            if pd.api.types.is_numeric_dtype(values):
                self.categories_[c] = None
            else:
                self.categories_[c] = sorted(values.dropna().astype(str).unique())
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        parts = []
        for c, categories in self.categories_.items():
            if categories is None:
                parts.append(pd.to_numeric(frame[c], errors="coerce").to_numpy(float)[:, None])
            else:
                # missing -> None, which equals no category (all zeros)
                values = frame[c].astype(object).where(frame[c].notna(), None).to_numpy()
                values = np.array([None if v is None else str(v) for v in values], dtype=object)
                parts.append((values[:, None] == np.asarray(categories)[None, :]).astype(float))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def feature_names(self) -> list[str]:
        names = []
        for c, categories in self.categories_.items():
            names += [c] if categories is None else [f"{c}={v}" for v in categories]
        return names
