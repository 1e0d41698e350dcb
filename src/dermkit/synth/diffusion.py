"""``dermkit synth diffusion``: class-conditional latent diffusion with classifier-free guidance.

Training (DDPM, Ho et al. 2020; epsilon prediction; Rombach et al. 2022 in latent space):
every train image is encoded once, in ``dihedral_views`` flips/rotations, to the scaled
posterior mean and std of the autoencoder; a step draws z = mean + std * e, a timestep t
and noise n, and regresses n from the noised z with a diffusers ``UNet2DModel`` whose
class embedding has ``n_classes + 1`` rows. The last row is the *null class*: with
probability ``label_dropout`` a label is replaced by it (Ho & Salimans 2022), so one
network learns both eps(z, t, c) and eps(z, t, null). ``unconditional: true`` always uses
the null class (the ablation). EMA weights (timm ``ModelEmaV3``) are what is saved.

``class_sampling`` balances the classes the model sees, not only the images it is later
asked to draw: ``class_balanced`` draws every class equally often, ``sqrt_balanced`` with
probability ~ sqrt(count), with the classifiers' weighted sampler
(``train.losses.sampling_weights``). Class-balancing diffusion models (CBDM, Qin et al.,
CVPR 2023) show that a generator trained on long-tailed data draws its tail classes with
less fidelity and diversity; re-sampling the training batches is the simplest lever
against it (an epoch is still one pass's worth of rows, drawn with replacement).

Sampling (DDIM, Song et al. 2021, or DPM-Solver++, Lu et al. 2022) uses

    eps = eps_uncond + g * (eps_cond - eps_uncond)

g = 0 is unconditional sampling (the null class only: exactly eps_uncond, one UNet call),
g = 1 plain conditional sampling, g > 1 stronger adherence to the class. Both halves come
from ONE batched UNet call on [x; x] with labels [c; null] (``guided_eps``): half the
kernel launches and weight reads of the two-call loop of a plain pipeline
(``dermkit bench sampling`` measures it). g may be set per class (``SamplerConfig``): each
row of a batch then gets its own class's scale, and equals the image a single-scale run
at that scale draws.

The run folder holds ``unet.safetensors`` (EMA weights; diffusers config in the metadata),
a copy of ``autoencoder.safetensors``, and ``generator.json`` (classes, train counts,
scheduler, latent shape): loading a generator needs only that folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from dermkit.config import ConfigError, load_config
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import PreparedData, prepare_data
from dermkit.eval.report import HtmlReport
from dermkit.runs import RunDir
from dermkit.synth.autoencoder import WEIGHTS_FILE as AUTOENCODER_FILE
from dermkit.synth.autoencoder import LatentCodec, load_codec
from dermkit.synth.images import dihedral, save_grid
from dermkit.synth.settings import (
    DEFAULT_GUIDANCE,
    AutoencoderRunConfig,
    DiffusionRunConfig,
    SamplerConfig,
    UNetConfig,
)
from dermkit.synth.training import load_diffusers, save_diffusers, write_json
from dermkit.synth.variations import strength_schedule
from dermkit.train.engine import Batch, EpochEnd, Rows, fit, make_accelerator, run_options
from dermkit.train.losses import sampling_weights

log = logging.getLogger(__name__)

UNET_FILE = "unet.safetensors"
GENERATOR_FILE = "generator.json"
# LDM's betas for the scaled_linear schedule (diffusers' defaults suit the pixel-space ones).
SCALED_LINEAR_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


# ----------------------------------------------------------------------------- model


def check_unet_config(u: UNetConfig, latent_side: int, section: str = "unet") -> None:
    """Cross-field checks of the UNet; errors name the fields."""
    n = len(u.block_out_channels)
    if len(u.attention) != n:
        raise ConfigError(
            f"{section}.attention has {len(u.attention)} entries, "
            f"{section}.block_out_channels {n}: give one per level"
        )
    bad = [c for c in u.block_out_channels if c % u.norm_num_groups]
    if bad:
        raise ConfigError(
            f"{section}.block_out_channels {u.block_out_channels}: {bad} not divisible by "
            f"{section}.norm_num_groups={u.norm_num_groups}"
        )
    if latent_side % 2 ** (n - 1):
        raise ConfigError(
            f"{section}.block_out_channels: {n} levels halve the {latent_side}x{latent_side} "
            f"latents {n - 1} times; the side must be divisible by {2 ** (n - 1)}"
        )


def build_unet(u: UNetConfig, latent_shape: tuple[int, int, int], n_classes: int) -> UNet2DModel:
    """eps-predicting UNet: (B, C, h, w), t (B,), labels (B,) in [0, n_classes] -> (B, C, h, w).

    Label ``n_classes`` is the null class of classifier-free guidance.
    """
    c, h, _ = latent_shape
    return UNet2DModel(
        sample_size=h,
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in u.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in u.attention[::-1]),
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        dropout=u.dropout,
        num_class_embeds=n_classes + 1,
    )


def training_scheduler(num_train_timesteps: int, beta_schedule: str) -> DDPMScheduler:
    """The forward process q(z_t | z_0); latents are not clipped (they are not in [-1, 1])."""
    extra = SCALED_LINEAR_BETAS if beta_schedule == "scaled_linear" else {}
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
        **extra,
    )


def make_sampler(kind: str, scheduler_config: dict, steps: int):
    """A fresh DDIM or DPM-Solver++ (2nd order) scheduler with ``steps`` timesteps.

    Fresh per call because multistep solvers keep state between steps. "trailing" spacing
    starts at t = T - 1, which matters with few steps (Lin et al. 2024).
    """
    if kind == "ddim":
        sched = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    elif kind == "dpm_solver":
        sched = DPMSolverMultistepScheduler.from_config(
            scheduler_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
        )
    else:
        raise ConfigError(f"sampler.sampler: unknown sampler {kind!r} (ddim or dpm_solver)")
    sched.set_timesteps(steps)
    return sched


# ----------------------------------------------------------------------------- sampling


def guided_eps(
    unet: UNet2DModel,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance: float | torch.Tensor,
    null_label: int,
) -> torch.Tensor:
    """Classifier-free guided noise estimate (B, C, h, w) from ONE UNet call.

    ``guidance``: one scale, or one per row (B,). Rows whose label is the null class get
    eps_uncond exactly; guidance 0 (or an all-null batch) runs only the unconditional
    half, guidance 1 on an all-conditional batch only the conditional half. Otherwise
    [x; x] with labels [c; null] go through the UNet together and
    eps = eps_u + g * (eps_c - eps_u).
    """
    if isinstance(guidance, torch.Tensor) and bool((guidance == guidance[0]).all()):
        guidance = float(guidance[0])  # one scale: the single-scale path, bit for bit
    null = torch.full_like(labels, null_label)
    conditional = labels != null_label
    if not isinstance(guidance, torch.Tensor):
        if guidance == 0 or not bool(conditional.any()):
            return unet(x, t, class_labels=null).sample
        if guidance == 1 and bool(conditional.all()):
            return unet(x, t, class_labels=labels).sample
    out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
    eps_c, eps_u = out.chunk(2)
    if isinstance(guidance, torch.Tensor):
        # (B, 1, 1, 1) in fp32, the precision torch multiplies a Python scale in (bf16
        # included), so each row equals what a single-scale run at its scale draws.
        g = guidance.to(out.device, torch.float32).view(-1, 1, 1, 1)
        eps = eps_u + ((eps_c - eps_u).float() * g).to(out.dtype)
    else:
        eps = eps_u + guidance * (eps_c - eps_u)
    return torch.where(conditional.view(-1, 1, 1, 1), eps, eps_u)


def row_guidance(
    guidance: float | Mapping[str, float], classes: list[str], names: list[str]
) -> float | torch.Tensor:
    """``SamplerConfig.guidance`` for rows of classes ``names``: the one scale, or (B,)."""
    if not isinstance(guidance, Mapping):
        return float(guidance)
    scales = class_guidance(guidance, classes)
    return torch.tensor([scales[n] for n in names], dtype=torch.float32)


def class_guidance(guidance: float | Mapping[str, float], classes: list[str]) -> dict[str, float]:
    """{class: CFG scale} of ``SamplerConfig.guidance``: one scale for all, or per class
    with ``default`` (else DEFAULT_GUIDANCE) for the classes left out."""
    if not isinstance(guidance, Mapping):
        return dict.fromkeys(classes, float(guidance))
    unknown = sorted(set(guidance) - {*classes, "default"})
    if unknown:
        raise ConfigError(
            f"sampler.guidance names {unknown}: not among the generator's classes {classes} "
            "(or 'default')"
        )
    default = float(guidance.get("default", DEFAULT_GUIDANCE))
    return {c: float(guidance.get(c, default)) for c in classes}


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}
"""Resolved precision (``resolve_precision``) -> the UNet's autocast dtype (None: fp32)."""


