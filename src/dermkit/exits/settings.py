"""Early-exit settings: the exit heads, how they are trained, and the exit policy (issue 7).

What belongs here: schemas of ``exits/`` (``dermkit exits train|calibrate|bench``) and the
exits run config, built on the training optimizer/loss sections and the augmentation and
eval sections. Schemas only (see ``dermkit.config``); settings modules are read at every
layer (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dermkit.config import RunSettings, Strict
from dermkit.data.settings import AugmentSettings
from dermkit.eval.settings import EvalConfig
from dermkit.train.settings import LossConfig, OptimConfig


class ExitsConfig(Strict):
    """Early-exit heads, how they are trained, and the exit policy (see ``exits/``)."""

    head_types: list[Literal["linear", "mlp", "attention", "ssm"]] = Field(
        default_factory=lambda: ["linear", "mlp", "attention", "ssm"],
        description="one early-exit model per head type; exits bench compares them",
    )
    exit_blocks: list[int] | None = Field(
        None, description="blocks computed before each early exit; null: a few in the latter half"
    )
    mode: Literal["frozen", "joint"] = Field(
        "frozen", description="frozen: train the exit heads only; joint: heads and backbone"
    )
    features: Literal["live", "cached"] = Field(
        "live",
        description="live: the frozen backbone runs on every (augmented) batch; cached: one "
        "pass computes each exit's pooled features, pooled heads (CNN) train on them "
        "(exits/cached.py)",
    )
    exit_loss_weights: list[float] | None = Field(
        None, description="joint: loss weight per exit, final included; null: equal"
    )
    distill_alpha: float = Field(
        0.0, ge=0, le=1, description="self-distillation: weight of the final exit's soft targets"
    )
    distill_temperature: float = Field(2.0, gt=0)
    mlp_hidden: int = Field(256, ge=1)
    attention_heads: int = Field(4, ge=1)
    ssm_d_model: int = Field(64, ge=4)
    ssm_layers: int = Field(1, ge=1, le=4)
    ssm_d_state: int = Field(8, ge=1)
    ssm_expand: int = Field(2, ge=1)
    ssm_grid_pool: int = Field(2, ge=1, description="average-pool the patch grid before the scan")
    measure: Literal["max_prob", "margin", "neg_entropy"] = "max_prob"
    objective: str = Field(
        "f1-drop=0.01",
        pattern=r"^(f1-drop|compute|latency|median-latency)=[0-9.eE+-]+$",
        description="f1-drop=X: least compute within X macro-F1 of the final exit (val); "
        "compute=B: best macro-F1 at mean compute <= B (fraction of the plain model); "
        "latency=B: best macro-F1 at measured mean batch-1 latency <= B (fraction of the "
        "plain model's, exits/latency.py); median-latency=B: the same for the median image",
    )
    compute: Literal["gflops", "blocks"] = Field("gflops", description="what compute counts")
    protect: list[str] = Field(default_factory=list, description="classes never answered early")
    grid: int = Field(50, ge=2, description="threshold quantiles tried per exit")
    bench_batch_size: int = Field(64, ge=1)
    bench_rounds: int = Field(3, ge=1, description="interleaved wall-time rounds")
    bench_max_images: int | None = Field(None, ge=1, description="test images timed; null: all")


class ExitsRunConfig(RunSettings):
    """``dermkit exits train``: exit heads on a trained classifier run (finetune/distill).

    ``loss`` and ``augment`` default to the base run's; ``optim.layer_decay`` and
    ``patience`` do not apply (errors: each head type keeps its own best epoch).
    """

    out_dir: str = "runs/exits"
    base_run: str = Field("runs/finetune", description="classifier run folder")
    data_path: str | None = Field(None, description="dataset root, if moved since the base run")
    cache_dir: str | None = Field(None, description="image cache root (default: the base run's)")
    exits: ExitsConfig = Field(default_factory=ExitsConfig)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(epochs=5, base_lr=1e-3, warmup_epochs=0.5)
    )
    loss: LossConfig | None = Field(None, description="null: the base run's")
    augment: AugmentSettings | None = Field(None, description="null: the base run's")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint_every: int = Field(
        200, ge=1, description="optimizer steps between checkpoints (and epoch ends, if as long)"
    )
