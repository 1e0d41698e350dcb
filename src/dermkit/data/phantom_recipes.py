"""Per-class recipes of the phantom lesions: pure data, no drawing.

The dermoscopic palette, the skin tones and, per HAM10000 class, the distributions a
phantom lesion's parameters and patient metadata are drawn from (:class:`ClassRecipe`,
:data:`RECIPES`). Separate from the sampling and drawing code so the numbers that decide
what each class looks like can be read, and tuned, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermkit.data.labels import HAM10000_CLASSES

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
