"""``dermkit exits``: exit heads after ViT blocks, calibrated thresholds, benchmarks, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import RESUMABLE, Param, command_group, fail, needs, reported, stage_command

app = command_group("Early exits: heads after ViT blocks, calibrated exit thresholds, benchmarks.")

app.command("train")(
    stage_command(
        "Train exit heads (frozen backbone, or jointly) of every configured head type.",
        schema="dermkit.exits.settings:ExitsRunConfig",
        section="exits",
        run="dermkit.exits.train:run_exits_train",
        params=(
            Param.argument("run", Path, "classifier run folder (finetune or distill)", "base_run"),
            *RESUMABLE,
        ),
        extras=("exits",),
    )
)


@app.command("calibrate")
def exits_calibrate(
    exit_run: Annotated[Path, typer.Argument(help="exit run folder (dermkit exits train)")],
    objective: Annotated[
        str | None,
        typer.Option(
            help="f1-drop=X, compute=B, latency=B or median-latency=B (batch-1 ONNX "
            "latency measured here, mean or median over images; "
            "default: the run's config)"
        ),
    ] = None,
    protect: Annotated[
        list[str] | None, typer.Option(help="class never answered early (repeatable)")
    ] = None,
    measure: Annotated[str | None, typer.Option(help="max_prob, margin or neg_entropy")] = None,
    compute: Annotated[str | None, typer.Option(help="compute counts gflops or blocks")] = None,
) -> None:
    """Choose exit thresholds on val for an objective; writes policy_<head>.json."""
    needs("exits")
    from dermkit.exits.calibrate import run_exits_calibrate

    if measure not in (None, "max_prob", "margin", "neg_entropy"):
        fail(f"--measure must be max_prob, margin or neg_entropy, got '{measure}'")
    if compute not in (None, "gflops", "blocks"):
        fail(f"--compute must be gflops or blocks, got '{compute}'")
    with reported():
        out = run_exits_calibrate(exit_run, objective, protect, measure, compute)
    print(out)


@app.command("bench")
def exits_bench(
    exit_run: Annotated[Path, typer.Argument(help="calibrated exit run folder")],
    rounds: Annotated[int | None, typer.Option(help="interleaved wall-time rounds")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size of the timing")] = None,
    max_images: Annotated[int | None, typer.Option(help="test images timed")] = None,
) -> None:
    """Test accuracy vs compute per head type, exit distribution, wall time vs plain."""
    needs("exits")
    from dermkit.exits.bench import run_exits_bench

    with reported():
        report = run_exits_bench(exit_run, rounds, batch_size, max_images)
    print(report)


@app.command("latency")
def exits_latency(
    exit_run: Annotated[Path, typer.Argument(help="calibrated exit run folder")],
    head: Annotated[str, typer.Option(help="head type")],
    images: Annotated[int, typer.Option(help="test images timed, one at a time")] = 300,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads")] = 2,
    eager: Annotated[
        bool, typer.Option(help="also time each part in PyTorch eager (slow for CNN stages)")
    ] = True,
) -> None:
    """Batch-1 ONNX latency: exit model vs plain model, interleaved, + per-part overhead."""
    from dermkit.exits.latency_bench import run_exits_latency

    with reported():
        r = run_exits_latency(exit_run, head, images, threads, eager=eager)
    ms, f1 = r["ms_per_image"], r["test_macro_f1"]
    print(
        f"{head}: plain {ms['plain']:.3f} ms, exits {ms['exits']:.3f} ms per image "
        f"(ratio {r['ratio_exits_over_plain']:.3f}); test macro-F1 plain {f1['plain']:.4f}, "
        f"exits {f1['exits']:.4f}; median/mean {r['ratio_exits_over_plain']:.3f}/"
        f"{r['mean_ms_per_image']['exits'] / r['mean_ms_per_image']['plain']:.3f}; {r['path']}"
    )


@app.command("export")
def exits_export(
    exit_run: Annotated[Path, typer.Argument(help="calibrated exit run folder")],
    head: Annotated[str, typer.Option(help="head type to export")],
    out: Annotated[Path, typer.Option(help="folder for segment_*.onnx and policy.json")],
    fused: Annotated[
        bool,
        typer.Option(help="exit decision inside each segment; unused exits pruned"),
    ] = True,
) -> None:
    """ONNX segments (one per exit) + the exit policy, for the onnxruntime runner."""
    needs("exits", "export")
    from dermkit.exits.onnx_segments import export_exit_run

    with reported():
        export_exit_run(exit_run, head, out, fused)
    print(out)
