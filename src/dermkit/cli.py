"""The ``dermkit`` command: one sub-command per stage.

Every stage command takes ``--preset tiny|cpu|gpu``, ``--config FILE`` and trailing
``key=value`` overrides (e.g. ``data.image_size=64 eval.n_boot=200``), and prints where its
report is. Errors in user input exit with status 2 and a message naming the file, row or key.
"""

from __future__ import annotations

import logging
import os
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


def _needs(*extras: str) -> None:
    """Stop with the pip line when an optional dependency group (extra) is not installed."""
    from rich.markup import escape

    from dermkit.core.optional import MissingExtraError, require_extra

    try:
        require_extra(*extras)
    except MissingExtraError as e:
        _fail(escape(str(e)))  # escaped: rich would take "[serve]" for markup


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


MaxImageMB = Annotated[
    float | None,
    typer.Option(
        "--max-image-mb",
        help="refuse image files larger than this, unread (default 64, or $DERMKIT_MAX_IMAGE_MB)",
    ),
]


def _set_max_image_mb(megabytes: float | None) -> None:
    """Apply --max-image-mb to the whole process, so the image cache obeys it as well."""
    from dermkit.data.images import MAX_IMAGE_MB_ENV

    if megabytes is None:
        return
    if megabytes <= 0:
        _fail(f"--max-image-mb must be positive, got {megabytes}")
    os.environ[MAX_IMAGE_MB_ENV] = str(megabytes)


def _validation_advice(error: Exception, skip_bad: bool, rejects: Path) -> str:
    """What to do after a failed validation, for the flags actually given."""
    from dermkit.data.readers import LayoutError

    if isinstance(error, LayoutError):
        # Fatal problems (no CSV, bad header, missing column) leave no row to keep.
        return "fix the problems above: --skip-bad cannot skip them, nothing could be read"
    if skip_bad:
        return "--skip-bad was given, but every row was rejected: nothing is left to use"
    return f"rerun with --skip-bad to continue without these rows (listed then in {rejects})"


def _report_rejects(rejects_table, rejects: Path) -> None:
    """Name the first rejected rows/files and where the full list was written."""
    if not len(rejects_table):
        return
    shown = rejects_table.head(5)
    names = ", ".join(f"{r.image_id or Path(r.path).name} ({r.reason})" for r in shown.itertuples())
    more = f" and {len(rejects_table) - 5} more" if len(rejects_table) > 5 else ""
    console.print(
        f"[yellow]{len(rejects_table)} rejected[/]: {names}{more}; listed in {rejects}",
        highlight=False,
    )


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
    max_image_mb: MaxImageMB = None,
) -> None:
    """Read a dataset and check every row and image; exit 1 naming every problem."""
    from dermkit.data.manifest import write_manifest
    from dermkit.data.readers import DataValidationError, load_dataset

    _set_max_image_mb(max_image_mb)
    try:
        loaded = load_dataset(path, layout=layout, skip_bad=skip_bad, rejects_path=rejects)
    except DataValidationError as e:
        console.print(str(e), highlight=False, markup=False)
        advice = _validation_advice(e, skip_bad, rejects)
        console.print(f"[red]validation failed[/]: {advice}", highlight=False)
        raise typer.Exit(1) from e
    m = loaded.manifest
    console.print(
        f"{len(m)} images, {m['lesion_id'].nunique()} lesions, "
        f"classes {m['label'].value_counts().to_dict()}",
        highlight=False,
    )
    if loaded.conversions:
        console.print(f"converted at load time: {loaded.conversions}", highlight=False)
    _report_rejects(loaded.rejects, rejects)
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
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="drop bad rows into the rejects file")
    ] = False,
    rejects: Annotated[Path, typer.Option(help="where --skip-bad writes the rejects")] = Path(
        "rejects.csv"
    ),
    image_size: Annotated[int, typer.Option(help="cache resolution for the pHash check")] = 64,
    near_duplicate_distance: Annotated[int, typer.Option(help="pHash bits; -1 disables")] = 4,
    max_image_mb: MaxImageMB = None,
) -> None:
    """Label-stratified, lesion-grouped split with a leakage report."""
    from dermkit.config import DataConfig
    from dermkit.data.prepare import prepare_data, write_split_file
    from dermkit.data.readers import DataValidationError
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
    _set_max_image_mb(max_image_mb)
    try:
        prepared = prepare_data(cfg, rejects_path=rejects if skip_bad else None, progress=True)
    except DataValidationError as e:
        _fail(f"{e}\n{_validation_advice(e, skip_bad, rejects)}")
    except _user_errors() as e:
        _fail(str(e))
    _report_rejects(prepared.rejects, rejects)
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
    from dermkit.config import CompareRunConfig, load_config
    from dermkit.train.compare import parse_init, run_compare

    try:
        ft = [
            f"finetune.{o}" if not o.startswith(("out_dir=", "inits.")) else o
            for o in overrides or []
        ]
        cfg = load_config(CompareRunConfig, "compare", preset, config, ft)
        if init:
            cfg.inits = dict(parse_init(item) for item in init)
        report = run_compare(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e))
    print(report)


