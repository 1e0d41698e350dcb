"""``dermkit serve``: a FastAPI app around one exported model, and the web page it serves.

Endpoints: ``POST /predict`` (multipart ``file``; optional ``?saliency=true``),
``GET /health``, ``GET /model-card``, ``GET /config`` (what the page needs to run the same
model in the browser), ``GET /openapi.json`` + ``/docs``, and the page itself (``/``,
``/app.js``, ``/core.js``, ``/style.css``), the model file(s) under ``/model/NAME`` and
onnxruntime-web under ``/ort/NAME`` from the local npm install (``web/node_modules``; no
CDN). Every served file is looked up by name in a fixed table built at start-up: no request
ever becomes a filesystem path.

Hostile input, in the order a request meets it:

* connection limits (:mod:`dermkit.deploy.http_protocol`, run by ``dermkit serve``): a
  header-read timeout (10 s; JSON 408), idle keep-alive connections closed after 5 s, at
  most 128 open connections (JSON 503), malformed requests a JSON 400;
* the API key (``X-API-Key``, constant-time comparison) when one is configured, before
  the body is read: 401. With a key, every path needs it except :data:`PUBLIC_PATHS` and
  :data:`PUBLIC_PREFIXES`: what the page needs to run the model in the browser (the page,
  ``/config``, ``/model/*``, ``/ort/*``) and ``/health`` (liveness probes). ``/predict``,
  ``/model-card``, ``/docs``, ``/redoc`` and ``/openapi.json`` (and any unknown path)
  need the key;
* a request timeout over the whole request (upload included): 408 while the body is still
  arriving (slow clients), 503 when the server itself was too slow;
* an upload size limit: ``Content-Length`` checked before reading, then bytes counted as
  they arrive (chunked uploads), 413 either way; the multipart part is checked again;
* a cheap header check before any decode (:mod:`dermkit.deploy.image_probe`, a few KiB
  read whatever the size): type from the magic bytes (:data:`IMAGE_FORMATS`, the list the
  page gets from ``/config``; the client's content type and filename are ignored): 415;
  a malformed header: 422; width x height over the pixel limit or a side over the side
  limit: 413;
* decoding and inference in a bounded pool (:class:`BoundedPool`: ``workers`` threads,
  ``decode_queue`` waiting; more is a JSON 503 at once), so the event loop and ``/health``
  stay free; there, a real, full decode restricted to the sniffed format with dermkit's
  decoder (truncation, transparency, modes, bomb guard): 422 / 413.

Memory: an upload is parsed into a spooled temporary file (1 MiB in memory, the rest on
disk) and is read into memory only by its pool job, so upload bytes in memory are at most
``workers x max_upload_bytes`` plus 1 MiB per open connection (128 at most), and decoded
pixels at most ``workers x max_image_pixels x 3`` bytes (plus PIL's working copy). With the
defaults on 2 cores: 2 x 10 MiB + 128 MiB, and 2 x 120 MB of pixels.

No response carries a server path: the model card is served through
:func:`dermkit.deploy.redact.public_card`. Every error is JSON
``{"error": {"status", "code", "message"}}``, a wrong method is a 405 with ``Allow``; bad
input is always 4xx.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from dermkit import __version__
from dermkit.data.images import ImageDecodeError, decode_rgb_bytes
from dermkit.deploy.decode_pool import BoundedPool, PoolFullError
from dermkit.deploy.image_probe import (
    IMAGE_FORMATS,
    UNSUPPORTED_MESSAGE,
    ProbeError,
    probe_header,
)
from dermkit.deploy.inference import ServedModel
from dermkit.deploy.redact import public_card

WEB_DIR = Path(__file__).with_name("web")
REPO_ROOT = Path(__file__).resolve().parents[3]
ORT_DIST_ENV = "DERMKIT_ORT_DIST"
# onnxruntime-web files the page loads: the wasm-only build, its module and its binary.
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = {
    "app.js": "text/javascript",
    "core.js": "text/javascript",
    "style.css": "text/css",
}
MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}
MULTIPART_OVERHEAD = 64 * 1024
# Open with --api-key: the page and what it needs to run the model in the browser, and
# liveness. Everything else (/predict, /model-card, /docs, /redoc, /openapi.json, unknown
# paths) needs X-API-Key.
PUBLIC_PATHS = frozenset({"/", "/health", "/config", *(f"/{name}" for name in PAGE_FILES)})
PUBLIC_PREFIXES = ("/model/", "/ort/")
DECODE_QUEUE = 64


def is_public(path: str) -> bool:
    """Whether ``path`` is served without the API key when one is configured."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def default_ort_dist() -> Path:
    """Where onnxruntime-web's dist files are: $DERMKIT_ORT_DIST, else the repo's web/."""
    env = os.environ.get(ORT_DIST_ENV)
    if env:
        return Path(env)
    return REPO_ROOT / "web" / "node_modules" / "onnxruntime-web" / "dist"


