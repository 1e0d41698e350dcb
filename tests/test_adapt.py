"""Label-free adaptation (``dermkit.eval.adapt``): EM priors, AdaBN, multi-scale TTA, and
``dermkit evaluate RUN --data DIR --adapt ...``."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import ConfigError
from dermkit.eval.adapt import (
    NoBatchNormError,
    adapt_batchnorm,
    batchnorm_state,
    em_check,
    em_priors,
    parse_adaptations,
    reweight,
    tta_views,
    zoom,
)

runner = CliRunner()


# ----------------------------------------------------------------------------- EM priors


def _calibrated_posteriors(prior_source, prior_target, n, seed):
    """Labels drawn from ``prior_target``; 1-D Gaussian classes; the exact Bayes posteriors
    under ``prior_source`` (a calibrated source model)."""
    g = np.random.default_rng(seed)
    mus = np.array([-2.0, 0.0, 1.5, 3.0])
    y = g.choice(len(mus), size=n, p=prior_target)
    x = g.normal(mus[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - mus[None]) ** 2)
    post = lik * prior_source
    return post / post.sum(1, keepdims=True), y


def test_em_recovers_shifted_priors_from_calibrated_posteriors():
    source = np.array([0.6, 0.2, 0.15, 0.05])
    target = np.array([0.1, 0.3, 0.2, 0.4])
    post, y = _calibrated_posteriors(source, target, 20000, seed=1)
    estimate, iterations, converged = em_priors(post, source)
    assert converged and iterations > 1
    np.testing.assert_allclose(estimate, target, atol=0.03)
    # the re-weighted posteriors are closer to the truth than the source ones
    adjusted = reweight(post, estimate / source)
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(adjusted) < nll(post) - 0.05


def test_em_is_the_identity_when_the_target_priors_are_the_source_priors():
    source = np.array([0.6, 0.2, 0.15, 0.05])
    post, _ = _calibrated_posteriors(source, source, 20000, seed=2)
    estimate, _, converged = em_priors(post, source)
    assert converged
    np.testing.assert_allclose(estimate, source, atol=0.02)
    adjusted = reweight(post, estimate / source)
    assert np.abs(adjusted - post).max() < 0.06
    assert (adjusted.argmax(1) == post.argmax(1)).mean() > 0.97


def test_em_check_passes_a_calibrated_model_and_fails_a_degenerate_one(tmp_path):
    """EM on the run's own val set, where the label frequencies are known."""
    import pandas as pd

    from dermkit.core.predictions import write_predictions
    from dermkit.eval.calibration import DecisionRule

    classes = ["a", "b", "c", "d"]
    source = np.array([0.6, 0.2, 0.15, 0.05])
    post, y = _calibrated_posteriors(source, source, 3000, seed=3)
    scales = np.array([1.0, 2.0, 2.0, 4.0])
    rule = DecisionRule(temperature=1.0, class_scales=scales.tolist())
    ids = [f"i{k}" for k in range(len(y))]
    manifest = pd.DataFrame({"image_id": ids, "lesion_id": ids, "label": np.take(classes, y)})
    write_predictions(tmp_path / "predictions_val.csv", manifest, reweight(post, scales), classes)
    good = em_check(tmp_path, rule, classes, source)
    assert good["ok"] and good["error"] < 0.05, good

    # over-confident, nearly uninformative posteriors: EM runs off to a corner
    noisy = np.random.default_rng(0).dirichlet(np.full(4, 0.05), len(y))
    write_predictions(tmp_path / "predictions_val.csv", manifest, noisy, classes)
    bad = em_check(tmp_path, DecisionRule(), classes, source)
    assert not bad["ok"] and bad["error"] > 0.1, bad


def test_parse_adaptations():
    assert parse_adaptations("tta, BN") == ("bn", "tta")
    assert parse_adaptations(None) == ()
    with pytest.raises(ConfigError, match="unknown adaptation"):
        parse_adaptations("bn,colour")


# ----------------------------------------------------------------------------- AdaBN