@app.command()
def distill(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    teacher: Annotated[
        Path | None, typer.Option(help="teacher run folder (overrides the config's teacher)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Knowledge distillation: a small student learns a teacher run's soft targets."""
    from dermkit.config import DistillRunConfig, load_config
    from dermkit.train.distill import run_distill

    extra = [f"teacher={teacher}"] if teacher else []
    try:
        cfg = load_config(DistillRunConfig, "distill", preset, config, [*(overrides or []), *extra])
        report = run_distill(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e))
    print(report)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="classifier run folder (finetune or distill)")],
    out: Annotated[Path, typer.Option(help="output folder for the ONNX files and model card")],
    int8: Annotated[
        str | None, typer.Option(help="INT8 quantisation: dynamic, static or both")
    ] = None,
    parity_images: Annotated[int, typer.Option(help="val images for the parity check")] = 512,
    calibration_images: Annotated[
        int, typer.Option(help="val images calibrating static INT8")
    ] = 64,
) -> None:
    """ONNX export (dynamic batch) + optional INT8, parity vs PyTorch and a model card."""
    _needs("export")
    import json

    from dermkit.deploy.export import export_run

    if int8 not in (None, "dynamic", "static", "both"):
        _fail(f"--int8 must be dynamic, static or both, got '{int8}'")
    try:
        result = export_run(run, out, int8, parity_images, calibration_images)
    except _user_errors() as e:
        _fail(str(e))
    console.print(json.dumps(result["files"], indent=2), highlight=False)
    print(out / "model_card.json")


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="predictions.csv or a run folder")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: beside input)")] = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
    data: Annotated[
        Path | None, typer.Option(help="external dataset: run the model of the RUN folder on it")
    ] = None,
    label_map: Annotated[
        Path | None, typer.Option(help="with --data: YAML/JSON dataset label -> run class/null")
    ] = None,
    layout: Annotated[str, typer.Option(help="with --data: auto, ham10000, isic, folder")] = "auto",
    skip_bad: Annotated[bool, typer.Option(help="with --data: drop unreadable rows/files")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="with --data: image cache root")] = None,
    against: Annotated[
        Path | None,
        typer.Option(help="predictions.csv or run folder B: paired comparison A - B, same images"),
    ] = None,
) -> None:
    """Metrics with lesion-level bootstrap CIs and an HTML report from a predictions file.

    With --data (and --label-map) the run folder's model is evaluated on another dataset.
    With --against B: metric(A) - metric(B) with paired lesion-bootstrap CIs -> paired.json
    and paired.md (default folder: A's folder/paired-vs-<B's name>).
    """
    from dermkit.eval.metrics import evaluate_predictions
    from dermkit.eval.predictions import read_predictions
    from dermkit.eval.report import write_evaluation_report

    if against is not None:
        from dermkit.eval import paired

        if data is not None or label_map is not None:
            _fail("--against compares two predictions files; it does not take --data/--label-map")
        try:
            result = paired.compare_prediction_files(
                predictions, against, n_boot=n_boot, seed=seed, positive_class=positive_class
            )
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        console.print(paired.comparison_table(result))
        out = out or paired.default_output_dir(predictions, against)
        _, md = paired.write_comparison(result, out)
        print(md)
        return
    if data is not None:
        from dermkit.eval.external import evaluate_external

        try:
            done = evaluate_external(
                predictions,
                data,
                label_map,
                out,
                layout=layout,
                skip_bad=skip_bad,
                cache_dir=cache_dir,
                n_boot=n_boot,
                seed=seed,
                positive_class=positive_class,
                progress=True,
            )
        except _user_errors() as e:
            _fail(str(e))
        ext = done["result"]["external"]
        console.print(
            f"scored {ext['images_scored']} images, classes {ext['scored_classes']}; model "
            f"classes not in the data: {ext['model_classes_not_in_data'] or 'none'}; dropped "
            f"by the label map: {ext['source_labels_dropped'] or 'none'}",
            highlight=False,
        )
        print(done["report"])
        return
    if label_map is not None:
        _fail("--label-map needs --data (external evaluation of a run folder)")
    if predictions.is_dir():
        predictions = predictions / "predictions_test.csv"
    try:
        df, y, probs, classes = read_predictions(predictions)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out = out or predictions.parent / f"eval-{predictions.stem}"
    from dermkit.eval.ordinal import TRUTH_COLUMN

    if TRUTH_COLUMN in df.columns:  # an ordinal run's predictions (task.kind=ordinal)
        from dermkit.eval.ordinal import evaluate_ordinal_predictions, metrics_table

        title = f"dermkit ordinal evaluation of {predictions}"
        result, report = evaluate_ordinal_predictions(
            df, y, probs, classes, out, n_boot=n_boot, seed=seed, title=title
        )
        for row in metrics_table(result):
            console.print(" | ".join(str(v) for v in row.values()), highlight=False)
        print(report)
        return
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