@torch.no_grad()
def sample_latents(
    unet: UNet2DModel,
    scheduler,
    noise: torch.Tensor,
    labels: torch.Tensor,
    guidance: float | torch.Tensor,
    null_label: int,
    precision: str = "no",
    init: torch.Tensor | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (B, C, h, w) to latents z_0 (B, C, h, w).

    ``guidance``: one CFG scale or one per row (B,) (:func:`guided_eps`).

    Deterministic given the noise (DDIM with eta 0, DPM-Solver++), so an image is a
    function of its own initial noise only, not of the batch it was drawn in.
    ``precision`` ("bf16", "fp16" or "no") is the UNet's autocast: the UNet is trained
    under the same autocast, and on a CPU with AVX512-BF16 a bf16 UNet call is ~1.5x
    faster than fp32 (BENCHMARKS.md). The scheduler's update stays in fp32.

    ``start`` > 0 (SDEdit, ``synth/variations.py``): skip the first ``start`` timesteps;
    the latents ``init`` (B, C, h, w) are noised to the first remaining one with the
    forward process q(z_t | z_0) and ``noise``, and denoised from there.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    timesteps = scheduler.timesteps[start:]
    if start == 0:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):  # multistep solvers index their sigmas
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(noise)))
    for t in timesteps:
        inp = scheduler.scale_model_input(x, t)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            eps = guided_eps(unet, inp, t, labels, guidance, null_label)
        x = scheduler.step(eps.float(), t, x).prev_sample
    return x


