"""Ordinal task: ordered classes from a column, the CORN head, ordinal metrics, the run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from dermkit.config import ConfigError, load_config
from dermkit.eval.ordinal import ordinal_metrics
from dermkit.tasks.ordinal import (
    OrdinalLabelError,
    OrdinalTask,
    corn_class_probs,
    corn_criterion,
    corn_cumulative,
    corn_loss,
    cut_thresholds,
    expected_class,
    threshold_class_names,
)
from dermkit.tasks.settings import TaskConfig
from dermkit.train.loop import score
from dermkit.train.settings import FinetuneRunConfig

BRESLOW = [0.0, 0.8, 1.0, 2.0]


def test_thresholds_cut_right_closed_bins_at_the_edges():
    x = [-0.1, 0.0, 0.01, 0.8, 0.81, 1.0, 1.5, 2.0, 2.01, 9.0]
    codes = cut_thresholds(np.array(x), BRESLOW, "thickness")
    # class k holds t_k < x <= t_{k+1}: an edge value belongs to the lower class
    np.testing.assert_array_equal(codes, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert threshold_class_names(BRESLOW) == ["<=0", "0-0.8", "0.8-1", "1-2", ">2"]
    with pytest.raises(OrdinalLabelError, match="strictly increasing"):
        cut_thresholds(np.array(x), [0.0, 1.0, 1.0], "thickness")


def test_missing_value_is_an_error_naming_column_and_row():
    df = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "label": ["mel"] * 4,
            "thickness": [0.5, np.nan, 1.2, "n/a"],
        }
    )
    task = OrdinalTask.from_config(
        TaskConfig(kind="ordinal", column="thickness", thresholds=BRESLOW)
    )
    with pytest.raises(OrdinalLabelError) as err:
        task.codes(df)
    message = str(err.value)
    assert "'thickness'" in message and "[1, 3]" in message and "'b'" in message
    np.testing.assert_array_equal(task.missing(df), [False, True, False, True])
    relabelled = task.relabel(df.iloc[[0, 2]])
    assert relabelled["label"].tolist() == ["0-0.8", "1-2"]
    assert relabelled["diagnosis"].tolist() == ["mel", "mel"]
    with pytest.raises(OrdinalLabelError, match="'depth' is not a manifest column"):
        OrdinalTask("depth", ["a", "b"], thresholds=[1.0]).codes(df)


def test_categorical_order_and_unknown_values():
    task = OrdinalTask.from_config(
        TaskConfig(kind="ordinal", column="grade", order=["low", "mid", "high"])
    )
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "grade": ["high", "low", "mid"]})
    np.testing.assert_array_equal(task.codes(df), [2, 0, 1])
    np.testing.assert_array_equal(task.truth(df), [2.0, 0.0, 1.0])
    with pytest.raises(OrdinalLabelError, match=r"'grade'.*\[1\].*lowest first"):
        task.codes(pd.DataFrame({"image_id": ["a", "b"], "grade": ["low", "extreme"]}))


def test_task_config_validation_names_the_key():
    base = ["task.kind=ordinal"]
    with pytest.raises(ConfigError, match=r"task\.column"):
        load_config(FinetuneRunConfig, "finetune", None, None, base)
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(FinetuneRunConfig, "finetune", None, None, [*base, "task.column=age"])
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(
            FinetuneRunConfig,
            "finetune",
            None,
            None,
            [*base, "task.column=age", "task.thresholds=[3, 2]"],
        )
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        None,
        None,
        [*base, "task.column=age", "task.thresholds=[10,20,30,40,50,60,70,80]"],
    )
    assert OrdinalTask.from_config(cfg.task).n_classes == 9
    assert FinetuneRunConfig().task.kind == "classification"


def test_fit_centres_median_per_class_with_fallback():
    task = OrdinalTask("thickness", threshold_class_names(BRESLOW), thresholds=BRESLOW)
    train = pd.DataFrame({"image_id": list("abcd"), "thickness": [0.0, 0.2, 0.6, 3.0]})
    task.fit_centres(train)
    # classes 2 (0.8-1] and 3 (1-2] have no training rows: their bin midpoints
    assert task.centres == pytest.approx([0.0, 0.4, 0.9, 1.5, 3.0])


def test_corn_probabilities_are_rank_consistent_and_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(256, 4) * 6
    logits[0] = torch.tensor([40.0, -40.0, 40.0, 40.0])  # saturated sigmoids
    cum = corn_cumulative(logits)
    assert (cum[:, 1:] <= cum[:, :-1]).all()  # P(y > k) non-increasing in k
    assert ((cum >= 0) & (cum <= 1)).all()
    probs = corn_class_probs(logits)
    assert probs.shape == (256, 5) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(256))
    # the expected class is the sum of the cumulative probabilities
    np.testing.assert_allclose(expected_class(probs.numpy()), cum.sum(1).numpy(), atol=1e-5)
    # P(y > 0) = sigmoid(first logit): the first task sees every row
    torch.testing.assert_close(cum[:, 0], torch.sigmoid(logits[:, 0]))


def test_corn_loss_learns_an_ordinal_target():
    """A linear CORN head fitted with the loss recovers an ordered target from x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g)
    y = torch.bucketize(x[:, 0] + 0.1 * torch.randn(400, generator=g), torch.tensor([-1.0, 0, 1]))
    head = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = float(corn_loss(head(x), y).detach())
    for _ in range(200):
        opt.zero_grad()
        loss = corn_criterion(head(x), y, x)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    expected = expected_class(corn_class_probs(head(x)).detach().numpy())
    assert spearmanr(expected, y.numpy())[0] > 0.9
    with pytest.raises(ValueError, match="hard class codes"):
        corn_criterion(head(x), torch.zeros(400, 4), x)


