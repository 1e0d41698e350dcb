"""``dermkit serve``: /predict against a reference pipeline, the OpenAPI schema, hostile input
(oversize, truncated, non-image, bombs, path-like names, API key, timeouts), a hypothesis
fuzz with zero server errors, early exits, saliency, and a small bounded load test."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import socket
import struct
import time
import zlib

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from dermkit.cli import app as cli_app
from dermkit.data.cache import resize_short_side_center_crop
from dermkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dermkit.deploy.image_probe import sniff_image_type
from dermkit.deploy.inference import MESSAGES, ModelFolderError, ServedModel
from dermkit.deploy.loadtest import BackgroundServer, bench_serve, sample_image
from dermkit.deploy.redact import public_card
from dermkit.deploy.server import create_app, resolve_model_dir
from dermkit.eval.calibration import DecisionRule

JPEG = sample_image(0)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(Image.open(io.BytesIO(JPEG)).convert("RGB"))


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(JPEG)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 10_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (100 M at 10,000) in about 12 KB."""
    rows = (b"\x00" + bytes((side + 7) // 8)) * side
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def _app(export_dir, **kwargs):
    """The app with a generous request timeout: a loaded CI machine must not turn a slow
    first saliency call (torch import) into a 503; the timeout has its own test."""
    return create_app(export_dir, **{"request_timeout_s": 600.0, **kwargs})


@pytest.fixture(scope="module")
def served(tiny_export):
    return _app(tiny_export)


@pytest.fixture(scope="module")
def client(served):
    return TestClient(served)


def _post(client, data: bytes, name: str = "image.jpg", ctype: str = "image/jpeg", **kw):
    return client.post("/predict", files={"file": (name, data, ctype)}, **kw)


def _assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["status"] == status and body["message"]
    if code:
        assert body["code"] == code, body
    return body


# ----------------------------------------------------------------------------- answers


def reference_probs(export_dir, data: bytes) -> np.ndarray:
    """The pipeline written out by hand: PIL decode, cache resize, float32 norm, ORT, rule."""
    card = json.loads((export_dir / "model_card.json").read_text())
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    crop = resize_short_side_center_crop(rgb, card["preprocessing"]["image_size"])
    x = crop.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    session = ort.InferenceSession(str(export_dir / "model.onnx"))
    logits = session.run(None, {"image": (x - mean) / std})[0]
    post = card["postprocessing"]
    return DecisionRule(post["temperature"], post["class_scales"]).probs(logits)[0]


def test_predict_matches_the_reference_pipeline(client, tiny_export):
    classes = json.loads((tiny_export / "model_card.json").read_text())["classes"]
    for data in (JPEG, PNG, _webp()):
        r = _post(client, data)
        assert r.status_code == 200, r.text
        body = r.json()
        probs = np.asarray(body["probabilities"])
        np.testing.assert_allclose(probs, reference_probs(tiny_export, data), atol=1e-6)
        assert body["classes"] == classes and probs.sum() == pytest.approx(1.0)
        assert body["top_class"] == classes[int(probs.argmax())]
        assert body["confidence"] == pytest.approx(probs.max())
        assert body["exit"] == {"index": 0, "name": "final", "blocks": None, "of": 1}
        assert body["image"]["width"] == 160 and body["image"]["height"] == 120
        assert "not diagnose" in body["not_a_diagnosis"]
        assert body["message"] == MESSAGES[body["advice"]]
        assert body["saliency_png_base64"] is None


def test_summary_levels_and_advice(tiny_export):
    model = ServedModel(tiny_export, malignant_threshold=0.3, confidence_levels=(0.5, 0.8))
    idx = {c: i for i, c in enumerate(model.classes)}

    def probs(**p):
        out = np.full(len(model.classes), 0.0)
        for k, v in p.items():
            out[idx[k]] = v
        rest = [i for c, i in idx.items() if c not in p]
        out[rest] = (1 - sum(p.values())) / len(rest)
        return out

    sure_nevus = model.summarise(probs(nv=0.9, mel=0.02))
    assert (sure_nevus.uncertainty, sure_nevus.advice) == ("low", "standard")
    unsure = model.summarise(probs(nv=0.4, bkl=0.35, mel=0.01, bcc=0.01, akiec=0.01))
    assert (unsure.uncertainty, unsure.advice) == ("high", "low_confidence")
    assert "not a diagnosis" in unsure.message.lower()
    # a malignant top class, or enough malignant mass behind a benign top class
    assert model.summarise(probs(mel=0.85)).advice == "malignant_suspect"
    behind = model.summarise(probs(nv=0.6, mel=0.2, bcc=0.15))
    assert behind.top_class == "nv" and behind.advice == "malignant_suspect"
    assert behind.malignant_probability == pytest.approx(0.35 + (0.05 / 4))
    assert behind.uncertainty == "moderate"


def test_health_card_config_and_openapi(client, tiny_export):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == 7 and not health["api_key_required"]
    card = client.get("/model-card")
    assert card.json() == public_card(json.loads((tiny_export / "model_card.json").read_text()))
    cfg = client.get("/config").json()
    assert cfg["image_size"] == 32 and cfg["model_url"] == "/model/model.onnx"
    assert cfg["malignant_classes"] == ["akiec", "bcc", "mel"]
    model = client.get(cfg["model_url"])
    assert model.content == (tiny_export / "model.onnx").read_bytes()

    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "401", "413", "415", "422"} <= set(predict["responses"])
    assert {"/health", "/model-card", "/config"} <= set(spec["paths"])
    # schema-driven: a real answer and a real error validate against the published schemas
    for name, response in (
        ("PredictResponse", _post(client, JPEG)),
        ("ErrorResponse", _post(client, b"GIF89a....")),
    ):
        schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
        jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)


