"""The classical baseline: colour + texture features and class-balanced gradient boosting.

Patient metadata (``baseline.metadata``) is appended to these features by the caller
(``dermkit.models.metadata``), so this module stays about pixels.

Every learned model in a table needs a cheap, honest floor beside it. Features (per image,
from the cached uint8 pixels):

* colour histograms of H, S, V and of Lab a*, b* (``color_bins`` bins each);
* colour moments (mean, std, skewness of L*, a*, b*) of the centre disc (mostly lesion)
  and the outer ring (mostly skin), and their difference: lesion-vs-skin contrast is what
  a dermatologist reads first;
* uniform rotation-invariant LBP histograms of the grey image at several radii (texture:
  network, globules, vessels);
* gradient-magnitude statistics (border sharpness).

The classifier is sklearn's HistGradientBoostingClassifier with inverse-frequency class
weights; the number of boosting rounds and (optionally) per-class probability scales are
chosen on the validation split, never on test.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.stats import skew
from skimage.color import rgb2hsv, rgb2lab
from skimage.feature import local_binary_pattern
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.utils.class_weight import compute_sample_weight

from dermkit.core.metrics import macro_f1, tune_class_scales


def _histograms(channels: np.ndarray, ranges: list[tuple[float, float]], bins: int) -> np.ndarray:
    """Normalised per-channel histograms. channels (N, P, K) -> (N, K * bins)."""
    n, p, k = channels.shape
    feats = []
    for c in range(k):
        lo, hi = ranges[c]
        idx = np.clip(((channels[..., c] - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
        flat = (idx + np.arange(n)[:, None] * bins).ravel()  # one bincount for all images
        feats.append(np.bincount(flat, minlength=n * bins).reshape(n, bins) / p)
    return np.concatenate(feats, axis=1)


def _moments(values: np.ndarray) -> np.ndarray:
    """Mean, std, skewness per channel. values (N, P, K) -> (N, 3K)."""
    return np.concatenate(
        [values.mean(1), values.std(1), np.nan_to_num(skew(values, axis=1))], axis=1
    )


def extract_features(
    images: np.ndarray,
    color_bins: int = 16,
    lbp_radii: tuple[int, ...] = (1, 2, 3),
    chunk: int = 256,
    workers: int | None = None,
) -> np.ndarray:
    """Hand-crafted colour and texture features, computed in chunks on a thread pool.

    Args:
        images: (N, S, S, 3) uint8.
    Returns:
        (N, F) float32 features; F depends on ``color_bins`` and ``lbp_radii`` only.
    """
    parts = [images[i : i + chunk] for i in range(0, len(images), chunk)]
    # numpy and skimage's Cython LBP release the GIL, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        feats = pool.map(lambda part: _features(part, color_bins, lbp_radii), parts)
        return np.concatenate(list(feats), axis=0)


def _features(images: np.ndarray, color_bins: int, lbp_radii: tuple[int, ...]) -> np.ndarray:
    """``extract_features`` for one chunk: (n, S, S, 3) uint8 -> (n, F) float32."""
    n, s = images.shape[0], images.shape[1]
    rgb = images.astype(np.float32) / 255.0
    hsv = rgb2hsv(rgb).reshape(n, s * s, 3)
    lab = rgb2lab(rgb).reshape(n, s * s, 3)
    yy, xx = np.mgrid[:s, :s]
    radius = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2).ravel() / (s / 2)
    centre, ring = radius < 0.45, radius > 0.8
    hist = np.concatenate(
        [
            _histograms(hsv, [(0, 1), (0, 1), (0, 1)], color_bins),
            _histograms(lab[..., 1:], [(-40, 60), (-30, 60)], color_bins),
        ],
        axis=1,
    )
    centre_m, ring_m = _moments(lab[:, centre]), _moments(lab[:, ring])
    grey = (images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(
        np.uint8
    )
    texture = []
    for r in lbp_radii:
        p = 8 * r if r <= 2 else 24
        codes = np.stack([local_binary_pattern(g, p, r, method="uniform") for g in grey])
        texture.append(_histograms(codes.reshape(n, -1, 1), [(0, p + 2)], p + 2))
    gy, gx = np.gradient(grey.astype(np.float32), axis=(1, 2))
    mag = np.hypot(gx, gy).reshape(n, -1)
    grad = np.stack(
        [mag.mean(1), mag.std(1), np.percentile(mag, 90, axis=1), mag[:, centre].mean(1)], 1
    )
    return np.concatenate(
        [hist, centre_m, ring_m, centre_m - ring_m, *texture, grad], axis=1
    ).astype(np.float32)


@dataclass
class ClassicalBaseline:
    """Features + class-balanced HistGradientBoosting, rounds and class scales tuned on val."""

    n_classes: int
    color_bins: int = 16
    lbp_radii: tuple[int, ...] = (1, 2, 3)
    max_iter: int = 400
    learning_rate: float = 0.05
    max_leaf_nodes: int = 31
    l2_regularization: float = 1.0
    class_balanced: bool = True
    tune_priors_on_val: bool = True
    seed: int = 0

    def features(self, images: np.ndarray) -> np.ndarray:
        return extract_features(images, self.color_bins, tuple(self.lbp_radii))

    def fit(self, x_train, y_train, x_val, y_val) -> dict:
        """Fit on train features (N, F), choose rounds and class scales on val. Returns a log."""
        weights = compute_sample_weight("balanced", y_train) if self.class_balanced else None
        self.model_ = HistGradientBoostingClassifier(
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes,
            l2_regularization=self.l2_regularization,
            early_stopping=False,
            random_state=self.seed,
        ).fit(x_train, y_train, sample_weight=weights)
        curve = []
        for it, p in enumerate(self.model_.staged_predict_proba(x_val), start=1):
            if it % 10 == 0 or it == self.max_iter:
                f1 = macro_f1(y_val, p.argmax(1), self.n_classes)
                curve.append((it, f1))
        self.best_iter_ = max(curve, key=lambda t: t[1])[0]
        self.model_.set_params(max_iter=self.best_iter_)
        self.model_.fit(x_train, y_train, sample_weight=weights)
        self.class_scales_ = np.ones(self.n_classes)
        if self.tune_priors_on_val:
            self.class_scales_ = tune_class_scales(self._raw_proba(x_val), y_val)
        return {
            "val_macro_f1_by_iter": curve,
            "best_iter": self.best_iter_,
            "class_scales": self.class_scales_.tolist(),
        }

    def _raw_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, C) probabilities, with zero columns for classes absent from training."""
        p = np.zeros((len(x), self.n_classes))
        p[:, self.model_.classes_] = self.model_.predict_proba(x)
        return p

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, C) probabilities after the val-chosen class scales (rows sum to 1)."""
        p = self._raw_proba(x) * self.class_scales_
        return p / p.sum(1, keepdims=True)
