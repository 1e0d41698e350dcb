"""The supervised training loop, readable top to bottom (nanoGPT-style), on accelerate.

One function, ``train_classifier``, owns the loop: plan the epoch's batches -> per step
set the lr, gather a batch from the in-memory cache, augment it, forward/backward
(micro-batches for gradient accumulation), clip, step, EMA -> log -> checkpoint -> at
each epoch end score val (and a clean train subset, for the overfitting gap) and keep the
best weights -> early stop.

Determinism is by construction, not by restoring opaque states: the batch plan of an
epoch is a function of (seed, epoch), and every step reseeds torch/numpy from
(seed, step) before it draws augmentation, mixup, dropout or drop-path randomness. A run
resumed from its step-k checkpoint therefore replays exactly what the uninterrupted run
did after step k, and a data-parallel rank augments its slice of the global batch exactly
as a single process would (parameters are drawn for the whole global batch).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from sklearn.metrics import balanced_accuracy_score

from dermkit.config import FinetuneRunConfig
from dermkit.core.files import atomic_path
from dermkit.core.metrics import macro_f1
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import AugmentConfig, BatchAugment, normalize, to_float
from dermkit.models.backbones import input_stats
from dermkit.train.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from dermkit.train.losses import ClassificationLoss, sampling_weights

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 or on CPUs with AVX512-BF16/AMX, else 'no'."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def fused_adamw() -> dict:
    """Keyword arguments for ``create_optimizer_v2(..., "adamw")``: torch's fused AdamW.

    One fused kernel instead of a loop over parameter tensors: on the 2-core benchmark
    machine a ViT-Tiny (5.5 M parameters) step of AdamW takes 2.6 ms fused vs 7.9 ms
    (for-loop, torch's CPU default) and 9.4 ms (foreach). Same update rule and state.
    """
    return {"fused": True}


def make_accelerator(precision: str = "auto") -> Accelerator:
    """An Accelerator on CUDA when present, else CPU, with the resolved mixed precision."""
    cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    accelerator = Accelerator(cpu=cpu, mixed_precision=resolve_precision(precision, device))
    if accelerator.num_processes > 1:
        # A process that exits with its gloo group alive can abort in interpreter teardown
        # ("terminate called without an active exception", SIGABRT after a finished run):
        # gloo's worker threads still hold tensors then. Destroying the group while the
        # interpreter is whole avoids it; atexit covers every command that trains.
        atexit.register(_destroy_process_group)
    return accelerator


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to peak*min_ratio."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_epoch(
    real: np.ndarray,
    synthetic: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    weights: np.ndarray | None = None,
    synthetic_ratio: float = 0.0,
) -> np.ndarray:
    """The epoch's global batches of dataset indices: (steps, batch_size) int64.

    Real rows are shuffled (or drawn with ``weights`` (len(real),) with replacement, for a
    class-balanced sampler); with ``synthetic_ratio`` r each batch holds round(r * B)
    synthetic rows drawn from ``synthetic``. An epoch is one pass over the real rows.
    """
    rng = np.random.default_rng([seed, epoch])
    n_syn = round(synthetic_ratio * batch_size) if len(synthetic) else 0
    n_real = batch_size - n_syn
    steps = len(real) // n_real
    if steps == 0:
        raise ValueError(f"{len(real)} training images are fewer than one batch of {n_real}")
    if weights is None:
        order = real[rng.permutation(len(real))]
    else:
        order = real[rng.choice(len(real), size=len(real), p=weights / weights.sum())]
    batches = order[: steps * n_real].reshape(steps, n_real)
    if n_syn:
        syn = synthetic[rng.choice(len(synthetic), size=(steps, n_syn))]
        batches = np.concatenate([batches, syn], axis=1)
        batches = np.take_along_axis(batches, rng.permuted(np.indices(batches.shape)[1], axis=1), 1)
    return batches


def seed_step(seed: int, step: int) -> torch.Generator:
    """Reseed the global RNGs for this step and return a generator for augmentation."""
    s = (seed * 1_000_003 + step) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)
    return torch.Generator().manual_seed(s)


def _tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Flips and 90-degree rotations: 8 views of (B, 3, S, S)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, r.flip(-1)]
    return views


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    dataset: CachedImageDataset,
    indices: np.ndarray,
    accelerator: Accelerator,
    batch_size: int = 256,
    tta: bool = False,
) -> torch.Tensor:
    """Logits (len(indices), C) for dataset rows, computed in shards on every rank.

    Each rank scores a contiguous shard; the shards are gathered so every rank returns the
    full result (needed for early stopping decisions that all ranks must agree on).
    """
    model.eval()
    stats = input_stats(model)  # the model's own input normalisation (mean, std)
    world, rank = accelerator.num_processes, accelerator.process_index
    shards = np.array_split(np.asarray(indices), world)
    longest = max(len(s) for s in shards)
    out = []
    mine = shards[rank]
    for i in range(0, len(mine), batch_size):
        x, _ = dataset.__getitems__(mine[i : i + batch_size])
        x = to_float(x.to(accelerator.device), *stats)
        with accelerator.autocast():
            if tta:
                logits = torch.stack([model(v).float() for v in _tta_views(x)]).mean(0)
            else:
                logits = model(x).float()
        out.append(logits)
    # outputs per row: the head's width (K-1 for an ordinal CORN head), else one per class
    n_classes = getattr(model, "num_classes", None) or len(dataset.class_names)
    local = torch.cat(out) if out else torch.zeros(0, n_classes, device=accelerator.device)
    if world == 1:
        return local.cpu()
    padded = torch.zeros(longest, n_classes, device=accelerator.device)
    padded[: len(local)] = local
    gathered = accelerator.gather(padded).view(world, longest, n_classes)
    return torch.cat([gathered[r, : len(s)] for r, s in enumerate(shards)]).cpu()


def score(
    logits: torch.Tensor,
    labels: torch.Tensor,
    to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
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


class MetricsLog:
    """JSONL (+ CSV of epoch rows, + TensorBoard when installed) metrics log of a run."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "log.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:  # optional: only when tensorboard is installed
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (a resumed run rewrites them identically)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run must know."""

    step: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- the loop


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
) -> dict:
    """Train ``model`` on ``train_ds``, select on ``val_ds``; returns a summary dict.

    ``criterion(logits (b, C), targets (b,) or (b, C), images (b, 3, S, S)) -> loss``
    replaces the configured ``ClassificationLoss`` when given; it sees the augmented,
    normalised micro-batch, so distillation can score the teacher on the same images.
    ``to_probs(logits) -> (b, K)`` is for heads whose outputs are not softmax logits (the
    ordinal CORN head): val/train scoring uses it and the best epoch is the best val QWK.

    Writes into ``run_dir``: ``checkpoints/`` (resumable), ``best.safetensors`` (weights of
    the best val macro-F1 epoch, EMA weights when EMA is on), ``log.jsonl`` and
    ``history.json`` (per-epoch train/val loss, macro-F1 and the overfitting gap).
    """
    oc, lc = cfg.optim, cfg.loss
    stats = input_stats(model)  # (mean, std) of the model's weights source, before wrapping
    accelerator = accelerator or make_accelerator(oc.precision)
    precision = accelerator.mixed_precision
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = oc.batch_size // (oc.grad_accum * world)
    if micro * oc.grad_accum * world != oc.batch_size:
        raise ValueError(
            f"optim.batch_size={oc.batch_size} must be divisible by grad_accum "
            f"({oc.grad_accum}) x processes ({world})"
        )

    # --- data: real/synthetic pools, sampler weights, a fixed clean train subset
    synthetic_mask = (
        np.zeros(len(train_ds), bool) if synthetic_mask is None else np.asarray(synthetic_mask)
    )
    real, synthetic = np.flatnonzero(~synthetic_mask), np.flatnonzero(synthetic_mask)
    n_classes = len(train_ds.class_names)
    counts = torch.bincount(train_ds.labels[real], minlength=n_classes)
    weights = sampling_weights(train_ds.labels[real], lc.sampler, n_classes)
    weights = None if weights is None else weights.numpy()
    rng = np.random.default_rng(cfg.seed)
    train_eval_idx = np.sort(rng.permutation(real)[: cfg.train_eval_images])
    val_idx = np.arange(len(val_ds))

    # --- model, optimiser, loss, EMA, augmentation
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    peak_lr = oc.base_lr * oc.batch_size / 256
    optimizer = create_optimizer_v2(
        model,
        "adamw",
        lr=peak_lr,
        weight_decay=oc.weight_decay,
        betas=oc.betas,
        layer_decay=oc.layer_decay,
        **fused_adamw(),
    )
    class_loss = ClassificationLoss(
        lc.loss, counts, lc.label_smoothing, lc.weight_power, lc.focal_gamma, lc.logit_tau
    ).to(accelerator.device)
    # EMA warm-up: the effective decay grows from 0 towards ema_decay, so early epochs are
    # not scored with weights that are still mostly the random initialisation.
    ema = ModelEmaV3(model, decay=oc.ema_decay, use_warmup=True) if oc.ema_decay else None
    augment = BatchAugment(
        AugmentConfig(**cfg.augment.model_dump(include=set(AugmentConfig.__dataclass_fields__)))
    )
    mixup = None
    if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.augment.mixup_alpha,
            cutmix_alpha=cfg.augment.cutmix_alpha,
            label_smoothing=lc.label_smoothing,
            num_classes=n_classes,
        )

    # --- resume
    ckpt_dir = run_dir / "checkpoints"
    state = TrainState()
    if (ckpt := checkpoint_to_resume(ckpt_dir, resume)) is not None:
        saved = load_checkpoint(ckpt, model, optimizer, ema.module if ema else None)
        state = TrainState(**saved["train_state"])
        log.info("resumed from %s (step %d)", ckpt, state.step)
    metrics_log = MetricsLog(run_dir, enabled=accelerator.is_main_process)
    metrics_log.truncate_after(state.step)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    steps_per_epoch = plan_epoch(
        real, synthetic, oc.batch_size, cfg.seed, 0, weights, cfg.synthetic_ratio
    ).shape[0]
    total_steps = oc.epochs * steps_per_epoch
    warmup = round(oc.warmup_epochs * steps_per_epoch)
    lo, hi = rank * micro * oc.grad_accum, (rank + 1) * micro * oc.grad_accum
    bar = None
    if progress and accelerator.is_main_process:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("training", total=total_steps, completed=state.step)

    t_last, seen = time.time(), 0
    while state.step < total_steps and not state.stopped_early:
        epoch = state.step // steps_per_epoch
        batches = plan_epoch(
            real, synthetic, oc.batch_size, cfg.seed, epoch, weights, cfg.synthetic_ratio
        )
        model.train()
        for b in range(state.step % steps_per_epoch, steps_per_epoch):
            gen = seed_step(cfg.seed, state.step)
            lr = lr_at(state.step, total_steps, warmup, peak_lr, oc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            params = augment.sample(oc.batch_size, gen)
            mine = batches[b][lo:hi]  # this rank's slice of the global batch
            step_loss = 0.0
            for m in range(oc.grad_accum):
                idx = mine[m * micro : (m + 1) * micro]
                x, y = train_ds.__getitems__(idx)
                x = x.to(accelerator.device, non_blocking=True).float().div_(255)
                x = normalize(augment.apply(x, params, lo=lo + m * micro), *stats)
                y = y.to(accelerator.device)
                if mixup is not None:
                    x, y = mixup(x, y)
                sync = m == oc.grad_accum - 1
                ctx = accelerator.no_sync(model) if not sync else nullcontext()
                with ctx, accelerator.autocast():
                    logits = model(x)
                    loss = criterion(logits, y, x) if criterion else class_loss(logits, y)
                    loss = loss / oc.grad_accum
                    accelerator.backward(loss)
                step_loss += loss.item()
            if oc.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), oc.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model, step=state.step)
            state.step += 1
            seen += oc.batch_size
            if bar is not None:
                bar.update(task, advance=1, description=f"epoch {epoch} loss {step_loss:.3f}")
            if state.step % cfg.log_every == 0:
                now = time.time()
                metrics_log.write(
                    {
                        "kind": "train",
                        "step": state.step,
                        "epoch": epoch,
                        "lr": lr,
                        "loss": step_loss,
                        "images_per_s": seen / max(now - t_last, 1e-9),
                    }
                )
                t_last, seen = now, 0
            end_of_epoch = b == steps_per_epoch - 1
            if end_of_epoch:
                _end_epoch(
                    cfg,
                    state,
                    epoch,
                    ema.module if ema else raw_model,
                    model,
                    train_ds,
                    val_ds,
                    train_eval_idx,
                    val_idx,
                    accelerator,
                    run_dir,
                    metrics_log,
                    to_probs=to_probs,
                )
            if state.step % cfg.checkpoint_every == 0 or end_of_epoch:
                if accelerator.is_main_process:
                    save_checkpoint(
                        ckpt_dir,
                        state.step,
                        raw_model,
                        optimizer,
                        ema.module if ema else None,
                        extra={"train_state": asdict(state), "epoch": epoch},
                    )
                accelerator.wait_for_everyone()
            if state.stopped_early:
                break
    if bar is not None:
        bar.stop()
    if accelerator.is_main_process:
        (run_dir / "history.json").write_text(json.dumps(state.history, indent=2))
    accelerator.wait_for_everyone()
    # What ``_end_epoch`` selected on: QWK for a non-softmax (ordinal) head, see ``score``.
    selection = "qwk" if to_probs is not None else "macro_f1"
    return {
        "best_epoch": state.best_epoch,
        "selection_metric": selection,
        "best_val_metric": state.best_metric,
        # kept under its old name for classification runs (benchmarks and reports read it)
        **({"best_val_macro_f1": state.best_metric} if selection == "macro_f1" else {}),
        "epochs_run": len(state.history),
        "stopped_early": state.stopped_early,
        "steps": state.step,
        "peak_lr": peak_lr,
        "precision": precision,
        "processes": world,
        "history": state.history,
    }


def _end_epoch(
    cfg,
    state,
    epoch,
    eval_model,
    model,
    train_ds,
    val_ds,
    train_eval_idx,
    val_idx,
    accelerator,
    run_dir,
    metrics_log,
    to_probs=None,
) -> None:
    """Score val and a clean train subset, keep the best weights, decide early stopping."""
    val = score(
        predict_logits(eval_model, val_ds, val_idx, accelerator, tta=cfg.augment.tta),
        val_ds.labels,
        to_probs,
    )
    train = (
        score(
            predict_logits(eval_model, train_ds, train_eval_idx, accelerator),
            train_ds.labels[train_eval_idx],
            to_probs,
        )
        if len(train_eval_idx)
        else {}
    )
    model.train()
    row = {
        "kind": "epoch",
        "step": state.step,
        "epoch": epoch,
        **{f"val_{k}": v for k, v in val.items()},
        **{f"train_{k}": v for k, v in train.items()},
    }
    if train:  # the overfitting gaps: train minus val (val minus train for the loss)
        for k in ("macro_f1", "balanced_accuracy", "accuracy"):
            row[f"gap_{k}"] = train[k] - val[k]
        row["gap_loss"] = val["loss"] - train["loss"]
    state.history.append(row)
    metrics_log.write(row)
    selected = val.get("qwk", val["macro_f1"])  # qwk: ordinal heads (see ``score``)
    if selected > state.best_metric:
        state.best_metric, state.best_epoch, state.bad_epochs = selected, epoch, 0
        if accelerator.is_main_process:
            with atomic_path(run_dir / "best.safetensors") as tmp:
                state_dict = eval_model.state_dict()
                save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, tmp)
    else:
        state.bad_epochs += 1
        if cfg.optim.patience and state.bad_epochs >= cfg.optim.patience:
            state.stopped_early = True
    log.info(
        "epoch %d: val macro-F1 %.3f, selected on %s %.3f (best %.3f @ %d)",
        epoch,
        val["macro_f1"],
        "qwk" if "qwk" in val else "macro-F1",
        selected,
        state.best_metric,
        state.best_epoch,
    )


def load_best(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """Load ``run_dir/best.safetensors`` into ``model`` (the weights to evaluate and export)."""
    model.load_state_dict(load_file(run_dir / "best.safetensors"))
    return model