def test_score_hook_uses_ordinal_probabilities():
    logits = torch.tensor([[5.0, -5.0], [5.0, 5.0], [-5.0, -5.0], [5.0, 5.0]])
    labels = torch.tensor([1, 2, 0, 1])
    out = score(logits, labels, to_probs=corn_class_probs)
    probs = corn_class_probs(logits)
    assert out["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(probs.log(), labels)))
    pred = probs.argmax(1).numpy()
    np.testing.assert_array_equal(pred, [1, 2, 0, 2])
    assert out["qwk"] == pytest.approx(cohen_kappa_score(labels, pred, weights="quadratic"))
    assert "qwk" not in score(torch.randn(4, 3), labels)


def test_ordinal_metrics_values_and_lesion_bootstrap():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 4, 300)
    y = cut_thresholds(truth, BRESLOW, "thickness")
    perfect = np.eye(5)[y]
    groups = np.repeat(np.arange(150), 2)
    r = ordinal_metrics(y, perfect, truth, threshold_class_names(BRESLOW), None, groups, 200)
    m = r["metrics"]
    assert m["qwk"]["value"] == pytest.approx(1.0) and m["mae_classes"]["value"] == 0
    assert m["spearman"]["value"] > 0.9
    assert m["spearman"]["ci_low"] <= m["spearman"]["value"] <= m["spearman"]["ci_high"]
    assert [row["n"] for row in r["per_range"]] == np.bincount(y, minlength=5).tolist()
    # noisy predictions: metrics match scikit-learn / scipy, CIs are proper intervals
    noisy = np.clip(y + rng.integers(-1, 2, 300), 0, 4)
    probs = 0.6 * np.eye(5)[noisy] + 0.1
    probs /= probs.sum(1, keepdims=True)
    value = probs @ np.array([0.0, 0.4, 0.9, 1.5, 3.0])
    r = ordinal_metrics(y, probs, truth, threshold_class_names(BRESLOW), value, groups, 200)
    m = r["metrics"]
    assert m["qwk"]["value"] == pytest.approx(cohen_kappa_score(y, noisy, weights="quadratic"))
    assert m["mae_classes"]["value"] == pytest.approx(np.abs(noisy - y).mean())
    assert m["spearman"]["value"] == pytest.approx(spearmanr(probs @ np.arange(5), truth)[0])
    assert m["mae_value"]["value"] == pytest.approx(np.abs(value - truth).mean())
    for entry in m.values():
        assert entry["ci_low"] < entry["ci_high"]
    assert np.asarray(r["confusion"]).sum() == 300


