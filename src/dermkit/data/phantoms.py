"""Phantom dermoscopy: a procedurally drawn, deterministic dataset in the HAM10000 layout.

Why: ``make demo`` must run offline with no download, and the test suite needs a fixture
that is fast, byte-for-byte reproducible, and *learnable but not trivial*. Real
HAM10000 cannot be shipped; random noise teaches nothing. So each phantom lesion is
drawn from per-class parameter *distributions* that overlap on purpose (a dysplastic
nevus looks a bit like a melanoma, a flat seborrheic keratosis like a nevus), and a
colour-histogram classifier lands clearly above chance but far from perfect.

What is drawn (numpy, vectorised; PIL for polylines and JPEG; scipy.ndimage for blurs):

- skin: per-lesion skin tone, low-frequency luminance/erythema variation, fine texture,
  a dermoscope's dark circular field edge (vignetting), a few hairs, sensor noise;
- lesion: a blob whose radius is modulated by radial harmonics (k=1 asymmetry, k=2
  elongation, k>=3 border irregularity), coloured by a soft per-pixel mixture of one to six
  palette colours (variegation), plus class-typical structures: pigment network,
  globules, dots, arborizing and dotted vessels, lacunae, central white patch, scale,
  milia, cerebriform ridges, blue-grey ovoid nests, ulceration, regression;
- melanoma thickness (Breslow depth, mm) drives a severity in [0, 1) that monotonically
  (with noise) widens the blue-white veil, adds colours, dots, irregularity, vessels
  and regression, so ``thickness`` is an ordinal target that images actually encode.

``thickness`` is defined for every row: Breslow depth for melanomas (0.0 = in situ),
0.0 for every other class (not an invasive melanocytic lesion).

Several views of one lesion share its ``lesion_id`` and every intrinsic parameter
(shape, colours, structures are all defined in the lesion's own coordinate frame); they
differ in rotation, scale, crop offset, lighting, vignetting, hairs and noise.

Determinism: lesion ``i`` and its views use generators seeded from ``(seed, i, k)``,
so the same seed gives byte-identical files, and generating ``n=100`` and ``n=200``
with one seed gives the same first 100 lesions. The first ``2 * C`` lesions (C = classes
with positive weight) cycle through the classes, so every class appears at least twice
once ``n_lesions >= 2 * C`` (14 with the default weights).

Provenance: every dataset carries ``phantoms.json`` (:data:`PROVENANCE_FILE`) beside its
metadata, naming this generator and its arguments, so that anything trained on it can say
so (:func:`is_phantom_dataset`; the model card flags such models as demo models).

Hand-written because no maintained library draws dermoscopy-like phantoms.

Modules: this one is the entry point (:func:`generate_phantoms`, :func:`is_phantom_dataset`,
argument checks, provenance); :mod:`~dermkit.data.phantom_recipes` holds the per-class
recipes and palette, :mod:`~dermkit.data.phantom_parts` the parts a lesion is made of,
:mod:`~dermkit.data.phantom_lesions` draws a lesion's parameters and
:mod:`~dermkit.data.phantom_render` rasterises one view of it.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermkit.core.files import atomic_path
from dermkit.data.labels import HAM10000_CLASSES, HAM10000_METADATA_COLUMNS
from dermkit.data.phantom_lesions import _sample_lesion, _sample_metadata
from dermkit.data.phantom_recipes import (
    DEFAULT_CLASS_WEIGHTS,
    PALETTE,
    RECIPES,
    SKIN_TONES,
    ClassRecipe,
)
from dermkit.data.phantom_render import _render_view

__all__ = [
    "DEFAULT_CLASS_WEIGHTS",
    "GENERATOR",
    "METADATA_COLUMNS",
    "PALETTE",
    "PROVENANCE_FILE",
    "RECIPES",
    "SKIN_TONES",
    "ClassRecipe",
    "generate_phantoms",
    "is_phantom_dataset",
]

METADATA_COLUMNS: tuple[str, ...] = (*HAM10000_METADATA_COLUMNS, "thickness")

PROVENANCE_FILE = "phantoms.json"
GENERATOR = "dermkit.data.phantoms"

_CLASS_ORDER_STREAM = 2**32 - 1  # seed-stream key of the class-guarantee order (no lesion index)


def _is_int(x, low: int) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


def _check_args(
    n_lesions, views_per_lesion, image_size, class_weights, seed, jpeg_quality
) -> dict[str, float]:
    """Validate arguments, naming the bad one; return class weights for every HAM10000 class.

    Classes missing from ``class_weights`` get weight 0.
    """
    if not _is_int(n_lesions, 1):
        raise ValueError(f"n_lesions must be an integer >= 1, got {n_lesions!r}")
    views = tuple(views_per_lesion)
    if len(views) != 2 or not all(_is_int(k, 1) for k in views) or views[0] > views[1]:
        raise ValueError(f"views_per_lesion must be (min, max) with 1 <= min <= max, got {views}")
    size = tuple(image_size)
    if len(size) != 2 or not all(_is_int(k, 16) for k in size):
        raise ValueError(f"image_size must be (width, height), each an integer >= 16, got {size}")
    if not _is_int(seed, 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not _is_int(jpeg_quality, 1) or jpeg_quality > 100:
        raise ValueError(f"jpeg_quality must be an integer in 1..100, got {jpeg_quality!r}")
    weights = dict(DEFAULT_CLASS_WEIGHTS if class_weights is None else class_weights)
    unknown = sorted(set(weights) - set(HAM10000_CLASSES))
    if unknown:
        raise ValueError(f"class_weights: unknown classes {unknown}; known: {HAM10000_CLASSES}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 <= w < math.inf:
            raise ValueError(f"class_weights['{name}'] must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("class_weights: at least one class needs a positive weight")
    return {c: float(weights.get(c, 0.0)) for c in HAM10000_CLASSES}


def _lesion_classes(weights: dict[str, float], n_lesions: int, seed: int) -> list[str | None]:
    """Forced classes of the first lesions (None = draw from the weights).

    The first 2 * C lesions cycle twice through the C classes with positive weight, in a
    seed-dependent order, so every class appears at least twice once n >= 2 * C, and the
    prefix does not depend on n.
    """
    present = [c for c in HAM10000_CLASSES if weights[c] > 0]
    order = [
        str(c) for c in np.random.default_rng([seed, _CLASS_ORDER_STREAM, 0]).permutation(present)
    ]
    forced = (order + order)[:n_lesions]
    return forced + [None] * (n_lesions - len(forced))


def generate_phantoms(
    out_dir: str | Path,
    n_lesions: int = 200,
    *,
    views_per_lesion: tuple[int, int] = (1, 3),
    image_size: tuple[int, int] = (160, 120),
    class_weights: dict[str, float] | None = None,
    seed: int = 0,
    jpeg_quality: int = 90,
) -> Path:
    """Write a phantom dataset in HAM10000 layout; return the path of its metadata.csv.

    Layout: ``out_dir/metadata.csv`` with columns lesion_id, image_id, dx, dx_type, age,
    sex, localization, thickness, and ``out_dir/images/<image_id>.jpg`` (RGB JPEG of
    ``image_size`` = (width, height)). Each lesion gets a uniform number of views in
    ``views_per_lesion`` (inclusive). ``class_weights`` maps HAM10000 class names to
    unnormalised weights (missing classes get 0; default: HAM10000-like imbalance).
    ``thickness`` is the Breslow depth in mm for melanomas (0.0 = in situ) and 0.0 for
    every other class. ``phantoms.json`` records the generator and these arguments (see
    :func:`is_phantom_dataset`). metadata.csv is written last and atomically, so its presence
    means the dataset is complete; phantom images (PHM_*.jpg) left in ``out_dir/images``
    by an earlier run that are not part of this dataset are removed.
    """
    weights = _check_args(
        n_lesions, views_per_lesion, image_size, class_weights, seed, jpeg_quality
    )
    width, height = (int(k) for k in image_size)
    min_views, max_views = (int(k) for k in views_per_lesion)
    n_lesions, seed = int(n_lesions), int(seed)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    classes = list(weights)
    p = np.asarray([weights[c] for c in classes])
    p /= p.sum()

    rows: list[dict] = []
    for i, forced in enumerate(_lesion_classes(weights, n_lesions, seed)):
        rng = np.random.default_rng([seed, i, 0])
        dx = forced if forced is not None else classes[int(rng.choice(len(classes), p=p))]
        n_views = int(rng.integers(min_views, max_views + 1))
        meta = _sample_metadata(rng, dx)
        lesion = _sample_lesion(rng, dx)
        lesion_id = f"PHL_{i + 1:07d}"
        for k in range(n_views):
            image_id = f"PHM_{len(rows) + 1:07d}"
            pixels = _render_view(lesion, np.random.default_rng([seed, i, k + 1]), width, height)
            Image.fromarray(pixels).save(image_dir / f"{image_id}.jpg", quality=int(jpeg_quality))
            rows.append(
                {
                    "lesion_id": lesion_id,
                    "image_id": image_id,
                    "dx": dx,
                    **meta,
                    "thickness": lesion.thickness,
                }
            )
    # Images left by an earlier, larger run into the same folder would be orphans.
    written = {row["image_id"] for row in rows}
    for stale in image_dir.glob("PHM_*.jpg"):
        if stale.stem not in written:
            stale.unlink()
    # Provenance before metadata.csv: a complete dataset always says what it is.
    provenance = {
        "generator": GENERATOR,
        "real_lesions": False,
        "n_lesions": n_lesions,
        "views_per_lesion": [min_views, max_views],
        "image_size": [width, height],
        "class_weights": weights,
        "seed": seed,
        "jpeg_quality": int(jpeg_quality),
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    csv = out_dir / "metadata.csv"
    with atomic_path(csv) as tmp:
        pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).to_csv(tmp, index=False)
    return csv


def is_phantom_dataset(root: str | Path) -> bool:
    """Whether the dataset folder ``root`` was drawn by :func:`generate_phantoms`.

    The marker is the ``phantoms.json`` provenance file naming this generator; a folder
    without it (real HAM10000, ISIC, a folder layout) or with another generator is not.
    """
    path = Path(root) / PROVENANCE_FILE
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(provenance, dict) and provenance.get("generator") == GENERATOR
