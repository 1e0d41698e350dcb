"""Thickness study: reader, probes, nested CV and the whole command on a phantom thickness set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermkit.data.readers import DataValidationError
from dermkit.data.thickness import GROUPINGS, THICKNESS_CATEGORIES, load_thickness


def _category(mm: float) -> int:
    """Breslow depth (mm) -> category code: in situ, < 0.76, 0.76-1.5, > 1.5."""
    return 0 if mm <= 0 else 1 if mm < 0.76 else 2 if mm <= 1.5 else 3


@pytest.fixture(scope="module")
def thickness_root(tmp_path_factory) -> Path:
    """Phantom melanomas (one view each, 48 px) with thickness / thickness_class columns."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("thickness")
    csv = generate_phantoms(
        root,
        n_lesions=48,
        views_per_lesion=(1, 1),
        image_size=(48, 48),
        class_weights={"mel": 1.0},
        seed=0,
    )
    meta = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str})
    codes = meta["thickness"].map(_category)
    meta["thickness"] = [THICKNESS_CATEGORIES[c] for c in codes]
    meta["thickness_class"] = codes
    meta.to_csv(csv, index=False)
    assert np.bincount(codes, minlength=4).min() >= 3, "every category needs 3 images"
    return root


def _copy_with(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the thickness folder whose metadata.csv went through ``edit``."""
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    meta = pd.read_csv(dst / "metadata.csv", dtype=str)
    edited = edit(meta)  # edits in place (None) or returns a new frame
    meta = meta if edited is None else edited
    meta.to_csv(dst / "metadata.csv", index=False)
    return dst


def test_reader_keeps_categories_and_groups_them(thickness_root):
    m = load_thickness(thickness_root)
    raw = pd.read_csv(thickness_root / "metadata.csv")
    assert m["category"].tolist() == raw["thickness_class"].tolist()
    three = GROUPINGS["3class"].classes_of(m["category"].to_numpy())
    # 0.76-1.5 and > 1.5 merge into ">= 0.76 mm"; the 4-class grouping keeps all four.
    assert three.max() == 2 and set(three[m["category"].to_numpy() >= 2]) == {2}
    assert GROUPINGS["4class"].classes_of(np.arange(4)).tolist() == [0, 1, 2, 3]


def test_reader_names_row_and_field_of_bad_values(thickness_root, tmp_path):
    def edit(meta):
        meta.loc[2, "thickness_class"] = "7"
        meta.loc[4, "thickness"] = "thick"
        meta.loc[5, "thickness_class"] = str((int(meta.loc[5, "thickness_class"]) + 1) % 4)

    with pytest.raises(DataValidationError) as e:
        load_thickness(_copy_with(thickness_root, tmp_path, edit))
    text = str(e.value)
    assert "metadata.csv row 4" in text and "thickness_class '7'" in text
    assert "metadata.csv row 6" in text and "thickness 'thick'" in text
    assert "metadata.csv row 7" in text and "disagrees with thickness" in text


def test_reader_requires_thickness_columns(thickness_root, tmp_path):
    path = _copy_with(thickness_root, tmp_path, lambda m: m.drop(columns=["thickness_class"]))
    with pytest.raises(DataValidationError, match="missing required column 'thickness_class'"):
        load_thickness(path)


def test_softmax_probe_equals_plain_logistic_regression():
    """The span/scaler folding is exact: same probabilities as scikit-learn on raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from dermkit.explain.thickness_cv import ProbeSpec, fit_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 60)) * 2 + 1, rng.integers(0, 3, 40)  # D > N: span trick
    test = rng.normal(size=(20, 60)) * 2 + 1
    with threadpool_limits(limits=1):
        probe = fit_probe(x, y, ProbeSpec("f", "softmax", 0.05, False), 3)
        scaler = StandardScaler().fit(x)
        ref = LogisticRegression(C=0.05, tol=1e-8, max_iter=2000).fit(scaler.transform(x), y)
    np.testing.assert_allclose(
        probe.predict_proba(test), ref.predict_proba(scaler.transform(test)), atol=2e-3
    )


