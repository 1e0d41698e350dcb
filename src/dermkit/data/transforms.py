"""Dermoscopy augmentations applied to whole uint8 batches, as tensor ops.

Per-image PIL transforms would cost more CPU than the model step on 2 cores; these run on
the batch (on whatever device it is on) with independent random parameters per image.
Dermoscopy has no canonical orientation, so flips and 90-degree rotations are free label-
preserving symmetries; the affine and colour changes are kept small because colour is
diagnostic (blue-grey veil, red vessels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The strengths come straight from the run config's validated ``augment`` section (one
# definition of each field; mixup/TTA fields there are not this module's business).
from dermkit.data.settings import AugmentSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> normalised float32 (B, 3, H, W)."""
    return normalize(images.float().div_(255.0), mean, std)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> (x - mean) / std, in place."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


class BatchAugment:
    """Random dermoscopy augmentation of a float batch (B, 3, H, W) in [0, 1].

    Parameters are drawn for a whole *global* batch from ``generator`` and then applied
    to any slice of it: a data-parallel rank that holds images [lo, hi) of the global batch
    gets exactly the augmentation those images get in a single-process run, which keeps
    1-process and N-process training equivalent. Call it on training batches only.
    """

    def __init__(self, cfg: AugmentSettings | None = None):
        self.cfg = cfg or AugmentSettings()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict:
        """Per-image parameters for a batch of ``batch`` images, each a (batch, ...) tensor."""

        def rand(*shape):
            return torch.rand(*shape, generator=generator)

        cfg = self.cfg
        params = {
            "flip_h": rand(batch) < (0.5 if cfg.flip else 0.0),
            "flip_v": rand(batch) < (0.5 if cfg.flip else 0.0),
            "rot90": (rand(batch) * 4).long().clamp_(max=3) * int(cfg.rot90),
            "angle": (rand(batch) * 2 - 1) * math.radians(cfg.max_rotate_deg),
            "scale": 1 + (rand(batch) * 2 - 1) * cfg.max_scale,
            "shift": (rand(batch, 2) * 2 - 1) * cfg.max_translate * 2,
            "brightness": 1 + (rand(batch) * 2 - 1) * cfg.brightness,
            "contrast": 1 + (rand(batch) * 2 - 1) * cfg.contrast,
            "saturation": 1 + (rand(batch) * 2 - 1) * cfg.saturation,
            "hue": (rand(batch) * 2 - 1) * cfg.hue * 2 * math.pi,
        }
        # Drawn after the others and only when on, so a config without them keeps its stream.
        if cfg.scale_range is not None:
            lo, hi = (math.log(v) for v in cfg.scale_range)
            params["zoom"] = torch.exp(lo + rand(batch) * (hi - lo))
            params["zoom_shift"] = rand(batch, 2) * 2 - 1
        if cfg.white_balance or cfg.tint or cfg.gamma:
            params["white_balance"] = (rand(batch) * 2 - 1) * cfg.white_balance
            params["tint"] = (rand(batch) * 2 - 1) * cfg.tint
            params["gamma"] = (rand(batch) * 2 - 1) * cfg.gamma
        if cfg.blur:
            params["blur"] = rand(batch) * cfg.blur * (rand(batch) < 0.5)
        return params

    def apply(self, x: torch.Tensor, params: dict, lo: int = 0) -> torch.Tensor:
        """Augment x (b, 3, H, W) with rows [lo, lo + b) of ``params``."""
        p = {k: v[lo : lo + x.shape[0]].to(x.device) for k, v in params.items()}
        cfg = self.cfg
        x = torch.where(p["flip_h"].view(-1, 1, 1, 1), x.flip(-1), x)
        x = torch.where(p["flip_v"].view(-1, 1, 1, 1), x.flip(-2), x)
        if cfg.rot90 and x.shape[-1] == x.shape[-2]:
            x = x.clone()
            for k in (1, 2, 3):  # one call per rotation, not per image
                sel = p["rot90"] == k
                if sel.any():
                    x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        if cfg.scale_range is not None:
            # A random resized crop: the window (zoom in) or the shrunk image (zoom out)
            # moves anywhere that keeps it inside the frame.
            zoom = p["zoom"]
            slack = (1 - 1 / zoom).abs().unsqueeze(1)
            shift = p["shift"] + p["zoom_shift"] * slack
            x = _affine(x, p["angle"], zoom, shift, fill=border_colour(x))
        elif cfg.max_rotate_deg or cfg.max_scale or cfg.max_translate:
            x = _affine(x, p["angle"], p["scale"], p["shift"])
        if "white_balance" in p:
            x = _camera(x, p)
        if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
            x = _colour(x, p, hue=bool(cfg.hue))
        if "blur" in p:
            x = _blur(x, p["blur"] * min(x.shape[-2:]))
        return x.clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample parameters for x's batch and apply them: (B, 3, H, W) -> same."""
        return self.apply(x, self.sample(x.shape[0], generator))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of x (B, 3, H, W), one sigma in pixels per image (B,).

    sigma 0 leaves an image unchanged. The B x 3 channels go through one grouped conv, each
    with its own kernel, reflection-padded to the largest radius.
    """
    b, c, h, w = x.shape
    radius = min(math.ceil(3 * float(sigma.max())), h - 1, w - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp(min=1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype))  # delta: no blur
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*3, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def border_colour(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the median of the outermost rows and columns: (B, 3, 1, 1)
    (the skin around a lesion, for filling a frame that a shrunk image leaves empty)."""
    ring = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    return ring.median(dim=-1).values[..., None, None]


def _affine(x, angle, scale, shift, fill: torch.Tensor | None = None):
    """Rotation/scale/shift per image. Outside the source, borders reflect (no black
    corners) or, with ``fill`` (B, 3, 1, 1), take that colour: a strong zoom-out would
    otherwise mirror the lesion into the frame."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, "bilinear", padding_mode="reflection", align_corners=False)
    ones = torch.ones_like(x[:, :1])
    inside = F.grid_sample(ones, grid, "bilinear", padding_mode="zeros", align_corners=False)
    out = F.grid_sample(x, grid, "bilinear", padding_mode="zeros", align_corners=False)
    return out + (1 - inside) * fill


def _colour(x, p, hue: bool):
    """Brightness, contrast, saturation and a small hue rotation (YIQ), per image."""
    x = x * p["brightness"].view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p["contrast"].view(-1, 1, 1, 1) + mean
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = (x - grey) * p["saturation"].view(-1, 1, 1, 1) + grey
    return _rotate_hue(x, p["hue"]) if hue else x


def _camera(x, p):
    """Another camera's rendering: white balance (temperature, tint), then a gamma curve."""
    t, g = p["white_balance"], p["tint"]
    gains = torch.exp(torch.stack([t, g, -t], 1)).to(x.dtype).view(-1, 3, 1, 1)
    x = (x * gains).clamp_(0.0, 1.0)
    return x.pow(torch.exp(p["gamma"]).to(x.dtype).view(-1, 1, 1, 1))


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by ``theta`` (B,) radians; x (B, 3, H, W)."""
    to_yiq = _RGB2YIQ.to(x)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(theta), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = to_rgb @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)
