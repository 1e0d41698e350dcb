"""Rasterising a phantom lesion: one view of it as an RGB image.

:func:`_render_view` draws skin, the lesion (:func:`_paint_lesion`), its spots and
vessels, hairs and the camera (pose, lighting, dermoscope vignette, noise) from a
:class:`~dermkit.data.phantom_parts._Lesion`; the helpers composite, splat and draw
polylines (numpy, PIL, scipy.ndimage). Separate from the sampling: it only reads a lesion,
and its own random draws (pose, lighting, hairs, noise) are those of the view.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dermkit.data.phantom_parts import _N_BASIS, _Blob, _Grating, _Lesion, _Spots


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
