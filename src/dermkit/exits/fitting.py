"""Exit heads on the engine (``train/engine.py``): what live training (``exits/train.py``)
and training on cached pooled features (``exits/cached.py``) share.

Several head types train at once, one trainable part each ({head type: part}, the
parts' parameters disjoint): one backward of the summed losses and one AdamW give each
the update its own loss would, and each part is clipped on its own. Each head type keeps
its own best epoch, on the mean val macro-F1 over its exits, so the engine selects none
(``select = None``); the best weights travel through checkpoints as the method's
tensors, the scores in ``FitState.notes``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dermkit.config import ConfigError
from dermkit.exits.policy import macro_f1
from dermkit.exits.settings import ExitsRunConfig
from dermkit.train.engine import CheckpointMismatchError, EpochEnd, Method, Rows, fit, run_options

log = logging.getLogger(__name__)


def val_scores(logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Macro-F1 of each exit's logits (E, N, C) against y (N,)."""
    return [macro_f1(y, lg.argmax(1), lg.shape[1]) for lg in logits]


class BestPerHeadType:
    """The epoch-end half of an exit-head method: every exit's val macro-F1 and each head
    type's best weights so far (``best``: {head type: state dict})."""

    select = None

    def __init__(self, y_val: np.ndarray):
        self.y_val = y_val
        self.best: dict[str, dict[str, torch.Tensor]] = {}

    def scored_row(
        self,
        end: EpochEnd,
        val: dict[str, np.ndarray],
        weights: Callable[[str], dict[str, torch.Tensor]],
    ) -> dict:
        """The epoch's row from every head type's val logits {head type: (E, N, C)};
        ``weights(h)``, head type h's state dict, is kept when its mean is its best yet."""
        notes = end.state.notes.setdefault("best", {})  # {head type: [score, epoch]}
        row = {"lr": end.lr}
        for h, logits in val.items():
            scores = val_scores(logits, self.y_val)
            mean = float(np.mean(scores))
            row[h] = {
                "train_loss": end.means[h],
                "val_macro_f1": scores,
                "val_mean_macro_f1": mean,
            }
            if mean > notes.get(h, [-1.0])[0]:
                notes[h] = [mean, end.epoch]
                self.best[h] = {k: v.detach().cpu().clone() for k, v in weights(h).items()}
        log.info("epoch %d: %s", end.epoch, {h: round(row[h]["val_mean_macro_f1"], 4) for h in val})
        return row

    def keep_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{h}/{k}": v for h, sd in self.best.items() for k, v in sd.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            head, name = key.split("/", 1)
            self.best.setdefault(head, {})[name] = value


def fit_exit_heads(
    method: Method,
    trainer: torch.nn.ModuleDict,
    rows: Rows,
    cfg: ExitsRunConfig,
    run_dir: Path,
    accelerator,
    resume: bool,
    progress: bool,
) -> tuple[list[dict], dict[str, int]]:
    """``fit`` the parts ``trainer`` ({head type: part}) with ``method`` (a
    ``BestPerHeadType``); returns (history, best epoch per head type).

    A checkpoint that does not fit is refused with the settings that fix the trained parts.
    """
    try:
        state, _ = fit(
            method,
            trainer,
            rows,
            cfg.optim,
            run_dir,
            accelerator=accelerator,
            name="exit heads",
            **run_options(cfg, resume=resume, progress=progress),
            # each head type is clipped on its own, as if it were trained alone
            clip_groups=lambda t: [part.parameters() for part in t.values()],
            keep_tensors=method.keep_tensors,
            load_tensors=method.load_tensors,
        )
    except CheckpointMismatchError as e:
        raise ConfigError(
            f"{e} (exits.head_types, exits.exit_blocks, exits.mode, exits.features and the "
            "head sizes fix what is trained)"
        ) from e
    return state.history, {h: int(state.notes["best"][h][1]) for h in trainer}
