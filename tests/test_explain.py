"""Explainability: frozen-feature maps with numbers, attention rollout, Grad-CAM, sanity check."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import load_config
from dermkit.explain.features import (
    class_separation,
    explain_features,
    is_continuous,
    plot_embedding,
    silhouette,
    umap_2d,
)
from dermkit.explain.saliency import (
    attention_rollout,
    captured_attention,
    grad_cam,
    randomized_copy,
    sanity_check,
)
from dermkit.models.backbones import create_backbone
from dermkit.tasks.runs import open_run
from dermkit.train.finetune import run_finetune
from dermkit.train.settings import FinetuneRunConfig


@pytest.fixture(scope="module")
def trained_run(phantom_root, cache_dir, tmp_path_factory):
    """A tiny ViT classifier fine-tuned on the phantoms (a few seconds at 32 px)."""
    out = tmp_path_factory.mktemp("explain") / "run"
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        None,
        [
            f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}",
            f"out_dir={out}",
            "model.name=vit_nano_patch4_32",
            "optim.epochs=4",
            "optim.base_lr=0.008",
            "eval.n_boot=0",
            "data.near_duplicate_distance=-1",
        ],
    )
    torch.set_num_threads(1)
    run_finetune(cfg, progress=False)
    return out


def test_rollout_captures_timm_attention_and_restores_fused_path():
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = [b.attn.fused_attn for b in model.blocks]
    with torch.no_grad():
        reference = model(x)
        with captured_attention(model) as maps:
            explicit = model(x)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-4)
    assert [b.attn.fused_attn for b in model.blocks] == fused  # restored
    assert len(maps) == len(model.blocks) and maps[0].shape == (2, 2, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 65))
    # the first block's attention equals softmax(q k^T / sqrt(d)) recomputed from its input
    attn = model.blocks[0].attn
    with torch.no_grad():
        tokens = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x)))
        q, k, _ = attn.qkv(tokens).reshape(2, 65, 3, 2, 32).permute(2, 0, 3, 1, 4)
        manual = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(maps[0], manual, atol=1e-5, rtol=1e-4)
    rollout = attention_rollout(model, x)
    assert rollout.shape == (2, 8, 8)
    torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2))


def test_gradcam_on_a_cnn_follows_the_evidence():
    """A CNN with a red and a green detector, class 1 = red, class 0 = green: on an image
    red on the left and green on the right, Grad-CAM of class 1 lights up the left half and
    of class 0 the right half."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = create_backbone("resnet18", num_classes=2, img_size=32).eval()
    maps = grad_cam(model, torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1

    class RedGreen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[0, 0] = 1.0  # channel 0: red
                self.conv.weight[1, 1] = 1.0  # channel 1: green
                self.conv.bias.zero_()
            self.feature_info = [{"module": "conv"}]  # timm's convention: the last stage

        def forward(self, x):
            f = torch.relu(self.conv(x)).mean((2, 3))
            return torch.stack([f[:, 1], f[:, 0]], 1)

    x = torch.zeros(2, 3, 16, 16)
    x[:, 0, :, :8] = 1.0
    x[:, 1, :, 8:] = 1.0
    cam = grad_cam(RedGreen(), x, [ClassifierOutputTarget(1), ClassifierOutputTarget(0)])
    assert cam[0, :, :6].mean() > 0.9 and cam[0, :, 10:].mean() < 0.1
    assert cam[1, :, 10:].mean() > 0.9 and cam[1, :, :6].mean() < 0.1


def test_randomised_copy_changes_every_weight():
    model = create_backbone("vit_nano_patch4_32", num_classes=3, img_size=32)
    clone = randomized_copy(model, seed=1)
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, q), name


def test_saliency_sanity_check_trained_vs_random(trained_run):
    run = open_run(trained_run)
    from dermkit.tasks.runs import run_data

    data = run_data(run)
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.transforms import to_float

    test = CachedImageDataset(data.cache, data.part("test"), run.classes)
    images, _ = test.__getitems__(np.arange(12))
    trained, random, stats = sanity_check(run.model, to_float(images), None, seed=0)
    assert set(stats) == {"gradcam", "rollout"}
    assert trained["rollout"].shape == (12, 8, 8) and trained["gradcam"].shape == (12, 32, 32)
    for method, s in stats.items():
        # Adebayo et al.: maps of a model with random weights must not look like the trained
        # model's; identical maps would give rho = 1
        assert s["mean"] is not None and s["mean"] < 0.5, (method, s["mean"])
    assert not np.allclose(trained["rollout"], random["rollout"])


