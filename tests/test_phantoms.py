"""Phantom generator: determinism, HAM10000 layout, and images that carry the labels.

"Learnable but not trivial" is checked with an honest baseline: a colour-histogram
classifier on a lesion-grouped split must beat chance by far and still be far from perfect;
melanoma thickness must show in a plain image statistic (blue-grey pixel fraction).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupShuffleSplit

from dermkit.data.labels import HAM10000_CLASSES
from dermkit.data.phantoms import generate_phantoms

HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
HAM_LOCALIZATIONS = {
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "unknown",
    "upper extremity",
}
HAM_DX_TYPES = {"histo", "follow_up", "consensus", "confocal"}
UNIFORM = {c: 1.0 for c in HAM10000_CLASSES}
PER_LESION = ["dx", "dx_type", "age", "sex", "localization", "thickness"]


def _digests(root: Path) -> dict[str, str]:
    """sha256 of metadata.csv and of every image, keyed by relative path."""
    files = [root / "metadata.csv", *sorted((root / "images").iterdir())]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _rgb(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / f"{image_id}.jpg").convert("RGB"))


def _colour_histogram(rgb: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel histograms, concatenated and normalised: (3 * bins,)."""
    counts = [np.histogram(rgb[..., c], bins=bins, range=(0, 256))[0] for c in range(3)]
    return np.concatenate(counts) / rgb[..., 0].size


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    kwargs = dict(n_lesions=15, image_size=(64, 48))
    generate_phantoms(tmp_path / "a", seed=3, **kwargs)
    generate_phantoms(tmp_path / "b", seed=3, **kwargs)
    generate_phantoms(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_digests(tmp_path / k) for k in "abc")
    assert a == b
    shared = set(a) & set(c)
    assert a["metadata.csv"] != c["metadata.csv"]
    assert all(a[k] != c[k] for k in shared if k.startswith("images"))


def test_a_larger_dataset_starts_with_the_smaller_one(tmp_path):
    small = pd.read_csv(generate_phantoms(tmp_path / "s", 9, image_size=(64, 48), seed=5))
    large = pd.read_csv(generate_phantoms(tmp_path / "l", 18, image_size=(64, 48), seed=5))
    assert len(large) > len(small)
    pd.testing.assert_frame_equal(large.head(len(small)), small)
    for image_id in small["image_id"]:
        rel = Path("images") / f"{image_id}.jpg"
        assert (tmp_path / "s" / rel).read_bytes() == (tmp_path / "l" / rel).read_bytes()


