"""``dermkit exits train``: exit heads on a trained classifier run.

base run (finetune/distill) -> its data and exact split -> one ``EarlyExitViT`` per head
type -> train -> select the epoch with the best val macro-F1 averaged over the exits ->
every exit's val/test logits, GFLOPs per exit -> exit-run folder (see ``run_io.py``).

Two modes:

* ``frozen``: the backbone is fixed and only the heads learn. All head types share one
  backbone, so each batch runs the blocks once (under ``no_grad``) and every head type
  trains on the same tokens; the final exit (the backbone's head) is unchanged.
* ``joint``: each head type gets its own copy of the backbone, trained with the heads on
  a weighted sum of every exit's loss (the final exit included).

With ``distill_alpha`` > 0 the early exits also learn the final exit's softened outputs
(self-distillation, ``dermkit.train.kd.KDLoss``); the final exit always learns the labels.

Training runs on the engine (``train/engine.py``): data-parallel under ``accelerate
launch``/``torchrun`` (DDP sees the trainable parts only), each step reseeded from
(seed, step), checkpoints (safetensors + JSON, no pickles) every ``checkpoint_every``
steps and at each epoch end; ``--resume`` continues a killed run from the latest one and
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch

from dermkit.config import ConfigError
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import BatchAugment, to_float
from dermkit.exits.backbones import backbone_parts
from dermkit.exits.fitting import BestPerHeadType, fit_exit_heads
from dermkit.exits.model import EarlyExitViT
from dermkit.exits.run_io import (
    base_data,
    check_classes,
    head_kwargs,
    saved_state,
    write_exit_run,
)
from dermkit.exits.settings import ExitsRunConfig
from dermkit.models.backbones import input_stats
from dermkit.models.runs_io import load_run_model
from dermkit.runs import RunDir
from dermkit.train.engine import Batch, EpochEnd, Rows, make_accelerator
from dermkit.train.kd import KDLoss
from dermkit.train.losses import ClassificationLoss, sampling_weights

log = logging.getLogger(__name__)


def build_exit_models(
    backbone: torch.nn.Module, cfg: ExitsRunConfig, n_classes: int
) -> dict[str, EarlyExitViT]:
    """One EarlyExitViT per head type: a shared backbone (frozen) or a copy each (joint)."""
    e = cfg.exits
    models = {}
    for head_type in e.head_types:
        bb = backbone if e.mode == "frozen" else copy.deepcopy(backbone)
        models[head_type] = EarlyExitViT(bb, e.exit_blocks, head_type, n_classes, head_kwargs(cfg))
    if e.mode == "frozen":
        backbone.requires_grad_(False)
    return models


def _trainable(model: EarlyExitViT, mode: str) -> torch.nn.Module:
    return model.heads if mode == "frozen" else model


@torch.no_grad()
def _shared_tokens(model: EarlyExitViT, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Frozen backbone: tokens after each exit depth (E - 1 of them) and the final logits."""
    tokens, h = [], model.embed(x)
    for j in range(model.n_exits):
        h = model.run_blocks(h, *model.block_range(j))
        tokens.append(h)
    return tokens[:-1], model.exit_logits(h, model.n_exits - 1)


@torch.no_grad()
def exit_logits_all(
    models: dict[str, EarlyExitViT],
    ds: CachedImageDataset,
    device: torch.device,
    shared_backbone: bool,
    batch_size: int = 256,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, np.ndarray]:
    """Every exit's logits for every row of ``ds``: {head type: (E, N, C) float32}.

    ``autocast`` makes a fresh mixed-precision context per batch (``accelerator.autocast``).
    """
    out: dict[str, list] = {h: [] for h in models}
    for m in models.values():
        m.eval()
    stats = input_stats(next(iter(models.values())).backbone)
    for i in range(0, len(ds), batch_size):
        x, _ = ds.__getitems__(np.arange(i, min(i + batch_size, len(ds))))
        x = to_float(x.to(device), *stats)
        with autocast():
            if shared_backbone:
                first = next(iter(models.values()))
                tokens, final = _shared_tokens(first, x)
                for h, m in models.items():
                    lg = [m.heads[j](t) for j, t in enumerate(tokens)] + [final]
                    out[h].append(torch.stack(lg).float().cpu())
            else:
                for h, m in models.items():
                    out[h].append(torch.stack(m.forward_all(x)).float().cpu())
    return {h: torch.cat(v, dim=1).numpy() for h, v in out.items()}


