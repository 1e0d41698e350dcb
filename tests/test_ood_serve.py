"""The unfamiliar-image flag in serving: ``/predict`` fields, ``/config``, and the page."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dermkit.deploy.inference import ModelFolderError, ServedModel
from dermkit.deploy.server import create_app
from dermkit.eval.ood import OOD_FILE, UNFAMILIAR_MESSAGE, OodRule, energy
from test_web import (  # the browser fixture and page helper of the main web test
    _page_answer,
    browser,  # noqa: F401  (fixture)
    test_png,  # noqa: F401  (fixture)
)

FIELDS = ("unfamiliar", "ood_score", "ood_threshold", "unfamiliar_message")


@pytest.fixture(scope="module")
def phantom_png(phantom_root) -> bytes:
    jpg = sorted((phantom_root / "images").glob("*.jpg"))[0]
    buf = io.BytesIO()
    Image.open(jpg).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _export_with_flag(tiny_export, tmp_path, png: bytes, margin: float | None) -> tuple:
    """A copy of the export with an ood.json whose threshold is the image's energy minus
    ``margin`` (> 0: the image is flagged; < 0: it is not); None: no ood.json."""
    out = tmp_path / f"export-{margin}"
    shutil.copytree(tiny_export, out)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    score = float(energy(ServedModel(out).predict(rgb).logits[None])[0])
    if margin is not None:
        OodRule(threshold=score - margin, n_val=10, val_flagged=0.05).save(out / OOD_FILE)
    return out, score


def _predict(export, png: bytes) -> dict:
    client = TestClient(create_app(export, request_timeout_s=600.0))
    r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
    assert r.status_code == 200, r.text
    return r.json(), client.get("/config").json()


def test_predict_returns_the_flag_and_its_score(tiny_export, tmp_path, phantom_png):
    flagged, score = _export_with_flag(tiny_export, tmp_path, phantom_png, 0.5)
    body, config = _predict(flagged, phantom_png)
    assert body["unfamiliar"] is True
    assert body["ood_score"] == pytest.approx(score, abs=1e-4)
    assert body["ood_threshold"] == pytest.approx(score - 0.5)
    assert body["unfamiliar_message"] == UNFAMILIAR_MESSAGE
    assert config["ood"] == {
        "score": "energy",
        "temperature": 1.0,
        "threshold": pytest.approx(score - 0.5),
        "message": UNFAMILIAR_MESSAGE,
    }

    familiar, _ = _export_with_flag(tiny_export, tmp_path, phantom_png, -0.5)
    body, _ = _predict(familiar, phantom_png)
    assert body["unfamiliar"] is False and body["unfamiliar_message"] is None

    # no ood.json anywhere: the fields are there, null; the schema documents them
    plain, _ = _export_with_flag(tiny_export, tmp_path, phantom_png, None)
    body, config = _predict(plain, phantom_png)
    assert all(body[k] is None for k in FIELDS) and config["ood"] is None
    schema = TestClient(create_app(plain)).get("/openapi.json").json()
    assert set(FIELDS) <= set(schema["components"]["schemas"]["PredictResponse"]["properties"])


def test_flag_fires_on_an_image_unlike_the_training_images(
    tiny_classifier_run, tiny_export, tmp_path, phantom_png
):
    """Fitted on the phantoms' val split (95% quantile), an image of another kind
    (a flat saturated colour, nothing like a lesion) is flagged, a training image is not
    more often than the quantile allows."""
    from dermkit.eval.ood import fit_ood

    run = tmp_path / "run"
    shutil.copytree(tiny_classifier_run, run)
    rule = fit_ood(run, mahalanobis=False)
    served = ServedModel(tiny_export, ood_file=run / OOD_FILE)
    assert served.ood.threshold == rule.threshold
    odd = [np.full((120, 160, 3), c, np.uint8) for c in ((0, 0, 0), (0, 255, 0), (0, 0, 255))]
    flags = [served.familiarity(served.predict(x))["unfamiliar"] for x in odd]
    assert any(flags), [served.familiarity(served.predict(x)) for x in odd]

    with pytest.raises(ModelFolderError, match="not found"):
        ServedModel(tiny_export, ood_file=tmp_path / "missing.json")


def test_page_shows_the_unfamiliar_message(browser, tiny_export, tmp_path, test_png):  # noqa: F811
    from dermkit.deploy.loadtest import BackgroundServer

    flagged, _ = _export_with_flag(tiny_export, tmp_path, test_png.read_bytes(), 0.5)
    with BackgroundServer(create_app(flagged, request_timeout_s=600.0)) as url:
        page = browser()
        result = _page_answer(page, url, test_png)
        assert result["engine"] == "browser" and result["unfamiliar"] is True
        assert page.is_visible("#unfamiliar")
        assert page.inner_text("#unfamiliar") == UNFAMILIAR_MESSAGE
        server = _predict(flagged, test_png.read_bytes())[0]
        assert result["ood_score"] == pytest.approx(server["ood_score"], abs=1e-3)
        assert not page.errors, page.errors

    familiar, _ = _export_with_flag(tiny_export, tmp_path, test_png.read_bytes(), -0.5)
    with BackgroundServer(create_app(familiar, request_timeout_s=600.0)) as url:
        page = browser()
        result = _page_answer(page, url, test_png)
        assert result["unfamiliar"] is False and not page.is_visible("#unfamiliar")


def test_export_carries_the_runs_flag(tiny_classifier_run, tmp_path):
    from dermkit.deploy.export import export_run

    run = tmp_path / "run"
    shutil.copytree(tiny_classifier_run, run)
    OodRule(threshold=-1.5, n_val=10).save(run / OOD_FILE)
    export_run(run, tmp_path / "export", int8=None, n_parity=8, n_calibration=0)
    shutil.rmtree(run)  # the export alone, as on another machine
    served = ServedModel(tmp_path / "export")
    assert served.ood is not None and served.ood.threshold == -1.5
