"""Lesion-level (cluster) bootstrap: resampling weights and percentile intervals.

HAM10000 has several images of many lesions. Images of one lesion are not independent
evidence, so resampling images would give confidence intervals that are too narrow. Here
the bootstrap draws *lesions* with replacement and keeps every image of each drawn lesion.

A replicate is represented by an integer weight per image: how many times its lesion was
drawn. Every metric in ``metrics.py`` is written as a weighted statistic, so one
``(B, N)`` weight matrix evaluates B replicates at once with matrix products instead of a
Python loop over replicates. Weights are produced in chunks to bound memory for large N.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Upper bound on the elements of one (chunk, N) float64 weight matrix (~32 MB).
_MAX_CHUNK_ELEMENTS = 4_000_000


def group_index(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Map group ids (e.g. lesion_id strings) to dense indices 0..G-1.

    Args:
        groups: (N,) group id per image, any sortable dtype; None makes every image its own
            group (an ordinary image-level bootstrap).
        n: number of images N.

    Returns:
        ``(index, G)``: (N,) int64 group index per image and the number of groups G.
    """
    if groups is None:
        return np.arange(n, dtype=np.int64), n
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) like y_true, got {groups.shape}")
    # A missing lesion id (None, or NaN from a pandas column) would otherwise become one
    # shared "nan" lesion and silently merge unrelated images.
    missing = [i for i, g in enumerate(groups.tolist()) if g is None or g != g]
    if missing:
        raise ValueError(f"groups has no lesion id at rows {missing[:10]}")
    _, index = np.unique(
        groups.astype(str) if groups.dtype == object else groups, return_inverse=True
    )
    index = index.reshape(-1).astype(np.int64)
    return index, int(index.max()) + 1


def lesion_bootstrap_weights(
    index: np.ndarray, n_groups: int, n_boot: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield image weights for ``n_boot`` lesion-level bootstrap replicates, in chunks.

    Each replicate draws ``n_groups`` groups uniformly with replacement; an image's weight
    is the number of times its group was drawn (0 for groups left out).

    Args:
        index: (N,) dense group index per image (from :func:`group_index`).
        n_groups: number of groups G.
        n_boot: number of replicates B.
        rng: source of randomness (fixes the replicates for a given seed).

    Yields:
        (b, N) float64 weight matrices, b <= B, whose rows total B replicates.
    """
    n = index.shape[0]
    chunk = max(1, min(n_boot, _MAX_CHUNK_ELEMENTS // max(n, n_groups, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # Offset each replicate's draws so one bincount counts all replicates at once.
        offsets = (np.arange(b, dtype=np.int64) * n_groups)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=b * n_groups)
        yield counts.reshape(b, n_groups)[:, index].astype(np.float64)
        done += b


def percentile_interval(
    replicates: np.ndarray, ci: float
) -> tuple[float | None, float | None, int]:
    """Percentile bootstrap interval over the valid (finite) replicates.

    Replicates where the metric is undefined (NaN, e.g. AUROC when a resample has no
    positive of a class) are dropped for this metric only.

    Args:
        replicates: (B,) metric value per bootstrap replicate, NaN where undefined.
        ci: central coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``(low, high, n_valid)``; low and high are None when no replicate is valid.
    """
    valid = replicates[np.isfinite(replicates)]
    if valid.size == 0:
        return None, None, 0
    tail = (1.0 - ci) / 2.0 * 100.0
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return float(low), float(high), int(valid.size)