class ExitHeads(torch.nn.ModuleDict):
    """What the engine trains: {head type: trainable part} (the heads, or in joint mode the
    whole model); ``forward`` returns every head type's loss.

    The full models travel beside the registered parts, so in frozen mode the shared
    backbone is neither checkpointed nor synchronised (it does not change) and DDP sees
    the heads only. The head types' parameters are disjoint, so the sum of their losses
    trains each exactly as its own loss would.
    """

    def __init__(self, models: dict[str, EarlyExitViT], cfg: ExitsRunConfig, hard, kd):
        super().__init__({h: _trainable(m, cfg.exits.mode) for h, m in models.items()})
        # not registered (see the class docstring); nor are the losses: the parts alone
        # are what is trained, synchronised and checkpointed
        self.__dict__.update(models=models, hard=hard, kd=kd)
        self.frozen = cfg.exits.mode == "frozen"
        n_exits = next(iter(models.values())).n_exits
        w = np.asarray(cfg.exits.exit_loss_weights or [1.0] * n_exits, dtype=float)
        if len(w) != n_exits:
            raise ConfigError(f"exits.exit_loss_weights has {len(w)} entries for {n_exits} exits")
        self.exit_w = w / w.sum()

    def train(self, mode: bool = True) -> ExitHeads:
        super().train(mode)
        for m in self.models.values():
            m.train(mode)
            if self.frozen:
                m.backbone.eval()  # no dropout / drop-path in the fixed backbone
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (b, 3, S, S), labels (b,) -> {head type: scalar loss}."""
        if self.frozen:  # the blocks run once, without gradients; every head type reads them
            tokens, final = _shared_tokens(next(iter(self.models.values())), x)
            return {
                h: torch.stack(
                    [self.kd(m.heads[j](t), final, y) for j, t in enumerate(tokens)]
                ).mean()
                for h, m in self.models.items()
            }
        losses = {}
        for h, m in self.models.items():
            outs = m.forward_all(x)
            teacher = outs[-1].detach()
            parts = [self.kd(o, teacher, y) for o in outs[:-1]] + [self.hard(outs[-1], y)]
            losses[h] = sum(float(w) * lo for w, lo in zip(self.exit_w, parts))
        return losses


class ExitTraining(BestPerHeadType):
    """The engine's method for exit heads: augmented images -> every head type's loss; at
    each epoch end every exit's val macro-F1 and each head type's best weights so far."""

    def __init__(self, train_ds, val_ds, augment_cfg, accelerator, stats: tuple):
        super().__init__(val_ds.labels.numpy())
        self.train_ds, self.val_ds, self.accelerator = train_ds, val_ds, accelerator
        self.stats = stats  # the base run's input normalisation (mean, std)
        self.device = accelerator.device
        self.augment = BatchAugment(augment_cfg)

    def step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        losses = model(*batch.augmented(self.train_ds, self.augment, self.device, self.stats))
        return sum(losses.values()), {h: float(v.detach()) for h, v in losses.items()}

    def evaluate(self, model: ExitHeads, end: EpochEnd) -> dict:
        """Score every exit on val, keep each head type's best weights."""
        val = exit_logits_all(
            model.models, self.val_ds, self.device, model.frozen, autocast=self.accelerator.autocast
        )
        mode = "frozen" if model.frozen else "joint"
        return self.scored_row(end, val, lambda h: saved_state(model.models[h], mode))