# ----------------------------------------------------------------------------- schemas


class ErrorBody(BaseModel):
    status: int = Field(description="HTTP status")
    code: str = Field(description="machine-readable error code")
    message: str = Field(description="what was wrong, for a person")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ExitUsed(BaseModel):
    index: int = Field(description="0-based exit index (0 without early exits)")
    name: str = Field(description="'final' or 'early exit k'")
    blocks: int | None = Field(description="transformer blocks run (None without exits)")
    of: int = Field(description="number of exits of the served model")


class PredictResponse(BaseModel):
    classes: list[str] = Field(description="class names in probability order")
    probabilities: list[float] = Field(description="calibrated probabilities, sum 1")
    top_class: str
    confidence: float = Field(description="calibrated probability of the top class")
    entropy: float = Field(description="normalised entropy of the probabilities, 0..1")
    uncertainty: Literal["low", "moderate", "high"]
    malignant_probability: float = Field(description="summed probability of malignant classes")
    malignant_suspect: bool
    advice: Literal["standard", "low_confidence", "malignant_suspect"]
    message: str = Field(description="what to tell the person; always says: not a diagnosis")
    exit: ExitUsed
    model: str
    image: dict[str, int | str] = Field(description="decoded width, height and format")
    saliency_png_base64: str | None = Field(
        description="Grad-CAM overlay PNG (base64) when ?saliency=true"
    )
    not_a_diagnosis: str
    demo_notice: str | None = Field(
        description="set when the model was trained on phantom images: not for real lesions"
    )
    unfamiliar: bool | None = Field(
        default=None,
        description="the image looks unlike the training images (OOD score above the "
        "threshold chosen on val); null when no flag is fitted or an early exit answered",
    )
    ood_score: float | None = Field(
        default=None, description="energy -logsumexp(logits): higher is less familiar"
    )
    ood_threshold: float | None = Field(
        default=None, description="the score above which an image is flagged"
    )
    unfamiliar_message: str | None = Field(
        default=None, description="what to tell the person when the image is flagged"
    )


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    classes: int
    exits: int
    api_key_required: bool
    version: str


ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request",
        401: "missing or wrong API key",
        408: "the upload did not arrive in time",
        413: "upload or image too large (bytes, pixels or sides)",
        415: "not a JPEG, PNG or WebP file",
        405: "wrong method for this path",
        422: "not a usable image, or invalid parameters",
        503: "the server is busy or could not answer in time",
    }.items()
}


# ----------------------------------------------------------------------------- errors


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code, rendered as :class:`ErrorResponse`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status_code=status, detail=message)
        self.code = code


