"""Robustness in training: scale and camera augmentation, Shades of Gray colour constancy
as preprocessing that travels with the run (cache, config, model card, server, web page)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dermkit.config import ConfigError, load_config
from dermkit.data.cache import build_cache, cache_key, crop_image, shades_of_gray
from dermkit.data.manifest import new_manifest
from dermkit.data.settings import AugmentSettings
from dermkit.data.transforms import BatchAugment
from dermkit.deploy.loadtest import BackgroundServer
from dermkit.train.settings import FinetuneRunConfig
from test_web import (  # the browser fixture and page helpers of the main web test
    DESKTOP,
    _app,
    _compare,
    _page_answer,
    _server_answer,
    browser,  # noqa: F401  (fixture)
    test_png,  # noqa: F401  (fixture)
)

# ------------------------------------------------------------ colour constancy


def _skin(seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """A textured skin-like image with a darker lesion, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = np.array([190.0, 140.0, 120.0]) + rng.normal(0, 12, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    lesion = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2
    base[lesion] *= 0.5
    return np.clip(base, 0, 255).astype(np.uint8)


def test_shades_of_gray_leaves_a_grey_illuminant_alone():
    grey = np.random.default_rng(0).integers(0, 256, (20, 30, 1), dtype=np.uint8).repeat(3, 2)
    assert np.array_equal(shades_of_gray(grey), grey)
    black = np.zeros((5, 5, 3), np.uint8)
    assert np.array_equal(shades_of_gray(black), black)


def test_shades_of_gray_removes_a_colour_cast():
    def chromaticity(a: np.ndarray) -> np.ndarray:
        """Mean colour as shares of R, G, B (brightness removed)."""
        m = a.reshape(-1, 3).astype(float).mean(0)
        return m / m.sum()

    image = _skin()
    for gains in ((1.25, 1.0, 0.75), (0.8, 1.0, 1.2)):
        cast = np.clip(np.rint(image * np.array(gains)), 0, 255).astype(np.uint8)
        before = np.abs(chromaticity(image) - chromaticity(cast)).max()
        after = np.abs(chromaticity(shades_of_gray(image)) - chromaticity(shades_of_gray(cast)))
        assert after.max() < 0.1 * before
    # the illuminant's channel means come out equal (p-means are equalised)
    out = shades_of_gray(cast).astype(float)
    p_means = (out.reshape(-1, 3) ** 6).mean(0) ** (1 / 6)
    assert p_means.max() - p_means.min() < 2.0
    with pytest.raises(ValueError, match="uint8"):
        shades_of_gray(image.astype(np.float32))


def test_crop_image_applies_colour_constancy_after_the_crop():
    image = _skin(h=60, w=80)
    for policy in ("short_side_center", "full_frame"):
        plain = crop_image(image, 32, policy)
        assert np.array_equal(crop_image(image, 32, policy, "none"), plain)
        assert np.array_equal(
            crop_image(image, 32, policy, "shades_of_gray"), shades_of_gray(plain)
        )
    with pytest.raises(ValueError, match="unknown colour constancy"):
        crop_image(image, 32, "full_frame", "grey_world")


def test_cache_keys_its_colour_constancy(tmp_path):
    rows = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(_skin(i)).save(path)
        rows.append({"image_id": f"im{i}", "path": str(path), "label": "a", "source": "t"})
    m = new_manifest(rows)
    # caches made before the option keep their key
    assert cache_key(m, 16, "full_frame") == cache_key(m, 16, "full_frame", "none")
    assert cache_key(m, 16, "full_frame") != cache_key(m, 16, "full_frame", "shades_of_gray")
    plain = build_cache(m, 16, cache_dir=tmp_path / "cache")
    cc = build_cache(m, 16, cache_dir=tmp_path / "cache", colour_constancy="shades_of_gray")
    assert cc.root != plain.root
    for i in range(3):
        assert np.array_equal(cc.images[i], shades_of_gray(np.asarray(plain.images[i])))
    assert json.loads((cc.root / "meta.json").read_text())["colour_constancy"] == "shades_of_gray"
    with pytest.raises(ValueError, match="unknown colour constancy"):
        build_cache(m, 16, cache_dir=tmp_path / "cache", colour_constancy="retinex")


def test_config_options_and_their_checks():
    cfg = load_config(FinetuneRunConfig, "finetune", "tiny", overrides=[])
    assert cfg.data.colour_constancy == "none" and cfg.augment.scale_range is None
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        overrides=[
            "data.colour_constancy=shades_of_gray",
            "augment.scale_range=[0.6,1.8]",
            "augment.white_balance=0.1",
        ],
    )
    assert cfg.data.colour_constancy == "shades_of_gray"
    assert cfg.augment.scale_range == (0.6, 1.8) and cfg.augment.white_balance == 0.1
    for bad in ("data.colour_constancy=grey_world", "augment.scale_range=[1.5,0.5]"):
        with pytest.raises(ConfigError):
            load_config(FinetuneRunConfig, "finetune", "tiny", overrides=[bad])


