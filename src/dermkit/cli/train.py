"""Supervised training commands: baseline, finetune, compare, distill and ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import (
    CONFIG_PARAMS,
    RESUMABLE,
    ConfigFile,
    Overrides,
    Param,
    Preset,
    console,
    load_stage_config,
    reported,
    stage_command,
)

baseline = stage_command(
    "Classical baseline: colour/texture features + class-balanced gradient boosting.",
    schema="dermkit.train.settings:BaselineRunConfig",
    section="baseline",
    run="dermkit.train.baseline:run_baseline",
    run_kwargs={"progress": True},
)

finetune = stage_command(
    "Supervised fine-tuning (imbalance-aware, resumable, data-parallel under accelerate).",
    schema="dermkit.train.settings:FinetuneRunConfig",
    section="finetune",
    run="dermkit.train.finetune:run_finetune",
    params=RESUMABLE,
)

distill = stage_command(
    "Knowledge distillation: a small student learns a teacher run's soft targets.",
    schema="dermkit.train.settings:DistillRunConfig",
    section="distill",
    run="dermkit.train.distill:run_distill",
    params=(
        *CONFIG_PARAMS,
        Param.option(
            "teacher", Path, "teacher run folder (overrides the config's teacher)", "teacher"
        ),
        "resume",
    ),
)


def compare(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    init: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=WEIGHTS or NAME=WEIGHTS@MODEL (WEIGHTS 'random' for none; @MODEL: "
            "the arm's own backbone, e.g. imagenet@tf_efficientnet_lite0)"
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="skip finished, resume the rest")
    ] = False,
) -> None:
    """Fine-tune several initialisations identically; curves, gaps and a metrics table."""
    from dermkit.train.compare import compare_overrides, parse_init, run_compare

    with reported():
        cfg = load_stage_config(
            "dermkit.train.settings:CompareRunConfig",
            "compare",
            preset,
            config,
            compare_overrides(overrides or []),
        )
        if init:
            cfg.inits = dict(parse_init(item) for item in init)
        report = run_compare(cfg, resume=resume)
    print(report)


def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="run folders with val and test predictions")],
    out: Annotated[Path, typer.Option(help="folder for the ensemble's predictions and report")],
    select: Annotated[
        str, typer.Option(help="greedy (forward selection on val macro-F1) or all (weight 1)")
    ] = "greedy",
    max_rounds: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
) -> None:
    """Combine finished runs (geometric mean of probabilities), weights chosen on val only.

    Writes predictions_{val,test}.csv, ensemble.json and report.html into --out; the test
    metrics have lesion-level bootstrap CIs like every other evaluation.
    """
    from dermkit.eval.ensemble import run_ensemble

    with reported():
        done = run_ensemble(
            runs, out, select, max_rounds, n_boot=n_boot, seed=seed, positive_class=positive_class
        )
    f1 = done["test"]["metrics"]["macro_f1"]
    weights = ", ".join(f"{r.name} x{w}" for r, w in zip(runs, done["weights"]) if w)
    console.print(
        f"members (weight): {weights}; val macro-F1 {done['val_macro_f1']:.3f}; test macro-F1 "
        f"{f1['value']:.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}]",
        highlight=False,
    )
    print(done["report"])
