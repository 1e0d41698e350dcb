"""The parts a phantom lesion is made of: blobs, spots, lines, gratings, the lesion itself.

Plain dataclasses in the lesion's own coordinate frame, shared by the sampler that draws
them (:mod:`dermkit.data.phantom_lesions`) and the renderer that rasterises them
(:mod:`dermkit.data.phantom_render`); kept apart so that neither of those imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_N_BASIS = 12  # smooth Fourier basis functions per lesion (colour mixing, warps, patchiness)


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
