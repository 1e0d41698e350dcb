"""Deployment commands: ``export``, ``serve`` and the latency / load / soak benches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import console, fail, needs, reported


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
    needs("export")
    import json

    from dermkit.deploy.export_folder import export_folder

    if int8 not in (None, "dynamic", "static", "both"):
        fail(f"--int8 must be dynamic, static or both, got '{int8}'")
    with reported():
        result = export_folder(run, out, int8, parity_images, calibration_images)
    console.print(json.dumps(result["files"], indent=2), highlight=False)
    print(out / "model_card.json")


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
    ood: Annotated[
        Path | None,
        typer.Option(help="ood.json of the unfamiliar-image flag (default: beside the model)"),
    ] = None,
) -> None:
    """FastAPI server + web page: /predict, /health, /model-card, in-browser inference.

    The unfamiliar-image flag (``dermkit evaluate RUN --fit-ood``) is served when an
    ``ood.json`` is in the export folder or the source run folder, or given with --ood.
    To serve a model adapted to a new clinic, export the folder that
    ``dermkit evaluate RUN --data DIR --adapt bn,priors --save-adaptation ADAPTED`` wrote
    (``dermkit export ADAPTED --out X``) and serve X.
    """
    needs("serve", "export")
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
        fail(f"--int8 must be dynamic or static, got '{int8}'")
    with reported(ModelFolderError):
        app_ = create_app(
            resolve_model_dir(run),
            api_key=api_key,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            request_timeout_s=timeout,
            workers=workers,
            decode_queue=decode_queue,
            exits_dir=exits,
            model_file=files[int8],
            ood_file=ood,
        )
        config = uvicorn_config(
            app_,
            host,
            port,
            header_timeout_s=header_timeout,
            max_connections=max_connections,
        )
    console.print(f"serving on http://{host}:{port}/ (API docs: /docs)", highlight=False)
    uvicorn.Server(config).run()


def bench_serve_cmd(
    run: Annotated[Path, typer.Argument(help="export folder or run folder to serve")],
    requests: Annotated[int, typer.Option(help="requests to send (bounded)")] = 2000,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 16,
    image: Annotated[Path | None, typer.Option(help="image to send (default: built-in)")] = None,
    max_seconds: Annotated[float, typer.Option(help="stop sending after this long")] = 600.0,
    out: Annotated[Path, typer.Option(help="folder for serve.json")] = Path("runs/bench/serve"),
) -> None:
    """Load test of `dermkit serve` on loopback: p50/p99 latency and failed requests."""
    needs("serve", "export")
    import json

    from dermkit.deploy.loadtest import bench_serve, markdown_row, write_bench

    with reported(RuntimeError, TimeoutError):
        result = bench_serve(run, requests, concurrency, image, max_seconds=max_seconds)
    write_bench(result, out)
    console.print(json.dumps(result["latency_ms"], indent=2), highlight=False)
    print(markdown_row(result), end="")
    if result["failed"]:
        fail(f"{result['failed']} of {result['requests']} requests failed", code=1)


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

    with reported(RuntimeError, TimeoutError):
        result = soak_serve(
            run, junk, junk_mb, slow, requests, concurrency, header_timeout, max_seconds=max_seconds
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "soak.json", result)
    print(markdown_summary(result), end="")
    if not result["passed"]:
        failed = [name for name, ok in result["checks"].items() if not ok]
        fail(f"soak checks failed: {', '.join(failed)} (details in {out / 'soak.json'})", code=1)


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
    needs("export")
    from dermkit.deploy.latency import bench_latency, markdown_table, write_latency

    if int8 not in ("dynamic", "static"):
        fail(f"--int8 must be dynamic or static, got '{int8}'")
    with reported():
        result = bench_latency(
            teacher, student, int8=int8, rounds=rounds, calls=calls, threads=threads
        )
    write_latency(result, out)
    print(markdown_table(result))
