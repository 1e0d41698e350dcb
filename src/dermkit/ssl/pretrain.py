"""``dermkit pretrain mae|vae``: self-supervised domain pretraining, readable top to bottom.

prepare data (the train split of real images, plus synthetic rows at ``synthetic_ratio``
when a synthetic manifest is given; labels are not used for training) -> model (MAE on a
timm ViT, or a convolutional VAE) -> the loop: per step reseed from (seed, step), set the
lr (linear warm-up, cosine), gather the batch from the cache, flip/rotate it, loss,
backward, (clip), AdamW step -> every ``checkpoint_every`` steps and at each epoch end an
atomic checkpoint -> at epoch ends a reconstruction grid (every ``grid_every`` epochs)
and a frozen-feature probe (every ``probe_every`` epochs, and always at the end) ->
export the encoder.

The run folder is then a weights source like any other: ``model.safetensors`` holds the
encoder alone with timm keys (ViT) or ``vae_encoder_*`` keys (VAE), ``encoder.json`` names
its backbone and resolution, ``config.yaml`` the full config, so
``dermkit finetune model.name=<backbone> model.weights=<run folder>`` starts from it. Also
written: ``history.json`` (per-epoch loss and probes), ``metrics.json`` (final probe),
``log.jsonl``, ``grids/epoch-NNN.png`` and ``report.html``.

Determinism is the fine-tuning loop's (``train/loop.py``): epoch plans depend on (seed,
epoch), each step reseeds every RNG from (seed, step) before drawing augmentation,
masks or VAE noise, so a run resumed from its step-k checkpoint repeats what the
uninterrupted run did after step k. Under ``accelerate launch`` each process takes its
slice of every global batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from dermkit.config import (
    ConfigError,
    MaePretrainRunConfig,
    VaePretrainRunConfig,
)
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    BatchAugment,
    normalize,
    to_float,
)
from dermkit.eval.probe import probe_encoder
from dermkit.eval.report import HtmlReport
from dermkit.models.weights import load_pretrained, save_weights
from dermkit.runs import RunDir
from dermkit.train.checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from dermkit.train.engine import (
    MetricsLog,
    fused_adamw,
    lr_at,
    make_accelerator,
    plan_epoch,
    seed_step,
)
from dermkit.train.finetune import load_training_data

log = logging.getLogger(__name__)

PretrainConfig = MaePretrainRunConfig | VaePretrainRunConfig
GRID_IMAGES = 8  # val images shown in each reconstruction grid


@dataclass
class PretrainState:
    """Everything besides tensors that a resumed pretraining run must know."""

    step: int = 0
    epoch_loss_sum: float = 0.0  # running sums of the current epoch (a resume mid-epoch
    epoch_steps: int = 0  # reports the same epoch mean as an uninterrupted run)
    history: list[dict] = field(default_factory=list)
    probe: dict | None = None  # the final probe, once computed


@dataclass
class Method:
    """What differs between MAE and VAE pretraining; the loop is shared.

    Attributes:
        stage: run stage name (``pretrain-mae``).
        loss: (model, x (B, 3, S, S) normalised, step) -> (scalar loss, {name: scalar}).
        grid: (raw model, uint8 images (n, 3, S, S)) -> grid image (3, H, W) in [0, 1].
        grid_caption: what the grid's rows show.
    """

    stage: str
    loss: Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict]]
    grid: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    grid_caption: str


# ----------------------------------------------------------------------------- figures


def _display(x: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, S, S) -> [0, 1] for display, nearest-upscaled to >= 96 px."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x.float() * std + mean).clamp(0, 1)
    scale = max(1, -(-96 // x.shape[-1]))
    return F.interpolate(x, scale_factor=scale, mode="nearest") if scale > 1 else x


def image_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of normalised images, each (n, 3, S, S) -> one grid (3, H, W) in [0, 1]."""
    from torchvision.utils import make_grid

    n = max(len(r) for r in rows)
    return make_grid(torch.cat([_display(r).cpu() for r in rows]), nrow=n, padding=2)


