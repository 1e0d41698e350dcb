"""Whole-pipeline commands: ``run``, ``demo`` and ``bench ablation``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import PIPELINE_EXTRAS, Preset, comma_list, console, needs, reported


def _print_plan(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table("stage", "status", "key", "folder")
    for r in rows:
        table.add_row(r["stage"], r["status"], r["key"] or "", r["folder"] or "")
    console.print(table)


def run_cmd(
    pipeline: Annotated[
        str, typer.Argument(help="pipeline YAML, or a shipped name: dermae-tiny|cpu|gpu")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="key=value overrides of the file, e.g. stages.distill.distill.temperature=2"
        ),
    ] = None,
    until: Annotated[
        list[str] | None,
        typer.Option("--until", help="run only this stage and what it reads (repeatable)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print each stage's key and whether it would run")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Run a pipeline: data -> synth -> pretrain -> finetune -> distill -> exits -> export.

    Stages are cached by the hash of their resolved config and inputs: a re-run computes
    only what a change affects, and a killed run resumes where it stopped. Prints the path
    of the summary report.html.
    """
    needs(*PIPELINE_EXTRAS)
    from dermkit.pipeline import dermae

    with reported():
        cfg = dermae.load_pipeline(pipeline, overrides or [])
        if dry_run:
            _print_plan(dermae.status(cfg, targets=until))
            return
        result = dermae.run(cfg, targets=until, progress=progress)
    console.print(
        f"[bold green]pipeline {cfg.name} finished[/]: ran {result.executed or 'nothing'}"
    )
    print(result.report)


def demo(
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: the pipeline's, demo/dermae-tiny)")
    ] = None,
    n_lesions: Annotated[int | None, typer.Option(help="phantom lesions (default 150)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of phantoms, split and training")] = None,
) -> None:
    """The whole pipeline on phantom data (no download): `dermkit run dermae-tiny`."""
    needs(*PIPELINE_EXTRAS)
    from dermkit.demo import run_demo

    with reported():
        report = run_demo(out, n_lesions=n_lesions, seed=seed)
    console.print(f"[bold green]demo finished[/]: open {report}")
    print(report)


def bench_ablation_cmd(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="pipeline overrides applied to every row")
    ] = None,
    preset: Preset = "cpu",
    config: Annotated[
        Path | None, typer.Option("--config", help="ablation YAML (default: ablation-PRESET)")
    ] = None,
    rows: Annotated[
        list[str] | None, typer.Option("--rows", help="row ids, comma-separated or repeated")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the file's)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list each row's stages and what would run")
    ] = False,
    latency: Annotated[bool, typer.Option("--latency/--no-latency")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """The ablation table: one lesion-grouped split and seed, rows sharing stage caches."""
    needs(*PIPELINE_EXTRAS)
    from dermkit.bench.ablation import (
        load_ablation,
        plan_ablation,
        run_ablation,
        stages_to_compute,
    )

    with reported():
        ablation = load_ablation(config or f"ablation-{preset or 'cpu'}", out=out)
        ids = [r for item in rows or [] for r in comma_list(item)]
        if dry_run:
            from rich.table import Table

            plans = plan_ablation(ablation, ids, overrides or [])
            table = Table("row", "from stage", "needs (status: key)")
            for row, plan in plans:
                needed = [r for r in plan if r["status"] not in ("off", "not needed")]
                wanted = ", ".join(f"{r['stage']} ({r['status']}: {r['key']})" for r in needed)
                if row.ensemble:
                    wanted = f"rows {', '.join(row.ensemble)} (weights chosen on val: {row.select})"
                table.add_row(f"{row.id}: {row.name}", row.target or "ensemble", wanted)
            console.print(table)
            todo = stages_to_compute(plans)
            console.print(
                f"{len(todo)} stage run(s) to compute in {ablation.out_dir} (shared ones once):"
            )
            for line in todo:
                console.print(f"  {line}", highlight=False)
            return
        table = run_ablation(ablation, ids, overrides or [], latency=latency, progress=progress)
    print(table.read_text())
    console.print(f"written to {table}")
