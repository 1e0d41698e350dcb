"""Decode-once image cache: a memory-mapped uint8 array per (manifest, resolution, crop).

On 2 CPU cores JPEG decoding would dominate training, so every image is decoded, resized
(short side to ``size``) and centre-cropped to ``size x size`` exactly once. Training then
reads tensors from the array. The cache key covers the image ids, their paths, the file
sizes and mtimes, the resolution and the crop policy, so a changed file or a new row
rebuilds it rather than serving stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
from PIL import Image

from dermkit.data.images import load_rgb
from dermkit.data.settings import ColourConstancy, CropPolicy

CROP_POLICIES: tuple[str, ...] = get_args(CropPolicy)
COLOUR_CONSTANCY: tuple[str, ...] = get_args(ColourConstancy)
SHADES_OF_GRAY_POWER = 6
DEFAULT_CACHE_DIR = Path(os.environ.get("DERMKIT_CACHE", Path.home() / ".cache" / "dermkit"))


def resize_short_side_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is ``size`` (antialiased bicubic), then centre-crop square.

    Args:
        image: (H, W, 3) uint8.
    Returns:
        (size, size, 3) uint8.
    """
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def resize_full_frame(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is ``size``, then pad the short side to a square by reflection.

    The whole frame stays in view: HAM10000's 4:3 dermoscopy frames lose their left and
    right eighths under a centre crop, where a large lesion's border can lie. Padding keeps
    the input square, so every model, augmentation (90-degree rotations), export and the
    web page work unchanged. A square source (lesion-centred crops) is only resized: no
    padding, no loss. Reflection rather than a constant keeps the pad skin-coloured.

    Args:
        image: (H, W, 3) uint8.
    Returns:
        (size, size, 3) uint8.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    pad = ((top, size - new_h - top), (left, size - new_w - left), (0, 0))
    # reflection needs a pad shorter than the image; a very thin image falls back to edges
    mode = "reflect" if max(pad[0]) < new_h and max(pad[1]) < new_w else "edge"
    return np.pad(resized, pad, mode=mode)


def shades_of_gray(image: np.ndarray, power: int = SHADES_OF_GRAY_POWER) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004), as ISIC 2018/19 entries used.

    The illuminant of channel c is the Minkowski p-mean of its values, e_c = mean(v^p)^(1/p)
    (p = 6: between grey world, p = 1, and max-RGB, p = inf); each channel is multiplied by
    |e| / (sqrt(3) e_c), so a grey illuminant leaves the image unchanged, and the result is
    rounded half up and clipped to [0, 255]. Computed from a 256-bin histogram per channel
    with exact integer powers and a sequential float64 sum, so ``core.js``'s
    ``shadesOfGray`` reproduces it (up to the last bit of the p-th root).

    Args:
        image: (H, W, 3) uint8.
    Returns:
        (H, W, 3) uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    n = image.shape[0] * image.shape[1]
    levels = np.arange(256, dtype=np.float64)
    powers = levels**power  # exact: 255^6 < 2^53
    illuminant = []
    for c in range(3):
        counts = np.bincount(image[..., c].reshape(-1), minlength=256).astype(np.float64)
        total = float(np.cumsum(counts * powers)[-1])  # sequential, level order (as core.js)
        illuminant.append((total / n) ** (1.0 / power))
    e0, e1, e2 = illuminant
    norm = float(np.sqrt(e0 * e0 + e1 * e1 + e2 * e2))
    if norm == 0.0:  # an all-black image has no illuminant
        return image.copy()
    gains = np.array([norm / (e * np.sqrt(3.0)) if e > 0 else 1.0 for e in illuminant])
    out = np.floor(image.astype(np.float64) * gains + 0.5)
    return np.minimum(out, 255.0).astype(np.uint8)


