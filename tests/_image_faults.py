"""Writers for good and deliberately broken image files, shared by the image/reader tests.

Every writer takes a path, writes one small file there and returns the path. The broken
ones are built from real encoder output (cut short, emptied, or with a hand-made PNG header)
so they fail the way files in the wild do.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def rgb_pixels(seed: int, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    """(H, W, 3) uint8 smooth-ish random pixels for an image of ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    w, h = size
    return rng.integers(40, 220, (h, w, 3), dtype=np.uint8)


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (16, 12)) -> Path:
    Image.fromarray(rgb_pixels(seed, size)).save(path, "JPEG", quality=95)
    return path


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (16, 12)) -> Path:
    Image.fromarray(rgb_pixels(seed, size)).save(path, "PNG")
    return path


def write_truncated(path: Path, fmt: str = "JPEG", keep: float = 0.6) -> Path:
    """A real JPEG/PNG with only the first ``keep`` fraction of its bytes."""
    tmp = path.with_name(path.name + ".full")
    Image.fromarray(rgb_pixels(1, (64, 48))).save(tmp, fmt)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_rgba_png(path: Path, n_transparent: int = 0, size: tuple[int, int] = (16, 12)) -> Path:
    """RGBA PNG, opaque except the first ``n_transparent`` pixels (row-major) at alpha 0."""
    rgb = rgb_pixels(2, size)
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha.reshape(-1)[:n_transparent] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(path, "PNG")
    return path


def write_grey_png(path: Path, values: np.ndarray) -> Path:
    """Greyscale PNG: uint8 values give mode L, uint16 values give mode I;16."""
    Image.fromarray(values).save(path, "PNG")
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A tiny 1-bit PNG whose header claims ``width`` x ``height`` (a decompression bomb).

    Only one row of pixel data follows; a reader that trusts the header before checking the
    size would try to allocate the full image.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * ((width + 7) // 8))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path
