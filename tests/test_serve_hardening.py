"""``dermkit serve`` hardening (issue 23): no server paths in responses, what ``--api-key``
protects, 405 and JSON for protocol errors, header timeouts and the connection limit (on
a real uvicorn with ``dermkit serve``'s protocol), cheap header checks before any decode,
the bounded decode pool, and a small bounded soak (the full-size one is
``dermkit bench soak``)."""

from __future__ import annotations

import io
import json
import re
import socket
import tempfile
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dermkit.deploy import server as server_module
from dermkit.deploy.decode_pool import BoundedPool, PoolFullError
from dermkit.deploy.image_probe import IMAGE_FORMATS, ProbeError, probe_header
from dermkit.deploy.loadtest import BackgroundServer
from dermkit.deploy.redact import redact_text
from dermkit.deploy.server import PUBLIC_PATHS, create_app
from dermkit.deploy.soak import junk_jpeg, soak_serve
from test_serve import JPEG, PNG, _assert_error, _post

# a filesystem path: two or more folders deep (URL paths such as /model/model.onnx are one)
ABSOLUTE = re.compile(r"(^|[\s\"'(=])((/[^\s/\"']+){2,}/|~/|[A-Za-z]:\\)")


def _app(export_dir, **kwargs):
    return create_app(export_dir, **{"request_timeout_s": 600.0, **kwargs})


@pytest.fixture(scope="module")
def client(tiny_export):
    return TestClient(_app(tiny_export))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b"connection: close" not in out.lower():
                break
    return out


def _json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return json.loads(body)


# ----------------------------------------------------------------------------- paths


def test_no_absolute_paths_in_public_responses(client, tiny_export):
    card_file = json.loads((tiny_export / "model_card.json").read_text())
    assert card_file["source_run"].startswith("/")  # what used to leak
    bodies = {
        path: client.get(path).json()
        for path in ("/model-card", "/config", "/health", "/openapi.json")
    }
    bodies["/predict"] = _post(client, JPEG).json()
    bodies["/predict 415"] = _post(client, b"GIF89a....").json()
    for path, body in bodies.items():
        for text in _strings(body):
            assert not ABSOLUTE.search(text), (path, text)
            assert str(tiny_export.parent) not in text, (path, text)
            assert tempfile.gettempdir() not in text, (path, text)
    card = bodies["/model-card"]
    assert card["source_run"] == card_file["source_run"].rstrip("/").rsplit("/", 1)[-1]
    assert card["training_data"]["dataset"] and "/" not in card["training_data"]["dataset"]
    assert card["files"] == card_file["files"]  # names relative to the card stay


def test_redact_text_keeps_ratios_and_urls():
    assert redact_text("split file /srv/a/split.csv, seed 0") == "split file split.csv, seed 0"
    assert redact_text("from ../shared/data/syn.csv") == "from syn.csv"
    for kept in ("train/val/test 0.7/0.15/0.15", "macro-F1 1/7", "https://x.org/a/b"):
        assert redact_text(kept) == kept


# ----------------------------------------------------------------------------- api key


def test_api_key_protects_everything_but_the_page_and_health(tiny_export):
    keyed = TestClient(_app(tiny_export, api_key="k3y"))
    public = ["/", "/app.js", "/core.js", "/style.css", "/config", "/health", "/model/model.onnx"]
    assert {p for p in public if not p.startswith("/model/")} == set(PUBLIC_PATHS)
    for path in public:
        assert keyed.get(path).status_code == 200, path
    for path in ("/model-card", "/docs", "/redoc", "/openapi.json", "/no-such-page"):
        _assert_error(keyed.get(path), 401, "unauthorized")
        assert keyed.get(path, headers={"X-API-Key": "k3y"}).status_code in (200, 404), path
    _assert_error(_post(keyed, JPEG), 401, "unauthorized")
    assert keyed.get("/model-card", headers={"X-API-Key": "k3y"}).json()["classes"]


# ----------------------------------------------------------------------------- protocol


def test_wrong_method_is_405_json(client):
    for method, path, allow in (("GET", "/predict", "POST"), ("POST", "/health", "GET")):
        r = client.request(method, path)
        _assert_error(r, 405, "method_not_allowed")
        assert r.headers["allow"] == allow
    assert client.get("/app.js").status_code == 200  # page files are still served
    _assert_error(client.get("/nothing.js"), 404, "not_found")


def test_malformed_requests_get_json_400(tiny_export):
    with BackgroundServer(_app(tiny_export)) as url:
        port = int(url.rsplit(":", 1)[1])
        for request in (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
            b"NOT AN HTTP REQUEST\r\n\r\n",
        ):
            raw = _raw(port, request)
            assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
            assert _json_body(raw)["error"]["code"] == "bad_request"


def test_slow_and_idle_connections_are_closed_in_time(tiny_export):
    timeout = 1.0
    with BackgroundServer(_app(tiny_export), header_timeout_s=timeout) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        start = time.perf_counter()
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # meanwhile the server answers others
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        for s in slow + idle:
            s.settimeout(timeout + 5)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            closed_after = time.perf_counter() - start
            assert closed_after < timeout + 2, closed_after
            if s in slow:
                assert data.startswith(b"HTTP/1.1 408"), data
                assert _json_body(data)["error"]["code"] == "header_timeout"
            else:
                assert data == b""  # nothing was asked: closed without an answer
            s.close()
        # a keep-alive connection still works for a full request, then is timed out too
        with httpx.Client(base_url=url) as c:
            assert c.get("/health").status_code == 200


