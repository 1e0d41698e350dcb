"""Image shifts of the shift benchmark: what another clinic, camera or dermoscope changes.

Every shift is a pure function of a float batch ``(B, 3, H, W)`` in [0, 1] and a severity
``0..3`` (0: the identity, 1 low, 2 middle, 3 high) that returns a batch of the same shape
in [0, 1]. None draws random numbers, so a shift is the same on every run and machine (the
bench's seed only drives the bootstrap). They act on the *source* image, before the run's
own resize, crop, colour constancy and normalisation (``bench/shift.py``), as a photo from
another device would arrive.

Parameters per severity (low, middle, high); ``SHIFTS`` holds them and the report prints
them:

- ``zoom_in``: centre crop of 85% / 70% / 50% of each side, resized back to H x W
  (bilinear, antialiased): the lesion fills the frame (lesion-centred crops of other sets).
- ``zoom_out``: the image shrunk to 85% / 70% / 50% of each side, centred in a frame of
  H x W filled with the median colour of the image's border (skin around it; reflection
  would mirror a large lesion into the frame): the lesion is small in the frame.
- ``warm`` / ``cool``: colour temperature, red gain e^t and blue gain e^-t with t = 0.1 /
  0.2 / 0.3 (warm) or -0.1 / -0.2 / -0.3 (cool); green unchanged.
- ``dark``: brightness x 0.85 / 0.7 / 0.55 (under-exposure).
- ``low_contrast``: contrast x 0.85 / 0.7 / 0.5 around each image's mean grey.
- ``vignette``: a dermoscope's dark circular border. r is the distance from the centre over
  the half-diagonal (corners at r = 1); brightness falls smoothly (smoothstep) from 1 at r0
  to 0 at r0 + 0.15, with r0 = 0.85 / 0.7 / 0.55 (low: corners only; high: the sides too).
- ``blur``: Gaussian blur, sigma 1% / 2% / 4% of the short side (1.2 / 2.4 / 4.8 px at
  160 x 120), reflection at the borders.
- ``jpeg``: JPEG re-encoding at quality 40 / 20 / 10 (PIL, 4:2:0 chroma subsampling).
- ``clinical``: a non-dermoscopic camera profile with strength a = 1/3, 2/3, 1: gamma
  1 - 0.25a (brighter mid-tones), an S-shaped tone curve blended in by 0.5a (more
  contrast), saturation x (1 + 0.4a), then a warm cast t = 0.05a (as ``warm``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dermkit.data.transforms import border_colour

SEVERITY_NAMES = ("clean", "low", "middle", "high")


@dataclass(frozen=True)
class Shift:
    """One shift: its parameter at severities 1..3 (``levels``) and what the parameter is."""

    name: str
    description: str
    parameter: str
    levels: tuple[float, float, float]
    apply: Callable[[torch.Tensor, float], torch.Tensor]

    def value(self, severity: int) -> float | None:
        """The parameter at ``severity`` 1..3; None at 0 (clean)."""
        if severity not in range(len(SEVERITY_NAMES)):
            raise ValueError(f"severity must be 0..3, got {severity}")
        return None if severity == 0 else self.levels[severity - 1]


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float batch (B, 3, H, W), got {tuple(x.shape)} {x.dtype}")


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def zoom_in(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Centre crop ``fraction`` of each side, resized back to the input size."""
    if fraction >= 1.0:
        return x.clone()
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(x[..., top : top + ch, left : left + cw], h, w).clamp_(0.0, 1.0)


