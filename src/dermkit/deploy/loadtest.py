"""``dermkit bench serve``: a bounded load test of ``dermkit serve`` on loopback.

The server runs as its own process (``python -m dermkit.cli serve``, as in production), so
client and server do not share a GIL; on a 2-core machine they still share the cores,
which the report states. The client is one ``httpx.AsyncClient`` keeping ``concurrency``
requests in flight until ``requests`` have been sent: the loop is bounded in count and by
``max_seconds``, and only ever talks to 127.0.0.1. A request fails unless it returns 200
with a probability vector. Latency is per request, client-side, upload included.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dermkit.core.files import write_json_atomic

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on loopback (bound by port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def sample_image(seed: int = 0) -> bytes:
    """A 160x120 phantom-like JPEG (HAM10000's shared size): a dark blob on skin tone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:120, 0:160]
    r = np.hypot((xx - 80) / 45, (yy - 60) / 35)
    skin = np.array([224, 172, 150], np.float64)
    lesion = np.array([110, 70, 55], np.float64)
    w = np.clip(1.3 - r, 0, 1)[..., None]
    img = skin * (1 - w) + lesion * w + rng.normal(0, 6, (120, 160, 1))
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(img, 0, 255))).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


class BackgroundServer:
    """Serve an ASGI app with uvicorn in a daemon thread on 127.0.0.1 (tests, the demo).

    ``with BackgroundServer(app) as url: ...``: the server is up when the block starts and
    shut down (open connections closed) when it ends. It runs with ``dermkit serve``'s
    connection limits (:func:`dermkit.deploy.http_protocol.uvicorn_config`); ``limits``
    overrides them (``header_timeout_s``, ``keep_alive_s``, ``max_connections``).
    """

    def __init__(self, app, port: int | None = None, start_timeout_s: float = 60, **limits):
        import uvicorn

        from dermkit.deploy.http_protocol import uvicorn_config

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn_config(app, LOOPBACK, self.port, **limits))
        self.start_timeout_s = start_timeout_s
        self.url = f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(run: str | Path, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    """``dermkit serve RUN`` on 127.0.0.1:port in a child process."""
    cmd = [sys.executable, "-m", "dermkit.cli", "serve", str(run), "--host", LOOPBACK]
    cmd += ["--port", str(port), *(extra or [])]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a :func:`start_server` process (killed after 15 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    """Poll ``url/health`` until it answers 200; raise if the process died or time ran out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s")


async def _hammer(
    url: str, image: bytes, n: int, concurrency: int, max_seconds: float, headers: dict
) -> tuple[list[float], list[str], float]:
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    next_index = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker():
            nonlocal next_index
            while next_index < n and time.monotonic() < deadline:
                next_index += 1
                t = time.perf_counter()
                try:
                    r = await client.post(
                        "/predict", files={"file": ("image.jpg", image)}, headers=headers
                    )
                    ok = r.status_code == 200 and len(r.json().get("probabilities", [])) > 0
                    if not ok:
                        failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, failures, wall


def bench_serve(
    run: str | Path,
    requests: int = 2000,
    concurrency: int = 16,
    image: str | Path | None = None,
    warmup: int = 20,
    max_seconds: float = 600.0,
    server_args: list[str] | None = None,
) -> dict:
    """Start the server, send ``warmup`` then ``requests`` requests; latency percentiles.

    Returns a JSON-ready dict: requests sent/failed, p50/p90/p99/max latency (ms),
    throughput (requests/s), settings, and the machine.
    """
    import httpx

    from dermkit.runs import machine_info

    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    data = Path(image).read_bytes() if image else sample_image()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    headers = {}
    api_key = os.environ.get("DERMKIT_API_KEY")
    if api_key:
        headers["X-API-Key"] = api_key
    proc = start_server(run, port, server_args)
    try:
        wait_healthy(url, proc)
        for _ in range(warmup):
            r = httpx.post(
                f"{url}/predict", files={"file": ("w.jpg", data)}, headers=headers, timeout=60
            )
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request failed: HTTP {r.status_code} {r.text[:300]}")
        latencies, failures, wall = asyncio.run(
            _hammer(url, data, requests, concurrency, max_seconds, headers)
        )
    finally:
        stop_server(proc)
    ms = np.asarray(latencies) * 1e3
    return {
        "run": str(run),
        "requests": len(latencies),
        "requested": requests,
        "failed": len(failures),
        "failures": failures[:10],
        "concurrency": concurrency,
        "image_bytes": len(data),
        "image": str(image) if image else "built-in 160x120 JPEG",
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
        },
        "throughput_rps": len(latencies) / wall,
        "wall_s": wall,
        "note": "client and server on the same machine over loopback (they share the cores)",
        "machine": machine_info(),
    }


def markdown_row(result: dict) -> str:
    lat = result["latency_ms"]
    return (
        "| requests | concurrency | failed | p50 (ms) | p90 (ms) | p99 (ms) | req/s |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['requests']} | {result['concurrency']} | {result['failed']} "
        f"| {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} "
        f"| {result['throughput_rps']:.0f} |\n"
    )


def write_bench(result: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(out_dir / "serve.json", result)
