import numpy as np
import pandas as pd
import pytest

from dermkit.data.manifest import new_manifest
from dermkit.data.splits import (
    LeakageError,
    check_leakage,
    lesion_grouped_kfold,
    lesion_grouped_split,
    perceptual_hashes,
    split_summary,
)


def _imbalanced_manifest(seed=0, n_lesions=3000):
    """Lesions with 1-4 images each and HAM-like imbalance (two rare classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(list("abcde"), size=n_lesions, p=[0.6, 0.2, 0.12, 0.05, 0.03])
    rows = []
    for i, lab in enumerate(labels):
        for v in range(rng.integers(1, 5)):
            rows.append(
                {
                    "image_id": f"img{i}_{v}",
                    "path": f"/x/{i}_{v}.jpg",
                    "label": lab,
                    "lesion_id": f"les{i}",
                    "source": "t",
                }
            )
    return new_manifest(rows)


def test_split_is_lesion_grouped_and_stratified():
    df = lesion_grouped_split(_imbalanced_manifest(), 0.7, 0.1, 0.2, seed=3)
    assert df.groupby("lesion_id")["split"].nunique().max() == 1
    summary = split_summary(df)
    assert summary["max_abs_diff"].max() < 1.0
    shares = df["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.01)
    assert shares["val"] == pytest.approx(0.1, abs=0.01)
    assert shares["test"] == pytest.approx(0.2, abs=0.01)


def test_split_is_deterministic_by_seed():
    m = _imbalanced_manifest()
    a, b = lesion_grouped_split(m, seed=1), lesion_grouped_split(m, seed=1)
    c = lesion_grouped_split(m, seed=2)
    assert (a["split"] == b["split"]).all()
    assert (a["split"] != c["split"]).any()


def test_synthetic_rows_always_train():
    m = _imbalanced_manifest(n_lesions=200)
    m.loc[:20, "synthetic"] = True
    out = lesion_grouped_split(m, seed=0)
    assert (out.loc[out["synthetic"], "split"] == "train").all()


def test_kfold_groups_and_covers_every_row():
    m = _imbalanced_manifest(n_lesions=1000)
    folds = lesion_grouped_kfold(m, k=5, seed=0)
    assert set(folds) == set(range(5))
    assert m.assign(f=folds).groupby("lesion_id")["f"].nunique().max() == 1
    sizes = folds.value_counts(normalize=True)
    assert sizes.min() > 0.18 and sizes.max() < 0.22


def test_leakage_detects_lesion_on_two_sides():
    m = lesion_grouped_split(_imbalanced_manifest(n_lesions=100), seed=0)
    multi = m.groupby("lesion_id").size()
    lesion = multi[multi > 1].index[0]
    rows = m.index[m["lesion_id"] == lesion]
    m.loc[rows[0], "split"] = "train"
    m.loc[rows[1], "split"] = "test"
    with pytest.raises(LeakageError, match=lesion):
        check_leakage(m)
    report = check_leakage(m, raise_on_lesion=False)
    assert report.lesions_across_splits == [lesion]


def test_phash_flags_near_duplicates_across_splits_only():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base[:, ::4, ::4], 4, axis=1), 4, axis=2)  # blocky, distinct
    noisy = np.clip(base[0].astype(int) + rng.integers(-3, 4, base[0].shape), 0, 255)
    images = np.concatenate([base, noisy[None].astype(np.uint8)])
    df = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(7)],
            "lesion_id": [f"l{k}" for k in range(7)],
            "split": ["train", "train", "val", "val", "test", "test", "test"],
        }
    )
    hashes = perceptual_hashes(images)
    report = check_leakage(df, hashes, max_distance=4)
    pairs = {(a, b) for a, _, b, _, _ in report.near_duplicates}
    assert pairs == {("i0", "i6")}