def test_saliency_overlay_png(client, tiny_export):
    r = _post(client, JPEG, params={"saliency": "true"})
    assert r.status_code == 200, r.text
    import base64

    png = Image.open(io.BytesIO(base64.b64decode(r.json()["saliency_png_base64"])))
    assert png.format == "PNG" and png.size == (224, 224)
    assert np.asarray(png).std() > 5  # a heat map over the image, not a blank
    no_run = TestClient(_app(tiny_export, saliency_run=tiny_export / "missing"))
    _assert_error(_post(no_run, JPEG, params={"saliency": "true"}), 422, "saliency_unavailable")
    assert _post(no_run, JPEG).status_code == 200


def test_serving_never_unpickles(tiny_export, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = TestClient(_app(tiny_export))
    assert _post(fresh, JPEG, params={"saliency": "true"}).status_code == 200


def test_model_folder_checks(tiny_export, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(tiny_export, changed)
    with (changed / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFolderError, match="SHA-256"):
        create_app(changed)
    with pytest.raises(ModelFolderError, match=r"model_card\.json not found"):
        create_app(tmp_path)
    with pytest.raises(ModelFolderError, match="not one of its files"):
        _app(tiny_export, model_file="../model.onnx")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    for f in tiny_export.iterdir():
        shutil.copy(f, run / "export" / f.name)
    assert resolve_model_dir(tiny_export) == tiny_export
    assert resolve_model_dir(run) == run / "export"
    with pytest.raises(FileNotFoundError, match="neither an export folder"):
        resolve_model_dir(tmp_path / "nothing")


# ----------------------------------------------------------------------------- hostile input


def test_sniffing_ignores_declared_type_and_name():
    assert sniff_image_type(JPEG) == "JPEG" and sniff_image_type(PNG) == "PNG"
    assert sniff_image_type(_webp()) == "WEBP"
    assert sniff_image_type(b"GIF89a") is None and sniff_image_type(b"%PDF-1.7") is None


def test_oversize_uploads_are_413(tiny_export):
    small = TestClient(_app(tiny_export, max_upload_bytes=100_000))
    big = b"\xff\xd8\xff" + bytes(200_000)
    body = _assert_error(_post(small, big), 413, "upload_too_large")
    assert "exceeds the 165,536 byte limit" in body["message"]  # 100,000 + multipart framing

    # chunked (no Content-Length): counted while it arrives
    boundary = "dermkitboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode(),
        *[bytes(50_000)] * 6,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    r = small.post(
        "/predict",
        content=iter(parts),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    _assert_error(r, 413, "upload_too_large")
    # within the request limit but over the file limit: caught on the part itself
    part_only = b"\xff\xd8\xff" + bytes(120_000)
    _assert_error(_post(small, part_only), 413, "upload_too_large")
    assert _post(small, JPEG).status_code == 200


def test_bad_images_are_4xx(client):
    cut_jpeg = JPEG[: len(JPEG) // 2]
    _assert_error(_post(client, cut_jpeg), 422, "truncated_image")
    _assert_error(_post(client, PNG[: len(PNG) - 30], "a.png", "image/png"), 422)
    for data in (b"hello world", b"%PDF-1.7\n...", b"GIF89a\x01\x00\x01\x00", b"<svg></svg>"):
        _assert_error(_post(client, data, "x.png", "image/png"), 415, "unsupported_media_type")
    _assert_error(_post(client, b"", "x.jpg"), 422)
    _assert_error(_post(client, b"\xff\xd8\xff" + bytes(500)), 422, "invalid_image")
    transparent = Image.new("RGBA", (40, 30), (200, 100, 50, 128))
    body = _assert_error(_post(client, _png(transparent), "t.png"), 422, "invalid_image")
    assert "transparency" in body["message"]
    # a declared type that lies is ignored: the bytes decide
    assert _post(client, JPEG, "x.gif", "image/gif").status_code == 200
    assert _post(client, PNG, "x.jpg", "application/octet-stream").status_code == 200


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_and_dimension_limits(client, tiny_export):
    bomb = png_bomb(10_000)
    assert len(bomb) < 50_000
    t = time.perf_counter()
    body = _assert_error(_post(client, bomb, "bomb.png", "image/png"), 413, "image_too_large")
    assert "10000x10000 pixels" in body["message"]
    assert time.perf_counter() - t < 5  # refused from the header, never decoded
    long_side = _png(Image.new("L", (12_000, 2)))
    body = _assert_error(_post(client, long_side, "long.png"), 413, "image_too_large")
    assert "12000x2" in body["message"]
    tight = TestClient(_app(tiny_export, max_image_pixels=10_000))
    _assert_error(_post(tight, JPEG), 413, "image_too_large")  # 160 x 120 = 19,200 pixels


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "a/../../b.jpg", "~/.ssh/x"],
)
def test_path_like_filenames_are_never_used(client, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = _post(client, JPEG).json()["probabilities"]
    r = _post(client, JPEG, name=name)
    assert r.status_code == 200, r.text
    assert r.json()["probabilities"] == reference
    assert "passwd" not in r.text and "win.ini" not in r.text
    assert list(tmp_path.iterdir()) == []
    for path in ("/model/../model_card.json", "/ort/..%2F..%2Fpackage.json", "/etc/passwd"):
        assert client.get(path).status_code == 404


def test_api_key(tiny_export):
    keyed = TestClient(_app(tiny_export, api_key="s3cret-key"))
    _assert_error(_post(keyed, JPEG), 401, "unauthorized")
    _assert_error(_post(keyed, JPEG, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    # the key is checked before the body is read: an oversized anonymous upload is a 401
    huge = keyed.post(
        "/predict",
        content=bytes(11 * 1024 * 1024),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    _assert_error(huge, 401, "unauthorized")
    assert _post(keyed, JPEG, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    assert keyed.get("/health").json()["api_key_required"] is True
    assert keyed.get("/config").json()["api_key_required"] is True


def test_slow_server_is_503_and_slow_upload_is_408(tiny_export):
    app = create_app(tiny_export, request_timeout_s=0.5)
    model = app.state.model
    real_predict = model.predict

    def slow_predict(rgb):
        time.sleep(1.5)
        return real_predict(rgb)

    model.predict = slow_predict
    _assert_error(_post(TestClient(app), JPEG), 503, "timeout")
    model.predict = real_predict

    with (
        BackgroundServer(app) as url,
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s,
    ):
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n"
        )
        s.settimeout(10)
        t = time.perf_counter()
        answer = s.recv(4096)
        while b"\r\n\r\n" in answer and not answer.endswith(b"}"):  # the body may come later
            more = s.recv(4096)
            if not more:
                break
            answer += more
        answer = answer.decode()
        assert time.perf_counter() - t < 5
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"code":"request_timeout"' in answer


# ----------------------------------------------------------------------------- fuzz


def _image_bytes(w: int, h: int, mode: str, fmt: str, seed: int) -> bytes | None:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        image = rgb.convert(mode)
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()
    except (OSError, ValueError, KeyError):
        return None


@st.composite
def uploads(draw):
    kind = draw(st.sampled_from(["random", "magic", "mutated", "truncated", "image"]))
    bases = [JPEG, PNG]
    if kind == "random":
        data = draw(st.binary(max_size=512))
    elif kind == "magic":
        prefix = draw(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP"]))
        data = prefix + draw(st.binary(max_size=512))
    elif kind == "mutated":
        data = bytearray(draw(st.sampled_from(bases)))
        for pos, value in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=12)
        ):
            data[pos] = value
        data = bytes(data)
    elif kind == "truncated":
        base = draw(st.sampled_from(bases))
        data = base[: draw(st.integers(0, len(base)))]
    else:
        data = (
            _image_bytes(
                draw(st.integers(1, 48)),
                draw(st.integers(1, 48)),
                draw(
                    st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA", "I", "F"])
                ),
                draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])),
                draw(st.integers(0, 1000)),
            )
            or b""
        )
    name = draw(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40))
    ctype = draw(st.sampled_from(["image/jpeg", "image/png", "text/plain", "", "x/y; a=b"]))
    saliency = draw(st.sampled_from([None, "false", "0", "maybe", "", "true"]))
    return data, name or "f", ctype or "application/octet-stream", saliency


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(upload=uploads())
def test_fuzz_predict_never_answers_5xx(client, upload):
    data, name, ctype, saliency = upload
    params = {} if saliency is None else {"saliency": saliency}
    r = client.post("/predict", files={"file": (name, data, ctype)}, params=params)
    assert r.status_code < 500, (r.status_code, r.text, data[:40])
    body = r.json()
    if r.status_code == 200:
        assert len(body["probabilities"]) == 7
        assert sum(body["probabilities"]) == pytest.approx(1.0)
    else:
        assert 400 <= r.status_code < 500 and body["error"]["status"] == r.status_code


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    path=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    body=st.binary(max_size=64),
    ctype=st.sampled_from(
        ["application/json", "multipart/form-data", "multipart/form-data; boundary=x"]
    ),
)
def test_fuzz_any_route_never_answers_5xx(served, path, method, body, ctype):
    client = TestClient(served)
    r = client.request(
        method, "/" + path.lstrip("/"), content=body, headers={"content-type": ctype}
    )
    assert r.status_code < 500, (method, path, r.status_code, r.text)


