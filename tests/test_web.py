"""The web page in a real browser: headless Debian Chromium driven by Playwright.

The page runs the exported ONNX model with onnxruntime-web (served from the local npm
install) and must agree with the server's ``POST /predict`` on the same image: same top
class, probabilities within 1e-3 (both sides run the same graph on the same float32
tensor, the JS resize being a port of PIL's), and the exact same uint8 crop. Screenshots
(desktop and a 390x844 phone viewport) go to ``tests/artifacts/`` (or
``$DERMKIT_TEST_ARTIFACTS``). Without Chromium or Playwright the tests skip, except under
CI=true, where they fail: ``make test`` installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dermkit.data.cache import resize_short_side_center_crop
from dermkit.deploy.loadtest import BackgroundServer
from dermkit.deploy.server import create_app, default_ort_dist

CHROMIUM = Path(os.environ.get("DERMKIT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("DERMKIT_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def _app(export_dir, **kwargs):
    """The app with a generous request timeout: a loaded CI machine must not turn a slow
    first saliency call (torch import) into a 503; the timeout has its own test."""
    return create_app(export_dir, **{"request_timeout_s": 600.0, **kwargs})


def _missing(what: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (required under CI=true; `make setup` installs it)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A Playwright Chromium context factory on Debian's chromium, fresh profile each."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)")
    if not (default_ort_dist() / "ort.wasm.min.js").exists():
        _missing(f"onnxruntime-web not installed in {default_ort_dist()} (cd web && npm ci)")
    with sync_playwright() as p:
        contexts = []

        def open_page(viewport=DESKTOP):
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport=viewport,
            )
            contexts.append(ctx)
            page = ctx.new_page()
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            return page

        yield open_page
        for ctx in contexts:
            ctx.close()


@pytest.fixture(scope="module")
def test_png(phantom_root, tmp_path_factory) -> Path:
    """A real phantom image (160x120, not model-sized) as a lossless PNG."""
    jpg = sorted((phantom_root / "images").glob("*.jpg"))[0]
    path = tmp_path_factory.mktemp("web") / "lesion.png"
    Image.open(jpg).convert("RGB").save(path)
    return path


def _server_answer(url: str, path: Path) -> dict:
    r = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _page_answer(page, url: str, image: Path, query: str = "") -> dict:
    page.goto(f"{url}/{query}")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    page.set_input_files("#file", str(image))
    page.wait_for_function(
        "document.getElementById('result-json').textContent.length > 0", timeout=60_000
    )
    return json.loads(page.eval_on_selector("#result-json", "e => e.textContent"))


def _compare(page_result: dict, server: dict) -> float:
    assert page_result["top_class"] == server["top_class"]
    assert page_result["classes"] == server["classes"]
    diff = np.abs(np.subtract(page_result["probabilities"], server["probabilities"])).max()
    assert diff < 1e-3, diff
    assert page_result["advice"] == server["advice"]
    assert page_result["exit"] == server["exit"]
    return float(diff)


def test_in_browser_prediction_matches_the_server(browser, tiny_export, test_png):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(_app(tiny_export)) as url:
        server = _server_answer(url, test_png)
        page = browser(DESKTOP)
        result = _page_answer(page, url, test_png)
        assert page.get_attribute("body", "data-engine") == "browser"
        assert result["engine"] == "browser"
        diff = _compare(result, server)
        # the JS resize is PIL's, bit for bit: the crop the page drew is the server's crop
        size = 32
        drawn = page.evaluate(
            f"""() => Array.from(document.getElementById('crop').getContext('2d')
                .getImageData(0, 0, {size}, {size}).data)"""
        )
        rgba = np.asarray(drawn, np.uint8).reshape(size, size, 4)
        expected = resize_short_side_center_crop(np.asarray(Image.open(test_png)), size)
        np.testing.assert_array_equal(rgba[..., :3], expected)
        # the advice the page shows, and the standing "not a diagnosis" banner
        advice = page.inner_text("#advice")
        assert advice == server["message"]
        assert "not a diagnosis" in page.inner_text(".banner").lower()
        assert "not a diagnosis" in advice.lower() or server["advice"] == "malignant_suspect"
        assert page.get_attribute("#advice", "class").endswith(server["advice"])
        bars = page.eval_on_selector_all(
            "#probs li", "els => els.map(e => [e.dataset.class, Number(e.dataset.probability)])"
        )
        assert {c for c, _ in bars} == set(server["classes"]) and len(bars) == 7
        assert page.errors == []
        shot = ARTIFACTS / "web-desktop.png"
        page.screenshot(path=str(shot), full_page=True)

        phone = browser(PHONE)
        phone_result = _page_answer(phone, url, test_png)
        _compare(phone_result, server)
        # nothing wider than the phone: no horizontal scrolling
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)
    print(f"max |p_browser - p_server| = {diff:.2e}; screenshots in {ARTIFACTS}")
    assert shot.stat().st_size > 10_000


def test_server_fallback_forced_and_when_ort_is_missing(browser, tiny_export, test_png, tmp_path):
    with BackgroundServer(_app(tiny_export)) as url:
        server = _server_answer(url, test_png)
        page = browser()
        result = _page_answer(page, url, test_png, "?engine=server")
        assert result["engine"] == "server" and page.errors == []
        _compare(result, server)
        assert page.get_attribute("body", "data-engine") == "server"
        assert page.inner_text("#engine") == "on the server"
    # no onnxruntime-web on the server: the page notices and uses /predict by itself
    with BackgroundServer(_app(tiny_export, ort_dist=tmp_path / "no-ort")) as url:
        page = browser()
        result = _page_answer(page, url, test_png)
        assert result["engine"] == "server"
        assert page.get_attribute("body", "data-engine") == "server"
        _compare(result, server)


def test_bad_file_shows_the_servers_error(browser, tiny_export, tmp_path):
    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"this is text, not a PNG")
    with BackgroundServer(_app(tiny_export)) as url:
        page = browser()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        page.set_input_files("#file", str(fake))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "not a JPEG, PNG or WebP" in page.inner_text("#error")
        assert page.is_hidden("#result")


def _timed_answer(page, image: Path) -> dict:
    """Upload ``image`` to a ready page (browser engine): the model's in-browser
    milliseconds on it (``inference_ms``) and the exit that answered."""
    page.evaluate("window.dermkitResult = null")
    page.set_input_files("#file", [])  # re-selecting the same file fires no change event
    page.set_input_files("#file", str(image))
    page.wait_for_function("window.dermkitResult !== null", timeout=60_000)
    result = page.evaluate("window.dermkitResult")
    assert result["engine"] == "browser"
    return {"ms": result["inference_ms"], "exit": result["exit"]["index"]}


def _time_plain_and_exits(browser, export_dir: Path, exits_dir: Path, images: list[Path]):
    """Median in-browser ms per image of the plain export and of its exit segments, the two
    pages alternating image by image (the load of a shared machine hits both alike)."""
    with (
        BackgroundServer(_app(export_dir)) as plain_url,
        BackgroundServer(_app(export_dir, exits_dir=exits_dir)) as exits_url,
    ):
        pages = {"plain": browser(), "exits": browser()}
        for name, url in (("plain", plain_url), ("exits", exits_url)):
            pages[name].goto(url)
            pages[name].wait_for_selector("body[data-ready=true]", timeout=60_000)
            _timed_answer(pages[name], images[0])  # wasm compilation and warm-up
        rows: dict[str, list[dict]] = {"plain": [], "exits": []}
        for image in images:
            for name, page in pages.items():
                rows[name].append(_timed_answer(page, image))
    ms = {k: float(np.median([r["ms"] for r in v])) for k, v in rows.items()}
    return {
        "images": len(images),
        "median_ms": ms,
        "mean_ms": {k: float(np.mean([r["ms"] for r in v])) for k, v in rows.items()},
        "ratio": ms["exits"] / ms["plain"],
        "exit_counts": np.bincount([r["exit"] for r in rows["exits"]]).tolist(),
        "rows": rows,
    }


def test_early_exit_segments_in_the_browser(browser, tiny_classifier_run, tiny_export, test_png):
    from dermkit.exits.model import EarlyExitModel
    from dermkit.exits.onnx_segments import export_segments
    from dermkit.exits.policy import ExitPolicy
    from dermkit.models.runs_io import load_run_model

    backbone, cfg, classes = load_run_model(tiny_classifier_run)
    folder = export_segments(
        EarlyExitModel(backbone, [1], "linear", len(classes)).eval(),
        tiny_export.parent / "web-exits",
        cfg.data.image_size,
    )
    for thresholds, exit_index in (([2.0], 1), ([0.0], 0)):  # never / always leave early
        ExitPolicy(thresholds, temperatures=[0.9, 1.0]).save(folder / "policy.json", classes)
        with BackgroundServer(_app(tiny_export, exits_dir=folder)) as url:
            server = _server_answer(url, test_png)
            assert server["exit"]["index"] == exit_index
            result = _page_answer(browser(), url, test_png)
            assert result["engine"] == "browser"
            assert result["inference_ms"] > 0
            _compare(result, server)
    # time per image in the browser, plain vs exits (every image leaving early here)
    timing = _time_plain_and_exits(browser, tiny_export, folder, [test_png] * 5)
    assert timing["exit_counts"] == [5] and all(
        r["ms"] > 0 for rows in timing["rows"].values() for r in rows
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "web_exit_timing_tiny.json").write_text(json.dumps(timing, indent=2))


@pytest.mark.skipif(
    not os.environ.get("DERMKIT_WEB_EXITS_BENCH"),
    reason="set DERMKIT_WEB_EXITS_BENCH=EXPORT_DIR:EXITS_DIR:IMAGES_DIR[:N] to time a real model",
)
def test_browser_time_per_image_of_a_real_exit_model(browser):
    """Opt-in benchmark: a real export and its fused exit segments (``dermkit exits export``)
    on N images of a folder, in Chromium (wasm, 1 thread); the record goes to
    ``web_exit_timing.json`` in the artifacts folder. The exit model must not be slower."""
    export_dir, exits_dir, images_dir, *n = os.environ["DERMKIT_WEB_EXITS_BENCH"].split(":")
    images = sorted(Path(images_dir).glob("*.jpg"))[: int(n[0]) if n else 100]
    timing = _time_plain_and_exits(browser, Path(export_dir), Path(exits_dir), images)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "web_exit_timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps({k: v for k, v in timing.items() if k != "rows"}))
    assert timing["ratio"] <= 1.0


def test_core_js_matches_python(tiny_export, tmp_path):
    """core.js under Node: PIL resize, float32 normalisation, decision rule, exit policy and
    summary equal the Python implementations on random inputs."""
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed (apt-get install nodejs)")
    from dermkit.deploy.inference import ServedModel
    from dermkit.deploy.server import WEB_DIR
    from dermkit.eval.calibration import DecisionRule
    from dermkit.exits.policy import ExitPolicy

    rng = np.random.default_rng(0)
    model = ServedModel(tiny_export)
    cfg = model.web_config()
    images = [
        (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), s)
        for w, h, s in [(160, 120, 32), (121, 161, 64), (20, 15, 32), (1000, 3, 8), (64, 64, 64)]
    ]
    logits = rng.normal(0, 3, (20, 7))
    scales = rng.uniform(0.3, 3, 7).tolist()
    policies = [
        ExitPolicy([rng.uniform(0, 1)], measure=m, temperatures=[0.7, 1.2], protected_classes=[4])
        for m in ("max_prob", "margin", "neg_entropy")
    ]
    script = f"""
    const core = require({json.dumps(str(WEB_DIR / "core.js"))});
    const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
    const out = {{
      crops: input.images.map(([rgb, w, h, s]) =>
        Array.from(core.resizeShortSideCenterCrop(Uint8Array.from(rgb), w, h, s))),
      norm: Array.from(core.normalise(Uint8Array.from(input.crop), 32, input.cfg.mean,
        input.cfg.std, input.cfg.scale)),
      rule: input.logits.map(l => core.decisionRule(l, 1.7, input.scales)),
      leave: input.policies.map((p) =>
        input.logits.map((l) => [0, 1].map((j) => core.exitsNow(p, l, j)))),
      summary: input.logits.map(l => core.summarise(core.softmax(l, 1.0), input.cfg)),
    }};
    process.stdout.write(JSON.stringify(out));
    """
    crop = resize_short_side_center_crop(images[0][0], 32)
    payload = {
        "images": [[a.reshape(-1).tolist(), a.shape[1], a.shape[0], s] for a, s in images],
        "crop": crop.reshape(-1).tolist(),
        "cfg": cfg,
        "logits": logits.tolist(),
        "scales": scales,
        "policies": [p.to_dict() for p in policies],
    }
    run = subprocess.run(
        [node, "-e", script], input=json.dumps(payload), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    js = json.loads(run.stdout)
    for (a, s), got in zip(images, js["crops"]):
        np.testing.assert_array_equal(
            np.asarray(got, np.uint8), resize_short_side_center_crop(a, s).reshape(-1)
        )
    _, x = model.preprocess(crop)
    np.testing.assert_array_equal(np.asarray(js["norm"], np.float32), x.reshape(-1))
    np.testing.assert_allclose(js["rule"], DecisionRule(1.7, scales).probs(logits), atol=1e-12)
    for policy, got in zip(policies, js["leave"]):
        want = np.stack([policy.exits_now(logits, 0), policy.exits_now(logits, 1)], 1)
        np.testing.assert_array_equal(np.asarray(got), want)
    for row, got in zip(logits, js["summary"]):
        p = np.exp(row - row.max())
        want = model.summarise(p / p.sum()).__dict__
        assert {
            k: got[k]
            for k in ("top_class", "uncertainty", "advice", "malignant_suspect", "message")
        } == {
            k: want[k]
            for k in ("top_class", "uncertainty", "advice", "malignant_suspect", "message")
        }
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-12)
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-12)


def _ready_page(browser, url: str):
    """A page on ``url`` that records every request it makes to /predict."""
    page = browser()
    page.uploads = []
    page.on("request", lambda r: page.uploads.append(r) if "/predict" in r.url else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    return page


def test_formats_the_api_refuses_are_refused_by_the_page(browser, tiny_export, tmp_path):
    gif = tmp_path / "lesion.gif"
    Image.new("RGB", (64, 48), (180, 120, 90)).save(gif, format="GIF")
    with BackgroundServer(_app(tiny_export)) as url:
        api = httpx.post(f"{url}/predict", files={"file": (gif.name, gif.read_bytes())})
        assert api.status_code == 415
        page = _ready_page(browser, url)
        assert page.get_attribute("body", "data-engine") == "browser"
        assert page.get_attribute("#file", "accept") == "image/jpeg,image/png,image/webp"
        page.set_input_files("#file", str(gif))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert page.inner_text("#error") == api.json()["error"]["message"]
        assert page.is_hidden("#result") and page.uploads == []
        assert page.errors == []


def test_no_upload_without_consent_when_the_browser_cannot_decode(browser, tiny_export, tmp_path):
    broken = tmp_path / "broken.jpg"  # a JPEG signature, then nothing a decoder can use
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    with BackgroundServer(_app(tiny_export)) as url:
        page = _ready_page(browser, url)
        assert page.get_attribute("body", "data-engine") == "browser"
        assert "stays on this device" in page.inner_text("#status")
        page.set_input_files("#file", str(broken))
        page.wait_for_selector("#consent:not([hidden])", timeout=30_000)
        assert "has not left this device" in page.inner_text("#consent-text")
        page.wait_for_timeout(500)
        assert page.uploads == []  # asked, not sent
        page.click("#consent-keep")
        page.wait_for_selector("#consent", state="hidden")
        assert "stayed on this device" in page.inner_text("#status")
        page.wait_for_timeout(500)
        assert page.uploads == []
        # asked again for the same file; this time the user agrees
        page.set_input_files("#file", [])
        page.set_input_files("#file", str(broken))
        page.wait_for_selector("#consent:not([hidden])", timeout=30_000)
        page.click("#consent-send")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert len(page.uploads) == 1
        assert "the server refused the image" in page.inner_text("#error")
        assert page.errors == []


def test_page_says_demo_model_after_a_prediction(browser, tiny_export, test_png):
    """The tiny model was trained on phantoms: the page says so before and with the answer."""
    from dermkit.deploy.model_card import DEMO_NOTICE

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with BackgroundServer(_app(tiny_export)) as url:
        page = browser(DESKTOP)
        result = _page_answer(page, url, test_png)
        assert result["demo_notice"] == DEMO_NOTICE
        for selector in ("#demo-notice", "#result-demo"):
            assert page.is_visible(selector), selector
            assert page.inner_text(selector) == DEMO_NOTICE
        page.screenshot(path=str(ARTIFACTS / "web-demo-prediction.png"), full_page=True)
        assert not page.errors, page.errors


def test_pipeline_report_renders_its_pictures_and_the_phantom_label(
    browser, tiny_classifier_run, tmp_path
):
    """The summary report of a phantom pipeline in Chromium: every embedded PNG decodes,
    the demo notice shows, the config is a YAML block. Screenshot: pipeline-report.png."""
    import yaml

    from dermkit.pipeline.dermae import DERMAE_STAGES, load_pipeline
    from dermkit.pipeline.report import DEMO_DATA_NOTICE, write_summary_report
    from dermkit.pipeline.runner import PipelineResult, StageRecord

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cfg = load_pipeline("dermae-tiny", [f"out_dir={tmp_path}"])
    records = {
        "finetune": StageRecord(
            "finetune",
            "fine-tuned teacher",
            "cached",
            "0" * 64,
            str(tiny_classifier_run),
            str(tiny_classifier_run / "report.html"),
            metric="test macro-F1 (tiny fixture)",
        ),
        "distill": StageRecord("distill", "distilled student", "off"),
    }
    stages = {s.name: s for s in DERMAE_STAGES}
    report = write_summary_report(PipelineResult(cfg, records, None, {}, stages), 1.0)
    page = browser(DESKTOP)
    page.goto(report.as_uri())
    sizes = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])"
    )
    assert len(sizes) >= 2  # the teacher's learning curves and confusion matrix at least
    assert all(done and width > 0 for done, width, _ in sizes), sizes
    assert {alt for *_, alt in sizes} >= {
        "finetune: learning curves",
        "finetune: confusion matrix (test)",
    }
    assert page.is_visible(".demo") and page.inner_text(".demo") == DEMO_DATA_NOTICE
    shown = yaml.safe_load(page.inner_text("pre.config"))
    assert shown == cfg.model_dump(mode="json", exclude={"source"})
    page.screenshot(path=str(ARTIFACTS / "pipeline-report.png"), full_page=True)
