"""The ``dermkit`` typer app: the root options, and every command in its place and order.

Each module of this package holds one command group (and its parsing only; the work is
done by the domain packages). This module registers them: the order of registration is
the order ``dermkit --help`` lists them in.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from dermkit import __version__
from dermkit.cli import bench, data, deploy, evaluate, exits, explain, pipeline, ssl, synth, train
from dermkit.cli.common import add_commands

app = typer.Typer(
    help="dermkit: skin-lesion classifiers when data is scarce and imbalanced.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def version() -> None:
    """Print the dermkit version."""
    print(__version__)


add_commands(
    app,
    {
        "baseline": train.baseline,
        "finetune": train.finetune,
        "compare": train.compare,
        "distill": train.distill,
        "export": deploy.export_cmd,
        "evaluate": evaluate.evaluate,
        "ensemble": train.ensemble,
        "serve": deploy.serve,
        "probe": ssl.probe,
        "demo": pipeline.demo,
        "run": pipeline.run_cmd,
    },
)
add_commands(
    bench.app,
    {
        "pipeline": bench.bench_pipeline_cmd,
        "latency": deploy.bench_latency_cmd,
        "serve": deploy.bench_serve_cmd,
        "soak": deploy.bench_soak_cmd,
        "mae": bench.bench_mae_cmd,
        "sampling": bench.bench_sampling_cmd,
        "ablation": pipeline.bench_ablation_cmd,
        "shift": bench.bench_shift_cmd,
        "shift-compare": bench.bench_shift_compare_cmd,
    },
)
for name, group in (
    ("data", data.app),
    ("bench", bench.app),
    ("pretrain", ssl.app),
    ("exits", exits.app),
    ("synth", synth.app),
    ("explain", explain.app),
    ("thickness", explain.thickness_app),
):
    app.add_typer(group, name=name)