def test_layout_matches_ham10000_and_every_image_decodes(phantom_root):
    meta = pd.read_csv(phantom_root / "metadata.csv")
    assert list(meta.columns) == [*HAM_COLUMNS, "thickness"]
    assert meta["image_id"].is_unique
    assert meta["image_id"].str.fullmatch(r"PHM_\d{7}").all()
    assert meta["lesion_id"].str.fullmatch(r"PHL_\d{7}").all()
    on_disk = {p.stem for p in (phantom_root / "images").glob("*")}
    assert on_disk == set(meta["image_id"])
    for image_id in meta["image_id"]:
        with Image.open(phantom_root / "images" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (160, 120)
            im.load()
    lesions = meta.drop_duplicates("lesion_id")
    assert lesions["dx"].value_counts().reindex(HAM10000_CLASSES).min() >= 2
    views = meta.groupby("lesion_id").size()
    assert views.min() >= 1 and views.max() <= 3 and (views >= 2).sum() > 10
    # Every view of a lesion carries the same diagnosis and patient metadata.
    assert (meta.groupby("lesion_id")[PER_LESION].nunique(dropna=False) == 1).all().all()


def test_metadata_values_are_plausible(phantom_root):
    meta = pd.read_csv(phantom_root / "metadata.csv")
    assert set(meta["sex"]) <= {"male", "female", "unknown"}
    assert set(meta["localization"]) <= HAM_LOCALIZATIONS
    assert set(meta["dx_type"]) <= HAM_DX_TYPES
    assert meta["age"].between(0, 90).all() and (meta["age"] % 5 == 0).all()
    mel = meta[meta["dx"] == "mel"]
    assert (meta.loc[meta["dx"] != "mel", "thickness"] == 0).all()
    assert mel["thickness"].between(0, 5).all()
    assert (mel["thickness"] > 0).any() and (mel["dx_type"] == "histo").all()
    # Actinic keratoses and basal cell carcinomas come from older patients than nevi.
    by_class = meta.drop_duplicates("lesion_id").groupby("dx")["age"].mean()
    assert by_class["nv"] < min(by_class["akiec"], by_class["bcc"])


def test_views_of_a_lesion_differ_but_look_alike(phantom_root):
    meta = pd.read_csv(phantom_root / "metadata.csv")
    # Colour histogram of the central region, where the lesion is in every view.
    hists = {i: _colour_histogram(_rgb(phantom_root, i)[30:90, 40:120]) for i in meta["image_id"]}
    lesion_of = dict(zip(meta["image_id"], meta["lesion_id"]))
    sibling_closer = []
    for _, group in meta.groupby("lesion_id"):
        ids = group["image_id"].tolist()
        for a, b in itertools.pairwise(ids):
            assert not np.array_equal(_rgb(phantom_root, a), _rgb(phantom_root, b))
            to_sibling = np.abs(hists[a] - hists[b]).sum()
            to_others = [
                np.abs(hists[a] - hists[o]).sum() for o in hists if lesion_of[o] != lesion_of[a]
            ]
            sibling_closer.append(np.mean(to_sibling < np.asarray(to_others)))
    # Shared intrinsic parameters: a sibling view is closer than most other lesions' images
    # (0.5 if views were independent draws).
    assert len(sibling_closer) > 10 and np.mean(sibling_closer) > 0.75


def test_default_weights_are_ham_like_and_every_class_appears_twice(tmp_path):
    meta = pd.read_csv(
        generate_phantoms(tmp_path, 300, views_per_lesion=(1, 1), image_size=(32, 24), seed=1)
    )
    share = meta["dx"].value_counts(normalize=True)
    assert 0.55 < share["nv"] < 0.8
    assert share["nv"] > share["mel"] > share["df"]
    assert share["bkl"] > share["vasc"]
    assert meta["dx"].value_counts().reindex(HAM10000_CLASSES).min() >= 2


def test_the_first_lesions_cover_every_class_twice(tmp_path):
    meta = pd.read_csv(generate_phantoms(tmp_path, 14, image_size=(32, 24), seed=9))
    counts = meta.drop_duplicates("lesion_id")["dx"].value_counts()
    assert counts.reindex(HAM10000_CLASSES).tolist() == [2] * 7


def test_class_weights_choose_the_classes(tmp_path):
    meta = pd.read_csv(
        generate_phantoms(tmp_path, 12, class_weights={"mel": 1, "df": 3}, image_size=(32, 24))
    )
    counts = meta.drop_duplicates("lesion_id")["dx"].value_counts()
    assert set(counts.index) == {"mel", "df"} and counts.min() >= 2


def test_custom_size_and_views(tmp_path):
    meta = pd.read_csv(
        generate_phantoms(tmp_path, 5, views_per_lesion=(2, 2), image_size=(48, 64), seed=2)
    )
    assert meta.groupby("lesion_id").size().tolist() == [2] * 5
    assert _rgb(tmp_path, meta["image_id"].iloc[0]).shape == (64, 48, 3)


def test_rerun_into_the_same_folder_leaves_no_orphan_images(tmp_path):
    generate_phantoms(tmp_path, 8, image_size=(32, 24))
    meta = pd.read_csv(generate_phantoms(tmp_path, 3, image_size=(32, 24)))
    assert {p.stem for p in (tmp_path / "images").iterdir()} == set(meta["image_id"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n_lesions=0), "n_lesions"),
        (dict(views_per_lesion=(3, 1)), "views_per_lesion"),
        (dict(image_size=(160,)), "image_size"),
        (dict(image_size=(8, 8)), "image_size"),
        (dict(class_weights={"melanoma": 1.0}), "melanoma"),
        (dict(class_weights={"mel": -1.0}), "class_weights['mel']"),
        (dict(class_weights={"mel": 0.0}), "positive weight"),
        (dict(seed=-1), "seed"),
        (dict(jpeg_quality=0), "jpeg_quality"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        generate_phantoms(tmp_path, **{"n_lesions": 3, **kwargs})
    assert not (tmp_path / "metadata.csv").exists()


@pytest.fixture(scope="module")
def balanced_phantoms(tmp_path_factory) -> Path:
    """~400 images, about 30 lesions per class: enough to measure per-class signal."""
    root = tmp_path_factory.mktemp("balanced")
    generate_phantoms(root, 200, class_weights=UNIFORM, seed=0)
    return root


def test_colour_histograms_learn_the_classes_but_not_perfectly(balanced_phantoms):
    meta = pd.read_csv(balanced_phantoms / "metadata.csv")
    features = np.stack([_colour_histogram(_rgb(balanced_phantoms, i)) for i in meta["image_id"]])
    labels = meta["dx"].to_numpy()
    split = GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=0)
    train, test = next(split.split(features, labels, groups=meta["lesion_id"]))
    assert not set(meta["lesion_id"].iloc[train]) & set(meta["lesion_id"].iloc[test])
    model = HistGradientBoostingClassifier(max_iter=100, random_state=0)
    model.fit(features[train], labels[train])
    score = balanced_accuracy_score(labels[test], model.predict(features[test]))
    chance = 1 / len(HAM10000_CLASSES)
    assert 2 * chance < score < 0.98, f"balanced accuracy {score:.3f}"


def test_thicker_melanomas_show_more_blue_grey(tmp_path):
    meta = pd.read_csv(
        generate_phantoms(tmp_path, 80, views_per_lesion=(1, 1), class_weights={"mel": 1}, seed=3)
    )
    rgb = [_rgb(tmp_path, i).astype(int) for i in meta["image_id"]]
    # Blue-grey veil: blue clearly above red, which skin, brown and black never are.
    blue_fraction = [np.mean(a[..., 2] > a[..., 0] + 10) for a in rgb]
    assert meta["thickness"].nunique() > 20
    rho = spearmanr(blue_fraction, meta["thickness"]).statistic
    assert rho > 0.5, f"Spearman {rho:.3f}"
