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
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage

from dermkit.core.files import atomic_path
from dermkit.data.labels import HAM10000_CLASSES, HAM10000_METADATA_COLUMNS, MELANOMA

METADATA_COLUMNS: tuple[str, ...] = (*HAM10000_METADATA_COLUMNS, "thickness")

# Dermoscopic colours (RGB, 0-255). Names follow the dermoscopy vocabulary.
PALETTE: dict[str, tuple[int, int, int]] = {
    "tan": (198, 152, 120),
    "light_brown": (184, 124, 94),
    "brown": (140, 84, 62),
    "dark_brown": (88, 52, 44),
    "black": (42, 32, 36),
    "blue_grey": (98, 106, 136),
    "red": (196, 64, 74),
    "purple": (126, 46, 92),
    "pink": (222, 146, 150),
    "white": (236, 224, 222),
}

# Fair, mostly pinkish skin as in HAM10000 (Fitzpatrick I-III); one is picked and jittered.
SKIN_TONES: np.ndarray = np.array(
    [(232, 186, 172), (222, 170, 152), (236, 198, 186), (214, 160, 134), (228, 180, 176)],
    dtype=np.float32,
)

PROVENANCE_FILE = "phantoms.json"
GENERATOR = "dermkit.data.phantoms"

_CLASS_ORDER_STREAM = 2**32 - 1  # seed-stream key of the class-guarantee order (no lesion index)
_N_BASIS = 12  # smooth Fourier basis functions per lesion (colour mixing, warps, patchiness)


@dataclass(frozen=True)
class ClassRecipe:
    """Per-class distributions of a phantom lesion's intrinsic parameters.

    Ranges are (low, high) of a uniform draw; dicts are unnormalised probabilities.
    Ranges of different classes overlap on purpose.
    """

    weight: float  # default share of lesions (HAM10000-like)
    radius: tuple[float, float]  # lesion radius, in units of half the image height
    elongation: tuple[float, float]  # amplitude of the k=2 harmonic
    asymmetry: tuple[float, float]  # amplitude of the k=1 and k=3 harmonics
    irregularity: tuple[float, float]  # amplitude of each k=4..10 harmonic
    border_softness: tuple[float, float]  # edge ramp width, fraction of radius
    opacity: tuple[float, float]  # how strongly lesion colour covers skin
    colours: dict[str, float]  # palette colour -> choice weight
    n_colours: tuple[int, int]
    variegation: tuple[float, float]  # softmax sharpness of the colour mixture (patchiness)
    concentric: tuple[float, float]  # pull of each colour towards its own ring (order)
    eccentricity: tuple[float, float]  # offset of the colour pattern centre, fraction of radius
    structures: dict[str, float]  # structure name -> probability of being present
    age: tuple[float, float]  # mean, sd (years)
    male: float  # probability of sex "male"
    localization: dict[str, float]
    dx_type: dict[str, float]