def zoom_out(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Shrink to ``scale`` of each side, centred in a frame of the input size filled with
    the image's border colour (skin; a reflection would mirror a large lesion into it)."""
    if scale >= 1.0:
        return x.clone()
    h, w = x.shape[-2:]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (h - sh) // 2, (w - sw) // 2
    out = border_colour(x).expand(-1, -1, h, w).clone()
    out[..., top : top + sh, left : left + sw] = _resize(x, sh, sw)
    return out.clamp_(0.0, 1.0)


def colour_temperature(x: torch.Tensor, t: float) -> torch.Tensor:
    """Red x e^t, blue x e^-t (t > 0 warmer, t < 0 cooler)."""
    gains = torch.tensor([np.exp(t), 1.0, np.exp(-t)], dtype=x.dtype, device=x.device)
    return (x * gains.view(1, 3, 1, 1)).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Every pixel x ``factor``."""
    return (x * factor).clamp_(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Contrast x ``factor`` around each image's mean grey level."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp_(0.0, 1.0)


def _smoothstep(lo: float, hi: float, v: torch.Tensor) -> torch.Tensor:
    t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


VIGNETTE_RAMP = 0.15  # width of the dark border's ramp, in half-diagonals


def vignette(x: torch.Tensor, r0: float) -> torch.Tensor:
    """Darken beyond radius ``r0`` (half-diagonals from the centre) to black at r0 + ramp."""
    h, w = x.shape[-2:]
    yy = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5 - h / 2).view(h, 1)
    xx = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5 - w / 2).view(1, w)
    r = torch.sqrt(yy**2 + xx**2) / (0.5 * float(np.hypot(h, w)))
    mask = 1.0 - _smoothstep(r0, r0 + VIGNETTE_RAMP, r)
    return x * mask.view(1, 1, h, w)


def gaussian_blur(x: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    """Gaussian blur with sigma = ``sigma_fraction`` x the short side (reflection borders)."""
    sigma = sigma_fraction * min(x.shape[-2:])
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(np.ceil(3 * sigma)))
    radius = min(radius, min(x.shape[-2:]) - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return y.clamp_(0.0, 1.0)


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """Re-encode every image as JPEG at ``quality`` (PIL) and decode it again."""
    from PIL import Image

    if quality >= 100:
        return x.clone()
    out = []
    for image in to_uint8(x).permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(x.device, x.dtype).div_(255.0)


def clinical_profile(x: torch.Tensor, a: float) -> torch.Tensor:
    """A clinical (non-dermoscopic) camera's rendering at strength ``a`` in [0, 1]."""
    if a <= 0:
        return x.clone()
    y = x.clamp(0.0, 1.0) ** (1.0 - 0.25 * a)
    s_curve = y * y * (3 - 2 * y)
    y = (1 - 0.5 * a) * y + 0.5 * a * s_curve
    grey = _grey(y)
    y = (y - grey) * (1 + 0.4 * a) + grey
    return colour_temperature(y.clamp_(0.0, 1.0), 0.05 * a)


# name, what it imitates, its parameter, the parameter at low / middle / high, the function
_TABLE = (
    ("zoom_in", "lesion fills the frame", "centre crop side", (0.85, 0.7, 0.5), zoom_in),
    ("zoom_out", "lesion small in the frame", "shrink factor", (0.85, 0.7, 0.5), zoom_out),
    ("warm", "warmer light", "log R/B gain t", (0.1, 0.2, 0.3), colour_temperature),
    ("cool", "cooler light", "log R/B gain t", (-0.1, -0.2, -0.3), colour_temperature),
    ("dark", "under-exposure", "brightness factor", (0.85, 0.7, 0.55), brightness),
    ("low_contrast", "flat contrast", "contrast factor", (0.85, 0.7, 0.5), contrast),
    ("vignette", "dermoscope's dark border", "clear radius r0", (0.85, 0.7, 0.55), vignette),
    ("blur", "out of focus", "sigma / short side", (0.01, 0.02, 0.04), gaussian_blur),
    ("jpeg", "JPEG compression", "JPEG quality", (40, 20, 10), jpeg),
    ("clinical", "clinical camera profile", "strength a", (1 / 3, 2 / 3, 1.0), clinical_profile),
)
SHIFTS: dict[str, Shift] = {row[0]: Shift(*row) for row in _TABLE}


def apply_shift(x: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    """``x`` (B, 3, H, W) float in [0, 1] under shift ``name`` at ``severity`` (0 = x)."""
    _check(x)
    if name not in SHIFTS:
        raise ValueError(f"unknown shift '{name}', expected one of {list(SHIFTS)}")
    value = SHIFTS[name].value(severity)
    return x.clone() if value is None else SHIFTS[name].apply(x, value)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 [0, 255], rounded to nearest."""
    return x.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)
