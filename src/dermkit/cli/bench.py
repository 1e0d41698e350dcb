"""``dermkit bench``: the benchmarks behind BENCHMARKS.md (training, MAE, sampling, shifts).

The group also holds deployment benches (cli/deploy.py) and the ablation table
(cli/pipeline.py); cli/main.py registers them all on ``app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import (
    PIPELINE_EXTRAS,
    ConfigFile,
    Overrides,
    Preset,
    console,
    fail,
    needs,
    user_errors,
)

app = typer.Typer(help="Benchmarks behind the figures in BENCHMARKS.md.", no_args_is_help=True)


def bench_pipeline_cmd(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    steps: Annotated[int, typer.Option(help="batches per round")] = 10,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (best is kept)")] = 3,
) -> None:
    """Training images/s of the full loop vs model-only steps on the same batches."""
    needs(*PIPELINE_EXTRAS)
    import json

    from dermkit.bench.pipeline import bench_pipeline
    from dermkit.config import load_config
    from dermkit.runs import machine_info
    from dermkit.train.settings import FinetuneRunConfig

    try:
        cfg = load_config(FinetuneRunConfig, "finetune", preset, config, overrides or [])
    except user_errors() as e:
        fail(str(e))
    result = bench_pipeline(cfg, steps=steps, rounds=rounds) | {"machine": machine_info()}
    print(json.dumps(result, indent=2))


def bench_mae_cmd(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    steps: Annotated[int, typer.Option(help="batches per round")] = 10,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (best is kept)")] = 3,
    attention: Annotated[
        str, typer.Option(help="attention kernel of both models: timm (default), fused, math")
    ] = "timm",
) -> None:
    """Training images/s of an MAE step vs a supervised step of the same ViT, interleaved."""
    import json

    from dermkit.bench.mae import bench_mae
    from dermkit.config import load_config
    from dermkit.runs import machine_info
    from dermkit.ssl.settings import MaePretrainRunConfig

    try:
        cfg = load_config(MaePretrainRunConfig, "pretrain_mae", preset, config, overrides or [])
        if attention not in ("timm", "fused", "math"):
            fail(f"--attention must be timm, fused or math, got '{attention}'")
        result = bench_mae(cfg, steps=steps, rounds=rounds, attention=attention)
    except user_errors() as e:
        fail(str(e))
    print(json.dumps(result | {"machine": machine_info()}, indent=2))


def bench_sampling_cmd(
    generator: Annotated[
        Path | None,
        typer.Argument(help="synth diffusion run; default: an untrained UNet of the preset"),
    ] = None,
    preset: Preset = "cpu",
    batch_size: Annotated[int, typer.Option(help="images per sampling batch")] = 32,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 25,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 2.0,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (best is kept)")] = 3,
    n_classes: Annotated[int, typer.Option(help="classes of an untrained UNet")] = 7,
    precision: Annotated[
        str, typer.Option(help="dermkit's sampling precision: auto, bf16, fp16, fp32")
    ] = "auto",
) -> None:
    """Images/s of dermkit's DDIM sampler vs a plain two-call (cond, uncond) fp32 loop."""
    needs("synth")
    import json

    import torch

    from dermkit.bench.sampling import bench_sampling
    from dermkit.runs import machine_info
    from dermkit.synth.diffusion import unet_for_sampling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        unet, sched, shape, n_classes = unet_for_sampling(generator, preset, n_classes)
        result = bench_sampling(
            unet,
            sched,
            shape,
            n_classes,
            batch_size,
            steps,
            guidance,
            rounds,
            device=device,
            precision=precision,
        )
    except (*user_errors(), ValueError) as e:
        fail(str(e))
    print(json.dumps(result | {"machine": machine_info()}, indent=2))


def bench_shift_cmd(
    run: Annotated[Path, typer.Argument(help="finetune or distill run folder")],
    out: Annotated[Path | None, typer.Option(help="output folder (default RUN/shift)")] = None,
    shifts: Annotated[
        str | None, typer.Option(help="comma-separated shifts (default: all of eval/shifts.py)")
    ] = None,
    severities: Annotated[
        str, typer.Option(help="comma-separated severities: 1 low, 2 middle, 3 high")
    ] = "1,2,3",
    n_boot: Annotated[int, typer.Option(help="paired lesion-bootstrap replicates")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 256,
    limit: Annotated[
        int | None, typer.Option(help="first N test images only (a quick look, not a benchmark)")
    ] = None,
    save_predictions: Annotated[
        bool, typer.Option(help="write OUT/predictions/<shift>-<severity>.csv and clean.csv")
    ] = True,
) -> None:
    """Test-split metrics under image shifts (zoom, colour, exposure, vignette, blur, JPEG,
    clinical camera), each with a paired lesion-bootstrap CI against the clean images."""
    from dermkit.bench.shift import run_shift_bench

    try:
        levels = tuple(int(v) for v in severities.split(",") if v.strip())
    except ValueError:
        fail(f"--severities must be comma-separated integers 1..3, got '{severities}'")
    names = [s.strip() for s in shifts.split(",") if s.strip()] if shifts else None
    try:
        result = run_shift_bench(
            run,
            out,
            shifts=names,
            severities=levels,
            n_boot=n_boot,
            seed=seed,
            batch_size=batch_size,
            limit=limit,
            save_predictions=save_predictions,
            progress=True,
        )
    except user_errors() as e:
        fail(str(e))
    worst = result["worst"]
    if worst is not None:
        console.print(
            f"worst shift at the {worst['severity_name']} severity: {worst['shift']} "
            f"(balanced accuracy {worst['balanced_accuracy_delta']:+.3f})",
            highlight=False,
        )
    print(result["files"]["markdown"])


def bench_shift_compare_cmd(
    a: Annotated[Path, typer.Argument(help="run A's shift bench folder (or run folder)")],
    b: Annotated[Path, typer.Argument(help="run B's shift bench folder (or run folder)")],
    out: Annotated[Path | None, typer.Option(help="default: A's bench/compare-vs-<B>")] = None,
    n_boot: Annotated[int, typer.Option(help="paired lesion-bootstrap replicates")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
) -> None:
    """Run A - run B under every shift both were benched on, with paired CIs (e.g. a
    robustness arm against its control)."""
    from dermkit.bench.shift import compare_shift_benches

    try:
        result = compare_shift_benches(a, b, out, n_boot=n_boot, seed=seed)
    except (*user_errors(), ValueError) as e:
        fail(str(e))
    print(result["files"]["markdown"])
