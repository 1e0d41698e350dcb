"""The unfamiliar-image flag (``dermkit.eval.ood``): scores, threshold, AUROC, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.eval.ood import OOD_FILE, Mahalanobis, OodRule, auroc, energy, load_ood

runner = CliRunner()


def test_energy_is_minus_logsumexp_and_higher_for_flat_logits():
    z = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    e = energy(z)
    np.testing.assert_allclose(e, -np.log(np.exp(z).sum(1)))
    np.testing.assert_allclose(energy(z, 2.0), -2 * np.log(np.exp(z / 2).sum(1)))
    assert e[1] > e[0]  # a confident image is more familiar
    rule = OodRule(threshold=float(e.mean()))
    assert rule.flags(z).tolist() == [False, True]


def test_mahalanobis_flags_a_clearly_different_distribution_and_auroc():
    g = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    y = g.integers(0, 3, 600)
    feats = means[y] + g.normal(0, 1, (600, 3))
    maha = Mahalanobis.fit(feats, y)
    val = means[y[:200]] + g.normal(0, 1, (200, 3))
    threshold = np.quantile(maha.score(val), 0.95)
    strange = g.normal(0, 1, (200, 3)) + np.array([0.0, 0.0, 8.0])
    assert (maha.score(strange) > threshold).mean() > 0.95
    assert (maha.score(val) > threshold).mean() == pytest.approx(0.05, abs=0.01)
    assert auroc(maha.score(val), maha.score(strange)) > 0.99
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0


def test_fit_ood_on_a_run_flags_a_clearly_different_dataset(
    tiny_classifier_run, phantom_root, tmp_path
):
    """Fitted on the phantoms' train/val split; the phantom images with their colour
    channels reversed and darkened are another distribution: Mahalanobis flags most of
    them. The run folder is copied: the shared fixture stays without ood.json."""
    from dermkit.eval.ood import ood_auroc, shift_aurocs

    run = tmp_path / "run"
    shutil.copytree(tiny_classifier_run, run)
    result = runner.invoke(app, ["evaluate", str(run), "--fit-ood"])
    assert result.exit_code == 0, result.output
    rule = load_ood(run)
    assert rule is not None and rule.score == "energy" and rule.quantile == 0.95
    assert rule.val_flagged <= 0.1 and rule.n_val > 0
    assert rule.mahalanobis_threshold is not None and (run / rule.mahalanobis_file).exists()
    saved = json.loads((run / OOD_FILE).read_text())
    assert saved["message"].startswith("This image looks unlike the training images")

    odd = ood_auroc(run, None, transform=lambda x: x[..., ::-1] // 3)
    assert odd["mahalanobis"]["auroc"] > 0.9 and odd["mahalanobis"]["flagged_out"] > 0.5, odd
    assert 0 <= odd["energy"]["auroc"] <= 1
    both = shift_aurocs(run, {"same": lambda x: x, "odd": lambda x: x[..., ::-1] // 3})
    assert both["same"]["mahalanobis"]["auroc"] == pytest.approx(0.5)
    assert both["odd"]["mahalanobis"] == odd["mahalanobis"]

    # the external report counts the flagged images
    result = runner.invoke(
        app, ["evaluate", str(run), "--data", str(phantom_root), "--n-boot", "10"]
    )
    assert result.exit_code == 0, result.output
    assert "unfamiliar (energy):" in result.output
    metrics = json.loads((run / f"external-{phantom_root.name}" / "metrics.json").read_text())
    ood = metrics["external"]["ood"]
    assert ood["energy"]["of"] == metrics["n"] and 0 <= ood["energy"]["flagged"] <= metrics["n"]

    # --ood-auroc DIR prints the AUROCs as JSON
    result = runner.invoke(app, ["evaluate", str(run), "--ood-auroc", str(phantom_root)])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(body) >= {"in", "out", "energy", "mahalanobis"}

    # --ood-shifts: the flag's AUROC per shift of the shift benchmark (source images shifted)
    args = ["evaluate", str(run), "--ood-shifts", "--shifts", "warm,zoom_in", "--limit", "20"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warm (middle) | energy AUROC" in result.output
    body = json.loads(result.stdout[result.stdout.index("{") :])
    assert [r["shift"] for r in body["rows"]] == ["warm", "zoom_in"] and body["n_images"] == 20
    assert all(0 <= r["mahalanobis"]["auroc"] <= 1 for r in body["rows"])
