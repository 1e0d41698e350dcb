"""A judge's recall on real val images at its own size and shrunk to 1/2 and 1/4 of it.

What a pixel-space generator at the smaller size could at best get from this judge
(BENCHMARKS.md, "Pixel-space diffusion at 32 px"). One-off; nothing trains.

    .venv/bin/python docs/benchmarks/judge_at_resolution.py runs/bench/compare4/imagenet
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.data.settings import DataConfig
from dermkit.synth.codec_check import judge_table
from dermkit.synth.filtering import load_real_classifier


def main(judge: str) -> None:
    config = yaml.safe_load((Path(judge) / "config.yaml").read_text())
    data = prepare_data(DataConfig(**config["data"]))  # the judge's own size and split
    dataset = CachedImageDataset(data.cache, data.part("val"), data.classes)
    images = dataset.__getitems__(np.arange(len(dataset)))[0]  # uint8 (N, 3, S, S)
    labels = np.asarray(data.classes)[dataset.labels.numpy()]
    side = images.shape[-1]
    versions = {"real": images}
    for factor in (2, 4):
        small = F.interpolate(images.float(), size=side // factor, mode="area")
        back = F.interpolate(small, size=side, mode="bilinear", align_corners=False)
        versions[f"at {side // factor} px"] = back.round().clamp(0, 255).to(torch.uint8)
    classifier = load_real_classifier(judge, purpose="the resolution ceiling")
    print({c: int((labels == c).sum()) for c in data.classes})
    for row in judge_table(versions, labels, classifier):
        print(row["version"], {c: round(v, 2) for c, v in row["recall"].items()})


if __name__ == "__main__":
    main(sys.argv[1])
