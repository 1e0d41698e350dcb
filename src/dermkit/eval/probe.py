"""How good are an encoder's frozen features? Linear-probe and k-NN macro-F1.

The standard read-outs of self-supervised pretraining (MAE, DINO): the encoder is frozen,
its pooled features (``forward_head(forward_features(x), pre_logits=True)``: the class
token for a ViT, the pooled posterior mean for the VAE encoder) are computed once for
every image, and

* linear probe: standardised features -> scikit-learn ``LogisticRegression`` with
  ``class_weight="balanced"`` (the classes are heavily imbalanced), fitted on train;
* k-NN: cosine similarity, majority vote of the k nearest train images
  (``KNeighborsClassifier``, brute force);

both scored by macro-F1 on val (and test when given). No augmentation, no fine-tuning:
the numbers compare representations, not training recipes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dermkit.core.metrics import macro_f1
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.data.settings import DataConfig
from dermkit.data.transforms import to_float
from dermkit.models.backbones import create_backbone, input_stats
from dermkit.models.weights import KeyReport, load_pretrained


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: CachedImageDataset,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Pooled frozen features (N, D) float32 of every image of ``dataset``, in order."""
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(dataset), batch_size):
        x, _ = dataset.__getitems__(np.arange(i, min(i + batch_size, len(dataset))))
        x = to_float(x.to(device), *input_stats(model))
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        out.append(feats.float().cpu())
    model.train(was_training)
    width = out[0].shape[1] if out else 0
    return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)


def probe_features(
    train_x: np.ndarray,
    train_y: np.ndarray,
    evals: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int = 20,
    seed: int = 0,
    n_classes: int | None = None,
) -> dict:
    """Fit both probes on (train_x (N, D), train_y (N,)); score each named (x, y) set.

    ``n_classes``: the task's K for macro-F1 (default: 1 + the largest label seen).

    Returns:
        {"linear_<name>_macro_f1": ..., "knn_<name>_macro_f1": ...} for each name in evals.
    """
    if n_classes is None:
        n_classes = 1 + int(max(train_y.max(), *(y.max(initial=0) for _, y in evals.values())))
    linear = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed),
    )
    linear.fit(train_x, train_y)
    knn = KNeighborsClassifier(
        n_neighbors=min(k, len(train_y)), metric="cosine", algorithm="brute"
    ).fit(train_x, train_y)
    result = {}
    for name, (x, y) in evals.items():
        result[f"linear_{name}_macro_f1"] = macro_f1(y, linear.predict(x), n_classes)
        result[f"knn_{name}_macro_f1"] = macro_f1(y, knn.predict(x), n_classes)
    return result


def probe_encoder(
    model: torch.nn.Module,
    train_ds: CachedImageDataset,
    val_ds: CachedImageDataset,
    test_ds: CachedImageDataset | None = None,
    k: int = 20,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict:
    """Linear-probe and k-NN macro-F1 of the frozen ``model`` (a timm-style backbone).

    Args:
        model: has ``forward_features`` and ``forward_head(..., pre_logits=True)``.
        train_ds: labelled images the probes are fitted on (real training images).
        val_ds: scored; ``test_ds``: also scored when given (report it, never select on it).
        k: neighbours of the k-NN probe.

    Returns:
        {linear_val_macro_f1, knn_val_macro_f1, [linear_test_macro_f1, knn_test_macro_f1],
        feature_dim, n_train, n_val, [n_test], k, seconds}.
    """
    start = time.perf_counter()
    sets = {"val": val_ds} | ({"test": test_ds} if test_ds is not None else {})
    train_x = extract_features(model, train_ds, batch_size, device)
    evals = {
        name: (extract_features(model, ds, batch_size, device), ds.labels.numpy())
        for name, ds in sets.items()
    }
    result = probe_features(
        train_x, train_ds.labels.numpy(), evals, k=k, seed=seed, n_classes=len(train_ds.class_names)
    )
    result |= {"feature_dim": int(train_x.shape[1]), "n_train": len(train_ds), "k": k}
    result |= {f"n_{name}": len(ds) for name, ds in sets.items()}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def probe_weights(
    data_cfg: DataConfig, seed: int, weights: str | Path, model: str, k: int = 20
) -> tuple[dict, KeyReport]:
    """``probe_encoder`` of the backbone ``model`` holding ``weights``, on ``data_cfg``'s splits.

    Args:
        data_cfg: the dataset and its split (a run config's ``data`` section).
        seed: seed of the linear probe.
        weights: a pretraining run folder or a weights file (``load_pretrained``).
        model: the timm backbone name the weights belong to.

    Returns:
        (probe_encoder's result, the weights' key report: ``.ok`` is False when keys were
        missing or unexpected).
    """
    encoder = create_backbone(model, num_classes=0, img_size=data_cfg.image_size)
    report = load_pretrained(encoder, weights)
    data = prepare_data(data_cfg)
    parts = ("train", "val", "test")
    sets = {s: CachedImageDataset(data.cache, data.part(s), data.classes) for s in parts}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = probe_encoder(
        encoder.to(device), sets["train"], sets["val"], sets["test"], k=k, seed=seed
    )
    return result, report
