"""The Manifest: the one table every stage reads and writes.

A manifest is a pandas DataFrame with the required columns below plus any metadata
columns (age, sex, localization, thickness, ...). Images never travel between stages
any other way: a stage gets a manifest, a stage writes a manifest.

Columns
-------
image_id   str   unique per row
path       str   absolute path of the image file
label      str   class name (e.g. "mel"); the class list lives in the dataset's label set
lesion_id  str   rows sharing a lesion_id are views of one lesion and never cross splits
split      str   "train" | "val" | "test" | "" (unassigned)
source     str   where the row came from ("ham10000", "isic", "folder", "phantoms", ...)
synthetic  bool  generated image; never allowed in val or test

A synthetic set may add ``kept`` (bool) and ``reject_reason`` (str): a filtered sample
run lists every image it drew, and only the kept ones are training data
(:func:`read_synthetic_rows`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from dermkit.core.files import atomic_path

REQUIRED_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "label",
    "lesion_id",
    "split",
    "source",
    "synthetic",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest breaks its contract. ``problems`` lists every violation found."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("invalid manifest:\n  " + "\n  ".join(self.problems))


def new_manifest(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Build a manifest from row dicts, filling optional contract columns with defaults.

    ``split`` defaults to "" (unassigned), ``synthetic`` to False, ``lesion_id`` to the
    image_id (one image per lesion when a source has no lesion grouping).
    """
    df = pd.DataFrame(rows).copy()
    for col in ("image_id", "path", "label", "source"):
        if col not in df.columns:
            raise ManifestError([f"missing required column '{col}'"])
    if "lesion_id" not in df.columns:
        df["lesion_id"] = df["image_id"]
    if "split" not in df.columns:
        df["split"] = ""
    if "synthetic" not in df.columns:
        df["synthetic"] = False
    df["synthetic"] = df["synthetic"].astype(bool)
    for col in ("image_id", "path", "label", "lesion_id", "split", "source"):
        df[col] = df[col].fillna("").astype(str)
    ordered = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    return df[ordered].reset_index(drop=True)


def check_manifest(df: pd.DataFrame) -> None:
    """Raise ManifestError listing every contract violation (columns, ids, splits, synthetic)."""
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError([f"missing required column '{c}'" for c in missing])
    dup = df["image_id"][df["image_id"].duplicated(keep=False)]
    for image_id in sorted(set(dup)):
        rows = df.index[df["image_id"] == image_id].tolist()
        problems.append(f"duplicate image_id '{image_id}' at rows {rows}")
    bad_split = ~df["split"].isin((*SPLITS, ""))
    for i in df.index[bad_split]:
        problems.append(f"row {i} ({df.at[i, 'image_id']}): unknown split '{df.at[i, 'split']}'")
    leaked_synth = df["synthetic"].astype(bool) & df["split"].isin(("val", "test"))
    for i in df.index[leaked_synth]:
        problems.append(
            f"row {i} ({df.at[i, 'image_id']}): synthetic image in split '{df.at[i, 'split']}'"
        )
    empty_label = df["label"].astype(str).str.len() == 0
    for i in df.index[empty_label]:
        problems.append(f"row {i} ({df.at[i, 'image_id']}): empty label")
    if problems:
        raise ManifestError(problems)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest from CSV or Parquet (by suffix) and check its contract."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "split": str})
        df["split"] = df["split"].fillna("")
    if "synthetic" in df.columns:
        df["synthetic"] = df["synthetic"].astype(str).str.lower().isin(("true", "1"))
    check_manifest(df)
    return df


def read_synthetic_rows(path: str | Path) -> pd.DataFrame:
    """The synthetic rows of a manifest that are training data: every consumer of a sampled
    set (fine-tuning, distillation, MAE pretraining, the quality study) reads it here.

    A filtered sample run (``dermkit synth sample`` with ``filter``) keeps every drawn row
    with ``kept`` and ``reject_reason``, so that rejections stay visible; rows with
    ``kept`` False are left out. A manifest without the column keeps every row.
    """
    df = read_manifest(path)
    keep = df["synthetic"].astype(bool)
    if "kept" in df.columns:
        keep &= df["kept"].astype(str).str.lower().isin(("true", "1"))
    return df[keep].reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest (CSV or Parquet by suffix) atomically: temp file, then rename."""
    check_manifest(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def manifest_hash(df: pd.DataFrame, columns: Iterable[str] = ("image_id", "path")) -> str:
    """Stable short hash of the listed columns, in row order (keys caches and artifacts)."""
    h = hashlib.sha256()
    for col in columns:
        h.update(col.encode())
        h.update("\x1f".join(df[col].astype(str).tolist()).encode())
    return h.hexdigest()[:16]


def class_names(df: pd.DataFrame) -> list[str]:
    """Sorted class names present in a manifest (the default class index order)."""
    return sorted(df["label"].astype(str).unique().tolist())
