"""Thickness analyses on frozen features: feature sets, separability of maps, Grad-CAM panels.

**Feature sets** are named ``BACKBONE@SIZE[/DETAIL][:WEIGHTS][+tta]``:

- ``tf_efficientnet_lite0@224:imagenet``: the packaged ImageNet weights
  (``models/packaged.py``), fed in their own input normalisation ([-1, 1] for TF-Lite);
- ``resnet18d_64@64:runs/ham-cnn``: a HAM10000-trained dermkit run's encoder (its config's
  normalisation);
- ``vit_micro_patch4_32@32:random``: random initialisation (a floor, and the tests);
- ``classical@160``: no network, the classical baseline's colour + texture features
  (``models/classical.py``: HSV/Lab histograms, lesion-vs-skin colour moments, LBP,
  gradients), a hand-crafted lever (a blue-white veil is a colour);
- ``+tta``: features averaged over the image and its horizontal and vertical flips;
- ``/DETAIL``: the image is first reduced to DETAIL px (antialiased) and enlarged back to
  SIZE, so the network sees the same input size with less detail. A resolution control:
  if balanced accuracy falls as DETAIL shrinks below the images' own size, the study is
  limited by the detail the images keep (``lite0@160/80`` vs ``lite0@160``).

Features are the pooled penultimate output ``forward_head(forward_features(x),
pre_logits=True)``, (N, D), of images resized once into the image cache at SIZE px.

**Separability** of a 2-D map (PCA always, UMAP when umap-learn is installed) or of the full
feature space, by the true category: the silhouette score and the leave-one-out k-NN
balanced accuracy, each against a shuffled-label control (the same score with the labels
permuted, ``n_shuffle`` times: its mean and 95th percentile, and the share of shuffles
scoring at least the real labels, a permutation p-value).

**Grad-CAM panels**: for a few images per true category, the Grad-CAM map of the probe that
did *not* see the image (its out-of-fold probe, head folded onto the backbone), next to the
map of a randomised copy (Adebayo et al.'s sanity check, ``explain/saliency.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermkit.data.cache import build_cache
from dermkit.data.transforms import normalize

log = logging.getLogger(__name__)

RANDOM = "random"
CLASSICAL = "classical"


@dataclass(frozen=True)
class FeatureSpec:
    """A frozen feature extractor: backbone, input size, weights, flip TTA, detail."""

    backbone: str
    size: int
    weights: str = RANDOM
    tta: bool = False
    detail: int | None = None  # px the image is reduced to before it is enlarged to size

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        """``BACKBONE@SIZE[:WEIGHTS][+tta]``, SIZE optionally ``SIZE/DETAIL`` -> FeatureSpec."""
        body, tta = (text[:-4], True) if text.endswith("+tta") else (text, False)
        name, at, rest = body.partition("@")
        sizes, _, weights = rest.partition(":")
        size_text, slash, detail_text = sizes.partition("/")
        numbers = [size_text] + ([detail_text] if slash else [])
        if not at or not name or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError(
                f"feature set '{text}': expected BACKBONE@SIZE[:WEIGHTS][+tta] (SIZE may be "
                "SIZE/DETAIL), e.g. tf_efficientnet_lite0@224:imagenet or "
                "tf_efficientnet_lite0@160/80:imagenet"
            )
        detail = int(detail_text) if slash else None
        if detail is not None and detail >= int(size_text):
            raise ValueError(f"feature set '{text}': DETAIL {detail} must be below SIZE")
        return cls(name, int(size_text), weights or RANDOM, tta, detail)

    def __str__(self) -> str:
        weights = "" if self.backbone == CLASSICAL else f":{self.weights}"
        detail = f"/{self.detail}" if self.detail else ""
        return f"{self.backbone}@{self.size}{detail}{weights}{'+tta' if self.tta else ''}"


def build_encoder(spec: FeatureSpec) -> tuple[nn.Module | None, tuple, tuple]:
    """(model without head, mean, std) of a feature set; the normalisation its weights want.

    The classical feature set has no network: (None, ImageNet mean, std).
    """
    from dermkit.models.backbones import create_backbone
    from dermkit.models.packaged import INPUT_NORMS, resolve_input_norm

    weights = None if spec.weights == RANDOM else spec.weights
    if spec.backbone == CLASSICAL:
        mean, std = INPUT_NORMS["imagenet"]
        return None, mean, std
    model = create_backbone(spec.backbone, num_classes=0, img_size=spec.size, weights=weights)
    mean, std = INPUT_NORMS[resolve_input_norm("auto", weights)]
    return model.eval(), mean, std


def load_images(manifest: pd.DataFrame, size: int, cache_dir: str | Path | None) -> np.ndarray:
    """(N, size, size, 3) uint8 images of the manifest rows (decoded once into the cache)."""
    cache = build_cache(manifest, size, cache_dir=cache_dir)
    return cache.load(manifest["image_id"])


def reduce_detail(images: np.ndarray, detail: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> the same shape, reduced to (detail, detail) and enlarged back.

    Antialiased bilinear both ways, so what is lost is the detail finer than ``detail`` px,
    not a sampling artefact.
    """
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    small = F.interpolate(x, size=(detail, detail), mode="bilinear", antialias=True)
    back = F.interpolate(small, size=images.shape[1:3], mode="bilinear", antialias=True)
    return back.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_input(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalize(x, mean, std)


@torch.no_grad()
def extract(
    model: nn.Module | None, images: np.ndarray, mean, std, tta: bool, batch_size: int = 64
) -> np.ndarray:
    """Pooled penultimate features (N, D) float64 of uint8 images (N, S, S, 3).

    ``model`` None: the classical colour + texture features (flips do not change them).
    """
    if model is None:
        from dermkit.models.classical import extract_features

        return extract_features(images).astype(np.float64)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size], mean, std)
        views = [x, x.flip(-1), x.flip(-2)] if tta else [x]
        f = [model.forward_head(model.forward_features(v), pre_logits=True) for v in views]
        out.append(torch.stack(f).mean(0).double())
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- separability


