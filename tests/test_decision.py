"""The val-fitted decision rule: temperature + class scales, saved with a run."""

import numpy as np
from sklearn.metrics import f1_score

from dermkit.eval.calibration import DecisionRule, expected_calibration_error


def _biased_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class problem whose logits over-favour class 2 and are 4x over-confident."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    clean = rng.normal(size=(n, 3))
    clean[np.arange(n), y] += 1.5
    return 4.0 * (clean + np.array([0.0, 0.0, 1.2])), y


def test_rule_fitted_on_val_improves_macro_f1_and_calibration_on_new_data():
    val_logits, y_val = _biased_logits(3000, seed=0)
    test_logits, y_test = _biased_logits(3000, seed=1)
    identity = DecisionRule()
    rule = DecisionRule.fit(val_logits, y_val, "temperature+class_scales")

    def f1(r):
        return f1_score(y_test, r.probs(test_logits).argmax(1), average="macro")

    assert rule.temperature > 2  # the logits were scaled up 4x: the fit softens them
    assert f1(rule) > f1(identity) + 0.02
    temperature_only = DecisionRule.fit(val_logits, y_val, "temperature")
    assert temperature_only.class_scales is None
    assert expected_calibration_error(
        temperature_only.probs(test_logits), y_test
    ) < 0.5 * expected_calibration_error(identity.probs(test_logits), y_test)


def test_rule_round_trips_through_json_and_missing_file_means_identity(tmp_path):
    val_logits, y_val = _biased_logits(500, seed=2)
    rule = DecisionRule.fit(val_logits, y_val, "temperature+class_scales")
    rule.save(tmp_path / "decision.json")
    loaded = DecisionRule.load(tmp_path / "decision.json")
    np.testing.assert_allclose(loaded.probs(val_logits), rule.probs(val_logits))
    assert DecisionRule.load(tmp_path / "absent.json") == DecisionRule()
    assert DecisionRule.fit(val_logits, y_val, "none") == DecisionRule()
    np.testing.assert_allclose(DecisionRule().probs(val_logits).sum(1), 1.0)


def test_auto_keeps_class_scales_only_where_they_help_held_out_images(tmp_path):
    """A model that under-calls one class gains from scales on held-out halves of val, so
    auto keeps them; a fair model only overfits val with them, so auto drops them."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    fair = 2 * np.eye(3)[y] + rng.normal(0, 1.2, (600, 3))
    biased = fair.copy()
    biased[:, 2] -= 2.5  # class 2 under-called: scales that raise it help everywhere

    kept = DecisionRule.fit(biased, y, "auto")
    assert kept.class_scales_gain > 0.05 and kept.class_scales is not None
    assert kept.class_scales[2] > 2 * max(kept.class_scales[0], kept.class_scales[1])
    dropped = DecisionRule.fit(fair, y, "auto")
    assert dropped.class_scales_gain < 0 and dropped.class_scales is None
    # the forced mode still fits scales on the fair model (the overfitting auto avoids)
    assert DecisionRule.fit(fair, y, "temperature+class_scales").class_scales is not None

    kept.save(tmp_path / "decision.json")
    assert DecisionRule.load(tmp_path / "decision.json") == kept
