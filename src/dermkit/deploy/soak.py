"""``dermkit bench soak``: hostile load on ``dermkit serve`` over loopback, bounded.

Three phases against one server process (``python -m dermkit.cli serve``), each bounded in
count and time, only ever on 127.0.0.1:

1. **junk**: ``junk`` concurrent uploads of ``junk_mb`` MB each, a real JPEG header
   (SOI + APP0) followed by zeros, while ``/health`` is polled every 100 ms by a separate
   process (:func:`probe_health`; polled from the uploading client's own event loop, the
   latency measured would be mostly the client's, busy sending 600 MB). Every answer must
   be a JSON 4xx and ``/health`` must answer within ``health_limit_s`` throughout.
2. **slow headers**: ``slow`` connections that send half a request head and stop. Each
   must be closed by the server within its header timeout (plus ``close_slack_s``).
3. **normal load**: ``requests`` valid images at ``concurrency`` in flight
   (:func:`dermkit.deploy.loadtest._hammer`): 0 failures, latency percentiles.

Any 5xx, non-JSON answer or transport error counts as a failure of its phase.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dermkit.deploy.loadtest import (
    LOOPBACK,
    _hammer,
    free_port,
    sample_image,
    start_server,
    stop_server,
    wait_healthy,
)

PARTIAL_HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def junk_jpeg(size: int) -> bytes:
    """``size`` bytes: a real JPEG's SOI + APP0 segment, then zeros (no frame header)."""
    head = sample_image()[:20]
    return head + bytes(max(0, size - len(head)))


def probe_health(url: str, max_seconds: float, interval_s: float = 0.1) -> None:
    """GET ``url/health`` every ``interval_s`` until killed or ``max_seconds``; prints one
    line per poll, ``ok SECONDS`` or ``fail SECONDS REASON`` (run in its own process)."""
    import httpx

    end = time.monotonic() + max_seconds
    with httpx.Client(base_url=url, timeout=max(5.0, interval_s)) as client:
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                r = client.get("/health")
                ok, why = (
                    r.status_code == 200 and r.json()["status"] == "ok",
                    f"HTTP {r.status_code}",
                )
            except Exception as e:  # any failure to answer is what is counted
                ok, why = False, f"{type(e).__name__}: {e}"
            line = (
                f"ok {time.perf_counter() - t:.4f}"
                if ok
                else f"fail {time.perf_counter() - t:.4f} {why}"
            )
            print(line, flush=True)
            time.sleep(interval_s)


class HealthProber:
    """``with HealthProber(url) as polls: ...``: :func:`probe_health` in a child process
    while the block runs; ``polls`` then holds ``(ok, seconds, reason)`` per poll."""

    def __init__(self, url: str, max_seconds: float):
        self.url, self.max_seconds, self.polls = url, max_seconds, []

    def __enter__(self) -> list:
        code = "import sys; from dermkit.deploy.soak import probe_health as p; "
        code += "p(sys.argv[1], float(sys.argv[2]))"
        cmd = [sys.executable, "-c", code, self.url, str(self.max_seconds)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()  # polling has started (imports done)
        self._lines = [first]
        return self.polls

    def __exit__(self, *exc) -> None:
        # One more poll that ends after the block: a block shorter than the polling interval
        # (cheap junk rejections) would otherwise leave no poll to judge /health by.
        self._lines.append(self.proc.stdout.readline())
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        for line in [*self._lines[1:], *out.splitlines()]:  # the first poll preceded the block
            kind, seconds, *why = line.split(" ", 2)
            self.polls.append((kind == "ok", float(seconds), why[0] if why else ""))


async def junk_phase(url: str, n: int, size: int, max_seconds: float = 300) -> dict:
    """``n`` concurrent junk uploads of ``size`` bytes, with /health polled meanwhile."""
    import httpx

    data = junk_jpeg(size)
    statuses: Counter = Counter()
    bad: list[str] = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)

    async def upload(client):
        try:
            r = await client.post("/predict", files={"file": ("junk.jpg", data, "image/jpeg")})
            statuses[r.status_code] += 1
            if not (400 <= r.status_code < 500 and "error" in r.json()):
                bad.append(f"HTTP {r.status_code}: {r.text[:200]}")
        except Exception as e:  # a non-JSON body or a transport error: a failure
            bad.append(f"{type(e).__name__}: {e}")

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=max_seconds) as uploads:
        with HealthProber(url, max_seconds) as polls:
            start = time.perf_counter()
            jobs = asyncio.gather(*(upload(uploads) for _ in range(n)))
            await asyncio.wait_for(jobs, max_seconds)
            wall = time.perf_counter() - start
    lat = [t for _, t, _ in polls] or [float("nan")]
    return {
        "uploads": n,
        "upload_bytes": size,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": len(bad),
        "failures": bad[:10],
        "wall_s": wall,
        "health_polls": len(polls),
        "health_failed": sum(not ok for ok, _, _ in polls),
        "health_errors": [why for ok, _, why in polls if not ok][:5],
        "health_max_s": float(max(lat)),
        "health_p99_s": float(np.percentile(lat, 99)),
    }


