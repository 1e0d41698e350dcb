"""``dermkit bench``: the benchmarks behind BENCHMARKS.md (training, MAE, sampling, shifts).

The group also holds deployment benches (cli/deploy.py) and the ablation table
(cli/pipeline.py); cli/main.py registers them all on ``app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import (
    CONFIG_PARAMS,
    PIPELINE_EXTRAS,
    Param,
    Preset,
    comma_list,
    command_group,
    console,
    fail,
    needs,
    print_json,
    reported,
    stage_command,
)

app = command_group("Benchmarks behind the figures in BENCHMARKS.md.")

# Options of the training-speed benches, given to the bench function (no config keys).
STEPS = Param.option("steps", int, "batches per round", default=10)
ROUNDS = Param.option("rounds", int, "interleaved rounds (best is kept)", default=3)

bench_pipeline_cmd = stage_command(
    "Training images/s of the full loop vs model-only steps on the same batches.",
    schema="dermkit.train.settings:FinetuneRunConfig",
    section="finetune",
    run="dermkit.bench.pipeline:bench_pipeline",
    params=(*CONFIG_PARAMS, STEPS, ROUNDS),
    extras=PIPELINE_EXTRAS,
    show=print_json,
)

bench_mae_cmd = stage_command(
    "Training images/s of an MAE step vs a supervised step of the same ViT, interleaved.",
    schema="dermkit.ssl.settings:MaePretrainRunConfig",
    section="pretrain_mae",
    run="dermkit.bench.mae:bench_mae",
    params=(
        *CONFIG_PARAMS,
        STEPS,
        ROUNDS,
        Param.option(
            "attention",
            str,
            "attention kernel of both models: timm (default), fused, math",
            default="timm",
        ),
    ),
    show=print_json,
)


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
    from dermkit.bench.sampling import run_sampling_bench

    with reported():
        result = run_sampling_bench(
            generator, preset, n_classes, batch_size, steps, guidance, rounds, precision
        )
    print_json(result)


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
        levels = tuple(comma_list(severities, int))
    except ValueError:
        fail(f"--severities must be comma-separated integers 1..3, got '{severities}'")
    with reported():
        result = run_shift_bench(
            run,
            out,
            shifts=comma_list(shifts) or None,
            severities=levels,
            n_boot=n_boot,
            seed=seed,
            batch_size=batch_size,
            limit=limit,
            save_predictions=save_predictions,
            progress=True,
        )
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

    with reported():
        result = compare_shift_benches(a, b, out, n_boot=n_boot, seed=seed)
    print(result["files"]["markdown"])
