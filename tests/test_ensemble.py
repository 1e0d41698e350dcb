"""Ensembles of finished runs: geometric mean, val-only greedy weights, files and CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.eval.ensemble import geometric_mean, greedy_weights, macro_f1, run_ensemble

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def specialist(rng: np.random.Generator, y: np.ndarray, knows: set[int]) -> np.ndarray:
    """(N, 7) probabilities: confident and right on classes in ``knows``, noise elsewhere."""
    logits = rng.normal(size=(y.size, len(CLASSES)))
    rows = np.isin(y, list(knows))
    logits[rows, y[rows]] += 6.0
    return softmax(logits, axis=1)


def write_run(folder, frames: dict, probs: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in frames.items():
        write_predictions(folder / f"predictions_{split}.csv", frame, probs[split], CLASSES)


def split_frames(rng: np.random.Generator, n: int = 350) -> tuple[dict, dict]:
    frames, labels = {}, {}
    for split in ("val", "test"):
        y = np.arange(n) % len(CLASSES)
        rng.shuffle(y)
        frames[split] = pd.DataFrame(
            {
                "image_id": [f"{split}_{i}" for i in range(n)],
                "lesion_id": [f"{split}_les{i // 2}" for i in range(n)],
                "label": np.asarray(CLASSES)[y],
            }
        )
        labels[split] = y
    return frames, labels


def test_macro_f1_matches_scikit_learn_including_absent_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=200)  # classes 5 and 6 never true
    probs = softmax(rng.normal(size=(200, 7)) * 2, axis=1)
    expected = f1_score(y, probs.argmax(1), average="macro", labels=range(7), zero_division=0)
    assert macro_f1(y, probs, 7) == pytest.approx(expected, abs=1e-12)


def test_geometric_mean_of_copies_is_the_member_and_weights_shift_it():
    rng = np.random.default_rng(1)
    a = softmax(rng.normal(size=(40, 7)), axis=1)
    b = softmax(rng.normal(size=(40, 7)), axis=1)
    np.testing.assert_allclose(
        geometric_mean(np.stack([a, a, a]), np.array([1, 2, 0])), a, atol=1e-9
    )
    mixed = geometric_mean(np.stack([a, b]), np.array([1, 1]))
    np.testing.assert_allclose(mixed.sum(1), 1.0, atol=1e-12)
    expected = np.sqrt(a * b) / np.sqrt(a * b).sum(1, keepdims=True)
    np.testing.assert_allclose(mixed, expected, atol=1e-9)
    # a weight of 0 drops a member entirely
    np.testing.assert_allclose(geometric_mean(np.stack([a, b]), np.array([0, 3])), b, atol=1e-9)


def test_greedy_combines_complementary_members_and_drops_a_useless_one():
    rng = np.random.default_rng(2)
    y = np.arange(700) % 7
    left = specialist(rng, y, {0, 1, 2, 3})
    right = specialist(rng, y, {3, 4, 5, 6})
    noise = softmax(rng.normal(size=(700, 7)), axis=1)
    probs = np.stack([noise, left, right])
    weights, trace = greedy_weights(probs, y)
    assert weights[0] == 0 and weights[1] > 0 and weights[2] > 0
    singles = [macro_f1(y, p, 7) for p in probs]
    assert trace[-1]["val_macro_f1"] > max(singles) + 0.2
    assert trace[-1]["val_macro_f1"] == pytest.approx(
        macro_f1(y, geometric_mean(probs, weights), 7)
    )
    # each pick raised val macro-F1: the trace is strictly increasing
    scores = [t["val_macro_f1"] for t in trace]
    assert all(b > a for a, b in itertools.pairwise(scores))


def test_run_ensemble_writes_a_member_like_folder_chosen_on_val(tmp_path):
    rng = np.random.default_rng(3)
    frames, y = split_frames(rng)
    runs = []
    for name, knows in (("left", {0, 1, 2, 3}), ("right", {3, 4, 5, 6}), ("noise", set())):
        probs = {s: specialist(rng, y[s], knows) for s in frames}
        runs.append(tmp_path / name)
        write_run(runs[-1], frames, probs)
    done = run_ensemble(runs, tmp_path / "ens", n_boot=50)
    assert done["weights"][2] == 0 and min(done["weights"][:2]) > 0
    summary = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert [m["weight"] for m in summary["members"]] == done["weights"]
    df, y_test, probs_test, classes = read_predictions(tmp_path / "ens" / "predictions_test.csv")
    assert classes == CLASSES and list(df["image_id"]) == list(frames["test"]["image_id"])
    np.testing.assert_allclose(probs_test.sum(1), 1.0, atol=1e-4)
    single = max(macro_f1(y_test, read_predictions(r / "predictions_test.csv")[2], 7) for r in runs)
    assert done["test"]["metrics"]["macro_f1"]["value"] > single + 0.2
    assert (tmp_path / "ens" / "report.html").exists()
    # the ensemble folder is itself a valid member (e.g. of a larger ensemble)
    again = run_ensemble([tmp_path / "ens", runs[0]], tmp_path / "ens2", select="all", n_boot=20)
    assert again["weights"] == [1, 1]


def test_members_must_cover_the_same_images_and_have_val_predictions(tmp_path):
    rng = np.random.default_rng(4)
    frames, y = split_frames(rng, n=70)
    probs = {s: specialist(rng, y[s], {0}) for s in frames}
    write_run(tmp_path / "a", frames, probs)
    shifted = {
        s: f.assign(image_id=f["image_id"].str.replace("_0", "_X")) for s, f in frames.items()
    }
    write_run(tmp_path / "b", shifted, probs)
    with pytest.raises(
        ValueError,
        match=r"a/predictions_val.csv has 1 image ids that .*b/predictions_val.csv lacks",
    ):
        run_ensemble([tmp_path / "a", tmp_path / "b"], tmp_path / "out", n_boot=10)
    (tmp_path / "c").mkdir()
    write_predictions(
        tmp_path / "c" / "predictions_test.csv", frames["test"], probs["test"], CLASSES
    )
    with pytest.raises(FileNotFoundError, match=r"c/predictions_val.csv not found"):
        run_ensemble([tmp_path / "a", tmp_path / "c"], tmp_path / "out", n_boot=10)
    with pytest.raises(ValueError, match="at least two runs"):
        run_ensemble([tmp_path / "a"], tmp_path / "out")


def test_cli_reports_weights_and_test_macro_f1_with_ci(tmp_path):
    rng = np.random.default_rng(5)
    frames, y = split_frames(rng)
    for name, knows in (("left", {0, 1, 2, 3}), ("right", {3, 4, 5, 6})):
        write_run(tmp_path / name, frames, {s: specialist(rng, y[s], knows) for s in frames})
    args = [
        "ensemble",
        str(tmp_path / "left"),
        str(tmp_path / "right"),
        "--out",
        str(tmp_path / "ens"),
        "--n-boot",
        "50",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "left x1" in result.output and "right x" in result.output
    assert "test macro-F1" in result.output and (tmp_path / "ens" / "metrics.json").exists()
    bad = CliRunner().invoke(app, [*args[:3], "--out", str(tmp_path / "x"), "--select", "vote"])
    assert bad.exit_code == 2 and "select must be one of" in bad.output
