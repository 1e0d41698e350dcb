"""Distribution metrics between real and synthetic feature sets, and nearest neighbours.

* Fréchet distance (Heusel et al. 2017): ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^1/2).
* KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets (mean, std).
* Improved precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union
  of balls reaching every sample's k-th nearest neighbour; precision = share of synthetic
  samples inside the real manifold, recall = share of real samples inside the synthetic one.

Hand-written (a few lines each, numpy/scipy/torch) because the packages that ship them
(torchmetrics, torch-fidelity) tie them to an Inception network downloaded at run time,
while dermkit measures in the feature space of its own encoders.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to features (N, D) and (M, D); N, M >= 2."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dimensions): regularise as pytorch-fid does.
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subset_size: int = 1000, n_subsets: int = 50, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over subsets) of features (N, D) and (M, D); subsets of
    min(subset_size, N, M) >= 2 rows drawn without replacement."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        x = real[rng.choice(len(real), m, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances (N, M) between rows of a (N, D) and b (M, D), in chunks."""
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    out = [
        torch.cdist(torch.from_numpy(np.ascontiguousarray(a[i : i + chunk], dtype=np.float32)), tb)
        for i in range(0, len(a), chunk)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, len(b)), np.float32)


def kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x (N, D) to its k-th nearest other row: (N,)."""
    d = pairwise_distances(x, x)
    np.fill_diagonal(d, np.inf)
    k = min(k, len(x) - 1)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of features (N, D) vs (M, D); N, M >= 2."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("precision/recall need at least 2 samples per set")
    r_real, r_fake = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    d_fake_real = pairwise_distances(fake, real)  # (M, N)
    precision = (d_fake_real <= r_real[None, :]).any(1).mean()
    d_real_fake = d_fake_real.T  # (N, M)
    recall = (d_real_fake <= r_fake[None, :]).any(1).mean()
    return float(precision), float(recall)


def nearest_neighbours(
    query: np.ndarray,
    reference: np.ndarray,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(distance (N,), index (N,)) of each query row's nearest reference row.

    With groups, reference rows of the query's own group (e.g. the same lesion, or the
    image itself) are skipped.
    """
    d = pairwise_distances(query, reference)
    if query_groups is not None:
        # Integer codes: comparing (N, M) strings would be slow.
        _, codes = np.unique(
            np.concatenate([np.asarray(query_groups), np.asarray(reference_groups)]).astype(str),
            return_inverse=True,
        )
        q, r = codes[: len(query)], codes[len(query) :]
        d[q[:, None] == r[None, :]] = np.inf
    idx = d.argmin(1) if d.shape[1] else np.zeros(len(d), int)
    return d[np.arange(len(d)), idx], idx
