"""Sampling one phantom lesion: its shape, colours and class-typical structures.

:func:`_sample_lesion` draws every intrinsic parameter of a lesion of one class from its
recipe (:mod:`dermkit.data.phantom_recipes`); the structure samplers (:data:`STRUCTURES`:
pigment network, globules, vessels, ...) add their parts to it, and :func:`_veil` adds a
melanoma's blue-white veil. :func:`_sample_metadata` draws the patient metadata. Nothing
here draws pixels (that is :mod:`dermkit.data.phantom_render`); the order of the random
draws is part of the output, so it must not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from dermkit.data.labels import MELANOMA
from dermkit.data.phantom_parts import _N_BASIS, _Blob, _Grating, _Lesion, _Lines, _Spots
from dermkit.data.phantom_recipes import PALETTE, RECIPES, SKIN_TONES


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