def _blob_images(n, g, shift=None):
    """Class 0: a bright blob in the green channel; class 1: in the red channel."""
    yy, xx = np.mgrid[:16, :16]
    blob = np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / 18.0).astype(np.float32)
    y = g.integers(0, 2, n)
    x = g.normal(0.5, 0.1, (n, 3, 16, 16)).astype(np.float32)
    x[np.arange(n), 1 - y] += 0.4 * blob * g.uniform(0.6, 1.4, (n, 1, 1)).astype(np.float32)
    x = torch.from_numpy(x)
    return (shift(x) if shift else x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def bn_net():
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    x, y = _blob_images(384, g)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(8):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return net.eval()


def _accuracy(net, x, y):
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).float().mean())


def _batches(x, size=64):
    return [x[i : i + size] for i in range(0, len(x), size)]


def test_adabn_recovers_a_colour_shift_and_leaves_the_source_distribution_alone(bn_net):
    g = np.random.default_rng(5)
    # a camera with another colour response: channel gains and offsets
    gain = torch.tensor([1.5, 0.7, 1.0]).view(1, 3, 1, 1)
    offset = torch.tensor([0.3, 0.0, -0.2]).view(1, 3, 1, 1)
    x_clean, y_clean = _blob_images(512, g)
    x_shift, y_shift = _blob_images(512, g, lambda x: x * gain + offset)
    clean = _accuracy(bn_net, x_clean, y_clean)
    hurt = _accuracy(bn_net, x_shift, y_shift)
    assert clean > 0.95 and hurt < clean - 0.2, (clean, hurt)

    net = copy.deepcopy(bn_net)
    report = adapt_batchnorm(net, _batches(x_shift))
    assert report == {"layers": 2, "images": 512, "batches": 8}
    assert not net.training and all(not m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    recovered = _accuracy(net, x_shift, y_shift)
    assert recovered > hurt + 0.5 * (clean - hurt), (clean, hurt, recovered)

    # the training distribution as the target: within noise
    same = copy.deepcopy(bn_net)
    adapt_batchnorm(same, _batches(x_clean))
    assert abs(_accuracy(same, x_clean, y_clean) - clean) < 0.03
    state = batchnorm_state(same)
    assert set(state) == {
        f"{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    # the cumulative average: the running mean is the mean of the batch means
    with torch.no_grad():
        first = bn_net[0](x_clean)
    batch_means = torch.stack([first[i : i + 64].mean((0, 2, 3)) for i in range(0, 512, 64)])
    torch.testing.assert_close(state["1.running_mean"], batch_means.mean(0), atol=1e-5, rtol=0)


def test_adabn_refuses_a_model_without_batchnorm():
    vit_like = nn.Sequential(nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 2))
    with pytest.raises(NoBatchNormError, match="no BatchNorm layer"):
        adapt_batchnorm(vit_like, [torch.zeros(2, 3, 2, 2)])


def test_multi_scale_views_keep_the_size_and_zoom_both_ways():
    x = torch.zeros(1, 3, 20, 20)
    x[..., 8:12, 8:12] = 1.0  # a centred square of 4 px
    views = tta_views(x)
    assert len(views) == 9 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[3], x)  # scale 1.0, as is
    area = lambda v: float(v[0, 0].sum())  # noqa: E731
    assert area(zoom(x, 0.8)) > area(x) > area(zoom(x, 1.2))


# ----------------------------------------------------------------------------- the CLI


