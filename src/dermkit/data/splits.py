"""Label-stratified, lesion-grouped splits and the leakage check every stage runs.

Why not sklearn's StratifiedGroupKFold: it balances k *equal* folds greedily and gives no
bound for rare classes when the ratios are unequal (70/10/20). Here each class's lesions are
dealt out one by one to whichever split is furthest below its quota *for that class*, which
keeps every class's share in every split within a lesion of its target, while a lesion
(all its images) always lands on exactly one side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermkit.data.manifest import SPLITS


def _lesion_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion: its majority label and image count (ties -> alphabetical label)."""
    counts = df.groupby(["lesion_id", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["lesion_id", "n", "label"], ascending=[True, False, True])
    majority = counts.drop_duplicates("lesion_id").set_index("lesion_id")["label"]
    sizes = df.groupby("lesion_id").size()
    return pd.DataFrame({"label": majority, "n_images": sizes}).sort_index()


def assign_lesions(df: pd.DataFrame, ratios: dict[str, float], seed: int = 0) -> pd.Series:
    """Assign every lesion to one part so each class is split at ``ratios`` (by image count).

    Args:
        df: manifest-like frame with ``lesion_id`` and ``label`` columns (N rows).
        ratios: part name -> share, e.g. {"train": .7, "val": .1, "test": .2} (normalised).
        seed: shuffles lesions within each class; same seed, same split.
    Returns:
        Series (N,) of part names aligned with ``df.index``.
    """
    names = list(ratios)
    shares = np.array([ratios[n] for n in names], dtype=float)
    if (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"split ratios must be non-negative and not all zero: {ratios}")
    shares = shares / shares.sum()
    lesions = _lesion_table(df)
    rng = np.random.default_rng(seed)
    part_of_lesion: dict[str, str] = {}
    for label in sorted(lesions["label"].unique()):
        group = lesions[lesions["label"] == label]
        order = rng.permutation(len(group))
        # Larger lesions first (stable within the shuffle) so the small ones fill the gaps.
        sizes = group["n_images"].to_numpy()[order]
        order = order[np.argsort(-sizes, kind="stable")]
        filled = np.zeros(len(names))
        total = group["n_images"].sum()
        for i in order:
            lesion_id, n = group.index[i], group["n_images"].iat[i]
            deficit = shares * total - filled
            k = int(np.argmax(deficit))
            part_of_lesion[lesion_id] = names[k]
            filled[k] += n
    return df["lesion_id"].map(part_of_lesion)


def lesion_grouped_split(
    df: pd.DataFrame,
    train: float = 0.7,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Return a copy of the manifest with ``split`` set to train/val/test.

    Synthetic rows (``synthetic=True``) always go to train: they must never be evaluated on.
    """
    out = df.copy()
    real = ~out["synthetic"].astype(bool)
    out.loc[real, "split"] = assign_lesions(
        out[real], {"train": train, "val": val, "test": test}, seed
    ).to_numpy()
    out.loc[~real, "split"] = "train"
    return out


def lesion_grouped_kfold(df: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.Series:
    """Fold index (0..k-1) per row, label-stratified and lesion-grouped; Series (N,)."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    parts = assign_lesions(df, {str(i): 1.0 for i in range(k)}, seed)
    return parts.astype(int)


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Class share (%) per split next to the overall share; one row per class."""
    overall = df["label"].value_counts(normalize=True).mul(100).rename("overall")
    table = [overall]
    for split in SPLITS:
        part = df[df["split"] == split]
        if len(part):
            table.append(part["label"].value_counts(normalize=True).mul(100).rename(split))
    out = pd.concat(table, axis=1).fillna(0.0).sort_index()
    out["max_abs_diff"] = out.drop(columns="overall").sub(out["overall"], axis=0).abs().max(axis=1)
    return out


# ---------------------------------------------------------------------------- leakage


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (pHash) of each image.

    Args:
        images: (N, H, W, 3) uint8.
    Returns:
        (N,) uint64: bit i is set where the i-th low-frequency DCT coefficient of the 32x32
        grey image exceeds the median of the 8x8 block (Zauner 2010).
    """
    import torch
    from scipy.fft import dctn

    grey = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=-1, keepdim=True)
    small = torch.nn.functional.interpolate(grey.permute(0, 3, 1, 2), size=(32, 32), mode="area")[
        :, 0
    ].numpy()
    low = dctn(small, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(images), 64)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    weights = (np.uint64(1) << np.arange(64, dtype=np.uint64)).astype(np.uint64)
    return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between uint64 hashes: (len(a), len(b)) uint8."""
    x = a[:, None] ^ b[None, :]
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else _popcount(x)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bit count of uint64 values for numpy < 2.0 (no np.bitwise_count)."""
    count = np.zeros(x.shape, dtype=np.uint8)
    for shift in range(0, 64, 8):
        count += _BYTE_POPCOUNT[(x >> np.uint64(shift)) & np.uint64(0xFF)]
    return count


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class LeakageError(RuntimeError):
    """A lesion appears on two sides of a split."""


@dataclass
class LeakageReport:
    """What crosses the split boundary. Lesion crossings are errors; near-duplicates warnings."""

    lesions_across_splits: list[str] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, str, str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lesions_across_splits

    def summary(self) -> str:
        lines = [f"lesions on two sides: {len(self.lesions_across_splits)}"]
        if self.lesions_across_splits:
            lines.append("  e.g. " + ", ".join(self.lesions_across_splits[:10]))
        lines.append(
            f"near-duplicate image pairs across splits (pHash): {len(self.near_duplicates)}"
        )
        for a, sa, b, sb, d in self.near_duplicates[:10]:
            lines.append(f"  {a} ({sa}) ~ {b} ({sb}), distance {d}")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.near_duplicates,
            columns=["image_id_a", "split_a", "image_id_b", "split_b", "hamming"],
        )


def check_leakage(
    df: pd.DataFrame,
    hashes: np.ndarray | None = None,
    max_distance: int = 4,
    raise_on_lesion: bool = True,
) -> LeakageReport:
    """Check a split manifest for lesions on two sides and near-duplicate images across sides.

    Args:
        df: manifest (N rows) with ``split`` set.
        hashes: (N,) uint64 perceptual hashes aligned with ``df`` rows, or None to skip.
        max_distance: Hamming distance at or below which two images count as near-duplicates.
        raise_on_lesion: raise LeakageError when any lesion crosses splits.
    """
    assigned = df[df["split"].isin(SPLITS)]
    sides = assigned.groupby("lesion_id")["split"].nunique()
    report = LeakageReport(lesions_across_splits=sorted(sides.index[sides > 1]))
    if hashes is not None:
        if len(hashes) != len(df):
            raise ValueError(f"hashes has {len(hashes)} entries for {len(df)} manifest rows")
        split = df["split"].to_numpy()
        ids = df["image_id"].to_numpy()
        for i, sa in enumerate(SPLITS):
            for sb in SPLITS[i + 1 :]:
                ia, ib = np.flatnonzero(split == sa), np.flatnonzero(split == sb)
                for start in range(0, len(ia), 2048):  # chunks bound memory to 2048 x len(ib)
                    chunk = ia[start : start + 2048]
                    d = _hamming(hashes[chunk], hashes[ib])
                    for r, c in zip(*np.nonzero(d <= max_distance), strict=True):
                        report.near_duplicates.append(
                            (ids[chunk[r]], sa, ids[ib[c]], sb, int(d[r, c]))
                        )
    if raise_on_lesion and not report.ok:
        raise LeakageError(report.summary())
    return report