def test_rows_without_a_value_error_or_are_dropped():
    from types import SimpleNamespace

    from dermkit.tasks.ordinal import ordinal_parts

    frames = {
        s: pd.DataFrame(
            {
                "image_id": [f"{s}{i}" for i in range(3)],
                "label": ["mel", "nv", "mel"],
                "thickness": [0.5, np.nan, 1.5],
            }
        )
        for s in ("train", "val", "test")
    }
    data = SimpleNamespace(part=lambda s: frames[s])
    task = OrdinalTask("thickness", threshold_class_names(BRESLOW), thresholds=BRESLOW)
    with pytest.raises(ConfigError, match=r"'thickness'.*'train1'.*task\.drop_missing"):
        ordinal_parts(data, task, False, np.zeros(3, bool))
    parts, mask = ordinal_parts(data, task, True, np.array([False, True, True]))
    assert [len(p) for p in parts.values()] == [2, 2, 2]
    assert mask.tolist() == [False, True]  # the synthetic mask follows the dropped row
    assert parts["test"]["label"].tolist() == ["0-0.8", "1-2"]


@pytest.fixture(scope="module")
def melanoma_root(tmp_path_factory):
    """Melanoma-only phantoms. The shared ``phantom_root`` has about 13 melanomas, too few
    Breslow depths to learn an order from; 300 melanoma lesions (small 64x48 files, the
    model sees 32 px) take a few seconds to draw. Thickness: ~30% in situ, else log-normal."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("melanoma")
    generate_phantoms(
        root,
        n_lesions=300,
        views_per_lesion=(1, 2),
        image_size=(64, 48),
        class_weights={"mel": 1.0},
        seed=1,
    )
    return root


# The tiny budget that reaches Spearman >= 0.7 on the phantoms' thickness: a 2-block ViT,
# 10 epochs at 32 px, a higher learning rate than the tiny preset's, no colour jitter (the
# phantoms encode depth mostly in colour: blue-white veil, number of colours).
ORDINAL_OVERRIDES = [
    "model.name=vit_nano_patch4_32",
    "optim.epochs=10",
    "optim.base_lr=0.01",
    "augment.brightness=0",
    "augment.contrast=0",
    "augment.saturation=0",
    "augment.hue=0",
    "task.kind=ordinal",
    "task.column=thickness",
    "task.thresholds=[0, 0.8, 1, 2]",
    "eval.n_boot=100",
    "data.near_duplicate_distance=-1",
]


def test_ordinal_finetune_learns_phantom_thickness(melanoma_root, cache_dir, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from dermkit.cli import app
    from dermkit.tasks.runs import open_run
    from dermkit.train.finetune import run_finetune

    run = tmp_path / "run"
    overrides = [f"data.path={melanoma_root}", f"data.cache_dir={cache_dir}", f"out_dir={run}"]
    cfg = load_config(FinetuneRunConfig, "finetune", "tiny", None, overrides + ORDINAL_OVERRIDES)
    torch.set_num_threads(1)
    run_finetune(cfg, progress=False)

    result = json.loads((run / "metrics.json").read_text())
    m = result["metrics"]
    assert m["spearman"]["value"] >= 0.7, m
    assert m["qwk"]["value"] >= 0.4, m
    assert m["spearman"]["ci_low"] < m["spearman"]["value"] < m["spearman"]["ci_high"]
    classes = ["<=0", "0-0.8", "0.8-1", "1-2", ">2"]
    assert json.loads((run / "classes.json").read_text()) == classes
    assert load_file(run / "model.safetensors")["head.weight"].shape[0] == 4  # K-1 outputs
    # selection on val QWK of the ordinal probabilities
    history = result["history"]
    best = max(range(len(history)), key=lambda i: history[i]["val_qwk"])
    assert result["best epoch (val QWK)"] == history[best]["epoch"]
    # the summary names its selection metric; best_val_macro_f1 is for classification only
    training = result["training"]
    assert training["selection_metric"] == "qwk" and "best_val_macro_f1" not in training
    assert training["best_val_metric"] == pytest.approx(history[best]["val_qwk"])

    preds = pd.read_csv(run / "predictions_test.csv")
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    rho = spearmanr(probs @ np.arange(5), preds["ordinal_truth"])[0]
    assert rho == pytest.approx(m["spearman"]["value"], abs=1e-3)  # same numbers from the file
    assert (run / "features_pca.png").stat().st_size > 1000

    out = CliRunner().invoke(app, ["evaluate", str(run), "--n-boot", "20"])
    assert out.exit_code == 0, out.output
    assert "qwk" in out.output and f"{m['spearman']['value']:.3f}" in out.output

    opened = open_run(run)
    assert opened.ordinal is not None and opened.ordinal.centres[0] == 0.0
    assert opened.model.num_classes == 4