def train_exit_models(
    models: dict[str, EarlyExitViT],
    cfg: ExitsRunConfig,
    train_ds: CachedImageDataset,
    val_ds: CachedImageDataset,
    loss_cfg,
    augment_cfg,
    accelerator,
    progress: bool = True,
    run_dir: Path | None = None,
    resume: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Train the exit models in place (best val epoch restored); returns (history, best epochs).

    On the engine (``train/engine.py``): with ``run_dir`` it checkpoints (trainable weights,
    AdamW state, each head type's best weights so far) into ``run_dir/checkpoints`` every
    ``cfg.checkpoint_every`` steps, at the end and at epoch ends (``fit``'s rule), and
    ``resume`` continues from the latest one, replaying exactly what the uninterrupted run
    did.
    """
    device = accelerator.device
    n_classes = len(train_ds.class_names)
    for m in models.values():
        m.to(device)
    weights = sampling_weights(train_ds.labels, loss_cfg.sampler, n_classes)
    hard = ClassificationLoss.from_config(loss_cfg, train_ds.class_counts()).to(device)
    kd = KDLoss(cfg.exits.distill_alpha, cfg.exits.distill_temperature, hard_loss=hard)
    trainer = ExitHeads(models, cfg, hard, kd)
    stats = input_stats(next(iter(models.values())).backbone)
    method = ExitTraining(train_ds, val_ds, augment_cfg, accelerator, stats)
    rows = Rows(np.arange(len(train_ds)), weights=None if weights is None else weights.numpy())
    with tempfile.TemporaryDirectory() as tmp:  # no run folder: checkpoints are thrown away
        history, best_epoch = fit_exit_heads(
            method,
            trainer,
            rows,
            cfg,
            Path(run_dir) if run_dir is not None else Path(tmp),
            accelerator,
            resume,
            progress,
        )
    for h, m in models.items():
        m.load_state_dict(method.best[h], strict=False)
    return history, best_epoch


def run_exits_train(cfg: ExitsRunConfig, progress: bool = True, resume: bool = False) -> Path:
    """Train exit heads on ``cfg.base_run``; returns the exit-run folder.

    ``resume``: continue from ``out_dir/checkpoints`` (see ``train_exit_models``).
    """
    if cfg.exits.features == "cached":
        from dermkit.exits.cached import run_cached_exits_train

        return run_cached_exits_train(cfg, progress, resume)
    base_dir = Path(cfg.base_run)
    backbone, base_cfg, classes = load_run_model(base_dir, purpose="early exits")
    try:
        backbone_parts(backbone)
    except TypeError as err:
        raise ConfigError(f"{base_dir}: {base_cfg.model.name}: {err}") from err
    accelerator = make_accelerator(cfg.optim.precision)
    # Under DDP every process trains its slice of each batch; process 0 writes the folder.
    with RunDir(cfg.out_dir, cfg, "exits", write=accelerator.is_main_process) as run:
        data = base_data(base_dir, base_cfg, cfg.data_path, cfg.cache_dir)
        check_classes(data, classes, base_dir)
        parts = {s: data.part(s) for s in ("train", "val", "test")}
        ds = {s: CachedImageDataset(data.cache, p, data.classes) for s, p in parts.items()}
        torch.manual_seed(cfg.seed)
        protect_unknown = sorted(set(cfg.exits.protect) - set(classes))
        if protect_unknown:
            raise ConfigError(f"exits.protect: unknown classes {protect_unknown} (have {classes})")
        models = build_exit_models(backbone, cfg, len(classes))
        history, best_epoch = train_exit_models(
            models,
            cfg,
            ds["train"],
            ds["val"],
            cfg.loss or base_cfg.loss,
            cfg.augment or base_cfg.augment,
            accelerator,
            progress=progress,
            run_dir=run.path,
            resume=resume,
        )
        if not accelerator.is_main_process:
            return run.path
        frozen = cfg.exits.mode == "frozen"
        # Saved logits are computed in fp32, as deployed inference runs: thresholds are
        # calibrated on them and must mean the same at inference time.
        logits = {
            s: exit_logits_all(models, ds[s], accelerator.device, frozen) for s in ("val", "test")
        }
        labels = {s: ds[s].labels.numpy() for s in ("val", "test")}
        write_exit_run(
            run.path, cfg, base_dir, base_cfg, classes, models, logits, labels, history, best_epoch
        )
        return run.path
