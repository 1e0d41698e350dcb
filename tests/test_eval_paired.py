"""Paired lesion-bootstrap comparison of two models on the same images (numpy only)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.paired import (
    PAIRED_METRICS,
    align_prediction_files,
    compare_prediction_files,
    compare_predictions,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def noisy_model(rng: np.random.Generator, y: np.ndarray, signal: float = 1.0) -> np.ndarray:
    """(N, 7) softmax probabilities that favour the true class by ``signal`` logits."""
    logits = rng.normal(size=(y.size, len(CLASSES)))
    logits[np.arange(y.size), y] += signal
    return softmax(logits, axis=1)


def make_right(probs: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A copy of ``probs`` whose ``rows`` put their largest probability on the true class
    (the probability vector is permuted, so confidence is unchanged)."""
    out = probs.copy()
    for i in rows:
        top = out[i].argmax()
        out[i, [top, y[i]]] = out[i, [y[i], top]]
    return out


def all_entries(result: dict) -> list[tuple[str, dict]]:
    entries = list(result["metrics"].items())
    for name, pc in result["per_class"].items():
        entries += [(f"recall {name}", pc["recall"]), (f"f1 {name}", pc["f1"])]
    return entries


def test_identical_predictions_give_zero_deltas_and_zero_width_cis():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=300)
    probs = noisy_model(rng, y)
    groups = rng.integers(0, 180, size=300).astype(str)
    r = compare_predictions(y, probs, probs.copy(), CLASSES, groups, n_boot=300, seed=1)
    assert r["n_pred_differ"] == 0 and r["n_groups"] == len(set(groups))
    assert set(r["metrics"]) == {*PAIRED_METRICS, "mel_sens_at_spec90"}
    assert len(all_entries(r)) == len(PAIRED_METRICS) + 1 + 2 * len(CLASSES)
    for name, e in all_entries(r):
        assert e["value_a"] == e["value_b"] is not None, name
        assert (e["delta"], e["ci_low"], e["ci_high"]) == (0.0, 0.0, 0.0), name
        assert e["p_a_better"] == 0.0 and e["p_b_better"] == 0.0, name
        assert e["n_valid"] > 250, name


def test_model_right_on_strictly_more_images_wins():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 7, size=n)
    probs_b = noisy_model(rng, y, signal=0.5)
    wrong = np.flatnonzero(probs_b.argmax(1) != y)
    fixed = rng.choice(wrong, size=30, replace=False)
    probs_a = make_right(probs_b, y, fixed)  # A = B, except right on 30 more images
    groups = np.arange(n) // 2  # two images per lesion
    r = compare_predictions(y, probs_a, probs_b, CLASSES, groups, n_boot=500, seed=0)
    assert r["n_pred_differ"] == 30
    for name in ("macro_f1", "accuracy", "balanced_accuracy"):
        e = r["metrics"][name]
        assert e["delta"] == pytest.approx(e["value_a"] - e["value_b"])
        assert e["delta"] > 0 and e["ci_low"] > 0, name
        assert e["p_a_better"] > 0.99 and e["p_b_better"] == 0.0, name
    assert r["metrics"]["accuracy"]["delta"] == pytest.approx(30 / n)
    # Swapping the roles flips the signs and the probabilities.
    swapped = compare_predictions(y, probs_b, probs_a, CLASSES, groups, n_boot=500, seed=0)
    e, s = r["metrics"]["macro_f1"], swapped["metrics"]["macro_f1"]
    assert s["delta"] == pytest.approx(-e["delta"])
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((-e["ci_high"], -e["ci_low"]))
    assert s["p_a_better"] == e["p_b_better"] and s["p_b_better"] == e["p_a_better"]


