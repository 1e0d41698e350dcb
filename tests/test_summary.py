"""Run summaries (ablation-table rows): metrics vs scikit-learn, CIs, cost, cache, table."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.eval import summary as summary_module
from dermkit.eval.calibration import expected_calibration_error
from dermkit.eval.summary import METRIC_KEYS, ablation_table_markdown
from dermkit.exits.summary import summarize_run

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ESTIMATE = re.compile(r"^\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]$")


def _predictions_run(path, y, probs, classes, lesions=None, stage="baseline"):
    """A run folder holding only run.json and predictions_test.csv (like a baseline run)."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(y)
    manifest = pd.DataFrame(
        {
            "image_id": [f"IMG_{i:05d}" for i in range(n)],
            "lesion_id": lesions if lesions is not None else [f"L_{i:05d}" for i in range(n)],
            "label": np.asarray(classes)[y],
        }
    )
    write_predictions(path / "predictions_test.csv", manifest, probs, classes)
    (path / "run.json").write_text(json.dumps({"stage": stage}))
    return path


@pytest.fixture(scope="module")
def handmade_run(tmp_path_factory):
    """300 images of 150 lesions (2 each), 7 classes, informative random probabilities."""
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, len(CLASSES), size=n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += 1.2
    lesions = [f"L_{i // 2:04d}" for i in range(n)]
    root = tmp_path_factory.mktemp("handmade") / "baseline"
    return _predictions_run(root, y, softmax(logits, axis=1), CLASSES, lesions)


def test_metrics_equal_sklearn_on_a_handmade_predictions_file(handmade_run):
    s = summarize_run(handmade_run, n_boot=200, seed=0)
    # compare with what the file holds (rounded to 6 significant digits)
    _, y, probs, classes = read_predictions(handmade_run / "predictions_test.csv")
    pred = probs.argmax(1)
    assert s["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert s["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["macro_f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"))
    auroc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert s["macro_auroc"]["value"] == pytest.approx(auroc)
    mel = classes.index("mel")
    fpr, tpr, _ = roc_curve(y == mel, probs[:, mel], drop_intermediate=False)
    assert s["mel_sens_at_90_spec"]["value"] == pytest.approx(tpr[fpr <= 0.1].max())
    assert s["ece"]["value"] == pytest.approx(expected_calibration_error(probs, y, 15))
    assert s["n_images"] == 300 and s["n_lesions"] == 150
    assert s["kind"] == "baseline" and s["classes"] == CLASSES


def test_every_ci_contains_its_point_estimate(handmade_run):
    s = summarize_run(handmade_run, n_boot=200, seed=0)
    for key in METRIC_KEYS:
        entry = s[key]
        assert entry["lo"] is not None and entry["hi"] is not None, key
        assert entry["lo"] <= entry["value"] <= entry["hi"], (key, entry)
        assert entry["lo"] < entry["hi"], key  # 150 lesions: the interval has width


def test_mel_sensitivity_at_90_specificity_on_a_constructed_case(tmp_path):
    # 10 non-melanomas with P(mel) 0.00..0.45: 90% specificity keeps the 9 lowest
    # (<= 0.40) below the threshold, so a melanoma is found only when P(mel) > 0.40.
    neg = np.arange(10) * 0.05
    pos = np.array([0.30, 0.40, 0.42, 0.50, 0.90])  # detected: 0.42, 0.50, 0.90
    p_mel = np.r_[neg, pos]
    probs = np.stack([p_mel, 1 - p_mel], axis=1)
    y = np.r_[np.ones(10, int), np.zeros(5, int)]  # class 0 = mel, 1 = nv
    run = _predictions_run(tmp_path / "run", y, probs, ["mel", "nv"])
    s = summarize_run(run, latency=False, n_boot=0)
    assert s["mel_sens_at_90_spec"]["value"] == pytest.approx(3 / 5)
    assert s["mel_sens_at_90_spec"]["lo"] is None  # n_boot=0: no interval
    # without a melanoma class the metric does not apply
    other = _predictions_run(tmp_path / "nomel", y, probs, ["bcc", "nv"])
    assert summarize_run(other, latency=False, n_boot=0)["mel_sens_at_90_spec"]["value"] is None


def test_summary_is_cached_by_the_predictions_hash(handmade_run, monkeypatch):
    first = summarize_run(handmade_run, n_boot=200, seed=0)
    cached = json.loads((handmade_run / "summary.json").read_text())
    assert cached["cache_key"] == first["cache_key"]

    def boom(*args, **kwargs):
        raise AssertionError("metrics recomputed although the predictions did not change")

    monkeypatch.setattr(summary_module, "evaluate_predictions", boom)
    assert summarize_run(handmade_run, n_boot=200, seed=0) == first
    # other bootstrap settings or other predictions are a cache miss
    with pytest.raises(AssertionError, match="recomputed"):
        summarize_run(handmade_run, n_boot=100, seed=0)
    monkeypatch.undo()
    path = handmade_run / "predictions_test.csv"
    original = path.read_text()
    df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    # flip row 0 between right and wrong, so accuracy must change
    label, pred = df.loc[0, "label"], df.loc[0, "pred"]
    df.loc[0, "label"] = pred if label != pred else next(c for c in CLASSES if c != pred)
    df.to_csv(path, index=False)
    try:
        changed = summarize_run(handmade_run, n_boot=200, seed=0)
        assert changed["cache_key"] != first["cache_key"]
        assert changed["accuracy"]["value"] != first["accuracy"]["value"]
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def tiny_summary(tiny_classifier_run):
    return summarize_run(tiny_classifier_run, latency=True, n_boot=50, seed=0)


