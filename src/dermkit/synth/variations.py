"""Image-guided variations of real training images (``dermkit synth sample --from-real S``).

SDEdit (Meng et al., ICLR 2022), as DA-Fusion (Trabucco et al., 2023) uses it for data
augmentation: a real image's latent z_0 is noised with the forward process to a timestep
t_0 ~ S * T, z_t0 = sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) n, and denoised from there
under its own class by the usual sampler. The lesion's layout survives small S; S = 1
starts from the noise alone, which is plain sampling (same code path, same images). S
trades diversity against fidelity to the real image: at small S an image is close to
its source, which the memorisation check of ``synth quality`` and of the sample filter
may count as a near-copy.

Sources: image i of class c starts from real TRAIN image ``order_c[i mod n_c]`` of the
generator's own train split, ``order_c`` a permutation of the class's images seeded by
(seed, c): a function of the image's (seed, class, index) like its noise, and every real
image of the class is used once before any is used twice. Only train images are sources,
so no val/test lesion reaches a synthetic training image.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dermkit.config import ConfigError


def strength_schedule(steps: int, strength: float, scheduler_config: Mapping) -> tuple[int, int]:
    """(timesteps of the sampler's grid, how many of its last ones to run) for ``strength``.

    The grid is chosen so that its last ``run`` = max(1, round(steps * strength)) timesteps
    start at t ~ strength * T: the denoising budget scales with the noise left, and small
    strengths start close to t = 0 (not at the coarse grid's lowest timestep, T / steps).
    Strength 1 is the plain sampler: (steps, steps).
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if strength == 1:
        return steps, steps
    run = max(1, round(steps * strength))
    total = min(int(scheduler_config["num_train_timesteps"]), max(run, round(run / strength)))
    return total, min(run, total)


class RealSources:
    """The real train images that variations start from, per class (see the module doc)."""

    def __init__(self, data, train: pd.DataFrame, classes: Sequence[str], seed: int):
        """``data``/``train``: the generator's prepared data and its train rows
        (``diffusion.generator_train_split``)."""
        self.data = data
        self.order: dict[str, np.ndarray] = {}
        for c in classes:
            ids = np.sort(train.loc[train["label"] == c, "image_id"].to_numpy())
            rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
            self.order[c] = ids[rng.permutation(len(ids))]

    def source_of(self, label: str, index: int) -> str:
        """The image id that image ``index`` of class ``label`` starts from."""
        ids = self.order.get(label)
        if ids is None or not len(ids):
            raise ConfigError(f"from_real: class {label!r} has no train image to start from")
        return str(ids[index % len(ids)])

    def images(self, image_ids: Sequence[str]) -> torch.Tensor:
        """uint8 (B, 3, S, S) images of these train ids, in order."""
        return torch.from_numpy(self.data.cache.load(list(image_ids))).permute(0, 3, 1, 2)

    def latents(self, codec, image_ids: Sequence[str]) -> torch.Tensor:
        """z_0 of these train images (B, C, h, w): the codec's scaled posterior means."""
        return codec.moments(self.images(image_ids))[0]
