"""One synthetic set from several generators, each class taken from the generator that draws it.

Why: no single generator draws every class at the cpu preset. The latent model loses vasc in
its autoencoder; the 32 px pixel-space model draws vasc but the other rare classes worse
(BENCHMARKS.md, "Pixel-space diffusion at 32 px"). Training reads one ``synthetic_manifest``,
so the per-class choice is a manifest: every row of a class comes from that class's source,
kept and rejected alike (the filter's record travels with it), paths unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from dermkit.data.manifest import read_manifest, write_manifest


def merge_manifests(sources: Mapping[str, str | Path]) -> pd.DataFrame:
    """``{class: manifest, ..., "default": manifest}`` -> one manifest.

    Each named class takes its rows from its own manifest; every other class in the
    ``default`` manifest takes them from there. A named class its manifest does not hold is
    an error (an image id two sources share is one on writing). Rows of an unfiltered
    source (no ``kept`` column) count as kept when another source is filtered.
    """
    frames = {name: read_manifest(path) for name, path in sources.items()}
    named = [c for c in frames if c != "default"]
    parts = []
    for label in named:
        rows = frames[label][frames[label]["label"] == label]
        if rows.empty:
            raise ValueError(f"{sources[label]}: no synthetic rows of class {label!r}")
        parts.append(rows)
    if "default" in frames:
        rest = frames["default"]
        parts.append(rest[~rest["label"].isin(named)])
    if any("kept" in p.columns for p in parts):
        parts = [p if "kept" in p.columns else p.assign(kept=True) for p in parts]
    return pd.concat(parts, ignore_index=True)  # write_manifest refuses duplicate image ids


def write_merged(sources: Mapping[str, str | Path], out: str | Path) -> Path:
    """Write the merged manifest to ``out`` (.csv or .parquet); returns ``out``."""
    return write_manifest(merge_manifests(sources), out)
