"""The teacher-logit store: each image scored once per teacher, shared by later students."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from dermkit.core.devices import make_accelerator
from dermkit.data.cache import ImageCache
from dermkit.data.dataset import CachedImageDataset
from dermkit.eval.inference import predict_logits
from dermkit.train.distill import cached_teacher_logits

CLASSES = ["a", "b", "c"]


class CountingTeacher(nn.Module):
    """Logits from the mean colour; counts the images it is asked to score."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, len(CLASSES))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.head(x.float().mean((2, 3)))


def _dataset(images: np.ndarray, ids: list[str]) -> CachedImageDataset:
    cache = ImageCache(images=images, image_ids=np.array(ids), root=None)
    manifest = pd.DataFrame({"image_id": ids, "lesion_id": ids, "label": "a"})
    return CachedImageDataset(cache, manifest, CLASSES)


def test_each_image_is_scored_once_per_teacher_and_the_store_serves_later_students(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    extra = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    teacher, acc = CountingTeacher(), make_accelerator("fp32")
    source = SimpleNamespace(fingerprint=lambda: "w1", path=tmp_path)
    store = tmp_path / "store"
    direct = predict_logits(teacher, _dataset(real, list("abcdef")), np.arange(6), acc)
    teacher.seen = 0

    first, path = cached_teacher_logits(teacher, source, _dataset(real, list("abcdef")), store, acc)
    assert teacher.seen == 6 and path.parent == store
    torch.testing.assert_close(first, direct)

    # A student with the same images plus synthetic ones (other ids, another order): only the
    # new images are scored, and every row is its own image's logits.
    images = np.concatenate([extra, real[::-1]])
    student = _dataset(images, [*"xyz", *"fedcba"])
    both, _ = cached_teacher_logits(teacher, source, student, store, acc)
    assert teacher.seen == 6 + 3
    torch.testing.assert_close(both[3:], first.flip(0))
    with safe_open(str(path), "pt") as f:
        assert len(json.loads(f.metadata()["images"])) == 9

    # The same again (a resumed run, another seed): nothing is scored.
    again, _ = cached_teacher_logits(teacher, source, student, store, acc)
    assert teacher.seen == 9
    torch.testing.assert_close(again, both)

    # Another teacher's weights, or the dihedral mean, never read these rows.
    other = SimpleNamespace(fingerprint=lambda: "w2", path=tmp_path)
    real_only = _dataset(real, list("abcdef"))
    _, other_path = cached_teacher_logits(teacher, other, real_only, store, acc)
    assert teacher.seen == 15 and other_path != path
    _, dihedral_path = cached_teacher_logits(teacher, source, real_only, store, acc, dihedral=True)
    assert teacher.seen == 15 + 6 * 8 and dihedral_path not in (path, other_path)
    # The synthetic rows are their own images' logits too.
    torch.testing.assert_close(both[:3], predict_logits(teacher, student, np.arange(3), acc))