@app.command()
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

    try:
        done = run_ensemble(
            runs, out, select, max_rounds, n_boot=n_boot, seed=seed, positive_class=positive_class
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    f1 = done["test"]["metrics"]["macro_f1"]
    weights = ", ".join(f"{r.name} x{w}" for r, w in zip(runs, done["weights"]) if w)
    console.print(
        f"members (weight): {weights}; val macro-F1 {done['val_macro_f1']:.3f}; test macro-F1 "
        f"{f1['value']:.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}]",
        highlight=False,
    )
    print(done["report"])


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    steps: Annotated[int, typer.Option(help="batches per round")] = 10,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (best is kept)")] = 3,
) -> None:
    """Training images/s of the full loop vs model-only steps on the same batches."""
    _needs("synth", "exits", "export", "explain")
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


@bench_app.command("latency")
def bench_latency_cmd(
    teacher: Annotated[Path, typer.Option(help="teacher run folder")],
    student: Annotated[Path, typer.Option(help="student run folder or `dermkit export` folder")],
    out: Annotated[Path, typer.Option(help="folder for latency.json and latency.md")] = Path(
        "runs/bench/latency"
    ),
    int8: Annotated[str, typer.Option(help="INT8 file to time: dynamic or static")] = "dynamic",
    rounds: Annotated[int, typer.Option(help="interleaved rounds")] = 10,
    calls: Annotated[int, typer.Option(help="batch-1 calls per model per round")] = 5,
    threads: Annotated[int, typer.Option(help="threads for PyTorch and ONNX Runtime")] = 1,
) -> None:
    """Batch-1 latency and batch-32 throughput: teacher, student PyTorch/ONNX/INT8, interleaved."""
    _needs("export")
    from dermkit.deploy.latency import bench_latency, markdown_table, write_latency

    if int8 not in ("dynamic", "static"):
        _fail(f"--int8 must be dynamic or static, got '{int8}'")
    try:
        result = bench_latency(
            teacher, student, int8=int8, rounds=rounds, calls=calls, threads=threads
        )
    except _user_errors() as e:
        _fail(str(e))
    write_latency(result, out)
    print(markdown_table(result))


# --------------------------------------------------------------------------- serve (issue 10)


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="export folder, or a run folder (exported once)")],
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="DERMKIT_API_KEY", help="require X-API-Key on /predict")
    ] = None,
    exits: Annotated[Path | None, typer.Option(help="`dermkit exits export` folder")] = None,
    int8: Annotated[str | None, typer.Option(help="serve the dynamic or static INT8 file")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest image upload (MB)")] = 10.0,
    timeout: Annotated[float, typer.Option(help="whole-request timeout (s)")] = 30.0,
    workers: Annotated[int | None, typer.Option(help="concurrent decodes + inferences")] = None,
    decode_queue: Annotated[int, typer.Option(help="requests waiting for a worker")] = 64,
    header_timeout: Annotated[float, typer.Option(help="request-header read timeout (s)")] = 10.0,
    max_connections: Annotated[int, typer.Option(help="open connections at most")] = 128,
) -> None:
    """FastAPI server + web page: /predict, /health, /model-card, in-browser inference."""
    _needs("serve", "export")
    import uvicorn

    from dermkit.deploy.http_protocol import uvicorn_config
    from dermkit.deploy.inference import ModelFolderError
    from dermkit.deploy.server import create_app, resolve_model_dir

    files = {
        None: "model.onnx",
        "dynamic": "model.int8-dynamic.onnx",
        "static": "model.int8-static.onnx",
    }
    if int8 not in files:
        _fail(f"--int8 must be dynamic or static, got '{int8}'")
    try:
        app_ = create_app(
            resolve_model_dir(run),
            api_key=api_key,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            request_timeout_s=timeout,
            workers=workers,
            decode_queue=decode_queue,
            exits_dir=exits,
            model_file=files[int8],
        )
        config = uvicorn_config(
            app_,
            host,
            port,
            header_timeout_s=header_timeout,
            max_connections=max_connections,
        )
    except (*_user_errors(), ModelFolderError, ValueError) as e:
        _fail(str(e))
    console.print(f"serving on http://{host}:{port}/ (API docs: /docs)", highlight=False)
    uvicorn.Server(config).run()