@dataclass
class Generator:
    """A trained class-conditional generator loaded from its run folder."""

    unet: UNet2DModel
    codec: LatentCodec
    classes: list[str]
    train_counts: dict[str, int]
    scheduler_config: dict
    unconditional: bool
    run: Path
    trained_classes: list[str] | None = None  # None: every class (train_classes unset)

    @property
    def null_label(self) -> int:
        return len(self.classes)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.codec.latent_shape)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> Generator:
        self.unet.to(device)
        self.codec.to(device)
        return self

    def labels_for(self, names: list[str | None]) -> torch.Tensor:
        """Class names (None: the null class) -> label indices (B,) long."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({n for n in names if n is not None and n not in index})
        if unknown:
            raise ConfigError(f"classes {unknown} are not among the generator's {self.classes}")
        return torch.tensor([self.null_label if n is None else index[n] for n in names])

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        labels: torch.Tensor | None,
        guidance: float | torch.Tensor,
        sampler: str = "ddim",
        steps: int = 25,
        precision: str = "no",
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """uint8 images (B, 3, S, S) from initial noise (B, C, h, w) and labels (B,).

        ``labels=None`` (or an unconditional generator) samples the null class;
        ``guidance`` is one scale or one per row (B,) (:func:`row_guidance`);
        ``precision`` is the UNet's autocast (:func:`sample_latents`). ``strength`` < 1
        starts from the latents ``init`` (B, C, h, w) noised to t ~ strength * T
        (SDEdit: :func:`dermkit.synth.variations.strength_schedule`); 1 ignores ``init``.
        """
        self.unet.eval()
        b = noise.shape[0]
        if labels is None or self.unconditional:
            labels = torch.full((b,), self.null_label, dtype=torch.long)
        total, run = strength_schedule(steps, strength, self.scheduler_config)
        if run < total and init is None:
            raise ValueError(f"strength {strength} < 1 needs the latents to start from")
        z = sample_latents(
            self.unet,
            make_sampler(sampler, self.scheduler_config, total),
            noise.to(self.device),
            labels.to(self.device),
            guidance,
            self.null_label,
            precision,
            None if init is None else init.to(self.device),
            total - run,
        )
        return self.codec.decode(z).cpu()


def generator_train_split(run: str | Path) -> tuple[PreparedData, pd.DataFrame]:
    """(prepared data, train rows) of the split a generator learnt from: its run folder's
    ``config.yaml`` names the data, so a sampler reads the very same train images."""
    config = Path(run) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: is {run} a synth diffusion run?")
    data = prepare_data(load_config(DiffusionRunConfig, "synth_diffusion", file=config).data)
    return data, data.part("train")


def save_unet(unet: UNet2DModel, path: str | Path) -> Path:
    return save_diffusers(unet, path, "unet2d")


def load_unet(path: str | Path) -> UNet2DModel:
    unet, _ = load_diffusers(path, UNet2DModel, "unet2d", "UNet")
    return unet.eval().requires_grad_(False)


def load_generator(run: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a ``dermkit synth diffusion`` run folder."""
    run = Path(run)
    meta_path = run / GENERATOR_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: is {run} a synth diffusion run?")
    meta = json.loads(meta_path.read_text())
    codec = load_codec(
        run / AUTOENCODER_FILE if meta["autoencoder"] else None, image_size=meta["image_size"]
    )
    return Generator(
        unet=load_unet(run / UNET_FILE),
        codec=codec,
        classes=list(meta["classes"]),
        train_counts={k: int(v) for k, v in meta["train_counts"].items()},
        scheduler_config=meta["scheduler"],
        unconditional=bool(meta["unconditional"]),
        run=run.resolve(),
        trained_classes=meta.get("trained_classes"),  # runs before the option have none
    ).to(device)