def test_connection_limit_answers_json_503(tiny_export):
    with BackgroundServer(_app(tiny_export), max_connections=4) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            data = b""
            while chunk := extra.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 503"), data
        assert _json_body(data)["error"]["code"] == "too_many_connections"
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


# ----------------------------------------------------------------------------- header checks


def test_probe_reads_sizes_of_every_accepted_format():
    rgb = Image.new("RGB", (123, 45), (200, 120, 90))
    for fmt, kwargs in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {})):
        buf = io.BytesIO()
        rgb.save(buf, format=fmt, **kwargs)
        info = probe_header(buf.getvalue())
        assert (info.format, info.width, info.height) == (fmt, 123, 45)
    for kwargs in ({}, {"lossless": True}):
        buf = io.BytesIO()
        rgb.save(buf, format="WEBP", **kwargs)
        assert (probe_header(buf.getvalue()).width, probe_header(buf.getvalue()).height) == (
            123,
            45,
        )
    with pytest.raises(ProbeError, match="no marker within"):
        probe_header(junk_jpeg(1_000_000))
    with pytest.raises(ProbeError, match="truncated"):
        probe_header(PNG[:20])
    assert {f.name for f in IMAGE_FORMATS} == {"JPEG", "PNG", "WEBP"}


def test_junk_and_huge_headers_are_refused_before_any_decode(tiny_export, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("a full decode was attempted")

    monkeypatch.setattr(server_module, "decode_rgb_bytes", no_decode)
    client = TestClient(_app(tiny_export, max_upload_bytes=11_000_000))
    body = _assert_error(_post(client, junk_jpeg(10_000_000)), 422, "invalid_image")
    assert "no marker" in body["message"]
    # a PNG whose IHDR claims 20,000 x 20,000 pixels, and nothing else
    huge = PNG[:16] + (20_000).to_bytes(4, "big") * 2 + PNG[24:33]
    body = _assert_error(_post(client, huge, "h.png"), 413, "image_too_large")
    assert "20000x20000" in body["message"]
    _assert_error(_post(client, PNG[:20], "t.png"), 422, "truncated_image")


def test_config_serves_the_formats_the_api_accepts(client):
    cfg = client.get("/config").json()
    formats = cfg["image_formats"]
    assert [f["mime"] for f in formats] == ["image/jpeg", "image/png", "image/webp"]
    for f, data in zip(formats, (JPEG, PNG)):
        assert all(data[o : o + len(bytes.fromhex(m))] == bytes.fromhex(m) for o, m in f["magic"])
    assert _post(client, JPEG).status_code == 200
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    body = _assert_error(_post(client, gif.getvalue(), "a.gif"), 415)
    assert body["message"] == cfg["unsupported_message"]


# ----------------------------------------------------------------------------- pool


def test_bounded_pool_refuses_when_full_and_frees_slots():
    pool = BoundedPool(workers=1, queue=1)
    gate = threading.Event()
    running = pool.submit(gate.wait, 10)
    queued = pool.submit(lambda: 1)
    with pytest.raises(PoolFullError, match="busy"):
        pool.submit(lambda: 2)
    assert pool.taken == 2
    queued.cancel()  # a queued job that is given up frees its slot at once
    assert pool.taken == 1 and pool.submit(lambda: 3)
    gate.set()
    assert running.result(timeout=5) is True
    pool.shutdown()


def test_busy_pool_is_503_json_and_health_still_answers(tiny_export):
    app = _app(tiny_export, workers=1, decode_queue=1)
    model = app.state.model
    real_predict, gate = model.predict, threading.Event()

    def blocked_predict(rgb):
        gate.wait(30)
        return real_predict(rgb)

    model.predict = blocked_predict
    with BackgroundServer(app) as url:
        results = []

        def post():
            results.append(
                httpx.post(f"{url}/predict", files={"file": ("a.jpg", JPEG)}, timeout=60)
            )

        first = [threading.Thread(target=post) for _ in range(2)]
        for t in first:
            t.start()
        deadline = time.monotonic() + 30
        while app.state.pool.taken < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = httpx.post(f"{url}/predict", files={"file": ("a.jpg", JPEG)}, timeout=30)
        _assert_error(busy, 503, "busy")
        t = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - t < 1
        gate.set()
        for t in first:
            t.join(60)
    assert [r.status_code for r in results] == [200, 200]


# ----------------------------------------------------------------------------- soak


def test_small_soak_json_4xx_health_and_timeouts(tiny_export):
    """The bench's three phases, small: 8 junk uploads of 2 MB, 10 slow-header
    connections (1 s timeout), 40 requests at concurrency 4."""
    result = soak_serve(
        tiny_export,
        junk=8,
        junk_mb=2,
        slow=10,
        requests=40,
        concurrency=4,
        header_timeout_s=1.0,
        health_limit_s=1.0,
        max_seconds=120,
    )
    assert result["junk"]["statuses"] == {"422": 8}
    assert result["junk"]["health_polls"] >= 1
    assert result["slow_headers"]["json_408"] == 10
    assert result["load"]["failed"] == 0
    assert result["passed"], result["checks"]
