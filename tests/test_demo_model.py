"""A model trained on phantom images says so: the dataset's provenance file, the model
card, the API's answer and the page's config (issue 23: "demo model: not for real lesions").
"""

from __future__ import annotations

import io
import json
import shutil

from fastapi.testclient import TestClient
from PIL import Image

from dermkit.data.phantoms import PROVENANCE_FILE, generate_phantoms, is_phantom_dataset
from dermkit.deploy.model_card import DEMO_NOTICE, validate_card_json
from dermkit.deploy.server import create_app


def test_phantom_datasets_carry_a_provenance_file_and_others_do_not(tmp_path):
    root = tmp_path / "ph"
    generate_phantoms(root, n_lesions=3, image_size=(32, 24), seed=2)
    provenance = json.loads((root / PROVENANCE_FILE).read_text())
    assert provenance["generator"] == "dermkit.data.phantoms"
    assert provenance["real_lesions"] is False and provenance["seed"] == 2
    assert provenance["n_lesions"] == 3 and provenance["image_size"] == [32, 24]
    assert is_phantom_dataset(root)

    real = tmp_path / "real"  # the same files without the marker: a real dataset
    shutil.copytree(root, real)
    (real / PROVENANCE_FILE).unlink()
    assert not is_phantom_dataset(real)
    (real / PROVENANCE_FILE).write_text("{not json")
    assert not is_phantom_dataset(real)
    (real / PROVENANCE_FILE).write_text(json.dumps({"generator": "someone-else"}))
    assert not is_phantom_dataset(real)
    assert not is_phantom_dataset(tmp_path / "missing")


def test_the_card_of_a_phantom_model_flags_it_as_a_demo(tiny_export):
    card = json.loads((tiny_export / "model_card.json").read_text())
    schema = json.loads((tiny_export / "model_card.schema.json").read_text())
    validate_card_json(card, schema)
    assert card["training_data"]["phantoms"] is True
    assert card["demo_notice"] == DEMO_NOTICE
    assert card["demo_notice"].startswith("demo model: not for real lesions")
    assert card["limitations"][0] == DEMO_NOTICE
    # the flag is required: a card that lost it is refused
    del card["demo_notice"]
    try:
        validate_card_json(card, schema)
    except Exception as e:  # jsonschema.ValidationError
        assert "demo_notice" in str(e)
    else:
        raise AssertionError("a card without demo_notice validated")


def test_a_model_of_real_data_has_no_demo_notice(tiny_classifier_run, tmp_path, monkeypatch):
    import dermkit.deploy.export as export

    monkeypatch.setattr(export, "is_phantom_dataset", lambda root: False)
    export.export_run(tiny_classifier_run, tmp_path, int8=None, n_parity=8, n_calibration=0)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["training_data"]["phantoms"] is False and card["demo_notice"] is None
    assert DEMO_NOTICE not in card["limitations"]


def test_the_api_answer_page_config_and_card_say_demo_model(tiny_export, phantom_root):
    client = TestClient(create_app(tiny_export, request_timeout_s=600.0))
    jpg = sorted((phantom_root / "images").glob("*.jpg"))[0]
    buf = io.BytesIO()
    Image.open(jpg).save(buf, format="PNG")
    r = client.post("/predict", files={"file": ("lesion.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["demo_notice"] == DEMO_NOTICE
    assert client.get("/config").json()["demo_notice"] == DEMO_NOTICE
    assert client.get("/model-card").json()["demo_notice"] == DEMO_NOTICE
