"""``dermkit pretrain mae|vae``: self-supervised domain pretraining, readable top to bottom.

prepare data (the train split of real images, plus synthetic rows at ``synthetic_ratio``
when a synthetic manifest is given; labels are not used for training) -> model (MAE on a
timm ViT, or a convolutional VAE) -> the loop: per step reseed from (seed, step), set the
lr (linear warm-up, cosine), gather the batch from the cache, flip/rotate it, loss,
backward, (clip), AdamW step -> every ``checkpoint_every`` steps (and at epoch ends, see ``fit``) an
atomic checkpoint -> at epoch ends a reconstruction grid (every ``grid_every`` epochs)
and a frozen-feature probe (every ``probe_every`` epochs, and always at the end) ->
export the encoder.

The run folder is then a weights source like any other: ``model.safetensors`` holds the
encoder alone with timm keys (ViT) or ``vae_encoder_*`` keys (VAE), ``encoder.json`` names
its backbone and resolution, ``config.yaml`` the full config, so
``dermkit finetune model.name=<backbone> model.weights=<run folder>`` starts from it. Also
written: ``history.json`` (per-epoch loss and probes), ``metrics.json`` (final probe),
``log.jsonl``, ``grids/epoch-NNN.png`` and ``report.html``.

Determinism is the engine's (``train/engine.py``): epoch plans depend on (seed,
epoch), each step reseeds every RNG from (seed, step) before drawing augmentation,
masks or VAE noise, so a run resumed from its step-k checkpoint repeats what the
uninterrupted run did after step k. Under ``accelerate launch`` each process takes its
slice of every global batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from dermkit.data.dataset import CachedImageDataset
from dermkit.data.settings import AugmentSettings
from dermkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    to_float,
)
from dermkit.eval.probe import probe_encoder
from dermkit.eval.report import HtmlReport
from dermkit.models.weights import load_pretrained, save_weights
from dermkit.runs import RunDir
from dermkit.ssl.settings import MaePretrainRunConfig, VaePretrainRunConfig
from dermkit.train.engine import (
    Batch,
    EpochEnd,
    FitState,
    Rows,
    fit,
    make_accelerator,
    run_options,
)
from dermkit.train.finetune import load_training_data

log = logging.getLogger(__name__)

PretrainConfig = MaePretrainRunConfig | VaePretrainRunConfig
GRID_IMAGES = 8  # val images shown in each reconstruction grid


@dataclass
class Method:
    """What differs between MAE and VAE pretraining; the loop is shared.

    Attributes:
        stage: run stage name (``pretrain-mae``).
        loss: (model, x (b, 3, S, S) normalised, the engine's batch) -> (scalar loss,
            {name: scalar}); per-row noise comes from ``batch.gen`` for the global batch.
        grid: (raw model, uint8 images (n, 3, S, S)) -> grid image (3, H, W) in [0, 1].
        grid_caption: what the grid's rows show.
    """

    stage: str
    loss: Callable[[nn.Module, torch.Tensor, Batch], tuple[torch.Tensor, dict]]
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


class Pretraining:
    """The engine's method for MAE/VAE: lightly augmented images -> ``Method.loss``.

    ``end_epoch(model, epoch, state)`` runs on the main process after each epoch and
    returns extra entries for that epoch's history row (grid file, probe scores).
    """

    select = None  # nothing selects an epoch: the last weights are the encoder

    def __init__(self, cfg: PretrainConfig, method: Method, train_ds, accelerator, end_epoch):
        self.method, self.train_ds, self.accelerator = method, train_ds, accelerator
        self.end_epoch = end_epoch
        # Light augmentation only: dermoscopy has no orientation, so flips and 90-degree
        # rotations are free; masking (MAE) or the bottleneck (VAE) is the actual pretext.
        light = AugmentSettings(
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
        self.augment = BatchAugment(light)

    def step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        x, _ = batch.augmented(self.train_ds, self.augment, self.accelerator.device)  # no labels
        return self.method.loss(model, x, batch)

    def evaluate(self, model: nn.Module, end: EpochEnd) -> dict:
        row = {"lr": end.lr, "train_loss": end.train_loss}
        if self.accelerator.is_main_process:
            row |= self.end_epoch(model, end.epoch, end.state)
        return row


def pretrain_loop(
    cfg: PretrainConfig,
    method: Method,
    model: nn.Module,
    train_ds: CachedImageDataset,
    synthetic_mask: np.ndarray,
    run_dir: Path,
    accelerator: Accelerator,
    end_epoch: Callable[[nn.Module, int, FitState], dict],
    resume: bool = False,
    progress: bool = True,
) -> tuple[FitState, nn.Module]:
    """Train ``model`` with ``method.loss`` on ``train_ds``; (final state, final model).

    ``end_epoch(model, epoch, state)`` runs on the main process after each epoch and
    returns extra entries for that epoch's history row (grid file, probe scores); the
    final probe goes to ``state.notes["probe"]``.
    """
    real, synthetic = np.flatnonzero(~synthetic_mask), np.flatnonzero(synthetic_mask)
    return fit(
        Pretraining(cfg, method, train_ds, accelerator, end_epoch),
        model,
        Rows(real, synthetic, synthetic_ratio=cfg.synthetic_ratio),
        cfg.optim,
        run_dir,
        accelerator=accelerator,
        name=method.stage,
        **run_options(cfg, resume=resume, progress=progress),
    )


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

        def end_epoch(raw_model: nn.Module, epoch: int, state: FitState) -> dict:
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
                state.notes["probe"] = probe(raw_model)
            elif cfg.probe_every and (epoch + 1) % cfg.probe_every == 0:
                extra |= {f"probe_{k}": v for k, v in probe(raw_model).items()}
            return extra

        state, final = pretrain_loop(
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
        if not accelerator.is_main_process:
            return run / "report.html"
        if "probe" not in state.notes:  # only when a finished run's checkpoint predates it
            state.notes["probe"] = probe(final)
        return _export(cfg, method, run, encoder_of(final), state, loss_keys)


def _export(
    cfg: PretrainConfig,
    method: Method,
    run: RunDir,
    encoder: nn.Module,
    state: FitState,
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
    metrics = {"steps": state.step, "final_train_loss": final_loss, "probe": state.notes["probe"]}
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
    rows = [{"probe": "final", **(state.notes["probe"] or {})}]
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

    def loss(model: nn.Module, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        # masks drawn for the global batch, then sliced: N processes mask as 1 does
        n = getattr(model, "module", model).num_patches  # model may be DDP-wrapped
        noise = batch.once("mask", lambda: torch.rand(batch.size, n, generator=batch.gen))
        return model(x, noise=noise[batch.offset : batch.offset + len(x)].to(x.device))[0], {}

    method = Method(
        stage="pretrain-mae",
        loss=loss,
        grid=mae_grid,
        grid_caption=f"rows: original / {cfg.mae.mask_ratio:.0%} of patches masked / "
        "reconstruction (visible patches pasted back)",
    )
    build = partial(MaskedAutoencoder.from_config, cfg)
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

    def loss(model: nn.Module, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        # reparameterisation noise drawn for the global batch, then sliced (as MAE's masks)
        shape = getattr(model, "module", model).latent_shape  # model may be DDP-wrapped
        eps = batch.once("eps", lambda: torch.randn(batch.size, *shape, generator=batch.gen))
        total, logs, _ = model(x, batch.step, eps[batch.offset : batch.offset + len(x)])
        return total, logs

    method = Method(
        stage="pretrain-vae",
        loss=loss,
        grid=lambda model, images: vae_grid(model, images, cfg.vae.n_samples),
        grid_caption="rows: original / reconstruction (posterior mean) / samples from the prior",
    )
    keys = ("loss", "recon", "kl")
    return _run_pretrain(cfg, method, build, lambda m: m.encoder, resume, progress, keys)
