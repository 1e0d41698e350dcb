"""One call from a DataConfig to split, cached, leak-checked data: what every stage starts with.

read + validate (readers) -> split (committed id list, or lesion-grouped by seed) ->
decode-once cache -> leakage check (lesions: error; near-duplicates: reported).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.config import ConfigError
from dermkit.data.cache import ImageCache, build_cache
from dermkit.data.labels import load_label_map
from dermkit.data.manifest import SPLITS, check_manifest, class_names
from dermkit.data.readers import load_dataset
from dermkit.data.settings import DataConfig
from dermkit.data.splits import (
    LeakageReport,
    check_leakage,
    lesion_grouped_split,
    perceptual_hashes,
)

log = logging.getLogger(__name__)


def dataset_fingerprint(root: str | Path, split_file: str | None = None) -> str:
    """sha256 of the metadata file (HAM10000 layout) or of every file's name and size, and
    of the split file's content.

    Cheap enough for 10k images; it changes when images are added, removed or relabelled or
    the committed split changes, so the data stage (and everything after it) runs again.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist")
    h = hashlib.sha256()
    meta = root / "metadata.csv"
    if meta.is_file():
        h.update(meta.read_bytes())
        h.update(str(sum(1 for _ in (root / "images").glob("*"))).encode())
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(root)}\x1f{p.stat().st_size}\n".encode())
    if split_file is not None:
        if not Path(split_file).is_file():
            raise ConfigError(f"split file {split_file} does not exist")
        h.update(Path(split_file).read_bytes())
    return h.hexdigest()


class SplitFileError(ValueError):
    """A committed split file does not match the dataset; the message names the rows."""


def read_split_file(path: str | Path) -> pd.DataFrame:
    """Read an id list (image_id, lesion_id, split) written by ``dermkit data split``."""
    path = Path(path)
    if not path.exists():
        raise SplitFileError(f"split file not found: {path}")
    ids = pd.read_csv(path, dtype=str)
    missing = {"image_id", "lesion_id", "split"} - set(ids.columns)
    if missing:
        raise SplitFileError(f"{path}: missing columns {sorted(missing)}")
    bad = ids[~ids["split"].isin(SPLITS)]
    if len(bad):
        raise SplitFileError(f"{path}: unknown split values at rows {bad.index[:10].tolist()}")
    return ids


def apply_split_file(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Set ``split`` of real rows from a committed id list; every real row must be listed.

    Synthetic rows are always train. A row whose lesion_id disagrees with the list is an
    error, since it means the list was made for other data.
    """
    ids = read_split_file(path).set_index("image_id")
    out = df.copy()
    real = ~out["synthetic"].astype(bool)
    unknown = out.loc[real & ~out["image_id"].isin(ids.index), "image_id"]
    if len(unknown):
        raise SplitFileError(
            f"{path}: {len(unknown)} images are not in the split file, e.g. {unknown[:5].tolist()}"
        )
    listed = ids.loc[out.loc[real, "image_id"]]
    mismatch = out.loc[real, "lesion_id"].to_numpy() != listed["lesion_id"].to_numpy()
    if mismatch.any():
        bad = out.loc[real, "image_id"][mismatch][:5].tolist()
        raise SplitFileError(f"{path}: lesion_id differs from the dataset for images {bad}")
    out.loc[real, "split"] = listed["split"].to_numpy()
    out.loc[~real, "split"] = "train"
    return out


def write_split_file(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the derived id list (no images, no paths) that makes a split reproducible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    real = df[~df["synthetic"].astype(bool)]
    real[["image_id", "lesion_id", "split"]].sort_values("image_id").to_csv(path, index=False)
    return path


def write_fold_file(df: pd.DataFrame, split_file: str | Path, k: int) -> Path:
    """Write ``<split file stem>-<k>fold.csv`` (image_id, lesion_id, fold) beside the split
    file, from ``df``'s ``fold`` column (``splits.lesion_grouped_kfold``); returns its path."""
    split_file = Path(split_file)
    path = split_file.with_name(split_file.stem + f"-{k}fold.csv")
    df[["image_id", "lesion_id", "fold"]].sort_values("image_id").to_csv(path, index=False)
    return path


@dataclass
class PreparedData:
    """A split manifest, its image cache, the class order and the leakage report."""

    manifest: pd.DataFrame
    cache: ImageCache
    classes: list[str]
    leakage: LeakageReport
    rejects: pd.DataFrame

    def part(self, split: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)


def split_manifest(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Apply the committed split file if configured, else a lesion-grouped split by seed."""
    if cfg.split_file:
        return apply_split_file(df, cfg.split_file)
    return lesion_grouped_split(df, cfg.train, cfg.val, cfg.test, seed=cfg.split_seed)


def read_configured_dataset(cfg: DataConfig, rejects_path: str | Path | None = None):
    """The dataset ``cfg`` describes, read and validated (path, layout, label map, classes,
    skip_bad), not yet split: a ``readers.LoadedDataset``."""
    label_map = load_label_map(cfg.label_map) if cfg.label_map else None
    return load_dataset(
        cfg.path,
        layout=cfg.layout,
        skip_bad=cfg.skip_bad,
        label_map=label_map,
        classes=cfg.classes,
        rejects_path=rejects_path,
    )


def prepare_data(
    cfg: DataConfig,
    rejects_path: str | Path | None = None,
    progress: bool = False,
    manifest: pd.DataFrame | None = None,
) -> PreparedData:
    """Read, validate, split, cache and leak-check the dataset described by ``cfg``.

    ``manifest`` skips reading (e.g. a manifest with synthetic rows from a synthesis run);
    it is still checked and split.
    """
    if manifest is None:
        loaded = read_configured_dataset(cfg, rejects_path)
        df, rejects = loaded.manifest, loaded.rejects
    else:
        df, rejects = manifest, pd.DataFrame(columns=["image_id", "path", "row", "reason"])
    if not (df["split"].isin(SPLITS)).all():
        df = split_manifest(df, cfg)
    check_manifest(df)
    cache = build_cache(
        df,
        cfg.image_size,
        cfg.crop,
        cfg.cache_dir,
        progress=progress,
        colour_constancy=cfg.colour_constancy,
    )
    hashes = None
    if cfg.near_duplicate_distance >= 0:
        hashes = perceptual_hashes(cache.images[cache.rows_for(df["image_id"])])
    leakage = check_leakage(df, hashes, max_distance=max(cfg.near_duplicate_distance, 0))
    if leakage.near_duplicates:
        log.warning("near-duplicate images across splits:\n%s", leakage.summary())
    return PreparedData(df, cache, class_names(df), leakage, rejects)


def images_for(data: PreparedData, part: pd.DataFrame) -> np.ndarray:
    """(M, S, S, 3) uint8 images of a manifest subset, in its row order."""
    return data.cache.load(part["image_id"])
