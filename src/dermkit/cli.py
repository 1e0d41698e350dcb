"""The ``dermkit`` command: one sub-command per stage.

Every stage command takes ``--preset tiny|cpu|gpu``, ``--config FILE`` and trailing
``key=value`` overrides (e.g. ``data.image_size=64 eval.n_boot=200``), and prints where its
report is. Errors in user input exit with status 2 and a message naming the file, row or key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dermkit import __version__

app = typer.Typer(
    help="dermkit: skin-lesion classifiers when data is scarce and imbalanced.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Read, validate, split, generate and download datasets.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
bench_app = typer.Typer(
    help="Benchmarks behind the figures in BENCHMARKS.md.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

Preset = Annotated[str | None, typer.Option(help="config preset: tiny, cpu or gpu")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config file")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides")]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _user_errors():
    """Exceptions that mean bad input (reported without a traceback)."""
    from dermkit.config import ConfigError
    from dermkit.data.manifest import ManifestError
    from dermkit.data.prepare import SplitFileError
    from dermkit.data.readers import DataValidationError
    from dermkit.data.splits import LeakageError

    return (
        ConfigError,
        ManifestError,
        SplitFileError,
        DataValidationError,
        LeakageError,
        FileNotFoundError,
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


# --------------------------------------------------------------------------- data


@data_app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="output folder (HAM10000 layout)")] = Path(
        "demo/phantoms"
    ),
    n_lesions: Annotated[int, typer.Option(help="number of lesions")] = 300,
    size: Annotated[str, typer.Option(help="image size WxH")] = "160x120",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a deterministic phantom dataset of dermoscopy-like images."""
    from dermkit.data.phantoms import generate_phantoms

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        _fail(f"--size must look like 160x120, got '{size}'")
    csv = generate_phantoms(out, n_lesions, image_size=(w, h), seed=seed)
    print(csv)


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="dataset folder")],
    layout: Annotated[str, typer.Option(help="auto, ham10000, isic or folder")] = "auto",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="drop bad rows into rejects.csv")
    ] = False,
    rejects: Annotated[Path, typer.Option(help="where --skip-bad writes the rejects")] = Path(
        "rejects.csv"
    ),
    manifest_out: Annotated[Path | None, typer.Option("--manifest", help="write manifest")] = None,
) -> None:
    """Read a dataset and check every row and image; exit 1 naming every problem."""
    from dermkit.data.manifest import write_manifest
    from dermkit.data.readers import DataValidationError, load_dataset

    try:
        loaded = load_dataset(path, layout=layout, skip_bad=skip_bad, rejects_path=rejects)
    except DataValidationError as e:
        console.print(str(e), highlight=False, markup=False)
        console.print(
            "[red]validation failed[/]: rerun with --skip-bad to continue without "
            "these rows (they are listed in rejects.csv)"
        )
        raise typer.Exit(1) from e
    m = loaded.manifest
    console.print(
        f"{len(m)} images, {m['lesion_id'].nunique()} lesions, "
        f"classes {m['label'].value_counts().to_dict()}",
        highlight=False,
    )
    if loaded.conversions:
        console.print(f"converted at load time: {loaded.conversions}", highlight=False)
    if len(loaded.rejects):
        console.print(f"[yellow]{len(loaded.rejects)} rejected[/], listed in {rejects}")
    if manifest_out:
        write_manifest(m, manifest_out)
        print(manifest_out)


@data_app.command("split")
def data_split(
    data: Annotated[Path, typer.Option(help="dataset folder")],
    out: Annotated[
        Path | None, typer.Option(help="write the id list (image_id,lesion_id,split)")
    ] = None,
    train: float = 0.7,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    kfold: Annotated[int, typer.Option(help="also assign K lesion-grouped folds")] = 0,
    layout: str = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad")] = False,
    image_size: Annotated[int, typer.Option(help="cache resolution for the pHash check")] = 64,
    near_duplicate_distance: Annotated[int, typer.Option(help="pHash bits; -1 disables")] = 4,
) -> None:
    """Label-stratified, lesion-grouped split with a leakage report."""
    from dermkit.config import DataConfig
    from dermkit.data.prepare import prepare_data, write_split_file
    from dermkit.data.splits import lesion_grouped_kfold, split_summary

    cfg = DataConfig(
        path=str(data),
        layout=layout,
        train=train,
        val=val,
        test=test,
        split_seed=seed,
        skip_bad=skip_bad,
        image_size=image_size,
        near_duplicate_distance=near_duplicate_distance,
    )
    try:
        prepared = prepare_data(
            cfg, rejects_path=Path("rejects.csv") if skip_bad else None, progress=True
        )
    except _user_errors() as e:
        _fail(str(e))
    m = prepared.manifest
    summary = split_summary(m)
    console.print(summary.round(2).to_string(), highlight=False)
    counts = {
        s: (int((m["split"] == s).sum()), int(m.loc[m["split"] == s, "lesion_id"].nunique()))
        for s in ("train", "val", "test")
    }
    console.print(f"images/lesions per split: {counts}", highlight=False)
    console.print(
        f"largest class-share difference from overall: {summary['max_abs_diff'].max():.2f} points",
        highlight=False,
    )
    console.print(prepared.leakage.summary(), highlight=False, markup=False)
    if kfold:
        folds = lesion_grouped_kfold(m, kfold, seed)
        m = m.assign(fold=folds.to_numpy())
    if out:
        write_split_file(m, out)
        if kfold:
            m[["image_id", "lesion_id", "fold"]].sort_values("image_id").to_csv(
                out.with_name(out.stem + f"-{kfold}fold.csv"), index=False
            )
        print(out)


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="dataset name: ham10000 or dermamnist")],
    dest: Annotated[Path, typer.Option(help="destination folder")] = Path("data"),
    base_url: Annotated[str | None, typer.Option(help="mirror replacing the official host")] = None,
) -> None:
    """Download a dataset from its official source with checksums and resume."""
    from dermkit.data.download import DownloadError, download_dataset

    try:
        print(download_dataset(name, dest, base_url=base_url))
    except (DownloadError, KeyError, ValueError) as e:
        _fail(str(e))