async def _one_slow(port: int, limit_s: float) -> tuple[float | None, bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    start = time.perf_counter()
    writer.write(PARTIAL_HEAD)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                received += chunk
        closed_after = time.perf_counter() - start
    except (TimeoutError, ConnectionError):
        closed_after = None if not received else time.perf_counter() - start
    finally:
        writer.close()
    return closed_after, received


async def slow_header_phase(port: int, n: int, header_timeout_s: float, slack_s: float) -> dict:
    """``n`` connections that never finish their headers; when the server closed each."""
    results = await asyncio.gather(*(_one_slow(port, header_timeout_s + slack_s) for _ in range(n)))
    closed = [t for t, _ in results if t is not None]
    answers = Counter(data.split(b" ", 2)[1].decode() if data else "none" for _, data in results)
    json_408 = sum(b'"code": "header_timeout"' in data for _, data in results)
    return {
        "connections": n,
        "closed": len(closed),
        "held_open": n - len(closed),
        "max_close_s": max(closed) if closed else None,
        "header_timeout_s": header_timeout_s,
        "answers": dict(answers),
        "json_408": json_408,
    }


def soak_serve(
    run: str | Path,
    junk: int = 60,
    junk_mb: float = 10.0,
    slow: int = 100,
    requests: int = 2000,
    concurrency: int = 16,
    header_timeout_s: float = 10.0,
    health_limit_s: float = 1.0,
    close_slack_s: float = 2.0,
    max_seconds: float = 600.0,
    server_args: list[str] | None = None,
) -> dict:
    """Run the three phases against a fresh server; a JSON-ready report with ``passed``."""
    from dermkit.runs import machine_info

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    args = ["--header-timeout", f"{header_timeout_s:g}", *(server_args or [])]
    proc = start_server(run, port, args)
    try:
        wait_healthy(url, proc)
        junk_report = asyncio.run(junk_phase(url, junk, int(junk_mb * 1_000_000), max_seconds))
        slow_report = asyncio.run(slow_header_phase(port, slow, header_timeout_s, close_slack_s))
        latencies, failures, wall = asyncio.run(
            _hammer(url, sample_image(), requests, concurrency, max_seconds, {})
        )
    finally:
        stop_server(proc)
    ms = np.asarray(latencies) * 1e3
    load = {
        "requests": len(latencies),
        "requested": requests,
        "concurrency": concurrency,
        "failed": len(failures),
        "failures": failures[:10],
        "latency_ms": {q: float(np.percentile(ms, int(q[1:]))) for q in ("p50", "p90", "p99")},
        "throughput_rps": len(latencies) / wall,
    }
    checks = {
        "junk_all_json_4xx": junk_report["failed"] == 0,
        "health_within_limit": junk_report["health_failed"] == 0
        and junk_report["health_max_s"] < health_limit_s,
        "slow_headers_closed_in_time": slow_report["held_open"] == 0
        and slow_report["max_close_s"] <= header_timeout_s + close_slack_s,
        "load_no_failures": load["failed"] == 0 and load["requests"] == requests,
    }
    return {
        "run": str(run),
        "junk": junk_report,
        "slow_headers": slow_report,
        "load": load,
        "health_limit_s": health_limit_s,
        "checks": checks,
        "passed": all(checks.values()),
        "note": "client and server on the same machine over loopback (they share the cores)",
        "machine": machine_info(),
    }


def markdown_summary(result: dict) -> str:
    j, s, load = result["junk"], result["slow_headers"], result["load"]
    lat = load["latency_ms"]
    return (
        "| phase | result |\n|---|---|\n"
        f"| {j['uploads']} junk uploads of {j['upload_bytes'] / 1e6:g} MB | answers "
        f"{j['statuses']}, failed {j['failed']}; /health max {j['health_max_s'] * 1e3:.0f} ms "
        f"over {j['health_polls']} polls ({j['health_failed']} failed) |\n"
        f"| {s['connections']} slow-header connections | {s['closed']} closed, last after "
        f"{s['max_close_s'] or float('nan'):.2f} s (timeout {s['header_timeout_s']:g} s); "
        f"answers {s['answers']} |\n"
        f"| {load['requests']} requests at concurrency {load['concurrency']} | failed "
        f"{load['failed']}; p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 "
        f"{lat['p99']:.1f} ms; {load['throughput_rps']:.0f} req/s |\n"
    )
