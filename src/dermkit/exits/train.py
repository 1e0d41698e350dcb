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

The loop is single-process (``make_accelerator`` picks the device and mixed precision);
each step is reseeded from (seed, step), as in ``train/loop.py``, so a run is repeatable.
It checkpoints into ``checkpoints/`` with ``train/checkpoint.py`` (safetensors + JSON, no
pickles) every ``checkpoint_every`` steps and at each epoch end; ``--resume`` continues
a killed run from the latest one and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2

from dermkit.config import ConfigError
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import AugmentConfig, BatchAugment, normalize, to_float
from dermkit.exits.backbones import backbone_parts
from dermkit.exits.model import EarlyExitViT
from dermkit.exits.policy import macro_f1
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
from dermkit.train.checkpoint import (
    checkpoint_to_resume,
    load_checkpoint,
    load_checkpoint_tensors,
    save_checkpoint,
)
from dermkit.train.engine import lr_at, make_accelerator, plan_epoch, seed_step
from dermkit.train.kd import KDLoss
from dermkit.train.losses import ClassificationLoss, sampling_weights

log = logging.getLogger(__name__)


def _check_optim(cfg: ExitsRunConfig) -> None:
    oc = cfg.optim
    unused = {
        "grad_accum": oc.grad_accum != 1,
        "layer_decay": oc.layer_decay is not None,
        "ema_decay": oc.ema_decay is not None,
        "patience": oc.patience != 0,
    }
    bad = [k for k, v in unused.items() if v]
    if bad:
        raise ConfigError(f"optim.{', optim.'.join(bad)} do(es) not apply to exits train")


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