def test_corn_probe_orders_an_ordinal_signal():
    from dermkit.explain.thickness_cv import ProbeSpec, fit_probe, fold_metrics

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 40)
    x = np.c_[y + rng.normal(0, 0.4, len(y)), rng.normal(size=(len(y), 20))]
    probe = fit_probe(x, y, ProbeSpec("f", "corn", 1.0, True), 4)
    probs = probe.predict_proba(x)
    assert probe.weight.shape == (3, 21)  # K-1 conditional tasks
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    m = fold_metrics(y, probs)
    assert m["balanced_accuracy"] > 0.8 and m["spearman"] > 0.9 and m["qwk"] > 0.9


def test_nested_cv_chooses_informative_features_on_inner_folds():
    from dermkit.explain.thickness_cv import SELECTED, candidate_grid, nested_cv

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    features = {
        "noise": rng.normal(size=(60, 10)),
        "signal": np.c_[y + rng.normal(0, 0.3, 60), rng.normal(size=(60, 9))],
    }
    grid = candidate_grid(["noise", "signal"], cs=(0.1,), balanced=(True,))
    results = nested_cv(features, y, 3, grid, n_folds=3, seeds=(0, 1), inner_folds=2)
    chosen = results[SELECTED].chosen_counts()
    assert all("signal" in c for c in chosen)
    for r in results.values():
        assert len(r.folds) == 6
        # every image is tested exactly once per seed
        for seed in (0, 1):
            tested = np.concatenate([t for (s, _), t in r.test_index.items() if s == seed])
            assert sorted(tested.tolist()) == list(range(60))
    # outer folds in parallel processes give the same predictions
    parallel = nested_cv(features, y, 3, grid, n_folds=3, seeds=(0, 1), inner_folds=2, n_jobs=2)
    np.testing.assert_allclose(parallel[SELECTED].mean_oof(), results[SELECTED].mean_oof())
    summary = results[SELECTED].summary()
    assert summary["balanced_accuracy"]["value"] > 0.6  # chance: 1/3
    assert summary["balanced_accuracy"]["ci_low"] < summary["balanced_accuracy"]["value"]


