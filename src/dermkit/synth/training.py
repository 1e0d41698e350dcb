"""Plumbing shared by the synth training loops (autoencoder, diffusion): budget, ranks, logs.

The loops themselves stay in ``autoencoder.py`` and ``diffusion.py`` so each reads top to
bottom; they reuse the supervised loop's deterministic helpers (``plan_epoch``,
``seed_step``, ``lr_at``) and its pickle-free checkpoints, so a resumed run replays
exactly what the uninterrupted run did.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from dermkit.config import ConfigError
from dermkit.core.files import write_json_atomic
from dermkit.eval.report import to_jsonable
from dermkit.synth.settings import SynthOptimConfig
from dermkit.train.engine import plan_epoch


def check_optim(optim: SynthOptimConfig) -> None:
    """Reject OptimConfig fields the generative loops do not implement (names the field)."""
    if optim.grad_accum != 1:
        raise ConfigError("optim.grad_accum: the synth loops take whole batches (set 1)")
    if optim.layer_decay is not None:
        raise ConfigError("optim.layer_decay: applies to ViT fine-tuning only (set null)")
    if optim.patience:
        raise ConfigError("optim.patience: no early stopping in the synth loops (set 0)")


@dataclass
class Budget:
    """Steps of a run: ``steps_per_epoch`` global batches per epoch, ``total`` overall."""

    steps_per_epoch: int
    total: int
    warmup: int
    peak_lr: float


def plan_budget(n_train: int, optim: SynthOptimConfig, max_steps: int | None) -> Budget:
    """Budget of a run over ``n_train`` rows (an epoch is one pass, last partial batch dropped)."""
    spe = n_train // optim.batch_size
    if spe == 0:
        raise ConfigError(
            f"optim.batch_size={optim.batch_size} is larger than the {n_train} training rows"
        )
    total = optim.epochs * spe if max_steps is None else min(optim.epochs * spe, max_steps)
    return Budget(
        spe, total, round(optim.warmup_epochs * spe), optim.base_lr * optim.batch_size / 256
    )


def epoch_batches(
    n_train: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """(steps, batch_size) row indices of an epoch: a function of (seed, epoch) only.

    ``weights`` (n_train,): rows drawn with replacement with these probabilities (a
    class-balanced sampler, ``train.losses.sampling_weights``); None: a shuffle.
    """
    rows, none = np.arange(n_train), np.zeros(0, np.int64)
    return plan_epoch(rows, none, batch_size, seed, epoch, weights)


def rank_slice(accelerator: Accelerator, batch_size: int) -> tuple[int, int]:
    """[lo, hi) of the global batch that this process trains on."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ConfigError(f"optim.batch_size={batch_size} must be divisible by {world} processes")
    micro = batch_size // world
    return rank * micro, (rank + 1) * micro


@dataclass
class TrainLog:
    """JSONL training log (``log.jsonl``) plus the per-epoch history kept in checkpoints."""

    path: Path
    enabled: bool
    history: list[dict] = field(default_factory=list)
    _t: float = field(default_factory=time.time)
    _seen: int = 0

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (a resumed run rewrites them)."""
        if self.enabled and self.path.exists():
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def count(self, images: int) -> None:
        self._seen += images

    def write(self, row: dict) -> None:
        if row.get("kind") == "train":
            now = time.time()
            row["images_per_s"] = round(self._seen / max(now - self._t, 1e-9), 2)
            self._t, self._seen = now, 0
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(to_jsonable(row)) + "\n")


def write_json(obj, path: str | Path) -> Path:
    """Write JSON (numpy values converted) atomically."""
    return write_json_atomic(path, to_jsonable(obj))


def progress_bar(enabled: bool, total: int, completed: int, description: str):
    """(rich Progress, task id), or (None, None) when disabled."""
    if not enabled:
        return None, None
    from rich.progress import Progress

    bar = Progress(transient=False)
    bar.start()
    return bar, bar.add_task(description, total=total, completed=completed)