RECIPES: dict[str, ClassRecipe] = {
    "nv": ClassRecipe(
        weight=0.669,
        radius=(0.35, 0.85),
        elongation=(0.0, 0.16),
        asymmetry=(0.0, 0.05),
        irregularity=(0.0, 0.02),
        border_softness=(0.08, 0.3),
        opacity=(0.65, 1.0),
        colours={
            "light_brown": 3,
            "brown": 3,
            "dark_brown": 1.2,
            "tan": 1.2,
            "blue_grey": 0.12,
            "black": 0.1,
            "pink": 0.2,
        },
        n_colours=(1, 3),
        variegation=(1.5, 3.5),
        concentric=(1.5, 4.0),
        eccentricity=(0.0, 0.15),
        structures={"network": 0.6, "globules": 0.4, "dots": 0.15, "white_centre": 0.03},
        age=(46, 15),
        male=0.51,
        localization={
            "back": 20,
            "lower extremity": 23,
            "trunk": 21,
            "abdomen": 13,
            "upper extremity": 9,
            "foot": 4,
            "chest": 2,
            "face": 1,
            "unknown": 3,
            "genital": 1,
            "hand": 1,
            "neck": 1,
        },
        dx_type={"follow_up": 0.55, "histo": 0.37, "consensus": 0.08},
    ),
    "mel": ClassRecipe(
        weight=0.111,
        radius=(0.45, 0.8),
        elongation=(0.04, 0.28),
        asymmetry=(0.04, 0.13),
        irregularity=(0.012, 0.04),
        border_softness=(0.04, 0.2),
        opacity=(0.65, 1.0),
        colours={
            "light_brown": 2,
            "brown": 2,
            "dark_brown": 2.5,
            "black": 1.2,
            "tan": 0.8,
            "red": 0.2,
            "pink": 0.2,
            "white": 0.2,
        },
        n_colours=(2, 3),
        variegation=(2.0, 4.0),
        concentric=(0.3, 1.5),
        eccentricity=(0.1, 0.5),
        structures={
            "network": 0.6,
            "globules": 0.35,
            "dots": 0.55,
            "dotted_vessels": 0.08,
            "regression": 0.12,
        },
        age=(61, 15),
        male=0.6,
        localization={
            "back": 30,
            "upper extremity": 18,
            "lower extremity": 17,
            "face": 11,
            "chest": 6,
            "abdomen": 5,
            "trunk": 4,
            "neck": 3,
            "ear": 2,
            "foot": 2,
            "scalp": 1,
            "unknown": 1,
        },
        dx_type={"histo": 1.0},
    ),
    "bkl": ClassRecipe(
        weight=0.110,
        radius=(0.4, 0.9),
        elongation=(0.04, 0.3),
        asymmetry=(0.02, 0.1),
        irregularity=(0.008, 0.035),
        border_softness=(0.02, 0.12),
        opacity=(0.5, 0.9),
        colours={
            "tan": 4,
            "light_brown": 3,
            "brown": 2,
            "dark_brown": 0.7,
            "pink": 0.5,
            "black": 0.15,
        },
        n_colours=(1, 3),
        variegation=(2.0, 6.0),
        concentric=(0.3, 2.0),
        eccentricity=(0.0, 0.3),
        structures={
            "cerebriform": 0.55,
            "milia": 0.5,
            "dots": 0.35,
            "network": 0.15,
            "scale": 0.12,
        },
        age=(64, 14),
        male=0.57,
        localization={
            "face": 27,
            "back": 18,
            "lower extremity": 15,
            "upper extremity": 9,
            "trunk": 8,
            "chest": 7,
            "abdomen": 5,
            "neck": 3,
            "scalp": 3,
            "unknown": 3,
            "hand": 2,
            "ear": 1,
        },
        dx_type={"histo": 0.7, "consensus": 0.24, "confocal": 0.06},
    ),
    "bcc": ClassRecipe(
        weight=0.051,
        radius=(0.3, 0.7),
        elongation=(0.0, 0.25),
        asymmetry=(0.03, 0.1),
        irregularity=(0.01, 0.04),
        border_softness=(0.1, 0.3),
        opacity=(0.45, 0.75),
        colours={
            "pink": 4,
            "white": 2,
            "red": 0.6,
            "light_brown": 0.6,
            "blue_grey": 0.3,
            "tan": 0.5,
            "brown": 0.3,
        },
        n_colours=(1, 3),
        variegation=(2.0, 6.0),
        concentric=(0.3, 2.0),
        eccentricity=(0.0, 0.3),
        structures={
            "arborizing_vessels": 0.75,
            "blue_grey_nests": 0.65,
            "ulceration": 0.25,
            "white_centre": 0.12,
            "dots": 0.12,
        },
        age=(67, 13),
        male=0.63,
        localization={
            "back": 38,
            "face": 19,
            "lower extremity": 11,
            "chest": 10,
            "upper extremity": 10,
            "abdomen": 3,
            "neck": 3,
            "scalp": 3,
            "trunk": 2,
            "foot": 1,
        },
        dx_type={"histo": 1.0},
    ),
    "akiec": ClassRecipe(
        weight=0.033,
        radius=(0.45, 0.9),
        elongation=(0.04, 0.3),
        asymmetry=(0.03, 0.1),
        irregularity=(0.01, 0.04),
        border_softness=(0.15, 0.35),
        opacity=(0.4, 0.7),
        colours={
            "pink": 3,
            "red": 2,
            "light_brown": 1.2,
            "tan": 1,
            "white": 0.8,
            "brown": 0.4,
        },
        n_colours=(1, 3),
        variegation=(2.0, 6.0),
        concentric=(0.3, 2.0),
        eccentricity=(0.0, 0.3),
        structures={
            "scale": 0.7,
            "dotted_vessels": 0.5,
            "milia": 0.3,
            "dots": 0.2,
            "network": 0.05,
        },
        age=(67, 11),
        male=0.65,
        localization={
            "face": 37,
            "lower extremity": 18,
            "upper extremity": 18,
            "back": 10,
            "chest": 4,
            "hand": 4,
            "neck": 4,
            "scalp": 4,
            "abdomen": 1,
        },
        dx_type={"histo": 1.0},
    ),
    "vasc": ClassRecipe(
        weight=0.014,
        radius=(0.25, 0.55),
        elongation=(0.0, 0.25),
        asymmetry=(0.0, 0.06),
        irregularity=(0.0, 0.03),
        border_softness=(0.04, 0.14),
        opacity=(0.6, 0.95),
        colours={"red": 3, "purple": 2.5, "pink": 1, "blue_grey": 0.5, "dark_brown": 0.3},
        n_colours=(1, 3),
        variegation=(2.0, 6.0),
        concentric=(0.3, 2.0),
        eccentricity=(0.0, 0.2),
        structures={"lacunae": 0.85, "dotted_vessels": 0.1, "white_centre": 0.05},
        age=(51, 21),
        male=0.51,
        localization={
            "trunk": 28,
            "abdomen": 22,
            "lower extremity": 16,
            "back": 12,
            "upper extremity": 6,
            "face": 5,
            "chest": 3,
            "hand": 3,
            "neck": 2,
            "scalp": 2,
        },
        dx_type={"consensus": 0.53, "histo": 0.47},
    ),
    "df": ClassRecipe(
        weight=0.011,
        radius=(0.28, 0.55),
        elongation=(0.0, 0.2),
        asymmetry=(0.0, 0.05),
        irregularity=(0.0, 0.02),
        border_softness=(0.15, 0.35),
        opacity=(0.55, 0.85),
        colours={"light_brown": 3, "tan": 2, "brown": 2, "pink": 0.4},
        n_colours=(1, 2),
        variegation=(2.0, 4.0),
        concentric=(1.0, 3.0),
        eccentricity=(0.0, 0.15),
        structures={"white_centre": 0.85, "network": 0.6, "dotted_vessels": 0.1},
        age=(53, 13),
        male=0.48,
        localization={
            "lower extremity": 74,
            "upper extremity": 19,
            "abdomen": 3,
            "back": 1,
            "foot": 1,
            "genital": 1,
        },
        dx_type={"consensus": 0.52, "histo": 0.48},
    ),
}
DEFAULT_CLASS_WEIGHTS: dict[str, float] = {c: RECIPES[c].weight for c in HAM10000_CLASSES}


