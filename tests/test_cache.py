import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermkit.data.cache import (
    build_cache,
    crop_image,
    resize_full_frame,
    resize_short_side_center_crop,
)
from dermkit.data.dataset import CachedImageDataset, batch_collate
from dermkit.data.manifest import new_manifest
from dermkit.data.settings import AugmentSettings
from dermkit.data.transforms import BatchAugment, to_float


def _write_images(folder, n=6, size=(40, 30)):
    rows = []
    for i in range(n):
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[..., 0] = 20 * i  # each image has its own red level
        arr[:, : size[0] // 2, 1] = 200  # left half green: lets us see the crop
        path = folder / f"im{i}.png"
        Image.fromarray(arr).save(path)
        rows.append({"image_id": f"im{i}", "path": str(path), "label": "ab"[i % 2], "source": "t"})
    return new_manifest(rows)


def test_short_side_resize_then_centre_crop():
    image = np.zeros((120, 160, 3), np.uint8)
    image[:, :20] = 255  # a white band on the far left is cropped away at 4:3
    image[:, 60:100] = 128
    out = resize_short_side_center_crop(image, 60)
    assert out.shape == (60, 60, 3)
    assert out[:, :3].max() < 255  # the far-left band is gone
    assert abs(int(out[30, 30, 0]) - 128) <= 2  # the centre stays the centre


def test_full_frame_keeps_the_whole_frame_and_pads_by_reflection():
    """4:3 -> the long side fits, the border band survives, rows above/below mirror the image."""
    image = np.zeros((120, 160, 3), np.uint8)
    image[:, :20] = 255  # the far-left band that a centre crop loses
    image[:10] = 77  # a top stripe: reflection puts it into the padding
    out = resize_full_frame(image, 64)
    assert out.shape == (64, 64, 3)
    assert out[32, 2].min() > 200  # the left band is still in view
    assert resize_short_side_center_crop(image, 64)[32, 2].max() == 0  # (a centre crop loses it)
    # content rows 8..55 (48 = 120 * 64/160); rows 0..7 mirror rows 9..16 (reflection)
    assert np.array_equal(out[:8][::-1], out[9:17])
    square = np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8)
    assert np.array_equal(crop_image(square, 50, "full_frame"), square)  # a square: untouched
    with pytest.raises(ValueError, match="unknown crop policy 'zoom'"):
        crop_image(square, 50, "zoom")


def test_cache_built_once_and_reused(tmp_path):
    m = _write_images(tmp_path)
    c1 = build_cache(m, 16, cache_dir=tmp_path / "cache")
    assert c1.images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(c1.load(["im3"])[0, 8, 8, 0], 60)
    mtime = (c1.root / "images.npy").stat().st_mtime_ns
    c2 = build_cache(m, 16, cache_dir=tmp_path / "cache")
    assert c2.root == c1.root and (c2.root / "images.npy").stat().st_mtime_ns == mtime
    assert build_cache(m, 20, cache_dir=tmp_path / "cache").root != c1.root


def test_cache_key_changes_when_a_file_changes(tmp_path):
    m = _write_images(tmp_path)
    c1 = build_cache(m, 16, cache_dir=tmp_path / "cache")
    arr = np.full((30, 40, 3), 250, np.uint8)
    Image.fromarray(arr).save(m.loc[0, "path"])
    c2 = build_cache(m, 16, cache_dir=tmp_path / "cache")
    assert c2.root != c1.root
    assert c2.load(["im0"])[0, 8, 8, 0] == 250


def test_dataset_serves_batches_matching_single_items(tmp_path):
    m = _write_images(tmp_path)
    cache = build_cache(m, 16, cache_dir=tmp_path / "cache")
    ds = CachedImageDataset(cache, m.iloc[[4, 1, 2]], ["a", "b"])
    x, y = ds.__getitems__([0, 2])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8
    x0, y0 = ds[0]
    torch.testing.assert_close(x[0], x0)
    assert y.tolist() == [0, 0] and y0.item() == 0
    assert x[0, 0, 8, 8].item() == 80  # im4's red level
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=batch_collate)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 16, 16) and yb.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="not in the class list"):
        CachedImageDataset(cache, m, ["a"])
    with pytest.raises(KeyError, match="not in cache"):
        CachedImageDataset(cache, pd.concat([m, m.assign(image_id="zz")]), ["a", "b"])


def test_augment_is_label_free_random_and_reproducible():
    x = torch.rand(8, 3, 16, 16)
    aug = BatchAugment()
    a = aug(x.clone(), torch.Generator().manual_seed(0))
    b = aug(x.clone(), torch.Generator().manual_seed(0))
    c = aug(x.clone(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_flips_and_rotations_only_permute_pixels():
    x = torch.rand(16, 3, 12, 12)
    cfg = AugmentSettings(
        max_rotate_deg=0,
        max_scale=0,
        max_translate=0,
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0,
    )
    y = BatchAugment(cfg)(x.clone(), torch.Generator().manual_seed(0))
    for i in range(16):
        torch.testing.assert_close(y[i].flatten().sort().values, x[i].flatten().sort().values)
    assert not torch.allclose(x, y)  # with 16 images some were flipped or rotated


def test_to_float_normalises():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = to_float(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(out, torch.ones(1, 3, 2, 2))
