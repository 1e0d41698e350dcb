"""Training checkpoints without pickles: safetensors for tensors, JSON for the rest.

accelerate's ``save_state`` writes the optimizer and RNG states with ``torch.save``, i.e.
pickles, which run arbitrary code when loaded; dermkit promises never to load one. So a
checkpoint here is a folder

    step-000120/
      model.safetensors       weights
      ema.safetensors         EMA weights (if any)
      optimizer.safetensors   every optimizer state tensor, keyed "<param index>.<name>"
      tensors.safetensors     other tensors the loop keeps (e.g. best weights so far)
      rng.safetensors         torch CPU (and CUDA) generator states
      state.json              step, epoch, best metric, optimizer scalars and param-group
                              hyper-parameters, numpy/python RNG states, config, version

written to a temporary folder and renamed, after which ``latest`` (a one-line file,
itself replaced atomically) points to it. A run killed at any instant therefore finds
either the previous complete checkpoint or the new one, never half of one.

A run starts through :func:`checkpoint_to_resume`, which removes the ``.tmp-step-*``
folders such a kill leaves behind and says what happens to an existing checkpoint: a run
with ``--resume`` but nothing to resume from warns and starts at step 0, and a run without
``--resume`` in a folder that holds a checkpoint names it and the flag.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dermkit import __version__

LATEST = "latest"
TENSORS_FILE = "tensors.safetensors"
TMP_PREFIX = ".tmp-step-"

log = logging.getLogger(__name__)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of ``optimizer_to_flat``: load the state into ``opt``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a training step may touch: torch (CPU, CUDA), numpy, python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
    extra: dict | None = None,
    keep: int = 1,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``ckpt_dir/step-<step>/`` atomically, point ``latest`` at it, prune old ones.

    ``tensors`` are stored as they are (read back with ``load_checkpoint_tensors``).
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
    if ema is not None:
        save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors")
    state = {"step": step, "dermkit": __version__, **(extra or {})}
    if optimizer is not None:
        flat, meta = optimizer_to_flat(optimizer)
        save_file(_contiguous(flat), tmp / "optimizer.safetensors")
        state["optimizer"] = meta
    if tensors:
        save_file(_contiguous(tensors), tmp / TENSORS_FILE)
    rng, meta = rng_state()
    save_file(_contiguous(rng), tmp / "rng.safetensors")
    state["rng"] = meta
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = ckpt_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    pointer.replace(ckpt_dir / LATEST)
    old = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The folder ``latest`` points to, or None when there is no complete checkpoint."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def _pid_alive(pid: int) -> bool:
    """True when another live process has this id (it may be writing its checkpoint)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists under another user
        return True
    return True


def clean_stale_tmp(ckpt_dir: str | Path) -> list[Path]:
    """Remove ``.tmp-step-*`` folders left by a process killed mid-write; returns them.

    A folder whose name ends in the id of another live process is kept: that process may
    still be writing it.
    """
    removed = []
    for tmp in sorted(Path(ckpt_dir).glob(f"{TMP_PREFIX}*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        names = ", ".join(p.name for p in removed)
        log.info(
            "removed %d unfinished checkpoint folder(s) in %s: %s", len(removed), ckpt_dir, names
        )
    return removed


def checkpoint_to_resume(ckpt_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a starting run continues from, or None to start at step 0.

    Removes stale ``.tmp-step-*`` folders first (:func:`clean_stale_tmp`). ``resume``
    without a checkpoint is a warning, not an error, because ``dermkit run`` calls a
    killed stage again with ``resume=True``, including one killed before its first
    checkpoint; refusing would make such a pipeline impossible to finish. Without
    ``resume``, an existing checkpoint is named with a hint, since the fresh run will
    replace it.
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        clean_stale_tmp(ckpt_dir)
    ckpt = latest_checkpoint(ckpt_dir)
    if resume and ckpt is None:
        log.warning(
            "--resume: no checkpoint in %s (no earlier run, or it stopped before its first "
            "checkpoint); starting from step 0",
            ckpt_dir,
        )
    elif not resume and ckpt is not None:
        step = json.loads((ckpt / "state.json").read_text()).get("step", "?")
        log.warning(
            "%s holds a checkpoint of an earlier run (step %s); this run starts from step 0 "
            "and replaces it. To continue that run instead, rerun with --resume.",
            ckpt,
            step,
        )
    return ckpt if resume else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint folder into the given objects; returns its state.json dict."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").exists():
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    if optimizer is not None and "optimizer" in state:
        optimizer_from_flat(
            optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"]
        )
    if restore_rng:
        set_rng_state(load_file(path / "rng.safetensors"), state["rng"])
    return state


def load_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``tensors`` a checkpoint folder was saved with ({} when none)."""
    file = Path(path) / TENSORS_FILE
    return load_file(file) if file.exists() else {}