# --------------------------------------------------------------------------- stages


@app.command()
def baseline(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
) -> None:
    """Classical baseline: colour/texture features + class-balanced gradient boosting."""
    from dermkit.config import BaselineRunConfig, load_config
    from dermkit.train.baseline import run_baseline

    try:
        cfg = load_config(BaselineRunConfig, "baseline", preset, config, overrides or [])
        report = run_baseline(cfg, progress=True)
    except _user_errors() as e:
        _fail(str(e))
    print(report)


@app.command()
def finetune(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Supervised fine-tuning (imbalance-aware, resumable, data-parallel under accelerate)."""
    from dermkit.config import FinetuneRunConfig, load_config
    from dermkit.train.finetune import run_finetune

    try:
        cfg = load_config(FinetuneRunConfig, "finetune", preset, config, overrides or [])
        report = run_finetune(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e))
    print(report)


@app.command()
def compare(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    init: Annotated[
        list[str] | None, typer.Option(help="NAME=WEIGHTS (WEIGHTS 'random' for none)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="skip finished, resume the rest")
    ] = False,
) -> None:
    """Fine-tune several initialisations identically; curves, gaps and a metrics table."""
    from dermkit.config import CompareRunConfig, load_config
    from dermkit.train.compare import run_compare

    try:
        ft = [
            f"finetune.{o}" if not o.startswith(("out_dir=", "inits.")) else o
            for o in overrides or []
        ]
        cfg = load_config(CompareRunConfig, "compare", preset, config, ft)
        if init:
            pairs = [item.split("=", 1) for item in init]
            if any(len(p) != 2 for p in pairs):
                _fail("--init must look like NAME=WEIGHTS")
            cfg.inits = {n: (None if w == "random" else w) for n, w in pairs}
        report = run_compare(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e))
    print(report)


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="predictions.csv or a run folder")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: beside input)")] = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
) -> None:
    """Metrics with lesion-level bootstrap CIs and an HTML report from a predictions file."""
    from dermkit.eval.metrics import evaluate_predictions
    from dermkit.eval.predictions import read_predictions
    from dermkit.eval.report import write_evaluation_report

    if predictions.is_dir():
        predictions = predictions / "predictions_test.csv"
    try:
        df, y, probs, classes = read_predictions(predictions)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out = out or predictions.parent / f"eval-{predictions.stem}"
    result = evaluate_predictions(
        y,
        probs,
        classes,
        groups=df["lesion_id"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
        positive_class=positive_class,
    )
    report = write_evaluation_report(
        result, y, probs, classes, out, title=f"dermkit evaluation of {predictions}"
    )
    print(report)


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    steps: Annotated[int, typer.Option(help="batches per round")] = 10,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (best is kept)")] = 3,
) -> None:
    """Training images/s of the full loop vs model-only steps on the same batches."""
    import json

    from dermkit.bench.pipeline import bench_pipeline
    from dermkit.config import FinetuneRunConfig, load_config
    from dermkit.runs import machine_info

    try:
        cfg = load_config(FinetuneRunConfig, "finetune", preset, config, overrides or [])
    except _user_errors() as e:
        _fail(str(e))
    result = bench_pipeline(cfg, steps=steps, rounds=rounds) | {"machine": machine_info()}
    print(json.dumps(result, indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="demo output folder")] = Path("demo"),
    n_lesions: Annotated[int, typer.Option(help="phantom lesions")] = 300,
    seed: int = 0,
) -> None:
    """The whole pipeline on embedded phantom data (no download), ending in an HTML report."""
    from dermkit.demo import run_demo

    report = run_demo(out, n_lesions=n_lesions, seed=seed)
    console.print(f"[bold green]demo finished[/]: open {report}")
    print(report)


if __name__ == "__main__":  # pragma: no cover
    app()