def unet_for_sampling(
    generator: str | Path | None, preset: str | None = "cpu", n_classes: int = 7
) -> tuple[UNet2DModel, dict, tuple[int, int, int], int]:
    """The UNet a sampling benchmark times: a trained generator's, else an untrained one.

    Args:
        generator: a ``dermkit synth diffusion`` run folder, or None for a freshly built
            UNet of the ``preset``'s diffusion settings at its autoencoder's latent shape.
        n_classes: the untrained UNet's classes (a generator brings its own).

    Returns:
        (unet, scheduler config, latent shape (C, H, W), number of classes).
    """
    if generator is not None:
        gen = load_generator(generator)
        return gen.unet, gen.scheduler_config, gen.latent_shape, len(gen.classes)
    ae = load_config(AutoencoderRunConfig, "synth_autoencoder", preset)
    dc = load_config(DiffusionRunConfig, "synth_diffusion", preset)
    side = ae.data.image_size // 2 ** (len(ae.model.block_out_channels) - 1)
    shape = (ae.model.latent_channels, side, side)
    unet = build_unet(dc.unet, shape, n_classes)
    sched = dict(training_scheduler(dc.num_train_timesteps, dc.beta_schedule).config)
    return unet, sched, shape, n_classes


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def encode_views(
    codec: LatentCodec, ds: CachedImageDataset, views: int, batch_size: int = 128
) -> torch.Tensor:
    """Scaled posterior mean and std of every image in ``views`` dihedral views.

    Returns (N, views, 2C, h, w) float16 (mean channels first); half precision halves the
    memory of a whole training set of latents, and is far finer than the posterior std.
    """
    out = []
    for i in range(0, len(ds), batch_size):
        images = ds.__getitems__(np.arange(i, min(i + batch_size, len(ds))))[0]
        per_view = []
        for k in range(views):
            mean, std = codec.moments(dihedral(images, k))
            per_view.append(torch.cat([mean, std], 1).half().cpu())
        out.append(torch.stack(per_view, 1))
    return torch.cat(out)


