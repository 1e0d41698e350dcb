"""Supervised training of a classifier on the engine (``train/engine.py``).

``train_classifier`` is the supervised method: each micro-batch is gathered from the
in-memory cache, augmented (parameters drawn for the whole global batch, so a process
augments its slice as a single process would), mixed (mixup/cutmix) and scored with the
configured ``ClassificationLoss`` or a given criterion (distillation's KD loss, an ordinal
task's). At each epoch end it scores val (and a clean train subset, for the overfitting
gap); the engine keeps the best weights on val macro-F1 (QWK for ordinal heads) and stops
early. Everything else (lr schedule, accumulation, DDP, EMA, clipping, checkpoints,
resume, the log) is the engine's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score

from dermkit.core.metrics import macro_f1
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import BatchAugment
from dermkit.eval.inference import predict_logits
from dermkit.models.backbones import input_stats
from dermkit.train.engine import (  # noqa: F401  (lr_at, plan_epoch: re-exported)
    Batch,
    EpochEnd,
    Rows,
    fit,
    lr_at,
    make_accelerator,
    peak_lr,
    plan_epoch,
    run_options,
)
from dermkit.train.losses import ClassificationLoss, sampling_weights
from dermkit.train.settings import FinetuneRunConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def score(
    logits: torch.Tensor,
    labels: torch.Tensor,
    to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    select: str | None = None,
) -> dict:
    """Loss, accuracy, macro-F1 and balanced accuracy of logits (N, C) against labels (N,).

    ``to_probs(logits) -> class probabilities (N, K)`` marks a non-softmax head (ordinal
    CORN): predictions and the loss (NLL) use its probabilities, and the quadratic weighted
    kappa ``qwk`` is added, which then selects the best epoch.
    """
    probs = to_probs(logits) if to_probs is not None else None
    pred = (logits if probs is None else probs).argmax(1).numpy()
    y = labels.numpy()
    if probs is None:
        loss = F.cross_entropy(logits, labels)
    else:
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels)
    out = {
        "loss": float(loss),
        # Over all K classes (dermkit.core.metrics): the same value the reports show.
        "macro_f1": macro_f1(y, pred, (logits if probs is None else probs).shape[1]),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
    }
    if probs is not None:
        from dermkit.eval.ordinal import quadratic_kappa

        out["qwk"] = float(np.nan_to_num(quadratic_kappa(y, pred, probs.shape[1]), nan=0.0))
    return out


class Supervised:
    """The supervised method: augmented cached images -> logits (b, C) -> loss.

    ``criterion(logits (b, C), targets (b,) or (b, C) after mixup, images (b, 3, S, S))``
    replaces the configured ``ClassificationLoss`` when given. ``to_probs(logits) ->
    (b, K)`` marks a non-softmax head (ordinal CORN): scoring uses it and QWK selects.
    ``select`` names another val score of :func:`score` that picks the epoch.
    """

    def __init__(
        self,
        cfg,
        model,
        train_ds,
        val_ds,
        train_eval_idx,
        accelerator,
        counts,
        criterion=None,
        to_probs=None,
        select=None,
    ):
        lc, device = cfg.loss, accelerator.device
        self.cfg, self.train_ds, self.val_ds = cfg, train_ds, val_ds
        self.train_eval_idx, self.accelerator = train_eval_idx, accelerator
        self.criterion, self.to_probs = criterion, to_probs
        self.select = f"val_{select or ('qwk' if to_probs is not None else 'macro_f1')}"
        self.stats = input_stats(model)  # the weights source's (mean, std), before wrapping
        self.class_loss = ClassificationLoss.from_config(lc, counts).to(device)
        self.augment = BatchAugment(cfg.augment)
        self.mixup = None
        if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.augment.mixup_alpha,
                cutmix_alpha=cfg.augment.cutmix_alpha,
                label_smoothing=lc.label_smoothing,
                num_classes=len(train_ds.class_names),
            )

    def step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        device = self.accelerator.device
        x, y = batch.augmented(self.train_ds, self.augment, device, self.stats)
        if self.mixup is not None:
            x, y = self.mixup(x, y)  # y: (b, C) soft targets
        logits = model(x)
        loss = self.criterion(logits, y, x) if self.criterion else self.class_loss(logits, y)
        return loss, {}

    def evaluate(self, model, end: EpochEnd) -> dict:
        """Score val and a clean train subset; the gaps are train minus val (val minus
        train for the loss)."""
        cfg, acc, tds, vds = self.cfg, self.accelerator, self.train_ds, self.val_ds
        logits = predict_logits(model, vds, np.arange(len(vds)), acc, tta=cfg.augment.tta)
        val = score(logits, vds.labels, self.to_probs)
        train = {}
        if len(self.train_eval_idx):
            logits = predict_logits(model, tds, self.train_eval_idx, acc)
            train = score(logits, tds.labels[self.train_eval_idx], self.to_probs)
        row = {f"val_{k}": v for k, v in val.items()} | {f"train_{k}": v for k, v in train.items()}
        if train:
            for k in ("macro_f1", "balanced_accuracy", "accuracy"):
                row[f"gap_{k}"] = train[k] - val[k]
            row["gap_loss"] = val["loss"] - train["loss"]
        log.info("epoch %d: val macro-F1 %.3f", end.epoch, val["macro_f1"])
        return row


def train_classifier(
    cfg: FinetuneRunConfig,
    model: torch.nn.Module,
    train_ds: CachedImageDataset,
    val_ds: CachedImageDataset,
    run_dir: Path,
    synthetic_mask: np.ndarray | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    select: str | None = None,
) -> dict:
    """Train ``model`` on ``train_ds``, select on ``val_ds``; returns a summary dict.

    ``criterion(logits (b, C), targets (b,) or (b, C), images (b, 3, S, S)) -> loss``
    replaces the configured ``ClassificationLoss`` when given; it sees the augmented,
    normalised micro-batch, so distillation can score the teacher on the same images.
    ``to_probs(logits) -> (b, K)`` is for heads whose outputs are not softmax logits (the
    ordinal CORN head): val/train scoring uses it and the best epoch is the best val QWK.
    ``select`` (a key of :func:`score`, e.g. ``balanced_accuracy``) picks the best epoch
    instead (default: QWK with ``to_probs``, else macro-F1).

    Writes into ``run_dir``: ``checkpoints/`` (resumable), ``best.safetensors`` (weights of
    the best val macro-F1 epoch, EMA weights when EMA is on), ``log.jsonl`` and
    ``history.json`` (per-epoch train/val loss, macro-F1 and the overfitting gap).
    """
    oc = cfg.optim
    accelerator = accelerator or make_accelerator(oc.precision)
    # --- data: real/synthetic pools, sampler weights, a fixed clean train subset
    synthetic_mask = (
        np.zeros(len(train_ds), bool) if synthetic_mask is None else np.asarray(synthetic_mask)
    )
    real, synthetic = np.flatnonzero(~synthetic_mask), np.flatnonzero(synthetic_mask)
    n_classes = len(train_ds.class_names)
    counts = torch.bincount(train_ds.labels[real], minlength=n_classes)
    weights = sampling_weights(train_ds.labels[real], cfg.loss.sampler, n_classes)
    weights = None if weights is None else weights.numpy()
    rows = Rows(real, synthetic, weights, cfg.synthetic_ratio)
    rng = np.random.default_rng(cfg.seed)
    train_eval_idx = np.sort(rng.permutation(real)[: cfg.train_eval_images])

    method = Supervised(
        cfg,
        model,
        train_ds,
        val_ds,
        train_eval_idx,
        accelerator,
        counts,
        criterion,
        to_probs,
        select,
    )
    state, _ = fit(
        method,
        model,
        rows,
        oc,
        run_dir,
        accelerator=accelerator,
        **run_options(cfg, resume=resume, progress=progress),
    )
    if accelerator.is_main_process:
        (run_dir / "history.json").write_text(json.dumps(state.history, indent=2))
    accelerator.wait_for_everyone()
    selection = method.select.removeprefix("val_")
    return {
        "best_epoch": state.best_epoch,
        "selection_metric": selection,
        "best_val_metric": state.best_metric,
        # kept under its old name for classification runs (benchmarks and reports read it)
        **({"best_val_macro_f1": state.best_metric} if selection == "macro_f1" else {}),
        "epochs_run": len(state.history),
        "stopped_early": state.stopped_early,
        "steps": state.step,
        "peak_lr": peak_lr(oc),
        "precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "history": state.history,
    }


def load_best(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """Load ``run_dir/best.safetensors`` into ``model`` (the weights to evaluate and export)."""
    model.load_state_dict(load_file(run_dir / "best.safetensors"))
    return model