def _val_scores(logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Macro-F1 of each exit's logits (E, N, C) against y (N,)."""
    return [macro_f1(y, lg.argmax(1), lg.shape[1]) for lg in logits]


@dataclass
class ExitsTrainState:
    """Everything besides tensors that a resumed exits run must know (JSON in the checkpoint).

    The best weights so far, one state per head type, travel as checkpoint tensors.
    """

    step: int = 0
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)  # current epoch so far
    best_score: dict[str, float] = field(default_factory=dict)  # mean val macro-F1 over exits
    best_epoch: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _resume(
    ckpt: Path, bundle: torch.nn.ModuleDict, optimizers: dict[str, torch.optim.Optimizer]
) -> tuple[ExitsTrainState, dict[str, dict[str, torch.Tensor]]]:
    """Load a checkpoint into the trainable modules {head type: module} and optimizers.

    Returns (state, best weights so far {head type: state dict}).
    """
    try:
        saved = load_checkpoint(ckpt, bundle, optimizers)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{ckpt} does not fit this run (changed exits.head_types, exits.exit_blocks, "
            f"exits.mode or head sizes?); use a new out_dir or drop --resume: {e}"
        ) from e
    best: dict[str, dict[str, torch.Tensor]] = {h: {} for h in bundle}
    for key, value in load_checkpoint_tensors(ckpt).items():
        head, name = key.split("/", 1)
        best[head][name] = value
    return ExitsTrainState(**saved["train_state"]), best


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

    With ``run_dir``, a checkpoint (trainable weights, one AdamW state per head type, the
    best weights so far, history and the epoch's running loss sums) is written to
    ``run_dir/checkpoints`` every ``cfg.checkpoint_every`` steps and at each epoch end;
    ``resume`` continues from the latest one. The batch plan is a function of (seed,
    epoch) and each step reseeds from (seed, step), so a resumed run replays exactly what
    the uninterrupted run did.
    """
    oc, e = cfg.optim, cfg.exits
    device = accelerator.device
    frozen = e.mode == "frozen"
    n_classes = len(train_ds.class_names)
    for m in models.values():
        m.to(device)
    counts = train_ds.class_counts()
    weights = sampling_weights(train_ds.labels, loss_cfg.sampler, n_classes)
    weights = None if weights is None else weights.numpy()
    hard = ClassificationLoss.from_config(loss_cfg, counts).to(device)
    kd = KDLoss(e.distill_alpha, e.distill_temperature, hard_loss=hard)
    first = next(iter(models.values()))
    n_exits = first.n_exits
    exit_w = np.asarray(e.exit_loss_weights or [1.0] * n_exits, dtype=float)
    if len(exit_w) != n_exits:
        raise ConfigError(f"exits.exit_loss_weights has {len(exit_w)} entries for {n_exits} exits")
    exit_w = exit_w / exit_w.sum()

    peak_lr = oc.base_lr * oc.batch_size / 256
    optimizers = {
        h: create_optimizer_v2(
            _trainable(m, e.mode), "adamw", lr=peak_lr, weight_decay=oc.weight_decay, betas=oc.betas
        )
        for h, m in models.items()
    }
    augment = BatchAugment(
        AugmentConfig(**augment_cfg.model_dump(include=set(AugmentConfig.__dataclass_fields__)))
    )
    real, none = np.arange(len(train_ds)), np.zeros(0, dtype=np.int64)
    steps_per_epoch = plan_epoch(real, none, oc.batch_size, cfg.seed, 0, weights).shape[0]
    total = oc.epochs * steps_per_epoch
    warmup = round(oc.warmup_epochs * steps_per_epoch)
    y_val = val_ds.labels.numpy()
    stats = input_stats(first.backbone)  # the base run's input normalisation

    # --- resume: what a checkpoint holds is the trainable part of each head type's model
    bundle = torch.nn.ModuleDict({h: _trainable(m, e.mode) for h, m in models.items()})
    ckpt_dir = None if run_dir is None else Path(run_dir) / "checkpoints"
    state = ExitsTrainState()
    best_state: dict[str, dict[str, torch.Tensor]] = {h: {} for h in models}
    if ckpt_dir is not None and (ckpt := checkpoint_to_resume(ckpt_dir, resume)) is not None:
        state, best_state = _resume(ckpt, bundle, optimizers)
        log.info("resumed from %s (step %d)", ckpt, state.step)

    bar = None
    if progress and state.step < total:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("exit heads", total=total, completed=state.step)
    try:
        while state.step < total:
            epoch = state.step // steps_per_epoch
            for m in models.values():
                m.train()
                if frozen:
                    m.backbone.eval()  # no dropout / drop-path in the fixed backbone
            batches = plan_epoch(real, none, oc.batch_size, cfg.seed, epoch, weights)
            if state.step % steps_per_epoch == 0:
                state.epoch_loss_sums = dict.fromkeys(models, 0.0)
            for b in range(state.step % steps_per_epoch, steps_per_epoch):
                lr = lr_at(state.step, total, warmup, peak_lr, oc.min_lr_ratio)
                gen = seed_step(cfg.seed, state.step)
                x, y = train_ds.__getitems__(batches[b])
                x = x.to(device).float().div_(255.0)
                x = normalize(augment.apply(x, augment.sample(len(x), gen)), *stats)
                y = y.to(device)
                with accelerator.autocast():
                    if frozen:
                        tokens, final = _shared_tokens(first, x)
                for h, m in models.items():
                    with accelerator.autocast():
                        if frozen:
                            losses = [kd(m.heads[j](t), final, y) for j, t in enumerate(tokens)]
                            loss = torch.stack(losses).mean()
                        else:
                            outs = m.forward_all(x)
                            teacher = outs[-1].detach()
                            losses = [kd(o, teacher, y) for o in outs[:-1]] + [hard(outs[-1], y)]
                            loss = sum(float(w) * lo for w, lo in zip(exit_w, losses))
                    opt = optimizers[h]
                    for group in opt.param_groups:
                        group["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if oc.clip_grad:
                        torch.nn.utils.clip_grad_norm_(
                            _trainable(m, e.mode).parameters(), oc.clip_grad
                        )
                    opt.step()
                    state.epoch_loss_sums[h] += float(loss.detach())
                state.step += 1
                if bar is not None:
                    bar.update(task, advance=1)
                end_of_epoch = b == steps_per_epoch - 1
                if end_of_epoch:
                    _end_epoch(
                        models,
                        state,
                        best_state,
                        epoch,
                        lr,
                        steps_per_epoch,
                        val_ds,
                        y_val,
                        accelerator,
                        e.mode,
                    )
                if ckpt_dir and (state.step % cfg.checkpoint_every == 0 or end_of_epoch):
                    save_checkpoint(
                        ckpt_dir,
                        state.step,
                        bundle,
                        optimizers,
                        extra={"train_state": asdict(state), "epoch": epoch},
                        tensors={
                            f"{h}/{k}": v for h in best_state for k, v in best_state[h].items()
                        },
                    )
    finally:
        if bar is not None:
            bar.stop()
    for h, m in models.items():
        m.load_state_dict(best_state[h], strict=False)
    return state.history, {h: state.best_epoch[h] for h in models}


def _end_epoch(
    models: dict[str, EarlyExitViT],
    state: ExitsTrainState,
    best_state: dict[str, dict[str, torch.Tensor]],
    epoch: int,
    lr: float,
    steps_per_epoch: int,
    val_ds: CachedImageDataset,
    y_val: np.ndarray,
    accelerator,
    mode: str,
) -> None:
    """Score every exit on val, log the epoch's row, keep each head type's best weights."""
    frozen = mode == "frozen"
    val = exit_logits_all(models, val_ds, accelerator.device, frozen, autocast=accelerator.autocast)
    row = {"epoch": epoch, "step": state.step, "lr": lr}
    for h, m in models.items():
        scores = _val_scores(val[h], y_val)
        mean = float(np.mean(scores))
        row[h] = {
            "train_loss": state.epoch_loss_sums[h] / steps_per_epoch,
            "val_macro_f1": scores,
            "val_mean_macro_f1": mean,
        }
        if mean > state.best_score.get(h, -1.0):
            state.best_score[h], state.best_epoch[h] = mean, epoch
            best_state[h] = {k: v.detach().cpu().clone() for k, v in saved_state(m, mode).items()}
    state.history.append(row)
    log.info("epoch %d: %s", epoch, {h: round(row[h]["val_mean_macro_f1"], 4) for h in models})


def run_exits_train(cfg: ExitsRunConfig, progress: bool = True, resume: bool = False) -> Path:
    """Train exit heads on ``cfg.base_run``; returns the exit-run folder.

    ``resume``: continue from ``out_dir/checkpoints`` (see ``train_exit_models``).
    """

    _check_optim(cfg)
    if cfg.exits.features == "cached":
        from dermkit.exits.cached import run_cached_exits_train

        return run_cached_exits_train(cfg)
    base_dir = Path(cfg.base_run)
    backbone, base_cfg, classes = load_run_model(base_dir, purpose="early exits")
    try:
        backbone_parts(backbone)
    except TypeError as err:
        raise ConfigError(f"{base_dir}: {base_cfg.model.name}: {err}") from err
    accelerator = make_accelerator(cfg.optim.precision)
    with RunDir(cfg.out_dir, cfg, "exits") as run:
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