def test_study_command_end_to_end(thickness_root, tmp_path, cache_dir):
    from typer.testing import CliRunner

    from dermkit.cli import app

    out = tmp_path / "study"
    args = ["thickness", "study", "--data", str(thickness_root), "--out", str(out)]
    args += ["--features", "vit_micro_patch4_32@32:random", "--features", "classical@32"]
    args += ["--folds", "3", "--seeds", "0"]
    args += ["--inner-folds", "2", "--gradcam-per-class", "1", "--n-shuffle", "5"]
    args += ["--n-boot", "10", "--cache-dir", str(cache_dir), "--cs", "0.01"]
    # --no-umap: numba compiling UMAP takes > 10 min on the shared CPU; PCA is checked
    args += ["--random-copies", "1", "--no-umap"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for grouping, k in (("3class", 3), ("4class", 4)):
        g = metrics["groupings"][grouping]
        assert len(g["class_names"]) == k
        assert 0 <= g["families"]["selected"]["balanced_accuracy"]["value"] <= 1
        assert set(g["pooled"]["auroc"]) == {"invasive_vs_in_situ", "ge_0.76mm_vs_below"}
        assert len(g["pooled"]["adjacent_auroc"]) == k - 1
        assert (out / f"gradcam_{grouping}_class{k - 1}.png").is_file()
        oof = pd.read_csv(out / f"oof_{grouping}.csv")
        np.testing.assert_allclose(oof[[f"p_{c}" for c in range(k)]].sum(axis=1), 1.0, atol=1e-4)
    sep = metrics["separability"]["scores"]["3class"]["PCA"]["silhouette"]
    assert sep["shuffled_mean"] is not None
    folds = pd.read_csv(out / "folds.csv")
    # groupings x families (corn, softmax per feature set; selected) x folds
    assert len(folds) == 2 * 5 * 3
    assert set(folds["family"]) >= {
        "corn | classical@32",
        "softmax | vit_micro_patch4_32@32:random",
    }
    # Grad-CAM only ever explains probes of a network
    for g in metrics["groupings"].values():
        assert "classical" not in g["gradcam_family"]
    html = (out / "report.html").read_text()
    assert "Separability" in html and "features_pca.png" not in html  # figures are embedded
    assert (out / "features_pca.png").is_file()


def test_study_command_rejects_bad_feature_spec(thickness_root, tmp_path):
    from typer.testing import CliRunner

    from dermkit.cli import app

    args = ["thickness", "study", "--data", str(thickness_root), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, [*args, "--features", "lite0-224"])
    assert result.exit_code == 2
    assert "BACKBONE@SIZE" in result.output


def test_gradcam_panel_mixes_feature_sets_of_different_sizes():
    """Folds may choose feature sets of different input sizes: one panel still holds them."""
    from dermkit.explain.thickness_study import _plot_gradcam, _same_size

    images = _same_size([np.zeros((16, 16, 3), np.uint8), np.full((24, 24, 3), 255, np.uint8)])
    assert images.shape == (2, 24, 24, 3) and images[1].min() == 255
    maps = [np.random.default_rng(0).random((4, 4)), np.random.default_rng(1).random((6, 6))]
    fig = _plot_gradcam(images, maps, maps, ["a", "b"])
    assert len(fig.axes) == 2 * 3  # rows x (image, Grad-CAM, randomised)


# ----------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def separable_root(tmp_path_factory) -> Path:
    """A thickness folder whose 3-class grouping is visible: 14 images per class, 32 px.

    Each image is skin-coloured noise with a disc whose colour and size are the class's
    (in situ: small brown, < 0.76 mm: medium red, >= 0.76 mm: large blue-grey), so a
    fine-tune that works learns it in a few steps and a broken one stays near chance.
    """
    from PIL import Image

    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("separable")
    csv = generate_phantoms(
        root, n_lesions=42, views_per_lesion=(1, 1), image_size=(32, 32),
        class_weights={"mel": 1.0}, seed=1,
    )  # fmt: skip
    meta = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str})
    codes = np.arange(len(meta)) % 3  # 3-class codes 0, 1, 2 (2: category 0.76-1.5 mm)
    colours = np.array([[110, 70, 40], [170, 30, 40], [60, 80, 150]], np.float64)
    radii = (5, 9, 13)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for image_id, c in zip(meta["image_id"], codes, strict=True):
        image = np.array([225, 180, 160]) + rng.normal(0, 12, (32, 32, 3))
        disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= radii[c] ** 2
        image[disc] = colours[c] + rng.normal(0, 12, (int(disc.sum()), 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(
            root / "images" / f"{image_id}.jpg", quality=95
        )
    meta["thickness"] = [THICKNESS_CATEGORIES[c] for c in codes]
    meta["thickness_class"] = codes
    meta.to_csv(csv, index=False)
    return root


def test_weighted_corn_loss_is_corn_with_ones_and_weights_rows_by_class():
    import torch

    from dermkit.tasks.ordinal import corn_loss

    logits, labels = torch.randn(12, 3), torch.tensor([0, 1, 2, 3] * 3)
    ones = corn_loss(logits, labels, torch.ones(4))
    torch.testing.assert_close(ones, corn_loss(logits, labels))
    # weighting class 3 only: the loss is the (unweighted) terms of the class-3 rows
    only3 = corn_loss(logits, labels, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    m = labels == 3
    rows = 3 * 1 + 3 * 2 + 3 * 3 + 3 * 3  # (row, task) terms: a class-c row joins min(c+1, 3)
    expected = -torch.nn.functional.logsigmoid(logits[m]).sum() / rows
    torch.testing.assert_close(only3, expected)


def test_study_finetune_arm_end_to_end_learns_a_visible_signal(
    separable_root, cache_dir, tmp_path, monkeypatch
):
    """``--finetune`` on the engine: fine-tuned rows beside the probes', out-of-fold files,
    and a working fine-tune beats chance (1/3) by far on the colour + size that define the
    classes. A small ViT without batch norm: at 32 px an EfficientNet's last feature maps
    are 1x1, so its batch statistics over 8 values are too noisy for a few-second test."""
    from typer.testing import CliRunner

    from dermkit.cli import app

    out = tmp_path / "study"
    args = ["thickness", "study", "--data", str(separable_root), "--out", str(out)]
    args += ["--features", "classical@32", "--groupings", "3class", "--folds", "3"]
    args += ["--seeds", "0", "--inner-folds", "2", "--gradcam-per-class", "1"]
    args += ["--n-shuffle", "5", "--n-boot", "10", "--cache-dir", str(cache_dir)]
    args += ["--cs", "0.01", "--random-copies", "1", "--no-umap", "--finetune"]
    args += ["--finetune-model", "vit_micro_patch4_32", "--finetune-size", "32"]
    args += ["--finetune-epochs", "6", "--finetune-batch", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    families = {f"finetune {h} | vit_micro_patch4_32@32:random": h for h in ("corn", "softmax")}
    folds = pd.read_csv(out / "folds.csv")
    metrics = json.loads((out / "metrics.json").read_text())["groupings"]["3class"]
    for family, head in families.items():
        rows = folds[folds["family"] == family]
        assert len(rows) == 3 and rows["chosen"].str.startswith("epoch ").all()
        assert metrics["families"][family]["balanced_accuracy"]["value"] > 0.75, family
        oof = pd.read_csv(out / f"oof_3class_finetune_{head}.csv")
        assert len(oof) == 42  # every image predicted by the fold that held it out
        np.testing.assert_allclose(oof[["p_0", "p_1", "p_2"]].sum(axis=1), 1.0, atol=1e-4)
        assert metrics["finetune"][family]["pooled"]["balanced_accuracy"] > 0.75
    curves = json.loads((out / "finetune_curves_3class.json").read_text())
    assert all(len(c["history"]) == 6 for f in families for c in curves[f])
    assert "Fine-tuned" in (out / "report.html").read_text()

    # A rerun resumes: every stored (head, seed, fold) fit is reused, a missing one is
    # trained again, and the out-of-fold files come out the same.
    import dermkit.explain.thickness_ft as ft

    stored = sorted((out / "finetune_folds" / "3class").glob("*.json"))
    assert len(stored) == 6  # 2 heads x 3 folds
    before = {h: pd.read_csv(out / f"oof_3class_finetune_{h}.csv") for h in ("corn", "softmax")}
    stored[0].unlink()
    calls = []
    real_train_fold = ft.train_fold
    monkeypatch.setattr(
        ft, "train_fold", lambda *a, **k: calls.append(1) or real_train_fold(*a, **k)
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    retrained = stored[0].name.split("-")[0]  # the head of the deleted fit
    for head, frame in before.items():
        again = pd.read_csv(out / f"oof_3class_finetune_{head}.csv")
        if head != retrained:
            pd.testing.assert_frame_equal(again, frame)


def test_a_damaged_stored_fit_is_named_not_silently_retrained(tmp_path):
    """A stored fit that cannot be read stops the study with its path and the way out."""
    from dermkit.explain.thickness_ft import _load_fold

    assert _load_fold(tmp_path, "corn-s0-f0-abc") is None  # not stored: train it
    (tmp_path / "corn-s0-f0-abc.json").write_text('{"probs": [[0.5, 0.5]')
    with pytest.raises(ValueError, match=r"corn-s0-f0-abc\.json.*delete the file"):
        _load_fold(tmp_path, "corn-s0-f0-abc")


def test_feature_spec_detail_round_trips_and_removes_fine_detail():
    from dermkit.explain.thickness import FeatureSpec, reduce_detail

    spec = FeatureSpec.parse("tf_efficientnet_lite0@160/40:imagenet+tta")
    assert (spec.size, spec.detail, spec.weights, spec.tta) == (160, 40, "imagenet", True)
    assert FeatureSpec.parse(str(spec)) == spec
    assert FeatureSpec.parse("classical@32").detail is None
    for bad in ("lite0@160/0:imagenet", "lite0@160/160:imagenet", "lite0@160/x"):
        with pytest.raises(ValueError, match=r"DETAIL|BACKBONE"):
            FeatureSpec.parse(bad)
    # a 1-px checkerboard (the finest detail) on a smooth ramp: reduction keeps the ramp,
    # removes the checkerboard; an image already at the reduced resolution is kept
    yy, xx = np.mgrid[:32, :32]
    ramp = (xx * 6).astype(np.float64)
    checker = ((yy + xx) % 2) * 60.0
    image = np.repeat((ramp + checker)[None, :, :, None], 3, axis=3).astype(np.uint8)
    out = reduce_detail(image, 8)
    assert out.shape == image.shape and out.dtype == np.uint8
    rows = out[0, :, :, 0].astype(np.float64)
    assert np.abs(np.diff(rows, axis=0)).mean() < 3  # checkerboard gone (was 60 per step)
    assert rows[:, -4:].mean() - rows[:, :4].mean() > 100  # the ramp survives
    flat = np.full((1, 16, 16, 3), 77, np.uint8)
    assert (reduce_detail(flat, 4) == 77).all()
