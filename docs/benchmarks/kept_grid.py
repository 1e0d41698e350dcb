"""A per-class grid of the kept images of a synthetic manifest, for BENCHMARKS.md.

One row per requested class (the first N kept images in manifest order), every image shown
at one size so a 32 px and a 64 px generator can share a figure (nearest-neighbour, so the
generator's own pixels stay visible).

    python docs/benchmarks/kept_grid.py runs/bench/synth-union/manifest.csv \
        docs/benchmarks/synth-union-kept-per-class.png --per-class 8 --size 64
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from dermkit.data.manifest import read_manifest
from dermkit.synth.images import save_grid


def kept_grid(manifest_path: str, out: str, per_class: int, size: int) -> list[str]:
    """Write the grid; returns the classes in row order."""
    rows = read_manifest(manifest_path)
    if "kept" in rows.columns:
        rows = rows[rows["kept"].astype(bool)]
    classes = sorted(rows["label"].unique())
    tiles = []
    for label in classes:
        paths = rows.loc[rows["label"] == label, "path"].head(per_class).tolist()
        for path in paths + [None] * (per_class - len(paths)):  # a short class: blank tiles
            if path is None:
                tiles.append(np.zeros((size, size, 3), np.uint8))
                continue
            image = Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
            tiles.append(np.asarray(image))
    save_grid(np.stack(tiles), out, nrow=per_class)
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    classes = kept_grid(args.manifest, args.out, args.per_class, args.size)
    print(f"{args.out}: rows {', '.join(classes)}")


if __name__ == "__main__":
    main()
