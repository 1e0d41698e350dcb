"""Tests for dermkit.eval metrics, lesion-level bootstrap and calibration.

The fast vectorised metrics are checked against scikit-learn (or a brute-force loop where
scikit-learn has no equivalent) on random data with tied scores and missing classes.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from dermkit.eval.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from dermkit.eval.metrics import (
    HEADLINE_METRICS,
    _PerImageStatistics,
    evaluate_predictions,
    sensitivity_at_specificity,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# The one macro-F1 (dermkit.core.metrics): all K classes, an undefined F1 counting 0.
ALL_CLASSES = {"average": "macro", "labels": range(7), "zero_division": 0}


def tied_probs(rng: np.random.Generator, n: int, c: int, never_predicted: int | None = None):
    """(n, c) probabilities built from small integers, so many scores tie exactly."""
    raw = rng.integers(0, 4, size=(n, c)).astype(float)
    raw[raw.sum(axis=1) == 0, 0] = 1.0
    if never_predicted is not None:
        raw[:, never_predicted] = 0.0
        raw[raw.sum(axis=1) == 0, (never_predicted + 1) % c] = 1.0
    return raw / raw.sum(axis=1, keepdims=True)


def brute_force_ece(probs, y_true, n_bins):
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence <= hi)
        if in_bin.any():
            total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total / len(y_true)


def brute_force_sensitivity(scores, is_positive, specificity):
    """Try every threshold 'score >= t' (t = each distinct score, or above all of them)."""
    pos, neg = scores[is_positive], scores[~is_positive]
    best = 0.0
    for t in [*np.unique(scores), np.inf]:
        if np.mean(neg < t) >= specificity:
            best = max(best, np.mean(pos >= t))
    return best


@pytest.mark.parametrize("never_predicted", [None, 3])
def test_point_estimates_match_sklearn_with_ties(never_predicted):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, size=400)
    probs = tied_probs(rng, 400, 7, never_predicted)
    y_pred = probs.argmax(axis=1)
    r = evaluate_predictions(y, probs, CLASSES, n_boot=0)
    m = {k: v["value"] for k, v in r["metrics"].items()}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, y_pred, **ALL_CLASSES))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, y_pred, average="weighted"))
    assert m["macro_auroc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    onehot = np.eye(7)[y]
    assert m["brier"] == pytest.approx(np.mean(((probs - onehot) ** 2).sum(axis=1)))
    assert m["ece"] == pytest.approx(brute_force_ece(probs, y, 15))
    assert r["confusion_matrix"] == confusion_matrix(y, y_pred, labels=range(7)).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=range(7), zero_division=np.nan
    )
    for k, name in enumerate(CLASSES):
        entry = r["per_class"][name]
        assert entry["support"] == support[k]
        for ours, theirs in (
            (entry["precision"], precision[k]),
            (entry["recall"], recall[k]),
            (entry["f1"], f1[k]),
        ):
            if np.isnan(theirs):
                assert ours is None
            else:
                assert ours == pytest.approx(theirs)
        assert entry["auroc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    if never_predicted is not None:
        assert r["per_class"][CLASSES[never_predicted]]["precision"] is None


def test_missing_true_class_is_left_out_of_macro_auroc_and_balanced_accuracy():
    rng = np.random.default_rng(2)
    y = rng.choice([0, 1, 2, 4, 5, 6], size=300)  # no "df" (3) in the ground truth
    probs = tied_probs(rng, 300, 7)
    y_pred = probs.argmax(axis=1)
    r = evaluate_predictions(y, probs, CLASSES, n_boot=0)
    present = [0, 1, 2, 4, 5, 6]
    expected_auroc = np.mean([roc_auc_score(y == k, probs[:, k]) for k in present])
    assert r["metrics"]["macro_auroc"]["value"] == pytest.approx(expected_auroc)
    assert r["per_class"]["df"]["auroc"] is None
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-but-absent class
        expected_bacc = balanced_accuracy_score(y, y_pred)
    assert r["metrics"]["balanced_accuracy"]["value"] == pytest.approx(expected_bacc)
    # macro-F1 runs over all 7 classes (dermkit.core.metrics): the absent "df" counts 0.
    assert r["metrics"]["macro_f1"]["value"] == pytest.approx(f1_score(y, y_pred, **ALL_CLASSES))


def test_weighted_replicate_equals_sklearn_on_explicitly_resampled_data():
    """A bootstrap replicate (integer weights) must equal the metrics of the resampled set."""
    rng = np.random.default_rng(3)
    n = 250
    y = rng.integers(0, 7, size=n)
    probs = tied_probs(rng, n, 7)
    stats = _PerImageStatistics.build(y, probs, n_bins=10)
    weights = rng.integers(0, 3, size=(4, n)).astype(float)
    out = stats.replicate_metrics(weights, positive_index=4)
    for b in range(4):
        idx = np.repeat(np.arange(n), weights[b].astype(int))
        yb, pb = y[idx], probs[idx]
        pred = pb.argmax(axis=1)
        assert out["accuracy"][b] == pytest.approx(accuracy_score(yb, pred))
        assert out["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pred))
        assert out["macro_f1"][b] == pytest.approx(f1_score(yb, pred, **ALL_CLASSES))
        assert out["weighted_f1"][b] == pytest.approx(f1_score(yb, pred, average="weighted"))
        for k in range(7):
            assert out["auroc"][b, k] == pytest.approx(roc_auc_score(yb == k, pb[:, k]))
        assert out["ece"][b] == pytest.approx(brute_force_ece(pb, yb, 10))
        for suffix, spec in (("spec80", 0.8), ("spec90", 0.9)):
            expected = brute_force_sensitivity(pb[:, 4], yb == 4, spec)
            assert out[suffix][b] == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_sensitivity_at_specificity_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    scores = np.round(rng.random(n), 1)  # ties within and across the two classes
    is_positive = rng.random(n) < 0.3
    is_positive[:2] = [True, False]
    for spec in (0.5, 0.8, 0.9, 0.95, 1.0, 1 / 3):
        expected = brute_force_sensitivity(scores, is_positive, spec)
        assert sensitivity_at_specificity(scores, is_positive, spec) == pytest.approx(expected)


def test_sensitivity_at_specificity_exact_fraction_boundary():
    # 10 negatives 0.0..0.9. Specificity 0.9 needs 9 of them below the threshold, so the
    # threshold sits just above 0.8 and the positive at 0.85 is detected.
    negatives = np.arange(10) / 10.0
    scores = np.r_[negatives, 0.25, 0.85, 0.95]
    is_positive = np.r_[np.zeros(10, bool), np.ones(3, bool)]
    assert sensitivity_at_specificity(scores, is_positive, 0.9) == pytest.approx(2 / 3)
    assert sensitivity_at_specificity(scores, is_positive, 0.95) == pytest.approx(1 / 3)
    assert sensitivity_at_specificity(scores, is_positive, 1.0) == pytest.approx(1 / 3)
    # 3 * 0.1 is 0.30000000000000004 in floating point; it still means 3 of 10 negatives
    # (threshold above 0.2), not 4, so the positive at 0.25 is detected.
    assert sensitivity_at_specificity(scores, is_positive, 3 * 0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        sensitivity_at_specificity(scores, np.zeros(13, bool), 0.9)


def test_perfect_classifier_has_best_values_and_collapsed_cis():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 7, size=200)
    probs = np.eye(7)[y]
    groups = rng.integers(0, 120, size=200)
    r = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=200)
    best = {name: 1.0 for name in HEADLINE_METRICS} | {"ece": 0.0, "brier": 0.0}
    best |= {"mel_sens_at_spec80": 1.0, "mel_sens_at_spec90": 1.0}
    assert set(r["metrics"]) == set(best)
    for name, value in best.items():
        entry = r["metrics"][name]
        assert entry["value"] == pytest.approx(value), name
        assert entry["ci_low"] == pytest.approx(value), name
        assert entry["ci_high"] == pytest.approx(value), name


def test_random_classifier_has_auroc_near_half():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 7, size=3000)
    probs = rng.dirichlet(np.ones(7), size=3000)
    r = evaluate_predictions(y, probs, CLASSES, n_boot=200)
    auroc = r["metrics"]["macro_auroc"]
    assert auroc["value"] == pytest.approx(0.5, abs=0.03)
    assert auroc["ci_low"] < 0.5 < auroc["ci_high"]
    assert r["metrics"]["accuracy"]["value"] == pytest.approx(1 / 7, abs=0.03)


def test_duplicated_images_of_a_lesion_do_not_shrink_the_lesion_bootstrap_ci():
    rng = np.random.default_rng(6)
    n_lesions = 300
    y = rng.integers(0, 7, size=n_lesions)
    logits = rng.normal(size=(n_lesions, 7))
    logits[np.arange(n_lesions), y] += 1.0
    probs = softmax(logits, axis=1)
    lesion = np.arange(n_lesions)
    kw = {"n_boot": 400, "seed": 0}

    def width(result, name):
        return result["metrics"][name]["ci_high"] - result["metrics"][name]["ci_low"]

    base = evaluate_predictions(y, probs, CLASSES, groups=lesion, **kw)
    y5, probs5, lesion5 = np.repeat(y, 5), np.repeat(probs, 5, axis=0), np.repeat(lesion, 5)
    grouped = evaluate_predictions(y5, probs5, CLASSES, groups=lesion5, **kw)
    as_independent = evaluate_predictions(y5, probs5, CLASSES, groups=None, **kw)
    assert grouped["n"] == 1500 and grouped["n_groups"] == 300
    assert as_independent["n_groups"] == 1500
    for name in ("accuracy", "macro_auroc", "macro_f1"):
        # Duplicates carry no new evidence: the grouped CI keeps the width of the original...
        assert width(grouped, name) == pytest.approx(width(base, name), rel=0.25), name
        # ...while treating duplicates as independent shrinks it by about sqrt(5).
        assert width(grouped, name) > 1.7 * width(as_independent, name), name


def test_degenerate_replicates_are_dropped_per_metric_and_counted():
    rng = np.random.default_rng(7)
    n = 60
    y = rng.choice([0, 1, 2, 5], size=n)
    y[:2] = 4  # one melanoma lesion with two images: absent from many resamples
    groups = np.arange(n)
    groups[1] = 0
    probs = tied_probs(rng, n, 7)
    r = evaluate_predictions(y, probs, CLASSES, groups=groups.astype(str), n_boot=300)
    assert r["metrics"]["accuracy"]["n_valid"] == 300
    sens = r["metrics"]["mel_sens_at_spec90"]
    assert 0 < sens["n_valid"] < 300  # P(lesion drawn) = 1 - (1 - 1/59)^59 ~ 0.63
    assert r["per_class"]["mel"]["ci"]["auroc"]["n_valid"] == sens["n_valid"]
    assert r["per_class"]["df"]["auroc"] is None
    assert r["per_class"]["df"]["ci"]["auroc"]["n_valid"] == 0


def test_absent_positive_class_keeps_keys_with_none():
    rng = np.random.default_rng(8)
    y = rng.choice([0, 1, 2], size=50)
    probs = tied_probs(rng, 50, 7)
    r = evaluate_predictions(y, probs, CLASSES, n_boot=20)
    for name in ("mel_sens_at_spec80", "mel_sens_at_spec90"):
        assert r["metrics"][name]["value"] is None
        assert r["metrics"][name]["ci_low"] is None
    # A class set without "mel" at all: same keys, value None.
    r2 = evaluate_predictions(y, np.eye(3)[y], ["a", "b", "c"], n_boot=5)
    assert r2["metrics"]["mel_sens_at_spec90"]["value"] is None
    assert r2["metrics"]["accuracy"]["value"] == 1.0


def test_result_is_strict_json_and_reproducible():
    rng = np.random.default_rng(9)
    y = rng.choice([0, 1, 2, 5], size=80)
    probs = tied_probs(rng, 80, 7)
    groups = np.array([f"L{i // 2}" for i in range(80)], dtype=object)
    r = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=50, seed=3)
    assert r["n_groups"] == 40 and r["n_boot"] == 50 and r["ci_level"] == 0.95
    text = json.dumps(r, allow_nan=False)
    assert json.loads(text) == r
    again = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=50, seed=3)
    assert again == r
    other = evaluate_predictions(y, probs, CLASSES, groups=groups, n_boot=50, seed=4)
    assert other["metrics"]["accuracy"]["ci_low"] != r["metrics"]["accuracy"]["ci_low"] or (
        other["metrics"]["accuracy"]["ci_high"] != r["metrics"]["accuracy"]["ci_high"]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"probs": np.full((5, 6), 1 / 6)}, "probs"),
        ({"y_true": np.zeros(4, int)}, "y_true"),
        ({"y_true": np.array([0, 1, 7, 0, 0])}, "y_true"),
        ({"y_true": np.array([0, 1, -1, 0, 0])}, "y_true"),
        ({"probs": np.full((5, 7), 0.5)}, "sum to 1"),
        ({"probs": np.where(np.eye(5, 7) > 0, np.nan, 1 / 7)}, "NaN"),
        ({"y_true": np.array([0, 1, np.nan, 0, 0])}, "y_true"),
        ({"groups": np.arange(4)}, "groups"),
        ({"groups": np.array(["a", None, "b", "c", "d"], dtype=object)}, "groups"),
        ({"groups": np.array(["a", "b", "c", np.nan, "d"], dtype=object)}, "groups"),
        ({"groups": np.array([1.0, 2.0, np.nan, 3.0, 4.0])}, "groups"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(kwargs, field):
    args = {"y_true": np.array([0, 1, 2, 3, 4]), "probs": np.full((5, 7), 1 / 7)} | kwargs
    groups = args.pop("groups", None)
    with pytest.raises(ValueError, match=field):
        evaluate_predictions(args["y_true"], args["probs"], CLASSES, groups=groups, n_boot=5)


def test_reliability_curve_bins_and_counts():
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.6, 0.4], [1.0, 0.0], [0.3, 0.7]])
    y = np.array([0, 1, 0, 0, 1])
    curve = reliability_curve(probs, y, n_bins=10)
    assert len(curve["bin_edges"]) == 11 and sum(curve["bin_count"]) == 5
    # 0.55 and 0.6 share the (0.5, 0.6] bin; one of them is right.
    assert curve["bin_count"][5] == 2
    assert curve["bin_acc"][5] == pytest.approx(0.5)
    assert curve["bin_conf"][5] == pytest.approx(0.575)
    assert curve["bin_count"][9] == 2 and curve["bin_acc"][9] == pytest.approx(1.0)
    assert curve["bin_acc"][0] is None


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(10)
    logits = rng.normal(scale=2.0, size=(20000, 7))
    probs = softmax(logits, axis=1)
    # Labels drawn from the model's own probabilities: calibrated by construction.
    y = (rng.random((20000, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    assert expected_calibration_error(probs, y, 15) < 0.02
    overconfident = softmax(3.0 * logits, axis=1)
    assert expected_calibration_error(overconfident, y, 15) > 0.1
    assert expected_calibration_error(probs, y, 15) == pytest.approx(brute_force_ece(probs, y, 15))


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(temperature):
    rng = np.random.default_rng(11)
    true_logits = rng.normal(scale=2.0, size=(5000, 5))
    probs = softmax(true_logits, axis=1)
    y = (rng.random((5000, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    # The model emits logits that a temperature of `temperature` turns back into the truth.
    fitted = fit_temperature(true_logits * temperature, y)
    assert fitted == pytest.approx(temperature, rel=0.1)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="y_true"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.full((2, 2), np.nan), np.array([0, 1]))


def test_a_class_neither_true_nor_predicted_counts_zero_in_macro_f1_only():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 7), 0.01)
    probs[np.arange(6), y] = 0.94
    r = evaluate_predictions(y, probs, CLASSES, n_boot=0)
    assert r["metrics"]["macro_f1"]["value"] == pytest.approx(3 / 7)  # 4 classes unseen
    assert r["per_class"][CLASSES[5]]["f1"] is None  # undefined per class, reported as such