def test_silhouette_and_class_separation_on_known_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0], [10, 0], [0, 10]])
    labels = pd.Series(np.repeat(["a", "b", "c"], 30))
    x = centres[np.repeat(np.arange(3), 30)] + rng.normal(0, 0.5, (90, 2))
    assert silhouette(x, labels) > 0.8
    assert abs(silhouette(rng.normal(size=(90, 2)), labels)) < 0.2
    assert np.isnan(silhouette(x, pd.Series(["a"] * 90)))
    sep = class_separation(x, labels, k=5)
    assert sep["knn_purity"].tolist() == [1.0, 1.0, 1.0]
    assert (sep["centroid_ratio"] < 0.2).all()
    assert sep["share"].tolist() == pytest.approx([1 / 3] * 3)


def test_continuous_columns_get_a_colour_bar():
    assert is_continuous(pd.Series([0.0, 0.5, 1.2], name="thickness"))
    assert is_continuous(pd.Series(np.arange(40.0), name="score"))
    assert not is_continuous(pd.Series([1, 2, 1], name="grade"))
    assert not is_continuous(pd.Series([True, False], name="synthetic"))
    coords = np.random.default_rng(0).normal(size=(20, 2))
    bar = plot_embedding(coords, pd.Series(np.linspace(0, 2, 20), name="t"), "t", "", ("a", "b"))
    legend = plot_embedding(coords, pd.Series(["x", "y"] * 10), "c", "", ("a", "b"))
    assert len(bar.axes) == 2 and len(legend.axes) == 1  # colour bar axis vs legend only
    assert legend.axes[0].get_legend() is not None


def test_umap_falls_back_to_pca_only_with_a_log_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    with caplog.at_level(logging.INFO, logger="dermkit.explain.features"):
        assert umap_2d(np.random.default_rng(0).normal(size=(30, 4))) is None
    assert "umap-learn is not installed" in caplog.text
    frame = pd.DataFrame({"label": ["a", "b"] * 15, "age": np.arange(30.0)})
    feats = (
        np.random.default_rng(0).normal(size=(30, 4))
        + (frame["label"] == "a").to_numpy()[:, None] * 3
    )
    m = explain_features(feats, frame, ["label", "age"], tmp_path, interactive=False)
    assert not m["umap"] and (tmp_path / "pca_label.png").exists()
    assert not list(tmp_path.glob("umap_*.png"))
    assert m["silhouette"][0]["silhouette (features)"] > 0.3


def test_explain_cli_features_and_saliency(trained_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "features"
    result = runner.invoke(
        app,
        [
            "explain",
            "features",
            str(trained_run),
            "--out",
            str(out),
            "--splits",
            "val,test",
            "--color-by",
            "label,split,age,thickness",
            "--no-umap",
        ],
    )
    assert result.exit_code == 0, result.output
    for column in ("label", "split", "age", "thickness"):
        assert (out / f"pca_{column}.png").stat().st_size > 1000
    metrics = json.loads((out / "features_metrics.json").read_text())
    assert metrics["continuous"] == ["age", "thickness"]
    sil = {row["column"]: row["silhouette (features)"] for row in metrics["silhouette"]}
    assert set(sil) == {"label", "split"} and -1 <= sil["label"] <= 1
    axes = {(r["column"], r["axis"]) for r in metrics["axis_spearman"]}
    assert ("thickness", "PC1") in axes and ("age", "PC2") in axes
    classes = json.loads((trained_run / "classes.json").read_text())
    assert {r["class"] for r in metrics["class_separation"]} <= set(classes)
    assert "Silhouette" in (out / "report.html").read_text()
    embedding = pd.read_csv(out / "embedding.csv")
    assert {"PC1", "PC2", "label", "age"} <= set(embedding.columns)

    bad = runner.invoke(app, ["explain", "features", str(trained_run), "--color-by", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output

    out = tmp_path / "saliency"
    result = runner.invoke(
        app,
        [
            "explain",
            "saliency",
            str(trained_run),
            "--out",
            str(out),
            "--per-class",
            "1",
            "--sanity-images",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    preds = pd.read_csv(trained_run / "predictions_test.csv")
    for c in preds["label"].unique():
        assert f"class {c}" in html and (out / "saliency" / f"class_{c}.png").exists()
    metrics = json.loads((out / "saliency_metrics.json").read_text())
    assert set(metrics["sanity_rank_correlation"]) == {"gradcam", "rollout"}
    for c, rows in preds.groupby("label"):  # one correct and one wrong example where they exist
        n_ok, n_wrong = min(1, (rows["pred"] == c).sum()), min(1, (rows["pred"] != c).sum())
        assert f"{c}: {n_ok} correct and {n_wrong} wrong predictions." in html