@torch.no_grad()
def mae_grid(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Rows: original / masked input / reconstruction (visible patches pasted back)."""
    x = to_float(images.to(next(model.parameters()).device))
    masked, recon = model.reconstruct(x)
    return image_rows([x, masked, recon])


@torch.no_grad()
def vae_grid(model: nn.Module, images: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Rows: original / reconstruction from the posterior mean / decoded prior samples."""
    x = to_float(images.to(next(model.parameters()).device))
    _, _, recon = model(x)  # eval mode: z = mu
    rows = [x, recon]
    if n_samples:
        rows.append(model.sample(n_samples, torch.Generator().manual_seed(0)))
    return image_rows(rows)


def plot_loss(steps: list[dict], history: list[dict], keys: tuple[str, ...]) -> Figure:
    """Training loss per logged step (thin) and per epoch (markers), one panel per key."""
    fig = Figure(figsize=(4.5 * len(keys), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in steps if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.6, label="logged steps")
        ep = [(r["step"], r[f"train_{key}"]) for r in history if f"train_{key}" in r]
        if ep:
            ax.plot(*zip(*ep), "o-", label="epoch mean")
        ax.set(title=key, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- the loop


def _check_optim(cfg: PretrainConfig) -> None:
    oc = cfg.optim
    unused = [k for k in ("ema_decay", "layer_decay") if getattr(oc, k) is not None]
    unused += ["patience"] if oc.patience else []
    if unused:
        raise ConfigError(
            f"optim.{', optim.'.join(unused)}: not used by pretraining (no EMA, no layer "
            "decay, no early stopping on a val metric); remove them"
        )


def pretrain_loop(
    cfg: PretrainConfig,
    method: Method,
    model: nn.Module,
    train_ds: CachedImageDataset,
    synthetic_mask: np.ndarray,
    run_dir: Path,
    accelerator: Accelerator,
    end_epoch: Callable[[nn.Module, int, PretrainState], dict],
    resume: bool = False,
    progress: bool = True,
) -> PretrainState:
    """Train ``model`` with ``method.loss`` on ``train_ds``; returns the final state.

    ``end_epoch(raw_model, epoch, state)`` runs on the main process after each epoch and
    returns extra entries for that epoch's history row (grid file, probe scores).
    """
    oc = cfg.optim
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = oc.batch_size // (oc.grad_accum * world)
    if micro * oc.grad_accum * world != oc.batch_size:
        raise ConfigError(
            f"optim.batch_size={oc.batch_size} must be divisible by grad_accum "
            f"({oc.grad_accum}) x processes ({world})"
        )
    real, synthetic = np.flatnonzero(~synthetic_mask), np.flatnonzero(synthetic_mask)

    from timm.optim import create_optimizer_v2

    peak_lr = oc.base_lr * oc.batch_size / 256
    optimizer = create_optimizer_v2(
        model, "adamw", lr=peak_lr, weight_decay=oc.weight_decay, betas=oc.betas, **fused_adamw()
    )
    # Light augmentation only: dermoscopy has no orientation, so flips and 90-degree
    # rotations are free; masking (MAE) or the bottleneck (VAE) is the actual pretext.
    light = AugmentConfig(
        flip=cfg.augment,
        rot90=cfg.augment,
        max_rotate_deg=0,
        max_scale=0,
        max_translate=0,
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0,
    )
    augment = BatchAugment(light)

    ckpt_dir = run_dir / "checkpoints"
    state = PretrainState()
    if (ckpt := checkpoint_to_resume(ckpt_dir, resume)) is not None:
        saved = load_checkpoint(ckpt, model, optimizer)
        state = PretrainState(**saved["train_state"])
        log.info("resumed from %s (step %d)", ckpt, state.step)
    metrics_log = MetricsLog(run_dir, enabled=accelerator.is_main_process)
    metrics_log.truncate_after(state.step)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    plan0 = plan_epoch(real, synthetic, oc.batch_size, cfg.seed, 0, None, cfg.synthetic_ratio)
    steps_per_epoch = plan0.shape[0]
    total_steps = oc.epochs * steps_per_epoch
    warmup = round(oc.warmup_epochs * steps_per_epoch)
    lo = rank * micro * oc.grad_accum
    hi = lo + micro * oc.grad_accum
    bar = None
    if progress and accelerator.is_main_process and state.step < total_steps:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task(method.stage, total=total_steps, completed=state.step)

    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        batches = plan_epoch(
            real, synthetic, oc.batch_size, cfg.seed, epoch, None, cfg.synthetic_ratio
        )
        model.train()
        for b in range(state.step % steps_per_epoch, steps_per_epoch):
            gen = seed_step(cfg.seed, state.step)
            lr = lr_at(state.step, total_steps, warmup, peak_lr, oc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            params = augment.sample(oc.batch_size, gen)
            mine = batches[b][lo:hi]  # this process's slice of the global batch
            step_loss, step_logs = 0.0, {}
            for m in range(oc.grad_accum):
                x, _ = train_ds.__getitems__(mine[m * micro : (m + 1) * micro])
                x = x.to(accelerator.device, non_blocking=True).float().div_(255)
                x = normalize(augment.apply(x, params, lo=lo + m * micro))
                sync = m == oc.grad_accum - 1
                ctx = nullcontext() if sync else accelerator.no_sync(model)
                with ctx, accelerator.autocast():
                    loss, logs = method.loss(model, x, state.step)
                    accelerator.backward(loss / oc.grad_accum)
                step_loss += loss.item() / oc.grad_accum
                for k, v in logs.items():
                    step_logs[k] = step_logs.get(k, 0.0) + float(v) / oc.grad_accum
            if oc.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), oc.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch_loss_sum += step_loss
            state.epoch_steps += 1
            if bar is not None:
                bar.update(task, advance=1, description=f"epoch {epoch} loss {step_loss:.4f}")
            if state.step % cfg.log_every == 0:
                row = {"kind": "train", "step": state.step, "epoch": epoch, "lr": lr}
                metrics_log.write(row | {"loss": step_loss} | step_logs)
            end_of_epoch = b == steps_per_epoch - 1
            if end_of_epoch:
                row = {
                    "epoch": epoch,
                    "step": state.step,
                    "lr": lr,
                    "train_loss": state.epoch_loss_sum / max(1, state.epoch_steps),
                }
                if accelerator.is_main_process:
                    row |= end_epoch(raw_model, epoch, state)
                    model.train()
                state.history.append(row)
                metrics_log.write({"kind": "epoch", **row})
                state.epoch_loss_sum, state.epoch_steps = 0.0, 0
                log.info("epoch %d: loss %.4f", epoch, row["train_loss"])
            if state.step % cfg.checkpoint_every == 0 or end_of_epoch:
                if accelerator.is_main_process:
                    extra = {"train_state": asdict(state), "epoch": epoch}
                    save_checkpoint(ckpt_dir, state.step, raw_model, optimizer, extra=extra)
                accelerator.wait_for_everyone()
    if bar is not None:
        bar.stop()
    return state


# ----------------------------------------------------------------------------- stages


def _datasets(cfg: PretrainConfig, run: RunDir):
    """(train incl. synthetic rows, synthetic mask (N,), real train rows for probes, val).

    The test split is never read while pretraining: the probes select nothing on it.
    """
    data, synthetic_mask = load_training_data(cfg, run)
    train, val = data.part("train"), data.part("val")
    return (
        CachedImageDataset(data.cache, train, data.classes),
        synthetic_mask,
        CachedImageDataset(data.cache, train[~synthetic_mask], data.classes),
        CachedImageDataset(data.cache, val, data.classes),
    )


def _run_pretrain(
    cfg: PretrainConfig,
    method: Method,
    build: Callable[[], nn.Module],
    encoder_of: Callable[[nn.Module], nn.Module],
    resume: bool,
    progress: bool,
    loss_keys: tuple[str, ...],
) -> Path:
    """The stage around the loop: data, model, loop, final probe, export, report."""
    _check_optim(cfg)
    accelerator = make_accelerator(cfg.optim.precision)
    with RunDir(cfg.out_dir, cfg, method.stage, write=accelerator.is_main_process) as run:
        with accelerator.main_process_first():
            train_ds, synthetic_mask, probe_train, val_ds = _datasets(cfg, run)
        torch.manual_seed(cfg.seed)
        model = build()
        if cfg.model.weights:  # optional initial encoder weights (e.g. continue from a run)
            report = load_pretrained(encoder_of(model), cfg.model.weights)
            log.info("initial encoder weights: %s", report)
        grid_idx = np.arange(min(GRID_IMAGES, len(val_ds)))
        grid_images, _ = val_ds.__getitems__(grid_idx)
        (run / "grids").mkdir(exist_ok=True)

        def probe(raw_model: nn.Module) -> dict:
            with accelerator.autocast():
                return probe_encoder(
                    encoder_of(raw_model), probe_train, val_ds, k=cfg.probe_k, seed=cfg.seed
                )

        def end_epoch(raw_model: nn.Module, epoch: int, state: PretrainState) -> dict:
            extra = {}
            last = epoch + 1 == cfg.optim.epochs
            if (epoch + 1) % cfg.grid_every == 0 or last:
                raw_model.eval()
                with torch.random.fork_rng(devices=[]), accelerator.autocast():
                    torch.manual_seed(cfg.seed)  # the same masks every epoch: comparable
                    grid = method.grid(raw_model, grid_images)
                from torchvision.utils import save_image

                path = run / "grids" / f"epoch-{epoch + 1:03d}.png"
                save_image(grid, path)
                extra["grid"] = str(path.relative_to(run.path))
            if last:  # kept in the state, so the final checkpoint records it
                state.probe = probe(raw_model)
            elif cfg.probe_every and (epoch + 1) % cfg.probe_every == 0:
                extra |= {f"probe_{k}": v for k, v in probe(raw_model).items()}
            return extra

        state = pretrain_loop(
            cfg,
            method,
            model,
            train_ds,
            synthetic_mask,
            run.path,
            accelerator,
            end_epoch,
            resume=resume,
            progress=progress,
        )
        raw_model = accelerator.unwrap_model(model)
        if not accelerator.is_main_process:
            return run / "report.html"
        if state.probe is None:  # only when a finished run's checkpoint predates its probe
            state.probe = probe(raw_model)
        return _export(cfg, method, run, encoder_of(raw_model), state, loss_keys)


def _export(
    cfg: PretrainConfig,
    method: Method,
    run: RunDir,
    encoder: nn.Module,
    state: PretrainState,
    loss_keys: tuple[str, ...],
) -> Path:
    """Write model.safetensors (encoder only), encoder.json, history/metrics, report.html."""
    save_weights(encoder, run / "model.safetensors", metadata={"stage": method.stage})
    info = {
        "backbone": cfg.model.name,
        "img_size": cfg.data.image_size,
        "in_chans": 3,
        "stage": method.stage,
        "feature_dim": int(encoder.num_features),
        "params": sum(p.numel() for p in encoder.parameters()),
        "weights": "model.safetensors",
        "usage": f"dermkit finetune model.name={cfg.model.name} model.weights={run.path.resolve()}",
    }
    (run / "encoder.json").write_text(json.dumps(info, indent=2))
    (run / "history.json").write_text(json.dumps(state.history, indent=2))
    final_loss = state.history[-1]["train_loss"] if state.history else None
    metrics = {"steps": state.step, "final_train_loss": final_loss, "probe": state.probe}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))

    logged = []
    if (run / "log.jsonl").exists():
        rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln]
        logged = [r for r in rows if r.get("kind") == "train"]
    report = HtmlReport(f"dermkit {method.stage}: {cfg.model.name} at {cfg.data.image_size} px")
    report.add_paragraph(
        f"{state.step} optimizer steps over {len(state.history)} epochs on the train split "
        f"of {cfg.data.path}. The encoder ({info['params']:,} parameters, feature width "
        f"{info['feature_dim']}) is in model.safetensors; fine-tune it with: {info['usage']}."
    )
    report.add_heading("Frozen-feature probes (val)")
    rows = [{"probe": "final", **(state.probe or {})}]
    for r in state.history:
        scores = {k.removeprefix("probe_"): v for k, v in r.items() if k.startswith("probe_")}
        if scores:
            rows.insert(0, {"probe": f"epoch {r['epoch'] + 1}", **scores})
    report.add_table(
        rows,
        caption="Linear probe (balanced logistic regression on "
        f"standardised features) and {cfg.probe_k}-NN (cosine) macro-F1",
    )
    report.add_heading("Training loss")
    report.add_figure(plot_loss(logged, state.history, loss_keys), "Training loss")
    grids = sorted((run / "grids").glob("epoch-*.png"))
    if grids:
        report.add_heading("Reconstructions (val images)")
        for path in dict.fromkeys([grids[0], grids[-1]]):
            report.add_figure(path, f"{path.stem}: {method.grid_caption}")
    report.add_heading("Configuration")
    report.add_table(
        [{"key": k, "value": json.dumps(v)} for k, v in cfg.model_dump(mode="json").items()]
    )
    return report.write(run / "report.html")


