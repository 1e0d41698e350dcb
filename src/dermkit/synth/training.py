"""Files shared by the synth stages (autoencoder, diffusion, sampling, quality).

The training loops themselves are the engine's (``dermkit.train.engine.fit``): budget,
per-process batch slices, logging and checkpoints live there.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from dermkit.config import ConfigError
from dermkit.core.files import write_json_atomic
from dermkit.eval.report import to_jsonable
from dermkit.models.weights import save_weights


def write_json(obj, path: str | Path) -> Path:
    """Write JSON (numpy values converted) atomically."""
    return write_json_atomic(path, to_jsonable(obj))


def save_diffusers(model, path: str | Path, kind: str, **metadata: str) -> Path:
    """A diffusers model in one .safetensors file: weights, its config, ``dermkit_kind``.

    ``metadata``: further string entries (e.g. the autoencoder's latent scale). Loading
    needs nothing else (``load_diffusers``).
    """
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    meta = {"dermkit_kind": kind, "diffusers_config": json.dumps(config), **metadata}
    return save_weights(model, path, metadata=meta)


def load_diffusers(path: str | Path, cls, kind: str, what: str) -> tuple:
    """(model of diffusers class ``cls``, the file's metadata) from a ``save_diffusers`` file.

    Refuses a missing file and one whose ``dermkit_kind`` is not ``kind``, naming ``what``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("dermkit_kind") != kind:
        raise ConfigError(f"{path}: not a dermkit {what} (metadata dermkit_kind)")
    model = cls.from_config(json.loads(meta["diffusers_config"]))
    model.load_state_dict(load_file(path))
    return model, meta