def crop_image(
    image: np.ndarray,
    size: int,
    policy: str = "short_side_center",
    colour_constancy: str = "none",
) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 under a crop policy of ``CROP_POLICIES``,
    then the ``colour_constancy`` of ``COLOUR_CONSTANCY`` on the crop (the model's input)."""
    if policy == "short_side_center":
        crop = resize_short_side_center_crop(image, size)
    elif policy == "full_frame":
        crop = resize_full_frame(image, size)
    else:
        raise ValueError(f"unknown crop policy '{policy}', expected one of {CROP_POLICIES}")
    if colour_constancy == "shades_of_gray":
        return shades_of_gray(crop)
    if colour_constancy != "none":
        raise ValueError(
            f"unknown colour constancy '{colour_constancy}', expected one of {COLOUR_CONSTANCY}"
        )
    return crop


def cache_key(df: pd.DataFrame, size: int, crop: str, colour_constancy: str = "none") -> str:
    """Hash of (image_id, path, file size, mtime) per row + resolution + crop policy (+ the
    colour constancy when there is one, so caches made without it keep their key)."""
    policy = crop if colour_constancy == "none" else f"{crop}|{colour_constancy}"
    h = hashlib.sha256(f"{size}|{policy}|v1".encode())
    for image_id, path in zip(df["image_id"], df["path"], strict=True):
        st = os.stat(path)
        h.update(f"{image_id}\x1f{path}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1e".encode())
    return h.hexdigest()[:20]


@dataclass
class ImageCache:
    """Images of one manifest at one resolution, as a read-only memory map.

    Attributes:
        images: (N, size, size, 3) uint8 memmap, rows in ``image_ids`` order.
        image_ids: (N,) image ids, the order of the manifest the cache was built from.
        root: the cache folder.
    """

    images: np.ndarray
    image_ids: np.ndarray
    root: Path

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def rows_for(self, image_ids) -> np.ndarray:
        """Row indices (M,) of ``image_ids`` in the cache; KeyError names the first unknown id."""
        pos = pd.Index(self.image_ids).get_indexer(list(image_ids))
        if (pos < 0).any():
            missing = [i for i, p in zip(image_ids, pos, strict=True) if p < 0]
            raise KeyError(f"{len(missing)} image ids not in cache {self.root}, e.g. {missing[:3]}")
        return pos

    def load(self, image_ids=None) -> np.ndarray:
        """Copy (into RAM) the images of ``image_ids`` (all by default): (M, S, S, 3) uint8."""
        if image_ids is None:
            return np.array(self.images)
        return np.array(self.images[self.rows_for(image_ids)])


def build_cache(
    df: pd.DataFrame,
    size: int,
    crop: str = "short_side_center",
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
    colour_constancy: str = "none",
) -> ImageCache:
    """Decode + resize every manifest image once; reuse the cache when the key matches.

    ``colour_constancy`` (``COLOUR_CONSTANCY``) is applied to every crop (``crop_image``).
    Writes to a temporary folder and renames it at the end, so a killed build never leaves
    a half-written cache that a later run would trust.
    """
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy '{crop}', expected one of {CROP_POLICIES}")
    if colour_constancy not in COLOUR_CONSTANCY:
        raise ValueError(
            f"unknown colour constancy '{colour_constancy}', expected one of {COLOUR_CONSTANCY}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    root = cache_dir / f"images-{size}px-{cache_key(df, size, crop, colour_constancy)}"
    if (root / "meta.json").exists():
        return open_cache(root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(df)
    arr = np.lib.format.open_memmap(
        tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
    )

    def decode(i_path):
        i, path = i_path
        arr[i] = crop_image(load_rgb(path), size, crop, colour_constancy)

    # PIL decoding releases the GIL, so threads use both cores without pickling arrays.
    jobs = list(enumerate(df["path"]))
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        results = pool.map(decode, jobs)
        if progress:
            from rich.progress import track

            results = track(results, total=n, description=f"caching {n} images at {size}px")
        for _ in results:
            pass
    arr.flush()
    pd.Series(df["image_id"].astype(str).to_numpy(), name="image_id").to_csv(
        tmp / "image_ids.csv", index=False
    )
    meta = {"size": size, "crop": crop, "n": n}
    if colour_constancy != "none":
        meta["colour_constancy"] = colour_constancy
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(root)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(root)


def open_cache(root: str | Path) -> ImageCache:
    """Open an existing cache folder read-only (memory-mapped)."""
    root = Path(root)
    images = np.load(root / "images.npy", mmap_mode="r")
    ids = pd.read_csv(root / "image_ids.csv", dtype=str)["image_id"].to_numpy()
    return ImageCache(images=images, image_ids=ids, root=root)