def _invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def test_adaptation_on_the_training_distribution_changes_little(
    tiny_classifier_run, phantom_root, tmp_path
):
    """The run's own dataset as the target: metrics within noise; the priors are estimated
    and checked (the tiny run is near chance and uncalibrated, so the EM check on its val
    set refuses to apply them)."""
    from dermkit.eval.external import evaluate_external

    plain = evaluate_external(
        tiny_classifier_run, phantom_root, out_dir=tmp_path / "plain", n_boot=20
    )
    adapted = evaluate_external(
        tiny_classifier_run,
        phantom_root,
        out_dir=tmp_path / "adapted",
        n_boot=20,
        adapt="priors,tta",
        save_adaptation=tmp_path / "adapted-run",
    )
    ext = adapted["result"]["external"]
    assert ext["adaptation"]["applied"] == ["priors", "tta"]
    priors = ext["adaptation"]["priors"]
    assert priors["source_from"].startswith("train split")
    assert abs(sum(priors["target"]) - 1) < 1e-6 and len(priors["target"]) == 7
    assert priors["check"]["val_images"] > 0
    assert priors["applied"] == priors["check"]["ok"]
    for name in ("balanced_accuracy", "macro_f1"):
        a = plain["result"]["metrics"][name]["value"]
        b = adapted["result"]["metrics"][name]["value"]
        assert abs(a - b) < 0.15, (name, a, b)
    html = (tmp_path / "adapted" / "report.html").read_text()
    assert "class priors, source -&gt; target (EM)" in html
    assert "EM check on the run&#x27;s val set" in html or "EM check on the run" in html
    saved = tmp_path / "adapted-run"
    record = json.loads((saved / "adaptation.json").read_text())
    assert record["applied"] == ["priors", "tta"] and record["carried_to_export"] == ["priors"]
    decision = json.loads((saved / "decision.json").read_text())
    assert len(decision["class_scales"]) == len(priors["classes"])
    assert set(load_file(saved / "model.safetensors")) == set(
        load_file(tiny_classifier_run / "model.safetensors")
    )


def test_cli_reports_the_adaptation_and_refuses_adabn_without_batchnorm(
    tiny_classifier_run, phantom_root, tmp_path
):
    result = _invoke(
        "evaluate",
        tiny_classifier_run,
        "--data",
        phantom_root,
        "--adapt",
        "priors",
        "--out",
        tmp_path / "ev",
        "--n-boot",
        10,
    )
    text = " ".join(result.output.split())
    assert "adapted: priors" in text and "class priors (source->target, EM)" in text
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    priors = metrics["external"]["adaptation"]["priors"]
    assert priors["iterations"] >= 1 and "EM check on the run's val set: error" in text
    # --priors-limit 1: the check always passes, the priors are applied
    _invoke(
        "evaluate",
        tiny_classifier_run,
        "--data",
        phantom_root,
        "--adapt",
        "priors",
        "--priors-limit",
        1,
        "--out",
        tmp_path / "ev1",
        "--n-boot",
        0,
    )
    forced = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    assert forced["external"]["adaptation"]["priors"]["applied"] is True

    result = _invoke(
        "evaluate", tiny_classifier_run, "--data", phantom_root, "--adapt", "bn", code=2
    )
    assert "no BatchNorm layer" in " ".join(result.output.split())
    result = _invoke("evaluate", tiny_classifier_run, "--adapt", "priors", code=2)
    assert "need --data" in " ".join(result.output.split())