# ----------------------------------------------------------------- augmentation


def _still(**kw) -> AugmentSettings:
    """No flips, rotations, affine or colour: only what ``kw`` switches on."""
    off = dict(flip=False, rot90=False, max_rotate_deg=0.0, max_scale=0.0, max_translate=0.0)
    colour = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    return AugmentSettings(**(off | colour | kw))


def _disc_batch(b: int = 8, size: int = 48, radius: float = 8.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(
        torch.arange(size) + 0.5 - size / 2, torch.arange(size) + 0.5 - size / 2, indexing="ij"
    )
    x = torch.full((b, 3, size, size), 0.8)
    x[:, :, (yy**2 + xx**2).sqrt() <= radius] = 0.2
    return x


def _areas(x: torch.Tensor) -> torch.Tensor:
    return (x.mean(1) < 0.5).float().sum(dim=(1, 2))


def test_scale_range_zooms_in_and_out():
    x = _disc_batch()
    area = float(_areas(x)[0])
    g = torch.Generator().manual_seed(0)

    def zoom(factor: float, centred: bool) -> torch.Tensor:
        augment = BatchAugment(_still(scale_range=(factor, factor)))
        params = augment.sample(x.shape[0], g)
        if centred:
            params["zoom_shift"].zero_()
        return augment.apply(x.clone(), params)

    assert torch.allclose(_areas(zoom(2.0, True)), torch.tensor(4 * area), rtol=0.1)
    assert torch.allclose(_areas(zoom(0.5, True)), torch.tensor(area / 4), rtol=0.2)
    # the window moves (a random resized crop), and a zoomed-out image stays whole
    moved = _areas(zoom(2.0, False))
    assert moved.std() > 10 and (moved > 0).all()
    assert torch.allclose(_areas(zoom(0.5, False)), torch.tensor(area / 4), rtol=0.2)
    # a range draws per-image zooms on both sides of 1
    params = BatchAugment(_still(scale_range=(0.5, 2.0))).sample(256, g)
    assert params["zoom"].min() < 0.8 and params["zoom"].max() > 1.25
    assert float(params["zoom"].min()) >= 0.5 and float(params["zoom"].max()) <= 2.0


def test_new_options_leave_the_default_random_stream_alone():
    """A config without the new options draws exactly what it drew before them."""
    default = BatchAugment(AugmentSettings()).sample(16, torch.Generator().manual_seed(3))
    assert not {"zoom", "white_balance"} & set(default)
    more = BatchAugment(AugmentSettings(white_balance=0.1, scale_range=(0.7, 1.4)))
    extended = more.sample(16, torch.Generator().manual_seed(3))
    for key, value in default.items():
        if key != "scale":
            assert torch.equal(value, extended[key]), key


def test_camera_augmentation_changes_white_balance_and_tone():
    x = torch.full((64, 3, 8, 8), 0.5)
    g = torch.Generator().manual_seed(1)
    y = BatchAugment(_still(white_balance=0.2))(x.clone(), g)
    red_over_blue = y[:, 0, 0, 0] / y[:, 2, 0, 0]
    assert red_over_blue.min() < 0.8 and red_over_blue.max() > 1.25  # warmer and cooler
    assert torch.allclose(y[:, 1], x[:, 1])  # green untouched without tint
    t = BatchAugment(_still(tint=0.2))(x.clone(), g)
    assert t[:, 1].std() > 0.02 and torch.allclose(t[:, 0], x[:, 0])
    gam = BatchAugment(_still(gamma=0.3))(x.clone(), g)
    assert gam.min() < 0.45 and gam.max() > 0.55
    assert torch.allclose(gam[:, 0], gam[:, 2])  # a tone curve keeps grey grey


def test_blur_augmentation_blurs_half_the_images_like_the_shift_bench():
    """Per-image sigma: a sharp edge softens in about half of the batch, the rest untouched,
    and a blurred image equals the shift benchmark's blur at the same sigma."""
    from dermkit.data.transforms import _blur
    from dermkit.eval.shifts import gaussian_blur

    x = torch.zeros(64, 3, 32, 32)
    x[..., 16:] = 1.0  # a vertical edge
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment(_still(blur=0.05))
    params = aug.sample(64, g)
    y = aug.apply(x.clone(), params)
    sharp = params["blur"] == 0
    assert 16 <= int(sharp.sum()) <= 48
    assert torch.equal(y[sharp], x[sharp])
    visible = params["blur"] * 32 > 0.6  # sigma > 0.6 px: the edge bleeds into column 15
    assert visible.sum() >= 8 and bool((y[visible][..., 15] > 0.01).all())
    one = _blur(x[:1], torch.tensor([0.02 * 32]))
    assert torch.allclose(one, gaussian_blur(x[:1], 0.02), atol=1e-5)


# ------------------------------------------------- the run carries it into deployment


@pytest.fixture(scope="module")
def cc_export(tiny_classifier_run, tmp_path_factory):
    """The tiny run re-labelled as trained with Shades of Gray, exported."""
    from dermkit.deploy.export import export_run

    run = tmp_path_factory.mktemp("cc-run") / "run"
    shutil.copytree(tiny_classifier_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["colour_constancy"] = "shades_of_gray"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path_factory.mktemp("cc-export")
    export_run(run, out, int8=None, n_parity=8, n_calibration=0)
    return out


def test_model_card_and_server_apply_colour_constancy(cc_export, tiny_export):
    from dermkit.deploy.inference import ServedModel

    card = json.loads((cc_export / "model_card.json").read_text())
    assert card["preprocessing"]["colour_constancy"] == "shades_of_gray"
    assert "Shades of Gray" in card["preprocessing"]["crop"]
    old = json.loads((tiny_export / "model_card.json").read_text())
    assert old["preprocessing"]["colour_constancy"] == "none"

    image = _skin(h=120, w=160)
    served = ServedModel(cc_export)
    assert served.web_config()["colour_constancy"] == "shades_of_gray"
    crop, x = served.preprocess(image)
    # saliency re-feeds the served crop: no second colour constancy on it
    assert np.array_equal(served.normalise(crop), x)
    size, policy = card["preprocessing"]["image_size"], card["preprocessing"]["crop_policy"]
    assert np.array_equal(crop, crop_image(image, size, policy, "shades_of_gray"))
    plain, _ = ServedModel(tiny_export).preprocess(image)
    assert not np.array_equal(crop, plain)


def test_shades_of_gray_in_js_matches_python():
    """core.js's cropImage with colour constancy equals crop_image's, pixel for pixel."""
    from dermkit.deploy.server import WEB_DIR

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    rng = np.random.default_rng(2)
    cases = [(_skin(0, 120, 160), 64, "short_side_center"), (_skin(1, 120, 160), 48, "full_frame")]
    cases += [
        (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), s, "full_frame")
        for h, w, s in ((33, 17, 40), (64, 64, 64))
    ]
    cast = np.clip(_skin(2, 90, 120) * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    cases.append((cast, 96, "short_side_center"))
    script = f"""
    const core = require({json.dumps(str(WEB_DIR / "core.js"))});
    const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
    process.stdout.write(JSON.stringify(input.map(([rgb, w, h, s, policy]) =>
      Array.from(core.cropImage(Uint8Array.from(rgb), w, h, s, policy, "shades_of_gray")))));
    """
    payload = [[a.reshape(-1).tolist(), a.shape[1], a.shape[0], s, p] for a, s, p in cases]
    run = subprocess.run(
        [node, "-e", script], input=json.dumps(payload), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for (a, s, policy), got in zip(cases, json.loads(run.stdout)):
        want = crop_image(a, s, policy, "shades_of_gray")
        np.testing.assert_array_equal(np.asarray(got, np.uint8), want.reshape(-1))


def test_the_page_applies_the_cards_colour_constancy(cc_export, test_png, browser):  # noqa: F811
    """In Chromium the page crops and colour-corrects as the server does (same crop, same
    answer); the crop differs from the one without colour constancy."""
    card = json.loads((cc_export / "model_card.json").read_text())
    size, policy = card["preprocessing"]["image_size"], card["preprocessing"]["crop_policy"]
    with BackgroundServer(_app(cc_export)) as url:
        server = _server_answer(url, test_png)
        page = browser(DESKTOP)
        result = _page_answer(page, url, test_png)
        assert result["engine"] == "browser"
        _compare(result, server)
        drawn = page.evaluate(
            f"""() => Array.from(document.getElementById('crop').getContext('2d')
                .getImageData(0, 0, {size}, {size}).data)"""
        )
        assert not page.errors
    rgba = np.asarray(drawn, np.uint8).reshape(size, size, 4)
    source = np.asarray(Image.open(test_png).convert("RGB"))
    np.testing.assert_array_equal(rgba[..., :3], crop_image(source, size, policy, "shades_of_gray"))
    assert not np.array_equal(rgba[..., :3], crop_image(source, size, policy))
