"""The minimum-recall operating point (eval/operating_point.py, evaluate --fit-operating-point).

A run folder is faked from logits: its prediction files hold ``DecisionRule.probs(logits)``
exactly as a finished run writes them, so the rewritten files can be checked against the
new rule applied to the same logits.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.operating_point import fit_factor, fit_operating_point, recall_of, rescale

CLASSES = ["bkl", "mel", "nv"]
MEL = CLASSES.index("mel")


def _logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) logits whose melanomas are often out-voted by nv: recall well below 0.9."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.2, 0.2, 0.6])
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 1.2
    logits[:, 2] += 0.6  # a bias toward the common class
    return logits, y


def _fake_run(tmp_path, rule: DecisionRule):
    """A run folder with val/test predictions and metrics.json under ``rule``."""
    logits = {}
    for split, seed in (("val", 0), ("test", 1)):
        z, y = _logits(400, seed)
        part = pd.DataFrame(
            {
                "image_id": [f"{split}{i}" for i in range(len(y))],
                "lesion_id": [f"L{split}{i // 2}" for i in range(len(y))],
                "label": np.asarray(CLASSES)[y],
            }
        )
        write_predictions(tmp_path / f"predictions_{split}.csv", part, rule.probs(z), CLASSES)
        logits[split] = z
    rule.save(tmp_path / "decision.json")
    df, y, probs, _ = read_predictions(tmp_path / "predictions_test.csv")
    metrics = evaluate_predictions(y, probs, CLASSES, groups=df["lesion_id"].to_numpy(), n_boot=20)
    metrics["training"] = {"best_epoch": 3}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return logits


def test_fit_factor_is_the_smallest_scale_that_reaches_the_target():
    logits, y = _logits(500, 0)
    probs = DecisionRule().probs(logits)
    assert recall_of(probs, y, MEL) < 0.8
    g = fit_factor(probs, y, MEL, 0.9)
    assert recall_of(rescale(probs, MEL, g), y, MEL) >= 0.9
    assert recall_of(rescale(probs, MEL, g / 1.01), y, MEL) < 0.9  # 1% less misses it
    assert fit_factor(probs, y, MEL, 0.05) == 1.0  # already met: the point never lowers recall
    with pytest.raises(ValueError, match="no images of class"):
        fit_factor(probs, np.zeros_like(y), MEL, 0.9)


def test_run_folder_gets_the_point_and_stays_consistent(tmp_path):
    rule = DecisionRule(temperature=1.3, class_scales=[1.0, 0.8, 0.5])
    logits = _fake_run(tmp_path, rule)
    record = fit_operating_point(tmp_path, "mel=0.9")

    assert record["after"]["val"]["recall"] >= 0.9 > record["before"]["val"]["recall"]
    assert record["after"]["test"]["recall"] > record["before"]["test"]["recall"]
    new_rule = DecisionRule.load(tmp_path / "decision.json")
    assert new_rule.min_recall == {"class": "mel", "target": 0.9, "factor": record["factor"]}
    assert new_rule.class_scales[MEL] == pytest.approx(0.8 * record["factor"])
    assert new_rule.class_scales[0] == 1.0 and new_rule.class_scales[2] == 0.5
    # The rewritten files are the new rule applied to the logits (up to the CSV's 6 digits).
    for split in ("val", "test"):
        _, _, probs, _ = read_predictions(tmp_path / f"predictions_{split}.csv")
        np.testing.assert_allclose(probs, new_rule.probs(logits[split]), atol=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["per_class"]["mel"]["recall"] == pytest.approx(record["after"]["test"]["recall"])
    assert metrics["training"] == {"best_epoch": 3}  # training record kept
    assert metrics["decision_rule"]["min_recall"]["target"] == 0.9

    # Refitting starts from the rule without the point: same target, same factor and files.
    again = fit_operating_point(tmp_path, "mel=0.9")
    assert again["factor"] == record["factor"]
    _, _, probs, _ = read_predictions(tmp_path / "predictions_test.csv")
    np.testing.assert_allclose(probs, new_rule.probs(logits["test"]), atol=1e-5)
    # A lower target gives a smaller factor on the original scale, not on top of the old one.
    lower = fit_operating_point(tmp_path, "mel=0.7")
    assert lower["factor"] < record["factor"]
    assert DecisionRule.load(tmp_path / "decision.json").class_scales[MEL] == pytest.approx(
        0.8 * lower["factor"]
    )


def test_cli_fits_and_reports_and_rejects_bad_targets(tmp_path):
    _fake_run(tmp_path, DecisionRule())
    runner = CliRunner()
    done = runner.invoke(app, ["evaluate", str(tmp_path), "--fit-operating-point", "mel=0.85"])
    assert done.exit_code == 0, done.output
    assert "val recall" in done.output and (tmp_path / "operating_point.json").exists()
    bad = runner.invoke(app, ["evaluate", str(tmp_path), "--fit-operating-point", "mel:0.85"])
    assert bad.exit_code != 0 and "CLASS=RECALL" in bad.output
    unknown = runner.invoke(app, ["evaluate", str(tmp_path), "--fit-operating-point", "bcc=0.8"])
    assert unknown.exit_code != 0 and "'bcc' is not one of" in unknown.output