_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    body = {"error": {"status": status, "code": code, "message": message}}
    return JSONResponse(body, status_code=status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or _DEFAULT_CODES.get(exc.status_code, "error")
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: still JSON, and nothing internal leaks into the message.
    return error_response(500, "internal_error", "internal server error")


def key_matches(given: str | bytes | None, api_key: str) -> bool:
    """Constant-time comparison of a presented API key with the configured one."""
    if given is None:
        return False
    given = given if isinstance(given, bytes) else given.encode()
    return secrets.compare_digest(given, api_key.encode())


class LimitsMiddleware:
    """API key, body size limit and request timeout, as plain ASGI (nothing is buffered).

    The key and ``Content-Length`` are checked before a byte of the body is read, so an
    unauthenticated or oversized upload costs the server nothing. The running byte count
    raises :class:`ApiError` from inside ``receive``: FastAPI re-raises HTTP exceptions met
    while parsing a body, so the 413 reaches the error handler intact.
    """

    def __init__(
        self,
        app,
        max_body_bytes: int,
        timeout_s: float,
        api_key: str | None = None,
    ):
        self.app, self.max_body, self.timeout_s = app, max_body_bytes, timeout_s
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        needs_key = self.api_key is not None and not is_public(scope["path"])
        if needs_key and not key_matches(headers.get(b"x-api-key"), self.api_key):
            response = error_response(401, "unauthorized", "missing or wrong X-API-Key header")
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if n > self.max_body:
                message = f"request body of {n:,} bytes exceeds the {self.max_body:,} byte limit"
                await error_response(413, "upload_too_large", message)(scope, receive, send)
                return
        state = {"received": 0, "body_done": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    raise ApiError(
                        413,
                        "upload_too_large",
                        f"request body exceeds the {self.max_body:,} byte limit",
                    )
                if not message.get("more_body", False):
                    state["body_done"] = True
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            with anyio.fail_after(self.timeout_s):
                await self.app(scope, limited_receive, tracking_send)
        except TimeoutError:
            if state["started"]:
                raise
            if state["body_done"] or scope["method"] in ("GET", "HEAD"):
                response = error_response(
                    503, "timeout", f"no answer within {self.timeout_s:g} s; try again"
                )
            else:
                message = f"the request did not arrive within {self.timeout_s:g} s"
                response = error_response(408, "request_timeout", message)
            await response(scope, receive, send)


# ----------------------------------------------------------------------------- the app


def create_app(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    max_upload_bytes: int = 10 * 1024 * 1024,
    max_image_pixels: int = 40_000_000,
    max_image_side: int = 10_000,
    request_timeout_s: float = 30.0,
    workers: int | None = None,
    decode_queue: int = DECODE_QUEUE,
    exits_dir: str | Path | None = None,
    model_file: str = "model.onnx",
    saliency_run: str | Path | None = None,
    ort_dist: str | Path | None = None,
    threads: int = 1,
    malignant_threshold: float = 0.3,
    ood_file: str | Path | None = None,
) -> FastAPI:
    """The serving app of one ``dermkit export`` folder.

    Args:
        model_dir: export folder (model_card.json + ONNX); see :class:`ServedModel`.
        api_key: when set, every path but the public ones (:func:`is_public`) needs header
            ``X-API-Key`` with this value.
        max_upload_bytes: largest accepted image file (the request may carry 64 KiB more
            multipart framing).
        max_image_pixels / max_image_side: decoded size limits, checked from the header.
        request_timeout_s: whole-request limit, upload included.
        workers: concurrent decodes + inferences (default: CPU count).
        decode_queue: requests that may wait for a worker; beyond, a 503 at once.
        exits_dir, model_file, saliency_run, threads, malignant_threshold: see
            :class:`ServedModel`.
        ort_dist: onnxruntime-web's dist folder (default :func:`default_ort_dist`); when
            missing the page falls back to ``/predict``.
        ood_file: the unfamiliar-image flag (``ood.json``; default: the export folder's,
            else the source run's; see :func:`dermkit.deploy.inference.find_ood`).
    """
    model = ServedModel(
        model_dir,
        model_file=model_file,
        exits_dir=exits_dir,
        saliency_run=saliency_run,
        threads=threads,
        malignant_threshold=malignant_threshold,
        ood_file=ood_file,
    )
    pool = BoundedPool(workers or os.cpu_count() or 1, decode_queue)
    ort_dir = Path(ort_dist) if ort_dist else default_ort_dist()
    ort_files = {name: ort_dir / name for name in ORT_FILES if (ort_dir / name).is_file()}
    page = {name: (WEB_DIR / name).read_bytes() for name in [*PAGE_FILES, "index.html"]}
    model_files = model.model_files()
    card = public_card(json.loads((model.dir / "model_card.json").read_text()))

    app = FastAPI(
        title="dermkit",
        version=__version__,
        description=(
            "Skin-lesion classification of one image by an exported dermkit model. "
            "Not a diagnosis: research prototype; see a dermatologist."
        ),
    )
    app.add_middleware(
        LimitsMiddleware,
        max_body_bytes=max_upload_bytes + MULTIPART_OVERHEAD,
        timeout_s=request_timeout_s,
        api_key=api_key,
    )
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.state.model = model
    app.state.pool = pool

    def check_key(given: str | None) -> None:
        # the middleware already refused a bad key before the upload; this keeps the
        # endpoint safe on its own (and documents the header in the OpenAPI spec)
        if api_key is not None and not key_matches(given, api_key):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    def check_header(f) -> str:
        """The upload's format, from a few KiB of its header; 415/422/413 otherwise."""
        try:
            info = probe_header(f)
        except ProbeError as e:
            if e.kind == "unsupported":
                raise ApiError(415, "unsupported_media_type", UNSUPPORTED_MESSAGE) from None
            code = "truncated_image" if "truncated" in e.reason else "invalid_image"
            raise ApiError(422, code, e.reason) from None
        w, h = info.width, info.height
        if w * h > max_image_pixels or max(w, h) > max_image_side:
            raise ApiError(
                413,
                "image_too_large",
                f"image too large: {w}x{h} pixels (limits: {max_image_pixels:,} pixels, "
                f"{max_image_side:,} per side)",
            )
        return info.format

    def decode(data: bytes, fmt: str) -> tuple:
        try:
            rgb, _ = decode_rgb_bytes(
                data,
                "upload",
                max_pixels=max_image_pixels,
                max_side=max_image_side,
                formats=(fmt,),
            )
        except ImageDecodeError as e:
            too_big = e.reason.startswith(("decompression bomb", "image too large"))
            if too_big:
                raise ApiError(413, "image_too_large", e.reason) from None
            code = "truncated_image" if "truncated" in e.reason else "invalid_image"
            raise ApiError(422, code, e.reason) from None
        return rgb, fmt

    def answer(f, fmt: str, saliency: bool) -> dict:
        f.seek(0)
        rgb, fmt = decode(f.read(), fmt)  # the only full read of an upload: in the pool
        pred = model.predict(rgb)
        summary = model.summarise(pred.probabilities)
        png = base64.b64encode(model.saliency_png(pred)).decode() if saliency else None
        return {
            "classes": model.classes,
            "probabilities": [float(p) for p in pred.probabilities],
            **summary.__dict__,
            "exit": model.exit_info(pred),
            "model": model.card.name,
            "image": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "format": fmt},
            "saliency_png_base64": png,
            "not_a_diagnosis": model.card.not_a_diagnosis,
            "demo_notice": model.card.demo_notice,
            **model.familiarity(pred),
        }

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(
        file: Annotated[UploadFile, File(description="JPEG, PNG or WebP image")],
        saliency: Annotated[bool, Query(description="add a Grad-CAM overlay PNG")] = False,
        x_api_key: Annotated[str | None, Header(description="API key, when required")] = None,
    ) -> dict:
        """Calibrated class probabilities of one image, the exit used and the advice."""
        check_key(x_api_key)
        if saliency and not model.saliency_available:
            raise ApiError(
                422, "saliency_unavailable", "saliency needs the run's model.safetensors"
            )
        try:
            size = file.size if file.size is not None else file.file.seek(0, 2)
            if size > max_upload_bytes:
                raise ApiError(
                    413, "upload_too_large", f"file exceeds the {max_upload_bytes:,} byte limit"
                )
            if not size:
                raise ApiError(422, "invalid_image", "empty file")
            fmt = check_header(file.file)
            try:
                return await pool.run(answer, file.file, fmt, saliency)
            except PoolFullError as e:
                raise ApiError(503, "busy", f"{e}; try again shortly") from None
        finally:
            await file.close()

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict:
        """Liveness and what is served."""
        return {
            "status": "ok",
            "model": model.card.name,
            "classes": len(model.classes),
            "exits": model.exits.n_exits if model.exits else 1,
            "api_key_required": api_key is not None,
            "version": __version__,
        }

    @app.get("/model-card", responses={200: {"description": "the model card JSON"}})
    async def model_card() -> Response:
        """The exported model's card (schema: model_card.schema.json), without server paths."""
        return JSONResponse(card)

    @app.get("/config")
    async def config() -> dict:
        """Preprocessing, decision rule, exits and messages for in-browser inference."""
        return model.web_config() | {
            "api_key_required": api_key is not None,
            "max_upload_bytes": max_upload_bytes,
            "max_image_pixels": max_image_pixels,
            "max_image_side": max_image_side,
            "ort_available": len(ort_files) == len(ORT_FILES),
            "image_formats": [fmt.to_json() for fmt in IMAGE_FORMATS],
            "unsupported_message": UNSUPPORTED_MESSAGE,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> Response:
        return Response(page["index.html"], media_type="text/html; charset=utf-8")

    # one route per page file (no catch-all "/{name}", which turned GET /predict into a 404)
    def page_file(name: str):
        async def serve_page_file() -> Response:
            return Response(page[name], media_type=PAGE_FILES[name])

        return serve_page_file

    for name in PAGE_FILES:
        app.add_api_route(f"/{name}", page_file(name), methods=["GET"], include_in_schema=False)

    @app.get("/ort/{name}", include_in_schema=False)
    async def ort_file(name: str) -> Response:
        if name not in ort_files:
            raise ApiError(404, "not_found", "not found")
        suffix = Path(name).suffix
        return FileResponse(ort_files[name], media_type=MEDIA_TYPES[suffix])

    @app.get("/model/{name}", include_in_schema=False)
    async def model_file_route(name: str) -> Response:
        if name not in model_files:
            raise ApiError(404, "not_found", "not found")
        return FileResponse(model_files[name], media_type="application/octet-stream")

    return app


def resolve_model_dir(run: str | Path, export_dir: str | Path | None = None) -> Path:
    """The export folder to serve for ``run``: an export folder itself, ``RUN/export``, or
    (for a classifier run folder not yet exported) a fresh FP32 export into ``RUN/export``.
    """
    run = Path(run)
    if (run / "model_card.json").exists():
        return run
    out = Path(export_dir) if export_dir else run / "export"
    if (out / "model_card.json").exists():
        return out
    if not (run / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{run} is neither an export folder (model_card.json) nor a run folder "
            "(model.safetensors)"
        )
    from dermkit.deploy.export import export_run

    export_run(run, out, int8=None, n_parity=64, n_calibration=0)
    return out