# --------------------------------------------------------------------------- lesion model


@dataclass
class _Blob:
    """A soft star-shaped region: r(phi) = radius * (1 + Re(sum_k c_k e^{i k phi}))."""

    centre: np.ndarray  # (2,) lesion frame
    radius: float
    harmonics: np.ndarray  # (K,) complex, k = 1..K
    softness: float  # edge ramp half-width, fraction of radius
    rgb: np.ndarray  # (3,)
    alpha: float


@dataclass
class _Spots:
    """Round marks (dots, globules, clods) of one size; hard ones get a crisp edge."""

    xy: np.ndarray  # (P, 2) lesion frame
    rgb: np.ndarray  # (P, 3)
    sigma: float  # Gaussian radius, lesion-frame units
    alpha: float
    hard: bool


@dataclass
class _Lines:
    """Polylines (vessels) of one colour."""

    polylines: list[np.ndarray]  # each (L, 2), lesion frame
    widths: list[float]  # lesion-frame units
    rgb: np.ndarray
    alpha: float


@dataclass
class _Grating:
    """Pigment network (three directions: honeycomb) or cerebriform ridges (one direction)."""

    freq: float  # cycles per lesion-frame unit
    angle: float
    directions: int  # 3 = network, 1 = ridges
    warp: float  # coordinate warp amplitude (irregular mesh), lesion-frame units
    threshold: float  # higher = thicker lines
    strength: float  # peak coverage of the lines
    depth: float  # how much a line darkens what lies under it (0-1)
    ring: float  # radial position (fraction of radius) where the grating is strongest
    ring_width: float
    patchiness: float  # 0 = everywhere, 1 = only in patches
    warp_mix: np.ndarray  # (M, 2) basis mix of the warp field
    patch_mix: np.ndarray  # (M,) basis mix of the patch field


@dataclass
class _Lesion:
    """Everything intrinsic to one lesion; shared by all its views."""

    dx: str
    thickness: float
    severity: float
    skin_rgb: np.ndarray  # (3,)
    shape: _Blob
    opacity: float
    basis_freq: np.ndarray  # (M, 2) cycles per radius
    basis_phase: np.ndarray  # (M,)
    colours: np.ndarray  # (K, 3)
    colour_rings: np.ndarray  # (K,) preferred radial position of each colour
    colour_mix: np.ndarray  # (M, K)
    variegation: float
    concentric: float
    pattern_centre: np.ndarray  # (2,) lesion frame
    gratings: list[_Grating] = field(default_factory=list)
    patches: list[_Blob] = field(default_factory=list)
    spots: list[_Spots] = field(default_factory=list)
    lines: list[_Lines] = field(default_factory=list)
    hairiness: float = 1.0


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _jitter(rng: np.random.Generator, name: str, sd: float = 8.0) -> np.ndarray:
    """A palette colour varied mostly in brightness (keeps the hue: brown stays brown)."""
    base = np.asarray(PALETTE[name], np.float32)
    return np.clip(base * rng.normal(1, sd / 150) + rng.normal(0, sd / 2.5, 3), 0, 255)


def _harmonics(
    rng: np.random.Generator, asymmetry: float, elongation: float, irregularity: float
) -> np.ndarray:
    """Complex harmonic coefficients k=1..10 of a border (shape (10,))."""
    amps = np.empty(10)
    amps[0] = asymmetry * rng.uniform(0.5, 1.0)
    amps[1] = elongation
    amps[2] = asymmetry * rng.uniform(0.3, 1.0)
    # Higher harmonics fall off ~1/k, so borders get wavy rather than spiky.
    amps[3:] = irregularity * rng.uniform(0.3, 1.0, 7) * 4 / np.arange(4, 11)
    # Keep the radius positive everywhere: the amplitudes bound the radial modulation.
    amps *= min(1.0, 0.6 / max(amps.sum(), 1e-9))
    return (amps * np.exp(1j * rng.uniform(0, 2 * np.pi, 10))).astype(np.complex64)


def _points_in_disk(
    rng: np.random.Generator, n: int, radius: float, centre=(0.0, 0.0)
) -> np.ndarray:
    """n points uniform over a disk: (n, 2) float32."""
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)], 1).astype(np.float32)


