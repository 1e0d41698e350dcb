"""A torch Dataset that serves uint8 image tensors from the decode-once cache.

``__getitems__`` returns a whole batch in one array gather (torch's DataLoader calls it
when present), so loading a batch costs one memcpy instead of B Python calls. Use
``collate_fn=batch_collate`` with it. Augmentation happens later, on the batch
(``dermkit.data.transforms.BatchAugment``), so this class stays free of randomness.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from dermkit.data.cache import ImageCache


class CachedImageDataset(Dataset):
    """Images (N, 3, S, S) uint8 with integer labels (N,) for the rows of a manifest.

    Args:
        cache: the image cache the manifest rows live in.
        manifest: rows to serve (any subset of the cached manifest).
        class_names: index order of the labels; a label outside it is an error.
        in_memory: copy the rows into RAM (fast random access; 10k images at 64 px = 120 MB).
    """

    def __init__(
        self,
        cache: ImageCache,
        manifest: pd.DataFrame,
        class_names: list[str],
        in_memory: bool = True,
    ):
        rows = cache.rows_for(manifest["image_id"])
        unknown = sorted(set(manifest["label"]) - set(class_names))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the class list {class_names}")
        index = {c: i for i, c in enumerate(class_names)}
        self.labels = torch.tensor([index[c] for c in manifest["label"]], dtype=torch.long)
        self.image_ids = manifest["image_id"].to_numpy()
        self.lesion_ids = manifest["lesion_id"].to_numpy()
        self.class_names = list(class_names)
        self._images = np.array(cache.images[rows]) if in_memory else cache.images
        self._rows = np.arange(len(rows)) if in_memory else rows

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self._images[self._rows[i]]))
        return image.permute(2, 0, 1), self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        images = torch.from_numpy(np.ascontiguousarray(self._images[self._rows[idx]]))
        return images.permute(0, 3, 1, 2), self.labels[idx]

    def class_counts(self) -> torch.Tensor:
        """Images per class, (C,) long."""
        return torch.bincount(self.labels, minlength=len(self.class_names))


def batch_collate(batch):
    """Identity collate for ``__getitems__`` batches; stacks when given single items."""
    if isinstance(batch, tuple):
        return batch
    images, labels = zip(*batch, strict=True)
    return torch.stack(images), torch.stack(labels)
