"""``dermkit evaluate RUN --tta``: a finished run re-scored as the mean of 8 dihedral views."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.predictions import read_predictions
from dermkit.data.dataset import CachedImageDataset
from dermkit.eval.calibration import DecisionRule
from dermkit.models.backbones import input_stats
from dermkit.tasks.runs import open_run, run_data

runner = CliRunner()


def _views_mean_logits(run, dataset) -> np.ndarray:
    """(N, C): the mean over rot90 k=0..3, each unflipped and flipped left-right, computed
    here view by view (not through dihedral_views) so a wrong view set fails the test."""
    x, _ = dataset.__getitems__(np.arange(len(dataset)))
    mean, std = input_stats(run.model)
    x = (x.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        views = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
        views += [v.flip(-1) for v in views]
        return torch.stack([run.model(v) for v in views]).mean(0).numpy()


def test_tta_rescores_the_runs_own_split_with_eight_views(tiny_classifier_run, tmp_path):
    out = tmp_path / "tta"
    result = runner.invoke(app, ["evaluate", str(tiny_classifier_run), "--tta", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    run = open_run(tiny_classifier_run)
    data = run_data(run)
    classes = run.task.class_names
    sets = {s: CachedImageDataset(data.cache, data.part(s), classes) for s in ("val", "test")}
    logits = {s: _views_mean_logits(run, d) for s, d in sets.items()}
    # the rule is refitted on the TTA val logits with the run's own mode
    rule = DecisionRule.fit(logits["val"], sets["val"].labels.numpy(), run.cfg.decision_rule)
    for split in ("val", "test"):
        frame, _, probs, names = read_predictions(out / f"predictions_{split}.csv")
        assert names == classes
        assert list(frame["image_id"]) == list(data.part(split)["image_id"])
        # fp32 here vs the run's precision there: equal to the rounding of the CSV
        np.testing.assert_allclose(probs, rule.probs(logits[split]), atol=2e-3)
        single = read_predictions(tiny_classifier_run / f"predictions_{split}.csv")[2]
        assert not np.allclose(probs, single, atol=2e-3)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] == "dihedral-8" and metrics["run"] == str(tiny_classifier_run)
    assert metrics["decision_rule"]["mode"] == run.cfg.decision_rule
    assert (out / "report.html").is_file()

    # the output is a prediction folder: it pairs with the run it came from
    paired = runner.invoke(
        app, ["evaluate", str(out), "--against", str(tiny_classifier_run), "--n-boot", "50"]
    )
    assert paired.exit_code == 0, paired.output
    assert "macro_f1" in paired.output or "macro-F1" in paired.output


def test_tta_refuses_data_and_a_folder_that_is_no_run(tiny_classifier_run, tmp_path):
    both = runner.invoke(
        app, ["evaluate", str(tiny_classifier_run), "--tta", "--against", str(tiny_classifier_run)]
    )
    assert both.exit_code != 0 and "--against afterwards" in " ".join(both.output.split())
    empty = runner.invoke(app, ["evaluate", str(tmp_path), "--tta"])
    assert empty.exit_code != 0 and "needs a run folder" in " ".join(empty.output.split())


def test_tta_rule_option_refits_the_named_rule(tiny_classifier_run, tmp_path):
    """--rule replaces the run's own mode (the 13-epoch Lite0 run's seven refitted class
    scales fitted val noise); a bad name and --rule without --tta are refused."""
    run = open_run(tiny_classifier_run)
    other = "none" if run.cfg.decision_rule != "none" else "temperature"
    out = tmp_path / "tta-rule"
    args = ["evaluate", str(tiny_classifier_run), "--tta", "--rule", other, "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "metrics.json").read_text())["decision_rule"]["mode"] == other

    data = run_data(run)
    val = CachedImageDataset(data.cache, data.part("val"), run.task.class_names)
    logits = _views_mean_logits(run, val)
    rule = DecisionRule.fit(logits, val.labels.numpy(), other)
    probs = read_predictions(out / "predictions_val.csv")[2]
    np.testing.assert_allclose(probs, rule.probs(logits), atol=2e-3)

    bad = runner.invoke(app, ["evaluate", str(tiny_classifier_run), "--tta", "--rule", "median"])
    assert bad.exit_code != 0 and "--rule 'median'" in " ".join(bad.output.split())
    alone = runner.invoke(app, ["evaluate", str(tiny_classifier_run), "--rule", "auto"])
    assert alone.exit_code != 0 and "goes with --tta" in " ".join(alone.output.split())