def _choose(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _sample_thickness(rng: np.random.Generator) -> float:
    """Breslow depth (mm) of a melanoma: ~30% in situ (0), else log-normal, 0.1-4.5 mm."""
    if rng.uniform() < 0.3:
        return 0.0
    return round(float(np.clip(np.exp(rng.normal(math.log(0.8), 0.75)), 0.1, 4.5)), 2)


# Structure samplers: (rng, lesion-in-progress, radius, atypia) -> appended components.
def _network(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Pigment network: regular and central (nevus), patchy and warped (atypia), peripheral (df)."""
    peripheral = les.dx == "df"  # delicate peripheral network around a central white patch
    les.gratings.append(
        _Grating(
            freq=rng.uniform(9, 14),
            angle=rng.uniform(0, np.pi),
            directions=3,
            warp=0.03 + 0.05 * atypia + rng.uniform(0, 0.02),
            threshold=rng.uniform(-0.6, 0.0) + 0.6 * atypia,
            strength=rng.uniform(0.5, 0.9),
            depth=rng.uniform(0.12, 0.25) + 0.2 * atypia,
            ring=rng.uniform(0.75, 0.9) if peripheral else rng.uniform(0.0, 0.4),
            ring_width=rng.uniform(0.25, 0.4) if peripheral else rng.uniform(0.6, 1.2),
            patchiness=min(1.0, 0.8 * atypia + rng.uniform(0, 0.3)),
            warp_mix=rng.normal(0, 1, (_N_BASIS, 2)).astype(np.float32),
            patch_mix=rng.normal(0, 1, _N_BASIS).astype(np.float32),
        )
    )


def _cerebriform(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Brain-like gyri and sulci of seborrheic keratosis."""
    les.gratings.append(
        _Grating(
            freq=rng.uniform(7, 11),
            angle=rng.uniform(0, np.pi),
            directions=1,
            warp=rng.uniform(0.08, 0.15),
            threshold=rng.uniform(-0.3, 0.2),
            strength=rng.uniform(0.5, 0.9),
            depth=rng.uniform(0.1, 0.25),
            ring=0.3,
            ring_width=1.5,
            patchiness=rng.uniform(0, 0.4),
            warp_mix=rng.normal(0, 1, (_N_BASIS, 2)).astype(np.float32),
            patch_mix=rng.normal(0, 1, _N_BASIS).astype(np.float32),
        )
    )


def _globules(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Brown globules: a regular peripheral rim or scattered; atypical ones add black/blue."""
    n = int(rng.integers(6, 20))
    if rng.uniform() < 0.5 and atypia < 0.5:  # peripheral rim of globules (growing nevus)
        a = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.normal(0, 0.15, n)
        r = R * (rng.uniform(0.65, 0.85) + rng.normal(0, 0.04, n))
        xy = np.stack([r * np.cos(a), r * np.sin(a)], 1).astype(np.float32)
    else:
        xy = _points_in_disk(rng, n, 0.8 * R)
    names = ["brown", "dark_brown"] + (["black", "blue_grey"] if atypia > 0.5 else [])
    rgb = np.stack([_jitter(rng, names[int(rng.integers(len(names)))]) for _ in range(n)])
    les.spots.append(_Spots(xy, rgb, rng.uniform(0.018, 0.03), rng.uniform(0.6, 0.9), True))


def _dots(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Small dots (comedo-like openings, melanoma's irregular black dots: more when thicker)."""
    n = int(rng.integers(4, 16) + 30 * les.severity)
    names = {"mel": ["black", "dark_brown", "blue_grey"], "bkl": ["dark_brown", "brown"]}.get(
        les.dx, ["dark_brown", "brown"]
    )
    xy = _points_in_disk(rng, n, 0.9 * R, centre=les.pattern_centre * rng.uniform(0, 1))
    rgb = np.stack([_jitter(rng, names[int(rng.integers(len(names)))]) for _ in range(n)])
    les.spots.append(_Spots(xy, rgb, rng.uniform(0.009, 0.014), rng.uniform(0.7, 1.0), False))


def _milia(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Milia-like cysts / white follicular openings: small crisp white-yellow clods."""
    n = int(rng.integers(2, 10))
    rgb = np.stack([_jitter(rng, "white", 6) * [1, 1, 0.93] for _ in range(n)])
    les.spots.append(
        _Spots(_points_in_disk(rng, n, 0.8 * R), rgb, rng.uniform(0.015, 0.025), 0.8, True)
    )


def _dotted_vessels(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Dotted (glomerular) red vessels."""
    n = int(rng.integers(10, 40))
    rgb = np.stack([_jitter(rng, "red", 12) for _ in range(n)])
    les.spots.append(
        _Spots(_points_in_disk(rng, n, 0.85 * R), rgb, rng.uniform(0.008, 0.012), 0.85, False)
    )


def _blue_grey_nests(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Blue-grey ovoid nests of basal cell carcinoma."""
    centres = _points_in_disk(rng, int(rng.integers(2, 7)), 0.7 * R)
    # Each ovoid nest is 2-3 overlapping clods along a random direction.
    parts = []
    for c in centres:
        d = rng.normal(0, 1, 2) * 0.04
        parts += [c + d * t for t in range(int(rng.integers(2, 4)))]
    xy = np.asarray(parts, np.float32)
    rgb = np.stack([_jitter(rng, "blue_grey", 10) for _ in range(len(xy))])
    les.spots.append(_Spots(xy, rgb, rng.uniform(0.03, 0.05), rng.uniform(0.6, 0.85), False))


def _lacunae(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Red-purple lacunae of vascular lesions: large crisp round clods."""
    n = int(rng.integers(5, 14))
    names = ["red", "purple", "purple", "dark_brown"]
    rgb = np.stack([_jitter(rng, names[int(rng.integers(4))]) * 0.85 for _ in range(n)])
    les.spots.append(
        _Spots(_points_in_disk(rng, n, 0.7 * R), rgb, R * rng.uniform(0.13, 0.22), 0.9, True)
    )


def _small_blobs(rng, n: int, R: float, size: tuple[float, float], spread: float, **kw):
    """n irregular blobs of radius size*R, centred within spread*R; kw: _Blob fields."""
    return [
        _Blob(
            centre=_points_in_disk(rng, 1, spread * R)[0],
            radius=R * rng.uniform(*size),
            harmonics=_harmonics(rng, 0.1, 0.15, 0.04),
            **kw,
        )
        for _ in range(n)
    ]


def _white_centre(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Central white scar-like patch (dermatofibroma); small shiny white area elsewhere."""
    size = (0.3, 0.55) if les.dx == "df" else (0.12, 0.25)
    les.patches += _small_blobs(
        rng,
        1,
        R,
        size,
        0.15,
        softness=rng.uniform(0.3, 0.6),
        rgb=_jitter(rng, "white", 6),
        alpha=rng.uniform(0.7, 0.9),
    )


def _scale(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Yellow-white scale / keratin patches (actinic keratosis, some keratoses)."""
    yellowish = np.asarray([1.0, 0.98, 0.9], np.float32)
    for _ in range(int(rng.integers(2, 6))):
        les.patches += _small_blobs(
            rng,
            1,
            R,
            (0.1, 0.28),
            0.75,
            softness=rng.uniform(0.15, 0.35),
            rgb=_jitter(rng, "white", 6) * yellowish,
            alpha=rng.uniform(0.5, 0.85),
        )


def _ulceration(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Dark red crust of an ulcerated basal cell carcinoma."""
    crust = np.asarray((118, 36, 34), np.float32) + rng.normal(0, 8, 3)
    les.patches += _small_blobs(
        rng, 1, R, (0.15, 0.3), 0.5, softness=0.25, rgb=crust, alpha=rng.uniform(0.6, 0.85)
    )


def _regression(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Regression: white scar-like area with blue-grey peppering."""
    (blob,) = _small_blobs(
        rng, 1, R, (0.2, 0.4), 0.5, softness=0.4, rgb=_jitter(rng, "white", 6), alpha=0.6
    )
    les.patches.append(blob)
    # Blue-grey peppering: fine granules inside the regression area.
    n = int(rng.integers(10, 30))
    xy = _points_in_disk(rng, n, blob.radius, centre=blob.centre)
    rgb = np.stack([_jitter(rng, "blue_grey", 10) for _ in range(n)])
    les.spots.append(_Spots(xy, rgb, 0.008, 0.8, False))


def _arborizing_vessels(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Branching red vessels of basal cell carcinoma: random-walk trunks with thinner branches."""
    polylines, widths = [], []
    for _ in range(int(rng.integers(1, 4))):
        start_angle = rng.uniform(0, 2 * np.pi)
        p = 0.85 * R * np.array([np.cos(start_angle), np.sin(start_angle)])
        heading = start_angle + np.pi + rng.normal(0, 0.5)
        trunk = [p.copy()]
        for _ in range(7):
            heading += rng.normal(0, 0.35)
            p = p + R * 0.14 * np.array([np.cos(heading), np.sin(heading)])
            trunk.append(p.copy())
        trunk_arr = np.asarray(trunk, np.float32)
        width = rng.uniform(0.014, 0.022)
        polylines.append(trunk_arr)
        widths.append(width)
        for _ in range(int(rng.integers(2, 5))):  # branches, thinner
            q = trunk_arr[int(rng.integers(1, len(trunk_arr) - 1))].astype(float)
            h = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.3)
            branch = [q.copy()]
            for _ in range(4):
                h += rng.normal(0, 0.4)
                q = q + R * 0.09 * np.array([np.cos(h), np.sin(h)])
                branch.append(q.copy())
            polylines.append(np.asarray(branch, np.float32))
            widths.append(width * 0.6)
    les.lines.append(_Lines(polylines, widths, _jitter(rng, "red", 10), rng.uniform(0.7, 0.95)))


def _veil(rng, les: _Lesion, R: float, atypia: float) -> None:
    """Blue-white veil, area growing monotonically with melanoma severity (thickness)."""
    area = float(np.clip(0.55 * les.severity + rng.normal(0, 0.04), 0.0, 0.65))
    if area < 0.01:
        return
    veil_rgb = 0.9 * _jitter(rng, "blue_grey", 6) + 0.1 * _jitter(rng, "white", 6)
    les.patches.append(
        _Blob(
            centre=_points_in_disk(rng, 1, 0.4 * R)[0] * (1 - area),
            radius=R * math.sqrt(area),
            harmonics=_harmonics(rng, 0.1, 0.15, 0.04),
            softness=rng.uniform(0.25, 0.45),
            rgb=veil_rgb,
            alpha=rng.uniform(0.6, 0.8),
        )
    )


STRUCTURES: dict[str, Callable[[np.random.Generator, _Lesion, float, float], None]] = {
    "network": _network,
    "cerebriform": _cerebriform,
    "globules": _globules,
    "dots": _dots,
    "milia": _milia,
    "dotted_vessels": _dotted_vessels,
    "blue_grey_nests": _blue_grey_nests,
    "lacunae": _lacunae,
    "white_centre": _white_centre,
    "scale": _scale,
    "ulceration": _ulceration,
    "regression": _regression,
    "arborizing_vessels": _arborizing_vessels,
}


def _sample_lesion(rng: np.random.Generator, dx: str) -> _Lesion:
    """Draw every intrinsic parameter of one lesion of class ``dx``."""
    rec = RECIPES[dx]
    thickness = _sample_thickness(rng) if dx == MELANOMA else 0.0
    # Severity in [0, 1): 0 in situ / non-melanoma, saturating for thick melanomas.
    severity = 1.0 - math.exp(-thickness / 1.0)
    if dx == MELANOMA:
        atypia = float(np.clip(0.4 + 0.5 * severity + rng.normal(0, 0.1), 0, 1))
    elif dx == "nv":
        atypia = float(rng.beta(1.2, 6.0))  # mostly banal; a tail of dysplastic-looking nevi
    else:
        atypia = float(rng.uniform(0, 0.3))

    R = _u(rng, rec.radius) * (1 + 0.25 * severity)
    irregular = 1 + 1.5 * max(atypia - 0.3, 0)
    shape = _Blob(
        centre=np.zeros(2, np.float32),
        radius=R,
        harmonics=_harmonics(
            rng,
            _u(rng, rec.asymmetry) * irregular,
            _u(rng, rec.elongation),
            _u(rng, rec.irregularity) * irregular,
        ),
        softness=_u(rng, rec.border_softness),
        rgb=np.zeros(3, np.float32),
        alpha=1.0,
    )

    # Colours: more (and blue-grey more likely) as a melanoma thickens.
    weights = dict(rec.colours)
    if dx == MELANOMA:
        weights["blue_grey"] = 0.2 + 1.5 * severity
    n_colours = int(rng.integers(rec.n_colours[0], rec.n_colours[1] + 1))
    n_colours = min(n_colours + round(2 * severity + rng.normal(0, 0.3)), len(weights))
    n_colours = max(n_colours, 1)
    names = list(weights)
    p = np.asarray([weights[n] for n in names], float)
    picked = rng.choice(len(names), size=n_colours, replace=False, p=p / p.sum())
    colours = np.stack([_jitter(rng, names[i]) for i in picked])
    # Ordered lesions put dark colours in the centre; disordered ones shuffle the rings.
    darkness_order = np.argsort(colours.sum(1))
    rings = np.empty(n_colours, np.float32)
    rings[darkness_order] = np.linspace(0.1, 0.9, n_colours) if n_colours > 1 else 0.5
    if rng.uniform() < 0.5 * atypia:
        rings = rng.permutation(rings)
    angle = rng.uniform(0, 2 * np.pi)
    ecc = _u(rng, rec.eccentricity) * R
    skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))] * rng.normal(1, 0.04) + rng.normal(
        0, 3, 3
    )

    les = _Lesion(
        dx=dx,
        thickness=thickness,
        severity=severity,
        skin_rgb=np.clip(skin, 0, 255).astype(np.float32),
        shape=shape,
        opacity=_u(rng, rec.opacity),
        basis_freq=(
            rng.uniform(0.4, 1.6, (_N_BASIS, 1))
            * np.stack([np.cos(t := rng.uniform(0, 2 * np.pi, _N_BASIS)), np.sin(t)], 1)
        ).astype(np.float32),
        basis_phase=rng.uniform(0, 2 * np.pi, _N_BASIS).astype(np.float32),
        colours=colours.astype(np.float32),
        colour_rings=rings + rng.normal(0, 0.1, n_colours).astype(np.float32),
        colour_mix=(rng.normal(0, 1, (_N_BASIS, n_colours)) / math.sqrt(_N_BASIS / 2)).astype(
            np.float32
        ),
        variegation=_u(rng, rec.variegation) * (1 + 0.5 * severity),
        concentric=_u(rng, rec.concentric),
        pattern_centre=np.array([ecc * math.cos(angle), ecc * math.sin(angle)], np.float32),
        hairiness=float(rng.choice([0.2, 1.0, 3.0, 10.0], p=[0.5, 0.3, 0.15, 0.05])),
    )
    for name, prob in rec.structures.items():
        if dx == MELANOMA and name in ("dotted_vessels", "regression"):
            prob = prob + 0.5 * severity  # thick melanomas: atypical vessels, regression
        if rng.uniform() < prob:
            STRUCTURES[name](rng, les, R, atypia)
    if dx == MELANOMA:
        _veil(rng, les, R, atypia)
    return les


def _sample_metadata(rng: np.random.Generator, dx: str) -> dict:
    """Patient metadata of one lesion: dx_type, age (multiple of 5), sex, localization."""
    rec = RECIPES[dx]
    age = float(np.clip(round(rng.normal(*rec.age) / 5) * 5, 5, 85))
    u = rng.uniform()
    sex = "unknown" if u < 0.006 else ("male" if u < 0.006 + rec.male * 0.994 else "female")
    loc = {k: v for k, v in rec.localization.items() if v > 0}
    return {
        "dx_type": _choose(rng, rec.dx_type),
        "age": age,
        "sex": sex,
        "localization": _choose(rng, loc),
    }


# --------------------------------------------------------------------------- rendering


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blob_alpha(u: np.ndarray, v: np.ndarray, blob: _Blob, min_edge: float) -> np.ndarray:
    """Soft coverage in [0, 1] of a harmonic blob; u, v are (H, W) lesion-frame coords."""
    du, dv = u - blob.centre[0], v - blob.centre[1]
    rho = np.hypot(du, dv)
    z = (du + 1j * dv) / np.maximum(rho, 1e-6)
    zk = np.ones_like(z)
    modulation = np.zeros_like(rho)
    for c in blob.harmonics:
        zk = zk * z
        modulation += (c * zk).real
    edge = max(blob.softness * blob.radius, min_edge)
    return _smoothstep(-edge, edge, blob.radius * (1 + modulation) - rho)


def _over(img: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> None:
    """Alpha-composite in place: img (H, W, 3), alpha (H, W), rgb (3,) or (H, W, 3)."""
    img += alpha[..., None] * (rgb - img)


def _grating(g: _Grating, u, v, basis, rho_rel) -> np.ndarray:
    """Line coverage (H, W) of a network/ridge grating."""
    warp = basis @ g.warp_mix * (g.warp / math.sqrt(_N_BASIS / 2))
    uu, vv = u + warp[..., 0], v + warp[..., 1]
    h = np.zeros_like(u)
    for k in range(g.directions):
        a = g.angle + k * np.pi / 3
        h += np.cos((2 * np.pi * g.freq) * (uu * math.cos(a) + vv * math.sin(a)))
    if g.directions == 3:  # honeycomb: h in [-1.5, 3]; lines where h is low
        lines = np.clip((g.threshold - h) / 0.9 + 0.5, 0, 1)
    else:
        lines = np.clip((g.threshold - h) / 0.6 + 0.5, 0, 1)
    ring = np.exp(-(((rho_rel - g.ring) / g.ring_width) ** 2))
    patches = _smoothstep(-0.3, 0.3, basis @ g.patch_mix / math.sqrt(_N_BASIS / 2))
    return g.strength * lines * ring * (1 - g.patchiness + g.patchiness * patches)


def _splat_spots(
    spots: _Spots, to_px: Callable, px_per_unit: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Render spots by bilinear splatting + Gaussian blur: (alpha (H, W), rgb (H, W, 3))."""
    H, W = shape
    pts = to_px(spots.xy)
    sigma = max(spots.sigma * px_per_unit, 0.6)
    acc = np.zeros((4, H, W), np.float32)
    vals = np.concatenate([spots.rgb, np.ones((len(pts), 1), np.float32)], 1).T  # (4, P)
    x0, y0 = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    fx, fy = pts[:, 0] - x0, pts[:, 1] - y0
    for ox, oy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy)):
        _splat(acc, x0 + ox, y0 + oy, vals * w)
    _splat(acc, x0 + 1, y0 + 1, vals * (fx * fy))
    acc = ndimage.gaussian_filter(acc, sigma=(0, sigma, sigma), truncate=3.0)
    weight = acc[3]
    alpha = np.clip(weight * (2 * np.pi * sigma**2), 0, None)
    rgb = np.moveaxis(acc[:3] / np.maximum(weight, 1e-6), 0, -1)
    alpha = _smoothstep(0.3, 0.55, alpha) if spots.hard else np.clip(alpha, 0, 1)
    return alpha * spots.alpha, rgb


def _splat(acc: np.ndarray, xi: np.ndarray, yi: np.ndarray, vals: np.ndarray) -> None:
    ok = (xi >= 0) & (xi < acc.shape[2]) & (yi >= 0) & (yi < acc.shape[1])
    np.add.at(acc, (slice(None), yi[ok], xi[ok]), vals[:, ok])


def _draw_polylines(
    polylines: list[np.ndarray], widths_px: list[int], fills: list[int], shape: tuple[int, int]
) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of pixel-space polylines, slightly blurred (anti-aliasing)."""
    H, W = shape
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, width, fill in zip(polylines, widths_px, fills):
        draw.line([tuple(p) for p in pts.tolist()], fill=fill, width=width, joint="curve")
    cover = np.asarray(canvas, np.float32) / 255.0
    return np.clip(ndimage.gaussian_filter(cover, 0.5) * 1.4, 0, 1)


def _hairs(rng: np.random.Generator, n: int, px_per_unit: float, shape: tuple[int, int]):
    """n thin dark curved hairs as quadratic Bezier curves in pixel space: coverage (H, W)."""
    H, W = shape
    t = np.linspace(0, 1, 16)[:, None]
    curves, widths, fills = [], [], []
    for _ in range(n):
        p0 = rng.uniform([-0.1 * W, -0.1 * H], [1.1 * W, 1.1 * H])
        a = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.6, 2.0) * px_per_unit
        d = np.array([math.cos(a), math.sin(a)])
        p2 = p0 + length * d
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25) * length * np.array([-d[1], d[0]])
        curves.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2)
        widths.append(max(1, round(px_per_unit / 60 * rng.uniform(0.8, 1.6))))
        fills.append(int(rng.integers(120, 230)))
    return _draw_polylines(curves, widths, fills, shape)


def _paint_lesion(
    img: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    body: np.ndarray,
    fine: np.ndarray,
    les: _Lesion,
    min_edge: float,
) -> None:
    """Paint the lesion body, gratings and patches in place.

    img (h, w, 3) float RGB; u, v (h, w) lesion-frame coordinates; body (h, w) lesion
    coverage; fine (h, w) unit-variance texture noise.
    """
    R = les.shape.radius
    pu, pv = (u - les.pattern_centre[0]) / R, (v - les.pattern_centre[1]) / R
    basis = np.cos(
        2 * np.pi * (pu[..., None] * les.basis_freq[:, 0] + pv[..., None] * les.basis_freq[:, 1])
        + les.basis_phase
    )  # (h, w, M)
    # Variegation: a softmax over colours of smooth noise plus each colour's ring preference.
    rho_pattern = np.hypot(pu, pv)
    logits = les.variegation * (
        basis @ les.colour_mix - les.concentric * (rho_pattern[..., None] - les.colour_rings) ** 2
    )
    logits -= logits.max(-1, keepdims=True)
    mix = np.exp(logits)
    mix /= mix.sum(-1, keepdims=True)
    lesion_rgb = mix @ les.colours
    lesion_rgb *= (1 + 0.05 * fine)[..., None]
    # Pigment is densest in the middle and thins out towards the border.
    rho_body = np.hypot(u, v) / R
    density = les.opacity * (1 - 0.3 * np.clip(rho_body, 0, 1) ** 2)
    _over(img, body * density, lesion_rgb)
    for g in les.gratings:
        img *= (1 - g.depth * body * _grating(g, u, v, basis, rho_body))[..., None]
    for patch in les.patches:
        _over(img, body * patch.alpha * _blob_alpha(u, v, patch, min_edge), patch.rgb)


def _render_view(les: _Lesion, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Draw one view of a lesion: uint8 RGB array of shape (height, width, 3)."""
    ppu = height / 2.0  # pixels per unit: the image spans [-1, 1] vertically
    H, W = height, width
    # View pose: lesion frame -> image frame is p_img = rot(angle) @ (scale * p) + offset.
    angle = rng.uniform(0, 2 * np.pi)
    scale = math.exp(rng.uniform(math.log(0.85), math.log(1.2)))
    offset = np.clip(rng.normal(0, 0.08, 2), -0.2, 0.2)
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    x = ((np.arange(W, dtype=np.float32) + 0.5 - W / 2) / ppu)[None, :].repeat(H, 0)
    y = ((np.arange(H, dtype=np.float32) + 0.5 - H / 2) / ppu)[:, None].repeat(W, 1)
    xs, ys = (x - offset[0]) / scale, (y - offset[1]) / scale
    u = cos_a * xs + sin_a * ys  # inverse rotation
    v = -sin_a * xs + cos_a * ys

    def to_px(p: np.ndarray) -> np.ndarray:
        q = p * scale
        qx = cos_a * q[:, 0] - sin_a * q[:, 1] + offset[0]
        qy = sin_a * q[:, 0] + cos_a * q[:, 1] + offset[1]
        return np.stack([qx * ppu + W / 2 - 0.5, qy * ppu + H / 2 - 0.5], 1)

    lesion_ppu = ppu * scale
    min_edge = 0.7 / lesion_ppu

    # Skin: base tone, low-frequency luminance and erythema, fine texture.
    low = np.stack(
        [
            np.asarray(
                Image.fromarray(rng.normal(0, 1, (3, 4)).astype(np.float32)).resize(
                    (W, H), Image.BICUBIC
                )
            )
            for _ in range(2)
        ]
    )
    fine_sigma = max(0.8 * ppu / 60, 0.6)
    fine = ndimage.gaussian_filter(rng.standard_normal((H, W), dtype=np.float32), fine_sigma)
    fine *= 2 * math.sqrt(math.pi) * fine_sigma  # back to unit variance
    img = np.empty((H, W, 3), np.float32)
    img[:] = les.skin_rgb
    img *= (1 + 0.05 * low[0] + 0.025 * fine)[..., None]
    erythema = np.abs(low[1]) * rng.uniform(0, 0.08)  # redness only, never towards green
    img += erythema[..., None] * np.array([0.0, -60.0, -40.0], np.float32)

    # Lesion body and its area structures, computed only inside the lesion's bounding box.
    body = _blob_alpha(u, v, les.shape, min_edge)
    rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    if len(rows):
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        _paint_lesion(img[box], u[box], v[box], body[box], fine[box], les, min_edge)
    for spots in les.spots:
        alpha, rgb = _splat_spots(spots, to_px, lesion_ppu, (H, W))
        _over(img, alpha, rgb)
    for lines in les.lines:
        widths = [max(1, round(w * lesion_ppu)) for w in lines.widths]
        pl = [to_px(p) for p in lines.polylines]
        cover = _draw_polylines(pl, widths, [255] * len(pl), (H, W))
        _over(img, cover * body * lines.alpha, lines.rgb)

    # The optics blur a little (real 160x120 HAM10000 images are downsampled, never crisp).
    img = ndimage.gaussian_filter(img, (0.5 * ppu / 60, 0.5 * ppu / 60, 0), truncate=3.0)

    # Hairs, then the camera: lighting, dermoscope vignette, noise.
    n_hairs = int(rng.poisson(les.hairiness))
    if n_hairs:
        hair_rgb = np.asarray((62, 46, 38), np.float32) + rng.normal(0, 8, 3)
        _over(img, _hairs(rng, n_hairs, ppu, (H, W)), hair_rgb)
    gain = rng.uniform(0.88, 1.08) * (1 + rng.normal(0, 0.015, 3))
    grad = rng.normal(0, 0.06, 2)
    img *= (gain * (1 + grad[0] * x + grad[1] * y)[..., None]).astype(np.float32)
    centre = rng.normal(0, 0.06, 2)
    r = np.hypot(x - centre[0], y - centre[1])
    field_radius = rng.uniform(1.3, 2.4)  # below ~1.67 the dark field edge shows in corners
    soft = rng.uniform(0.05, 0.15)
    vignette = 1 - (1 - rng.uniform(0.03, 0.15)) * _smoothstep(
        field_radius - soft, field_radius + soft, r
    )
    vignette *= 1 - rng.uniform(0.05, 0.2) * (r / field_radius) ** 2
    img *= vignette[..., None]
    img += rng.uniform(1.5, 3.5) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- dataset


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