def test_ece_counts_lower_as_better():
    rng = np.random.default_rng(2)
    calibrated = noisy_model(rng, rng.integers(0, 7, size=600), signal=2.0)
    # Labels drawn from A's probabilities: A is calibrated by construction.
    y = (calibrated.cumsum(axis=1) < rng.random((600, 1))).sum(axis=1)
    # Same top class everywhere, but B is pushed towards overconfidence.
    overconfident = softmax(np.log(calibrated) * 4.0, axis=1)
    r = compare_predictions(y, calibrated, overconfident, CLASSES, None, n_boot=300)
    ece = r["metrics"]["ece"]
    assert ece["higher_is_better"] is False
    assert ece["value_a"] < ece["value_b"] and ece["delta"] < 0
    assert ece["p_a_better"] > 0.95
    assert r["metrics"]["accuracy"]["delta"] == 0.0


def test_paired_ci_is_narrower_than_the_unpaired_intervals_suggest():
    rng = np.random.default_rng(3)
    n = 500
    y = rng.integers(0, 7, size=n)
    groups = np.arange(n) // 2
    probs_a = noisy_model(rng, y, signal=1.0)
    right = np.flatnonzero(probs_a.argmax(1) == y)
    spoiled = rng.choice(right, size=10, replace=False)
    probs_b = probs_a.copy()
    probs_b[spoiled] = np.roll(probs_b[spoiled], 1, axis=1)  # B wrong on 10 more images
    kw = {"n_boot": 400, "seed": 0}
    paired = compare_predictions(y, probs_a, probs_b, CLASSES, groups, **kw)
    alone_a = evaluate_predictions(y, probs_a, CLASSES, groups=groups, **kw)["metrics"]
    alone_b = evaluate_predictions(y, probs_b, CLASSES, groups=groups, **kw)["metrics"]
    for name in ("accuracy", "macro_f1"):
        e = paired["metrics"][name]
        assert e["value_a"] == pytest.approx(alone_a[name]["value"])
        assert e["value_b"] == pytest.approx(alone_b[name]["value"])
        # The separate intervals overlap: they cannot tell A from B...
        assert alone_a[name]["ci_low"] < alone_b[name]["ci_high"], name
        # ...an independent-samples interval of the difference would be this wide...
        half = [(m[name]["ci_high"] - m[name]["ci_low"]) / 2 for m in (alone_a, alone_b)]
        unpaired_width = 2 * float(np.hypot(*half))
        # ...while pairing removes the shared variation and excludes 0.
        assert e["ci_high"] - e["ci_low"] < 0.3 * unpaired_width, name
        assert e["ci_low"] > 0, name


def test_resampling_keeps_lesions_whole():
    rng = np.random.default_rng(4)
    n_lesions = 240
    y = rng.integers(0, 7, size=n_lesions)
    probs_b = noisy_model(rng, y, signal=0.7)
    probs_a = make_right(probs_b, y, rng.choice(n_lesions, size=40, replace=False))
    lesion = np.array([f"L{i:04d}" for i in range(n_lesions)])
    kw = {"n_boot": 400, "seed": 0}
    base = compare_predictions(y, probs_a, probs_b, CLASSES, lesion, **kw)
    # Four images of every lesion, with the same predictions: no new evidence.
    y4, a4, b4, lesion4 = (np.repeat(x, 4, axis=0) for x in (y, probs_a, probs_b, lesion))
    grouped = compare_predictions(y4, a4, b4, CLASSES, lesion4, **kw)
    as_images = compare_predictions(y4, a4, b4, CLASSES, None, **kw)
    assert grouped["n_groups"] == n_lesions and as_images["n_groups"] == 4 * n_lesions
    for name in ("accuracy", "macro_f1", "balanced_accuracy"):
        b, g, i = (r["metrics"][name] for r in (base, grouped, as_images))
        # The same lesion draws weight every image of a lesion alike: replicates (and so
        # the interval) are those of one image per lesion...
        assert (g["ci_low"], g["ci_high"]) == pytest.approx((b["ci_low"], b["ci_high"]))
        assert g["p_a_better"] == b["p_a_better"]
        # ...while image-level resampling treats copies as evidence: about half as wide.
        assert i["ci_high"] - i["ci_low"] < 0.7 * (g["ci_high"] - g["ci_low"]), name