def run_pretrain_mae(
    cfg: MaePretrainRunConfig, resume: bool = False, progress: bool = True
) -> Path:
    """MAE pretraining end to end; returns the path of report.html."""
    from dermkit.ssl.mae import MaskedAutoencoder

    def build() -> nn.Module:
        m = cfg.mae
        return MaskedAutoencoder(
            cfg.model.name,
            cfg.data.image_size,
            mask_ratio=m.mask_ratio,
            decoder_dim=m.decoder_dim,
            decoder_depth=m.decoder_depth,
            decoder_heads=m.decoder_heads,
            norm_pix_loss=m.norm_pix_loss,
            drop_path_rate=cfg.model.drop_path_rate,
        )

    def loss(model: nn.Module, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return model(x)[0], {}

    method = Method(
        stage="pretrain-mae",
        loss=loss,
        grid=mae_grid,
        grid_caption=f"rows: original / {cfg.mae.mask_ratio:.0%} of patches masked / "
        "reconstruction (visible patches pasted back)",
    )
    return _run_pretrain(cfg, method, build, lambda m: m.encoder, resume, progress, ("loss",))


def run_pretrain_vae(
    cfg: VaePretrainRunConfig, resume: bool = False, progress: bool = True
) -> Path:
    """VAE pretraining end to end; returns the path of report.html."""
    from dermkit.ssl.vae import ConvVAE

    def build() -> nn.Module:
        return ConvVAE(
            cfg.model.name,
            cfg.data.image_size,
            beta=cfg.vae.beta,
            kl_warmup_steps=cfg.vae.kl_warmup_steps,
        )

    def loss(model: nn.Module, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        total, logs, _ = model(x, step)
        return total, logs

    method = Method(
        stage="pretrain-vae",
        loss=loss,
        grid=lambda model, images: vae_grid(model, images, cfg.vae.n_samples),
        grid_caption="rows: original / reconstruction (posterior mean) / samples from the prior",
    )
    keys = ("loss", "recon", "kl")
    return _run_pretrain(cfg, method, build, lambda m: m.encoder, resume, progress, keys)