class DiffusionTraining:
    """The engine's method for latent diffusion: one epsilon-regression step per batch.

    Every random draw (dihedral view, timestep, label dropout, posterior and diffusion
    noise) is made for the whole global batch from ``Batch.gen`` and sliced, so N
    processes train on exactly what one process would.
    """

    select = None  # no val metric: the last (EMA) weights are the generator

    def __init__(self, cfg: DiffusionRunConfig, latents, labels, null, latent_shape, sched):
        """``latents`` (N, V, 2C, h, w), ``labels`` (N,), ``null``: the null class's label."""
        self.cfg, self.latents, self.labels, self.null = cfg, latents, labels, null
        self.latent_shape, self.noise_sched = latent_shape, sched

    def draws(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        cfg, bsz, g, shape = self.cfg, batch.size, batch.gen, self.latent_shape
        return (
            torch.randint(0, cfg.dihedral_views, (bsz,), generator=g),
            torch.randint(0, cfg.num_train_timesteps, (bsz,), generator=g),
            torch.rand(bsz, generator=g) < cfg.label_dropout,
            torch.randn((bsz, *shape), generator=g),
            torch.randn((bsz, *shape), generator=g),
        )

    def step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        mine = slice(batch.offset, batch.offset + len(batch.rows))
        view, t, drop, e_post, noise = (
            v[mine] for v in batch.once("draws", lambda: self.draws(batch))
        )
        idx = torch.from_numpy(batch.rows)
        c = self.latent_shape[0]
        moments = self.latents[idx, view].float()  # (b, 2C, h, w): scaled mean, std
        z0 = moments[:, :c] + moments[:, c:] * e_post
        y = self.labels[idx].clone()
        y[drop] = self.null
        if self.cfg.unconditional:
            y[:] = self.null
        device = next(model.parameters()).device
        z0, noise, t, y = (v.to(device) for v in (z0, noise, t, y))
        zt = self.noise_sched.add_noise(z0, noise, t)  # q(z_t | z_0)
        pred = model(zt, t, class_labels=y).sample
        return F.mse_loss(pred.float(), noise), {}

    def evaluate(self, model, end: EpochEnd) -> dict:
        return {"train_loss": end.train_loss}


def train_diffusion(cfg: DiffusionRunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train the latent diffusion model end to end; returns the path of report.html."""
    oc = cfg.optim
    accelerator = make_accelerator(oc.precision)
    main, device = accelerator.is_main_process, accelerator.device
    with RunDir(cfg.out_dir, cfg, "synth_diffusion", write=main) as run:
        # --- data and latents
        with accelerator.main_process_first():
            data = prepare_data(cfg.data, rejects_path=run / "rejects.csv")
        train_part = data.part("train")
        counts = train_part["label"].value_counts()  # every class's: the sampler plans on them
        trained = cfg.train_classes or list(data.classes)
        unknown = sorted(set(trained) - set(data.classes))
        if unknown:
            raise ConfigError(f"train_classes {unknown}: not classes of the data {data.classes}")
        train_part = train_part[train_part["label"].isin(trained)].reset_index(drop=True)
        ds = CachedImageDataset(data.cache, train_part, data.classes)
        codec = load_codec(cfg.autoencoder, image_size=cfg.data.image_size).to(device)
        if codec.image_size != cfg.data.image_size:
            raise ConfigError(
                f"data.image_size={cfg.data.image_size} differs from the autoencoder's "
                f"{codec.image_size} px ({cfg.autoencoder})"
            )
        check_unet_config(cfg.unet, codec.latent_shape[1])
        latents = encode_views(codec, ds, cfg.dihedral_views)  # (N, V, 2C, h, w)
        n_classes, null = len(data.classes), len(data.classes)
        weights = sampling_weights(ds.labels, cfg.class_sampling, n_classes)
        rows = Rows(np.arange(len(ds)), weights=None if weights is None else weights.numpy())

        # --- model, noise schedule; the engine trains
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg.unet, codec.latent_shape, n_classes)
        noise_sched = training_scheduler(cfg.num_train_timesteps, cfg.beta_schedule)
        method = DiffusionTraining(cfg, latents, ds.labels, null, codec.latent_shape, noise_sched)
        state, final = fit(
            method,
            unet,
            rows,
            oc,
            run.path,
            accelerator=accelerator,
            name="diffusion",
            **run_options(cfg, resume=resume, progress=progress),
        )
        step, history = state.step, state.history
        if not main:
            return run / "report.html"

        # --- save the generator, preview grid, report
        final = final.eval()  # the EMA weights when optim.ema_decay
        save_unet(final.float().cpu(), run / UNET_FILE)
        if cfg.autoencoder is not None:
            src = Path(cfg.autoencoder)
            src = src / AUTOENCODER_FILE if src.is_dir() else src
            if src.resolve() != (run / AUTOENCODER_FILE).resolve():
                shutil.copyfile(src, run / AUTOENCODER_FILE)
        meta = {
            "classes": data.classes,
            "train_counts": {k: int(counts.get(k, 0)) for k in data.classes},
            "trained_classes": trained,
            "null_label": null,
            "unconditional": cfg.unconditional,
            "label_dropout": cfg.label_dropout,
            "image_size": cfg.data.image_size,
            "latent_shape": list(codec.latent_shape),
            "autoencoder": str(cfg.autoencoder) if cfg.autoencoder else None,
            "scheduler": {k: v for k, v in dict(noise_sched.config).items() if k[0] != "_"},
            "steps": step,
        }
        write_json(meta, run / GENERATOR_FILE)
        figure = None
        if cfg.preview_per_class:
            generator = load_generator(run.path, device=device)
            figure = preview_grid(
                generator, cfg.preview, cfg.preview_per_class, cfg.seed, run / "samples.png"
            )
        metrics = {
            "steps": step,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "params": sum(p.numel() for p in unet.parameters()),
            "latent_shape": list(codec.latent_shape),
            "train_images": len(ds),
            "dihedral_views": cfg.dihedral_views,
            "history": history,
        }
        write_json(metrics, run / "metrics.json")
        report = HtmlReport("dermkit synth diffusion: class-conditional latent diffusion")
        report.add_table(
            [{"quantity": k, "value": v} for k, v in metrics.items() if k != "history"],
            caption="Training",
        )
        report.add_table(history, caption="Per epoch")
        if figure is not None:
            p = cfg.preview
            report.add_figure(
                figure,
                caption=f"One row per class ({', '.join(trained)}): {p.sampler}, "
                f"{p.steps} steps, guidance {p.guidance}",
            )
        report.add_link("metrics.json", "metrics.json")
        return report.write(run / "report.html")


def preview_grid(
    generator: Generator, sampler: SamplerConfig, per_class: int, seed: int, path: Path
) -> Path:
    """A grid with one row of ``per_class`` samples per class."""
    g = torch.Generator().manual_seed(seed)
    names = [c for c in generator.trained_classes or generator.classes for _ in range(per_class)]
    noise = torch.randn((len(names), *generator.latent_shape), generator=g)
    images = []
    for i in range(0, len(names), sampler.batch_size):
        batch = names[i : i + sampler.batch_size]
        images.append(
            generator.sample(
                noise[i : i + sampler.batch_size],
                generator.labels_for(batch),
                row_guidance(sampler.guidance, generator.classes, batch),
                sampler.sampler,
                sampler.steps,
            )
        )
    return save_grid(torch.cat(images), path, nrow=per_class)
