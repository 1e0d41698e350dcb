"""Class sets and label maps.

HAM10000's seven diagnostic classes are dermkit's reference class set. A label map maps
one source's class names onto another's (e.g. ISIC 2019's "AK" and "SCC" onto "akiec"),
so a model trained on one dataset can be evaluated on another.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_DESCRIPTIONS: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
# Columns of HAM10000's metadata.csv, in its order (readers, download and phantoms share it).
HAM10000_METADATA_COLUMNS: tuple[str, ...] = (
    "lesion_id",
    "image_id",
    "dx",
    "dx_type",
    "age",
    "sex",
    "localization",
)
MALIGNANT_CLASSES: frozenset[str] = frozenset({"akiec", "bcc", "mel"})
MELANOMA = "mel"


def load_label_map(path: str | Path) -> dict[str, str | None]:
    """Read a label map {source_label: target_label or null (drop)} from YAML or JSON."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a label map must be a mapping source_label -> target_label")
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}


def apply_label_map(df: pd.DataFrame, label_map: dict[str, str | None]) -> pd.DataFrame:
    """Map ``label`` through ``label_map``; rows mapped to None are dropped.

    Raises ValueError naming every label the map does not cover, so no class is lost
    silently.
    """
    unknown = sorted(set(df["label"]) - set(label_map))
    if unknown:
        raise ValueError(f"label map does not cover labels {unknown}")
    out = df.copy()
    out["label"] = out["label"].map(label_map)
    return out[out["label"].notna()].reset_index(drop=True)