# ----------------------------------------------------------------------------- early exits


def _exit_folder(run_dir, tmp_path, thresholds, protected=()):
    from dermkit.exits.model import EarlyExitModel
    from dermkit.exits.onnx_segments import export_segments
    from dermkit.exits.policy import ExitPolicy
    from dermkit.models.runs_io import load_run_model

    backbone, cfg, classes = load_run_model(run_dir)
    model = EarlyExitModel(backbone, [1], "linear", len(classes))
    torch.manual_seed(0)
    for p in model.heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    folder = export_segments(model.eval(), tmp_path / "exits", cfg.data.image_size)
    ExitPolicy(list(thresholds), temperatures=[0.8, 1.0], protected_classes=list(protected)).save(
        folder / "policy.json", classes
    )
    return folder


def test_early_exits_answer_early_or_as_the_plain_model(
    tiny_classifier_run, tiny_export, client, tmp_path
):
    plain = _post(client, JPEG).json()
    never = _exit_folder(tiny_classifier_run, tmp_path / "never", [2.0])
    body = _post(TestClient(_app(tiny_export, exits_dir=never)), JPEG).json()
    depth = json.loads((never / "segments.json").read_text())["exit_depths"][-1]
    assert body["exit"] == {"index": 1, "name": "final", "blocks": depth, "of": 2}
    np.testing.assert_allclose(body["probabilities"], plain["probabilities"], atol=1e-5)

    always = _exit_folder(tiny_classifier_run, tmp_path / "always", [0.0])
    early_app = _app(tiny_export, exits_dir=always)
    body = _post(TestClient(early_app), JPEG).json()
    assert body["exit"] == {"index": 0, "name": "early exit 1", "blocks": 1, "of": 2}
    # the probabilities are the exit head's softmax at its own temperature (0.8)
    model = early_app.state.model
    _, x = model.preprocess(np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB")))
    seg = ort.InferenceSession(str(always / "segment_0.onnx"))
    logits = seg.run(None, {seg.get_inputs()[0].name: x})[-1][0].astype(np.float64)
    expected = np.exp(logits / 0.8 - (logits / 0.8).max())
    np.testing.assert_allclose(body["probabilities"], expected / expected.sum(), atol=1e-5)
    cfg = TestClient(early_app).get("/config").json()["exits"]
    assert cfg["segments"] == ["/model/segment_0.onnx", "/model/segment_1.onnx"]
    assert cfg["policy"]["thresholds"] == [0.0]


# ----------------------------------------------------------------------------- load


def test_bench_serve_cli_small_load_has_no_failures(tiny_export, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        cli_app,
        [
            "bench",
            "serve",
            str(tiny_export),
            "--requests",
            "60",
            "--concurrency",
            "8",
            "--max-seconds",
            "120",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "serve.json").read_text())
    assert report["requests"] == 60 and report["failed"] == 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert "| 60 | 8 | 0 |" in result.stdout


def test_bench_serve_is_bounded_in_time(tiny_export):
    result = bench_serve(tiny_export, requests=100_000, concurrency=2, warmup=1, max_seconds=2)
    assert 0 < result["requests"] < 100_000 and result["failed"] == 0