def test_no_bootstrap_and_bad_inputs():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 7, size=50)
    probs = noisy_model(rng, y)
    r = compare_predictions(y, probs, probs, CLASSES, None, n_boot=0)
    e = r["metrics"]["macro_f1"]
    assert e["delta"] == 0.0 and e["ci_low"] is None and e["p_a_better"] is None
    with pytest.raises(ValueError, match="probs_b: probs must have shape"):
        compare_predictions(y, probs, probs[:, :6], CLASSES, None)
    with pytest.raises(ValueError, match=r"probs_a: .*row 3"):
        bad = probs.copy()
        bad[3] *= 2
        compare_predictions(y, bad, probs, CLASSES, None)
    # A class that no image has and neither model predicts has no recall: None, no CI.
    absent = compare_predictions(y % 5, probs, probs, CLASSES, None, n_boot=50)
    assert absent["per_class"]["vasc"]["recall"]["delta"] is None
    assert absent["per_class"]["vasc"]["support"] == 0


# ------------------------------------------------------------------------ files


def write_pair(root, n=120, seed=0, fixed=20):
    """Run folders root/A and root/B with predictions_test.csv on the same n images (3 per
    lesion); A is B made right on ``fixed`` random images (those B got wrong differ)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, size=n)
    probs_b = noisy_model(rng, y, signal=0.5)
    probs_a = make_right(probs_b, y, rng.choice(n, size=fixed, replace=False))
    manifest = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "lesion_id": [f"HAM_{i // 3:07d}" for i in range(n)],
            "label": np.asarray(CLASSES)[y],
        }
    )
    paths = []
    for name, probs in (("A", probs_a), ("B", probs_b)):
        (root / name).mkdir(parents=True)
        paths.append(
            write_predictions(root / name / "predictions_test.csv", manifest, probs, CLASSES)
        )
    return paths


def test_files_are_aligned_by_image_id_and_class_name(tmp_path):
    path_a, path_b = write_pair(tmp_path)
    expected = compare_prediction_files(path_a, path_b, n_boot=200)
    # Shuffle B's rows and reverse its class columns: the comparison must not change.
    df = pd.read_csv(path_b, dtype=str)
    prob_cols = [c for c in df.columns if c.startswith("prob_")]
    df = df.sample(frac=1, random_state=0)[
        ["image_id", "lesion_id", "label", "pred", *prob_cols[::-1]]
    ]
    shuffled = tmp_path / "shuffled.csv"
    df.to_csv(shuffled, index=False)
    got = compare_prediction_files(tmp_path / "A", shuffled, n_boot=200)  # a run folder works
    assert got["a"] == str(path_a) and got["b"] == str(shuffled)
    assert got["metrics"] == expected["metrics"] and got["per_class"] == expected["per_class"]
    frame, probs_a, probs_b, classes = align_prediction_files(path_a, shuffled)
    assert classes == CLASSES and probs_b.shape == probs_a.shape == (120, 7)
    assert frame["image_id"].tolist() == pd.read_csv(path_a, dtype=str)["image_id"].tolist()
    assert np.allclose(probs_b, read_predictions(path_b)[2], atol=1e-6)


def _rewrite(path, edit):
    df = pd.read_csv(path, dtype=str)
    df = edit(df)
    df.to_csv(path, index=False)


def test_alignment_errors_name_files_and_ids(tmp_path):
    path_a, path_b = write_pair(tmp_path)

    _rewrite(path_b, lambda df: df.iloc[:-12])  # 12 images missing from B
    with pytest.raises(ValueError) as info:
        compare_prediction_files(path_a, path_b, n_boot=0)
    msg = str(info.value)
    assert f"{path_a} has 12 image ids that {path_b} lacks" in msg
    named = re.findall(r"ISIC_\d{7}", msg)
    assert named == [f"ISIC_{i:07d}" for i in range(108, 118)] and "2 more" in msg

    path_a, path_b = write_pair(tmp_path / "labels")
    true_label = pd.read_csv(path_a)["label"][7]
    other = next(c for c in CLASSES if c != true_label)
    _rewrite(path_b, lambda df: df.assign(label=np.where(df.index == 7, other, df["label"])))
    with pytest.raises(ValueError, match=r"different labels for 1 image ids: ISIC_0000007"):
        compare_prediction_files(path_a, path_b, n_boot=0)

    _rewrite(path_b, lambda df: df.assign(label=pd.read_csv(path_a, dtype=str)["label"]))
    _rewrite(
        path_b, lambda df: df.assign(lesion_id=np.where(df.index == 9, "HAM_x", df["lesion_id"]))
    )
    with pytest.raises(ValueError, match=r"different lesion ids for 1 image ids: ISIC_0000009"):
        compare_prediction_files(path_a, path_b, n_boot=0)

    _rewrite(
        path_b,
        lambda df: df.rename(columns={"prob_vasc": "prob_scc"}).replace({"label": {"vasc": "scc"}}),
    )
    with pytest.raises(ValueError) as info:
        compare_prediction_files(path_a, path_b, n_boot=0)
    msg = str(info.value)
    assert str(path_a) in msg and str(path_b) in msg
    assert str(CLASSES) in msg and "'scc'" in msg

    _rewrite(path_a, lambda df: pd.concat([df, df.iloc[[5]]]))
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(path_a))}: image ids appear more than once: \['ISIC_0000005'\]",
    ):
        compare_prediction_files(path_a, path_b, n_boot=0)


def test_cli_evaluate_against_writes_paired_json_matching_compare_predictions(tmp_path):
    path_a, path_b = write_pair(tmp_path, fixed=25)
    runner = CliRunner()
    result = runner.invoke(
        app, ["evaluate", str(tmp_path / "A"), "--against", str(tmp_path / "B"), "--n-boot", "200"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "A" / "paired-vs-B"
    assert result.stdout.strip() == str(out / "paired.md")
    assert "P(A better)" in result.output and "macro_f1" in result.output
    saved = json.loads((out / "paired.json").read_text())

    df, y, probs_a, classes = read_predictions(path_a)
    _, _, probs_b, _ = read_predictions(path_b)
    direct = compare_predictions(
        y, probs_a, probs_b, classes, df["lesion_id"].to_numpy(), n_boot=200
    )
    for name in ("macro_f1", "accuracy", "ece"):
        for key in ("value_a", "value_b", "delta", "ci_low", "ci_high", "p_a_better"):
            assert saved["metrics"][name][key] == pytest.approx(direct["metrics"][name][key])
    assert saved["metrics"]["macro_f1"]["delta"] > 0
    assert saved["a"] == str(path_a) and saved["b"] == str(path_b)
    md = (out / "paired.md").read_text()
    delta = saved["metrics"]["macro_f1"]["delta"]
    assert re.search(rf"\| macro_f1 \| [\d.]+ \| [\d.]+ \| \**{re.escape(f'{delta:+.3f}')} \[", md)

    # --out wins; without --against evaluate behaves as before; errors exit 2 naming the id.
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(path_a),
            "--against",
            str(path_b),
            "--out",
            str(tmp_path / "cmp"),
            "--n-boot",
            "20",
        ],
    )
    assert result.exit_code == 0 and (tmp_path / "cmp" / "paired.json").exists()
    _rewrite(path_b, lambda df: df.iloc[1:])
    result = runner.invoke(
        app, ["evaluate", str(path_a), "--against", str(path_b), "--n-boot", "20"]
    )
    assert result.exit_code == 2 and "ISIC_0000000" in result.output
    result = runner.invoke(
        app, ["evaluate", str(path_a), "--against", str(path_b), "--data", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--against" in result.output