@bench_app.command("serve")
def bench_serve_cmd(
    run: Annotated[Path, typer.Argument(help="export folder or run folder to serve")],
    requests: Annotated[int, typer.Option(help="requests to send (bounded)")] = 2000,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 16,
    image: Annotated[Path | None, typer.Option(help="image to send (default: built-in)")] = None,
    max_seconds: Annotated[float, typer.Option(help="stop sending after this long")] = 600.0,
    out: Annotated[Path, typer.Option(help="folder for serve.json")] = Path("runs/bench/serve"),
) -> None:
    """Load test of `dermkit serve` on loopback: p50/p99 latency and failed requests."""
    _needs("serve", "export")
    import json

    from dermkit.deploy.loadtest import bench_serve, markdown_row, write_bench

    try:
        result = bench_serve(run, requests, concurrency, image, max_seconds=max_seconds)
    except (*_user_errors(), RuntimeError, TimeoutError, ValueError) as e:
        _fail(str(e))
    write_bench(result, out)
    console.print(json.dumps(result["latency_ms"], indent=2), highlight=False)
    print(markdown_row(result), end="")
    if result["failed"]:
        _fail(f"{result['failed']} of {result['requests']} requests failed", code=1)


@bench_app.command("soak")
def bench_soak_cmd(
    run: Annotated[Path, typer.Argument(help="export folder or run folder to serve")],
    junk: Annotated[int, typer.Option(help="concurrent junk uploads")] = 60,
    junk_mb: Annotated[float, typer.Option(help="size of each junk upload (MB)")] = 10.0,
    slow: Annotated[int, typer.Option(help="slow-header connections")] = 100,
    requests: Annotated[int, typer.Option(help="normal requests after the attacks")] = 2000,
    concurrency: Annotated[int, typer.Option(help="normal requests in flight")] = 16,
    header_timeout: Annotated[float, typer.Option(help="the server's header timeout (s)")] = 10.0,
    max_seconds: Annotated[float, typer.Option(help="time bound of each phase (s)")] = 600.0,
    out: Annotated[Path, typer.Option(help="folder for soak.json")] = Path("runs/bench/serve"),
) -> None:
    """Hostile loopback soak of `dermkit serve`: junk uploads, slow headers, then load."""
    from dermkit.core.files import write_json_atomic
    from dermkit.deploy.soak import markdown_summary, soak_serve

    try:
        result = soak_serve(
            run, junk, junk_mb, slow, requests, concurrency, header_timeout, max_seconds=max_seconds
        )
    except (*_user_errors(), RuntimeError, TimeoutError, ValueError) as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "soak.json", result)
    print(markdown_summary(result), end="")
    if not result["passed"]:
        failed = [name for name, ok in result["checks"].items() if not ok]
        _fail(f"soak checks failed: {', '.join(failed)} (details in {out / 'soak.json'})", code=1)


# --------------------------------------------------------------------------- pretrain (SSL)

pretrain_app = typer.Typer(
    help="Self-supervised domain pretraining (MAE on a ViT, or a convolutional VAE).",
    no_args_is_help=True,
)
app.add_typer(pretrain_app, name="pretrain")


def _weights_errors():
    from dermkit.models.weights import WeightsError

    return (*_user_errors(), WeightsError)