def test_a_trained_run_reports_params_gflops_and_latency(tiny_classifier_run, tiny_summary):
    from dermkit.eval.metrics import evaluate_predictions
    from dermkit.models.runs_io import load_run_model

    model, cfg, _ = load_run_model(tiny_classifier_run)
    s = tiny_summary
    assert s["kind"] == "finetune" and s["model"] == cfg.model.name
    assert s["image_size"] == cfg.data.image_size
    assert s["params"] == sum(p.numel() for p in model.parameters())
    assert s["gflops"] > 0
    # a ViT forward is at least its patch-embedding matmul: 2 * tokens * (3 * p * p) * dim
    tokens = (cfg.data.image_size // 4) ** 2
    assert s["gflops"] * 1e9 >= 2 * tokens * 3 * 16 * model.embed_dim
    assert s["latency_ms_batch1"] > 0 and s["latency_measured"]
    assert s["latency_note"]["calls"] > 1
    # the metrics are those of the run's own test predictions
    df, y, probs, classes = read_predictions(tiny_classifier_run / "predictions_test.csv")
    expected = evaluate_predictions(y, probs, classes, groups=df["lesion_id"].to_numpy(), n_boot=0)
    assert s["macro_f1"]["value"] == pytest.approx(expected["metrics"]["macro_f1"]["value"])
    assert (tiny_classifier_run / "summary.json").exists()


def test_latency_is_added_to_a_cached_summary_without_it(tmp_path, tiny_classifier_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_classifier_run, run, ignore=shutil.ignore_patterns("summary.json"))
    without = summarize_run(run, latency=False, n_boot=20)
    assert without["latency_ms_batch1"] is None and without["params"] > 0
    # asking again without latency reuses the cache; asking with latency measures it
    assert summarize_run(run, latency=False, n_boot=20) == without
    with_latency = summarize_run(run, latency=True, n_boot=20)
    assert with_latency["latency_ms_batch1"] > 0
    assert with_latency["macro_f1"] == without["macro_f1"]


def test_ablation_table_has_every_column_and_na_for_the_baseline(handmade_run, tiny_summary):
    baseline = summarize_run(handmade_run, n_boot=200, seed=0)
    assert baseline["params"] is None and baseline["gflops"] is None
    table = ablation_table_markdown([("classical baseline", baseline), ("tiny ViT", tiny_summary)])
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "run",
        "accuracy",
        "balanced accuracy",
        "macro-F1",
        "macro AUROC",
        "mel sens @90% spec",
        "ECE",
        "params (M)",
        "GFLOPs",
        "batch-1 latency (ms)",
    ]
    assert len(lines) == 4
    rows = {
        r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }
    base, tiny = rows["classical baseline"], rows["tiny ViT"]
    assert all(ESTIMATE.match(cell) for cell in base[:6]), base
    assert base[6:] == ["n/a", "n/a", "n/a"]
    assert tiny[6] == f"{tiny_summary['params'] / 1e6:.2f}"
    assert float(tiny[7]) == pytest.approx(tiny_summary["gflops"], abs=5e-4)
    assert float(tiny[8]) > 0
    # a metric that is undefined shows n/a too
    undefined = dict(baseline, mel_sens_at_90_spec={"value": None, "lo": None, "hi": None})
    row = ablation_table_markdown([("x", undefined)]).strip().splitlines()[2]
    assert row.split("|")[6].strip() == "n/a"


@pytest.fixture(scope="module")
def exit_run(tiny_classifier_run, cache_dir, tmp_path_factory):
    """One-epoch linear exits on the tiny ViT, calibrated."""
    from dermkit.config import load_config
    from dermkit.exits.calibrate import run_exits_calibrate
    from dermkit.exits.settings import ExitsRunConfig
    from dermkit.exits.train import run_exits_train

    cfg = load_config(
        ExitsRunConfig,
        "exits",
        "tiny",
        overrides=[
            f"base_run={tiny_classifier_run}",
            f"cache_dir={cache_dir}",
            f"out_dir={tmp_path_factory.mktemp('summary-exits') / 'exits'}",
            "optim.epochs=1",
            "exits.head_types=[linear]",
        ],
    )
    out = run_exits_train(cfg, progress=False)
    run_exits_calibrate(out, objective="f1-drop=0.5")
    return out


def test_an_exit_run_reports_average_gflops_of_its_policy(exit_run):
    from dermkit.exits.policy import softmax as exit_softmax
    from dermkit.exits.run_io import ExitRun

    s = summarize_run(exit_run, latency=True, n_boot=20)
    run = ExitRun.open(exit_run)
    assert s["kind"] == "exits" and s["exit_head"] == "linear"
    logits = run.logits("linear")
    chosen, exit_index = run.policy("linear").select(list(logits["test"]))
    flops = run.info["gflops"]["linear"]
    expected = np.asarray(flops["cumulative_gflops"])[exit_index].mean()
    assert s["gflops"] == pytest.approx(expected)
    assert s["gflops"] <= flops["cumulative_gflops"][-1] + 1e-12
    y = logits["test_labels"].astype(int)
    assert s["accuracy"]["value"] == pytest.approx((exit_softmax(chosen).argmax(1) == y).mean())
    assert s["params"] == sum(p.numel() for p in run.model("linear").parameters())
    assert s["latency_ms_batch1"] > 0
    assert (exit_run / "summary_linear.json").exists()
    with pytest.raises(ValueError, match="no 'mlp' exits"):
        summarize_run(exit_run, latency=False, n_boot=20, exit_head="mlp")