@pytest.fixture(scope="module")
def tiny_bn_run(phantom_root, cache_dir, tmp_path_factory):
    """The tiny fine-tune recipe on a small BatchNorm CNN (timm's resnet10t at 32 px), for
    8 epochs: well above chance on the phantoms (balanced accuracy about 0.57)."""
    from dermkit.config import load_config
    from dermkit.train.finetune import run_finetune
    from dermkit.train.settings import FinetuneRunConfig

    out = tmp_path_factory.mktemp("tiny-bn-finetune")
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        overrides=[
            f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}",
            f"out_dir={out}",
            "model.name=resnet10t",
            "optim.epochs=8",
            "eval.n_boot=0",
            "train_eval_images=0",
        ],
    )
    run_finetune(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def colour_shifted_phantoms(phantom_root, tmp_path_factory):
    """The phantoms photographed by another camera: green x 0.6, blue x 0.8, red + 30."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shifted") / "phantoms-other-camera"
    shutil.copytree(phantom_root, root)
    for path in (root / "images").glob("*.jpg"):
        rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
        rgb = rgb * np.array([1.0, 0.6, 0.8]) + np.array([30.0, 0.0, 0.0])
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=95)
    return root


def test_evaluate_data_adapt_bn_recovers_a_colour_shift(
    tiny_bn_run, phantom_root, colour_shifted_phantoms, tmp_path
):
    """`evaluate RUN --data DIR --adapt bn`: on the training distribution it changes the
    metrics within noise; on a colour-shifted copy of it, which costs the run most of its
    balanced accuracy, it wins back at least half of the loss."""
    from dermkit.eval.external import evaluate_external

    def bal_acc(data, adapt, name):
        done = evaluate_external(tiny_bn_run, data, out_dir=tmp_path / name, n_boot=0, adapt=adapt)
        return done["result"]["metrics"]["balanced_accuracy"]["value"]

    same, same_bn = bal_acc(phantom_root, None, "a"), bal_acc(phantom_root, "bn", "b")
    shifted = bal_acc(colour_shifted_phantoms, None, "c")
    shifted_bn = bal_acc(colour_shifted_phantoms, "bn", "d")
    assert same > 0.4 and abs(same_bn - same) < 0.08, (same, same_bn)
    assert shifted < same - 0.2, (same, shifted)
    assert shifted_bn > shifted + 0.5 * (same - shifted), (same, shifted, shifted_bn)


def test_adabn_end_to_end_on_a_batchnorm_run(tiny_bn_run, phantom_root, tmp_path):
    """--adapt bn on a CNN run: every BN layer re-estimated on the target images, the
    adapted run folder written (weights, BN statistics, record), and each call of a
    RunAdapter starts again from the run's own statistics."""
    from dermkit.data.cache import build_cache
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.readers import load_dataset
    from dermkit.eval.adapt import BN_STATS_FILE, RunAdapter, batchnorm_layers
    from dermkit.eval.calibration import DecisionRule
    from dermkit.eval.external import evaluate_external
    from dermkit.models.runs_io import load_run_model

    done = evaluate_external(
        tiny_bn_run,
        phantom_root,
        out_dir=tmp_path / "ev",
        n_boot=10,
        adapt="bn",
        save_adaptation=tmp_path / "adapted",
    )
    bn = done["result"]["external"]["adaptation"]["bn"]
    model, cfg, classes = load_run_model(tiny_bn_run)
    n_layers = len(batchnorm_layers(model))
    assert n_layers > 5 and bn["layers"] == n_layers and bn["images"] == done["result"]["n"]
    stats = load_file(tmp_path / "adapted" / BN_STATS_FILE)
    own = model.state_dict()
    key = next(k for k in stats if k.endswith("running_mean"))
    assert not torch.allclose(stats[key], own[key])  # re-estimated, not the run's
    adapted_weights = load_file(tmp_path / "adapted" / "model.safetensors")
    torch.testing.assert_close(adapted_weights[key], stats[key])

    manifest = load_dataset(phantom_root, classes=classes).manifest
    cache = build_cache(manifest, cfg.data.image_size, cfg.data.crop, cfg.data.cache_dir)
    full = CachedImageDataset(cache, manifest, classes)
    half = CachedImageDataset(cache, manifest.iloc[: len(manifest) // 2], classes)
    adapter = RunAdapter(tiny_bn_run, model, cfg, classes, DecisionRule(), "bn")
    first = adapter(full).probs
    adapter(half)
    np.testing.assert_allclose(adapter(full).probs, first, atol=1e-6)


def test_shift_bench_as_is_and_adapted(tiny_bn_run, tmp_path):
    """`evaluate RUN --adapt bn,priors --shift-bench`: each condition scored as is and
    adapted to its own images, with paired CIs; the run's weights are left as they were."""
    before = load_file(tiny_bn_run / "model.safetensors")
    result = _invoke(
        "evaluate",
        tiny_bn_run,
        "--adapt",
        "bn,priors",
        "--shift-bench",
        "--shifts",
        "warm,dark",
        "--limit",
        40,
        "--n-boot",
        20,
        "--out",
        tmp_path / "adapt-shift",
    )
    assert "| clean | clean |" in result.stdout and "| warm | middle |" in result.stdout
    body = json.loads((tmp_path / "adapt-shift" / "adapt_shift.json").read_text())
    assert body["adaptations"] == ["bn", "priors"] and body["n_images"] == 40
    assert [(r["shift"], r["severity"]) for r in body["rows"]] == [
        ("clean", "clean"),
        ("warm", "middle"),
        ("dark", "middle"),
    ]
    for row in body["rows"]:
        e = row["metrics"]["balanced_accuracy"]
        assert e["delta"] == pytest.approx(e["adapted"] - e["as_is"])
        assert row["priors"]["check"] is not None
    after = load_file(tiny_bn_run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = _invoke("evaluate", tiny_bn_run, "--shift-bench", code=2)
    assert "needs --adapt" in " ".join(result.output.split())