@pretrain_app.command("mae")
def pretrain_mae(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Masked-autoencoder pretraining; the run folder then serves as model.weights."""
    from dermkit.config import MaePretrainRunConfig, load_config
    from dermkit.ssl.pretrain import run_pretrain_mae

    try:
        cfg = load_config(MaePretrainRunConfig, "pretrain_mae", preset, config, overrides or [])
        report = run_pretrain_mae(cfg, resume=resume)
    except _weights_errors() as e:
        _fail(str(e))
    print(report)


@pretrain_app.command("vae")
def pretrain_vae(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Convolutional VAE pretraining; its encoder (vae_encoder_*) serves as model.weights."""
    from dermkit.config import VaePretrainRunConfig, load_config
    from dermkit.ssl.pretrain import run_pretrain_vae

    try:
        cfg = load_config(VaePretrainRunConfig, "pretrain_vae", preset, config, overrides or [])
        report = run_pretrain_vae(cfg, resume=resume)
    except _weights_errors() as e:
        _fail(str(e))
    print(report)


@app.command()
def probe(
    weights: Annotated[str, typer.Option(help="encoder weights: a run folder or a file")],
    model: Annotated[
        str | None, typer.Option(help="backbone name (default: the run's encoder.json)")
    ] = None,
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    k: Annotated[int, typer.Option(help="neighbours of the k-NN probe")] = 20,
) -> None:
    """Linear-probe and k-NN macro-F1 (val and test) of any encoder's frozen features.

    The data comes from the finetune config (preset, --config, data.* overrides).
    """
    import json

    import torch

    from dermkit.config import FinetuneRunConfig, load_config
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.prepare import prepare_data
    from dermkit.eval.probe import probe_encoder
    from dermkit.models.backbones import create_backbone
    from dermkit.models.weights import load_pretrained

    try:
        cfg = load_config(FinetuneRunConfig, "finetune", preset, config, overrides or [])
        info = Path(weights) / "encoder.json"
        if model is None and info.is_file():
            model = json.loads(info.read_text())["backbone"]
        if model is None:
            _fail(f"--model is needed: {weights} has no encoder.json naming its backbone")
        encoder = create_backbone(model, num_classes=0, img_size=cfg.data.image_size)
        report = load_pretrained(encoder, weights)
        data = prepare_data(cfg.data)
        parts = ("train", "val", "test")
        sets = {s: CachedImageDataset(data.cache, data.part(s), data.classes) for s in parts}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = probe_encoder(
            encoder.to(device), sets["train"], sets["val"], sets["test"], k=k, seed=cfg.seed
        )
    except _weights_errors() as e:
        _fail(str(e))
    if not report.ok:
        console.print(f"[yellow]warning:[/] incomplete weights\n{report}", highlight=False)
    result = {"model": model, "weights": str(weights), "weights_ok": report.ok, **result}
    print(json.dumps(result, indent=2))


@bench_app.command("mae")
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
    from dermkit.config import MaePretrainRunConfig, load_config
    from dermkit.runs import machine_info

    try:
        cfg = load_config(MaePretrainRunConfig, "pretrain_mae", preset, config, overrides or [])
        if attention not in ("timm", "fused", "math"):
            _fail(f"--attention must be timm, fused or math, got '{attention}'")
        result = bench_mae(cfg, steps=steps, rounds=rounds, attention=attention)
    except _weights_errors() as e:
        _fail(str(e))
    print(json.dumps(result | {"machine": machine_info()}, indent=2))


# --------------------------------------------------------------------------- exits (issue 7)

exits_app = typer.Typer(
    help="Early exits: heads after ViT blocks, calibrated exit thresholds, benchmarks.",
    no_args_is_help=True,
)
app.add_typer(exits_app, name="exits")


def _exits_errors():
    from dermkit.models.weights import WeightsError

    return (*_user_errors(), WeightsError)


@exits_app.command("train")
def exits_train(
    run: Annotated[Path, typer.Argument(help="classifier run folder (finetune or distill)")],
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Train exit heads (frozen backbone, or jointly) of every configured head type."""
    _needs("exits")
    from dermkit.config import ExitsRunConfig, load_config
    from dermkit.exits.train import run_exits_train

    try:
        items = [*(overrides or []), f"base_run={run}"]
        cfg = load_config(ExitsRunConfig, "exits", preset, config, items)
        out = run_exits_train(cfg, resume=resume)
    except _exits_errors() as e:
        _fail(str(e))
    print(out)


@exits_app.command("calibrate")
def exits_calibrate(
    exit_run: Annotated[Path, typer.Argument(help="exit run folder (dermkit exits train)")],
    objective: Annotated[
        str | None,
        typer.Option(
            help="f1-drop=X, compute=B or latency=B (batch-1 ONNX latency measured here; "
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
    _needs("exits")
    from dermkit.exits.calibrate import run_exits_calibrate

    if measure not in (None, "max_prob", "margin", "neg_entropy"):
        _fail(f"--measure must be max_prob, margin or neg_entropy, got '{measure}'")
    if compute not in (None, "gflops", "blocks"):
        _fail(f"--compute must be gflops or blocks, got '{compute}'")
    try:
        out = run_exits_calibrate(exit_run, objective, protect, measure, compute)
    except _exits_errors() as e:
        _fail(str(e))
    print(out)


@exits_app.command("bench")
def exits_bench(
    exit_run: Annotated[Path, typer.Argument(help="calibrated exit run folder")],
    rounds: Annotated[int | None, typer.Option(help="interleaved wall-time rounds")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size of the timing")] = None,
    max_images: Annotated[int | None, typer.Option(help="test images timed")] = None,
) -> None:
    """Test accuracy vs compute per head type, exit distribution, wall time vs plain."""
    _needs("exits")
    from dermkit.exits.bench import run_exits_bench

    try:
        report = run_exits_bench(exit_run, rounds, batch_size, max_images)
    except _exits_errors() as e:
        _fail(str(e))
    print(report)


@exits_app.command("latency")
def exits_latency(
    exit_run: Annotated[Path, typer.Argument(help="calibrated exit run folder")],
    head: Annotated[str, typer.Option(help="head type")],
    images: Annotated[int, typer.Option(help="test images timed, one at a time")] = 300,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads")] = 2,
) -> None:
    """Batch-1 ONNX latency: exit model vs plain model, interleaved, + per-part overhead."""
    from dermkit.exits.latency_bench import run_exits_latency

    try:
        r = run_exits_latency(exit_run, head, images, threads)
    except (*_exits_errors(), ValueError) as e:
        _fail(str(e))
    ms, f1 = r["ms_per_image"], r["test_macro_f1"]
    print(
        f"{head}: plain {ms['plain']:.3f} ms, exits {ms['exits']:.3f} ms per image "
        f"(ratio {r['ratio_exits_over_plain']:.3f}); test macro-F1 plain {f1['plain']:.4f}, "
        f"exits {f1['exits']:.4f}; {r['path']}"
    )


@exits_app.command("export")
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
    _needs("exits", "export")
    from dermkit.exits.onnx_segments import export_segments
    from dermkit.exits.run_io import ExitRun

    try:
        run = ExitRun.open(exit_run)
        policy = run.policy(head)
        if fused:
            export_segments(
                run.model(head), out, run.info["img_size"], policy=policy, class_names=run.classes
            )
        else:
            export_segments(run.model(head), out, run.info["img_size"])
            policy.save(out / "policy.json", run.classes)
    except (*_exits_errors(), ValueError) as e:
        _fail(str(e))
    print(out)


# --------------------------------------------------------------------------- synth (issue 5)

synth_app = typer.Typer(
    help="Class-conditional latent diffusion: autoencoder, diffusion, sampling, quality.",
    no_args_is_help=True,
)
app.add_typer(synth_app, name="synth")


def _synth_errors():
    from dermkit.models.weights import WeightsError
    from dermkit.synth.encoders import EncoderError

    return (*_user_errors(), WeightsError, EncoderError)


@synth_app.command("autoencoder")
def synth_autoencoder(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Train the KL autoencoder (diffusers AutoencoderKL) on the train split's images."""
    _needs("synth")
    from dermkit.config import AutoencoderRunConfig, load_config
    from dermkit.synth.autoencoder import train_autoencoder

    try:
        cfg = load_config(
            AutoencoderRunConfig, "synth_autoencoder", preset, config, overrides or []
        )
        report = train_autoencoder(cfg, resume=resume)
    except _synth_errors() as e:
        _fail(str(e))
    print(report)


@synth_app.command("diffusion")
def synth_diffusion(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    autoencoder: Annotated[
        Path | None, typer.Option(help="autoencoder run folder (overrides the config)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
) -> None:
    """Train the class-conditional latent diffusion UNet (DDPM, label dropout for CFG)."""
    _needs("synth")
    from dermkit.config import DiffusionRunConfig, load_config
    from dermkit.synth.diffusion import train_diffusion

    extra = [f"autoencoder={autoencoder}"] if autoencoder else []
    try:
        cfg = load_config(
            DiffusionRunConfig, "synth_diffusion", preset, config, [*(overrides or []), *extra]
        )
        report = train_diffusion(cfg, resume=resume)
    except _synth_errors() as e:
        _fail(str(e))
    print(report)


@synth_app.command("sample")
def synth_sample(
    generator: Annotated[Path, typer.Argument(help="synth diffusion run folder")],
    overrides: Overrides = None,
    balance: Annotated[
        str | None,
        typer.Option(
            help="'uniform' (default) or a JSON file: per-class totals, shares or generate counts"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default runs/synth-samples)")
    ] = None,
    preset: Preset = None,
    config: ConfigFile = None,
) -> None:
    """Generate a class-balanced synthetic set (resumable) and its manifest."""
    _needs("synth")
    from dermkit.config import SampleConfig, load_config
    from dermkit.synth.sample import run_sample

    extra = [f"generator={generator}"]
    extra += [f"balance={balance}"] if balance else []
    extra += [f"out_dir={out}"] if out else []
    try:
        cfg = load_config(
            SampleConfig, "synth_sample", preset, config, [*(overrides or []), *extra]
        )
        manifest = run_sample(cfg)
    except _synth_errors() as e:
        _fail(str(e))
    print(manifest)


@synth_app.command("quality")
def synth_quality(
    overrides: Overrides = None,
    preset: Preset = None,
    config: ConfigFile = None,
    synthetic: Annotated[Path | None, typer.Option(help="manifest written by synth sample")] = None,
    encoder: Annotated[
        Path | None, typer.Option(help="dermkit run folder giving the feature space")
    ] = None,
) -> None:
    """FD, KID, precision/recall (per class), TSTR vs TRTR and a memorisation check."""
    from dermkit.config import QualityConfig, load_config
    from dermkit.synth.quality import run_quality

    extra = [f"synthetic_manifest={synthetic}"] if synthetic else []
    extra += [f"encoder={encoder}"] if encoder else []
    try:
        cfg = load_config(
            QualityConfig, "synth_quality", preset, config, [*(overrides or []), *extra]
        )
        report = run_quality(cfg)
    except _synth_errors() as e:
        _fail(str(e))
    print(report)


@bench_app.command("sampling")
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
    _needs("synth")
    import json

    import torch

    from dermkit.bench.sampling import bench_sampling
    from dermkit.runs import machine_info

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if generator is not None:
            from dermkit.synth.diffusion import load_generator

            gen = load_generator(generator)
            unet, sched, shape = gen.unet, gen.scheduler_config, gen.latent_shape
            n_classes = len(gen.classes)
        else:
            from dermkit.config import AutoencoderRunConfig, DiffusionRunConfig, load_config
            from dermkit.synth.diffusion import build_unet, training_scheduler

            ae = load_config(AutoencoderRunConfig, "synth_autoencoder", preset)
            dc = load_config(DiffusionRunConfig, "synth_diffusion", preset)
            side = ae.data.image_size // 2 ** (len(ae.model.block_out_channels) - 1)
            shape = (ae.model.latent_channels, side, side)
            unet = build_unet(dc.unet, shape, n_classes)
            sched = dict(training_scheduler(dc.num_train_timesteps, dc.beta_schedule).config)
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
    except (*_synth_errors(), ValueError) as e:
        _fail(str(e))
    print(json.dumps(result | {"machine": machine_info()}, indent=2))


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: the pipeline's, demo/dermae-tiny)")
    ] = None,
    n_lesions: Annotated[int | None, typer.Option(help="phantom lesions (default 150)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of phantoms, split and training")] = None,
) -> None:
    """The whole pipeline on phantom data (no download): `dermkit run dermae-tiny`."""
    _needs("synth", "exits", "export", "explain")
    from dermkit.demo import run_demo

    try:
        report = run_demo(out, n_lesions=n_lesions, seed=seed)
    except _pipeline_errors() as e:
        _fail(str(e))
    console.print(f"[bold green]demo finished[/]: open {report}")
    print(report)


# --------------------------------------------------------------------------- pipeline (issue 9)


def _pipeline_errors():
    from dermkit.models.weights import WeightsError
    from dermkit.synth.encoders import EncoderError

    return (*_user_errors(), WeightsError, EncoderError)


def _print_plan(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table("stage", "status", "key", "folder")
    for r in rows:
        table.add_row(r["stage"], r["status"], r["key"] or "", r["folder"] or "")
    console.print(table)


@app.command("run")
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
    """Run a pipeline: data -> synth -> pretrain -> teacher -> student -> exits -> export.

    Stages are cached by the hash of their resolved config and inputs: a re-run computes
    only what a change affects, and a killed run resumes where it stopped. Prints the path
    of the summary report.html.
    """
    _needs("synth", "exits", "export", "explain")
    from dermkit.pipeline import load_pipeline, plan_status, run_pipeline
    from dermkit.stages import DERMAE_STAGES

    try:
        cfg = load_pipeline(pipeline, overrides or [])
        if dry_run:
            _print_plan(plan_status(cfg, DERMAE_STAGES, targets=until))
            return
        result = run_pipeline(cfg, DERMAE_STAGES, targets=until, progress=progress)
    except _pipeline_errors() as e:
        _fail(str(e))
    console.print(
        f"[bold green]pipeline {cfg.name} finished[/]: ran {result.executed or 'nothing'}"
    )
    print(result.report)


@bench_app.command("ablation")
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
    _needs("synth", "exits", "export", "explain")
    from dermkit.bench.ablation import (
        load_ablation,
        plan_ablation,
        run_ablation,
        stages_to_compute,
    )

    try:
        ablation = load_ablation(config or f"ablation-{preset or 'cpu'}", out=out)
        ids = [r.strip() for item in rows or [] for r in item.split(",") if r.strip()]
        if dry_run:
            from rich.table import Table

            plans = plan_ablation(ablation, ids, overrides or [])
            table = Table("row", "from stage", "needs (status: key)")
            for row, plan in plans:
                needed = [r for r in plan if r["status"] not in ("off", "not needed")]
                needs = ", ".join(f"{r['stage']} ({r['status']}: {r['key']})" for r in needed)
                if row.ensemble:
                    needs = f"rows {', '.join(row.ensemble)} (weights chosen on val: {row.select})"
                table.add_row(f"{row.id}: {row.name}", row.target or "ensemble", needs)
            console.print(table)
            todo = stages_to_compute(plans)
            console.print(
                f"{len(todo)} stage run(s) to compute in {ablation.out_dir} (shared ones once):"
            )
            for line in todo:
                console.print(f"  {line}", highlight=False)
            return
        table = run_ablation(ablation, ids, overrides or [], latency=latency, progress=progress)
    except _pipeline_errors() as e:
        _fail(str(e))
    print(table.read_text())
    console.print(f"written to {table}")


# --------------------------------------------------------------------------- explain (issue 8)

explain_app = typer.Typer(
    help="What a trained run's encoder encodes and where it looks.", no_args_is_help=True
)
app.add_typer(explain_app, name="explain")
RunArg = Annotated[Path, typer.Argument(help="classifier run folder (finetune or distill)")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="dataset root, if it moved")]
OutOpt = Annotated[Path | None, typer.Option(help="output folder (default: inside the run)")]


@explain_app.command("features")
def explain_features_cmd(
    run: RunArg,
    data: DataOpt = None,
    out: OutOpt = None,
    splits: Annotated[str, typer.Option(help="comma-separated splits")] = "test",
    color_by: Annotated[
        str | None, typer.Option(help="comma-separated manifest columns (default: the usual)")
    ] = None,
    max_images: Annotated[int | None, typer.Option(help="random subset size")] = None,
    umap: Annotated[bool, typer.Option("--umap/--no-umap", help="UMAP when installed")] = True,
    seed: int = 0,
) -> None:
    """PCA/UMAP of frozen penultimate features coloured by manifest columns, with numbers."""
    from dermkit.explain.features import run_explain_features

    try:
        report = run_explain_features(
            run,
            out,
            data,
            splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
            color_by=[c.strip() for c in color_by.split(",")] if color_by else None,
            max_images=max_images,
            seed=seed,
            use_umap=umap,
        )
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    print(report)


@explain_app.command("saliency")
def explain_saliency_cmd(
    run: RunArg,
    data: DataOpt = None,
    out: OutOpt = None,
    split: Annotated[str, typer.Option(help="split whose predictions are explained")] = "test",
    per_class: Annotated[int, typer.Option(help="correct and wrong examples per class")] = 2,
    sanity_images: Annotated[int, typer.Option(help="images in the randomisation check")] = 16,
    random_copies: Annotated[int, typer.Option(help="randomised models averaged")] = 3,
    seed: int = 0,
) -> None:
    """Grad-CAM (+ attention rollout for ViTs) overlays per class, and the sanity check."""
    _needs("explain")
    from dermkit.explain.saliency import run_explain_saliency

    try:
        report = run_explain_saliency(
            run, out, data, split, per_class, sanity_images, seed, random_copies
        )
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    print(report)


# --------------------------------------------------------------------------- thickness (issue 21)

thickness_app = typer.Typer(help="Melanoma thickness (Breslow category).", no_args_is_help=True)
app.add_typer(thickness_app, name="thickness")


@thickness_app.command("study")
def thickness_study_cmd(
    data: Annotated[Path, typer.Option(help="thickness folder (HAM layout + thickness columns)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/thickness"),
    features: Annotated[
        list[str] | None, typer.Option(help="BACKBONE@SIZE[:WEIGHTS][+tta], repeatable")
    ] = None,
    groupings: Annotated[str, typer.Option(help="comma-separated 3class,4class")] = "3class,4class",
    folds: Annotated[int, typer.Option(help="outer stratified folds")] = 5,
    seeds: Annotated[str, typer.Option(help="comma-separated CV seeds")] = "0,1,2",
    inner_folds: Annotated[int, typer.Option(help="inner folds choosing each model")] = 3,
    cs: Annotated[str | None, typer.Option(help="comma-separated probe C grid")] = None,
    gradcam_per_class: Annotated[int, typer.Option(help="Grad-CAM images per category")] = 3,
    random_copies: Annotated[int, typer.Option(help="randomised models (sanity check)")] = 3,
    n_shuffle: Annotated[int, typer.Option(help="shuffled-label controls")] = 200,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates of pooled metrics")] = 1000,
    cache_dir: Annotated[Path | None, typer.Option(help="image cache root")] = None,
    jobs: Annotated[int, typer.Option(help="outer folds run in parallel")] = 1,
) -> None:
    """Nested-CV probes (CORN vs softmax) on frozen features, analyses and report.html."""
    from dermkit.explain.thickness_study import ThicknessStudyConfig, run_thickness_study

    cfg = ThicknessStudyConfig(
        data=data,
        out=out,
        groupings=[g.strip() for g in groupings.split(",") if g.strip()],
        n_folds=folds,
        seeds=tuple(int(s) for s in seeds.split(",") if s.strip()),
        inner_folds=inner_folds,
        gradcam_per_class=gradcam_per_class,
        n_random=random_copies,
        n_shuffle=n_shuffle,
        n_boot=n_boot,
        cache_dir=cache_dir,
        n_jobs=jobs,
    )
    if features:
        cfg.features = list(features)
    if cs:
        cfg.cs = tuple(float(c) for c in cs.split(",") if c.strip())
    try:
        report = run_thickness_study(cfg)
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    print(report)


if __name__ == "__main__":  # pragma: no cover
    app()
