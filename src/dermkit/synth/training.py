"""Files shared by the synth stages (autoencoder, diffusion, sampling, quality).

The training loops themselves are the engine's (``dermkit.train.engine.fit``): budget,
per-process batch slices, logging and checkpoints live there.
"""

from __future__ import annotations

from pathlib import Path

from dermkit.core.files import write_json_atomic
from dermkit.eval.report import to_jsonable


def write_json(obj, path: str | Path) -> Path:
    """Write JSON (numpy values converted) atomically."""
    return write_json_atomic(path, to_jsonable(obj))