def knn_balanced_accuracy(points: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-NN balanced accuracy: each point voted by its k nearest others.

    Votes are weighted by 1 / class share, so a majority class does not win by its size.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import NearestNeighbors

    k = max(1, min(k, len(y) - 1))
    _, nn_idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    neighbours = y[nn_idx[:, 1:]]  # drop the point itself
    n_classes = int(y.max()) + 1
    share = np.bincount(y, minlength=n_classes) / len(y)
    votes = np.stack([(neighbours == c).sum(1) / max(share[c], 1e-12) for c in range(n_classes)])
    return float(balanced_accuracy_score(y, votes.argmax(0)))


def silhouette_score_of(points: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(points, y)) if len(np.unique(y)) > 1 else float("nan")


def separability(
    points: np.ndarray, y: np.ndarray, n_shuffle: int = 200, k: int = 10, seed: int = 0
) -> dict[str, dict]:
    """{score: {value, shuffled_mean, shuffled_p95, p_value}} for silhouette and k-NN."""
    rng = np.random.default_rng(seed)
    scores = {
        "silhouette": lambda lab: silhouette_score_of(points, lab),
        f"knn{k}_balanced_accuracy": lambda lab: knn_balanced_accuracy(points, lab, k),
    }
    out = {}
    shuffles = [rng.permutation(y) for _ in range(n_shuffle)]
    for name, fn in scores.items():
        real = fn(y)
        null = np.asarray([fn(s) for s in shuffles])
        out[name] = {
            "value": real,
            "shuffled_mean": float(null.mean()) if n_shuffle else None,
            "shuffled_p95": float(np.percentile(null, 95)) if n_shuffle else None,
            "p_value": float((1 + np.sum(null >= real)) / (1 + n_shuffle)) if n_shuffle else None,
        }
    return out


def embeddings(
    features: np.ndarray, seed: int = 0, use_umap: bool = True
) -> dict[str, tuple[np.ndarray, tuple]]:
    """{"PCA": (coords (N, 2), axis labels), "UMAP": ... when ``use_umap`` and umap-learn
    is installed}."""
    from sklearn.preprocessing import StandardScaler

    from dermkit.explain.features import pca_2d, umap_2d

    z = StandardScaler().fit_transform(features)
    coords, var = pca_2d(z, seed)
    out = {"PCA": (coords, (f"PC1 ({var[0]:.0%})", f"PC2 ({var[1]:.0%})"))}
    umap = umap_2d(z, seed) if use_umap else None
    if umap is not None:
        out["UMAP"] = (umap, ("UMAP1", "UMAP2"))
    return out


# ----------------------------------------------------------------------------- Grad-CAM


def probe_model(encoder: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """A copy of ``encoder`` whose classifier is the probe's linear head (raw-feature space)."""
    import copy

    model = copy.deepcopy(encoder)
    model.reset_classifier(weight.shape[0])
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).float())
        head.bias.copy_(torch.from_numpy(bias).float())
    return model.eval()


def gradcam_rows(
    model: nn.Module, images: np.ndarray, mean, std, ordinal: bool, n_random: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Grad-CAM of a probe model and of randomised copies for uint8 images (B, S, S, 3).

    Returns (trained maps (B, h, w), maps of the first random copy (B, h, w), per-image
    Spearman rho trained vs random, averaged over ``n_random`` copies).
    """
    from dermkit.explain.saliency import class_targets, sanity_check

    x = to_input(images, mean, std)
    with torch.no_grad():
        pred = model(x).argmax(-1).tolist()
    targets = class_targets(pred, ordinal)
    trained, random, stats = sanity_check(model, x, targets, seed=seed, n_random=n_random)
    return trained["gradcam"], random["gradcam"], stats["gradcam"]["per_image"]
