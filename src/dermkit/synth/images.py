"""Pixel conversions, dihedral views, PNG writing and image grids shared by the synth stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dermkit.core.files import atomic_path


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the range the autoencoder and UNet use."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), clamped and rounded."""
    return x.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of the dihedral group on the last two axes: rot90 ** (k % 4), then a
    horizontal flip when k >= 4. Dermoscopy has no canonical orientation, so all 8 views are
    label-preserving."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def apply_dihedral(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Image i of (B, C, H, W) in dihedral view ``views[i]`` (0..7); square images only."""
    out = x.clone()
    for k in range(1, 8):  # one call per view, not per image
        sel = (views == k).to(x.device)
        if sel.any():
            out[sel] = dihedral(x[sel], k)
    return out


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Write (H, W, 3) uint8 as PNG atomically: a file at ``path`` is always complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def image_grid(images: torch.Tensor | np.ndarray, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, 3, H, W) or (N, H, W, 3) into one (H', W', 3) uint8 array."""
    from torchvision.utils import make_grid

    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    grid = make_grid(x, nrow=max(1, nrow), padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8) -> Path:
    """``image_grid`` written as a PNG (atomically)."""
    return write_png(image_grid(images, nrow), path)
