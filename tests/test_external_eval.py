"""External evaluation: ``dermkit evaluate RUN --data OTHER --label-map MAP``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.predictions import read_predictions

runner = CliRunner()
# ISIC 2019-style one-hot columns: akiec is split into AK and SCC, both mapped back onto
# akiec (a merge); VASC is mapped to null (a dropped class).
ISIC_COLUMNS = ["MEL", "NV", "BCC", "AK", "SCC", "BKL", "DF", "VASC"]
LABEL_MAP = {
    "mel": "mel",
    "nv": "nv",
    "bcc": "bcc",
    "ak": "akiec",
    "scc": "akiec",
    "bkl": "bkl",
    "df": "df",
    "vasc": None,
}


def _invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def _says(result, text: str) -> bool:
    """Whether the output holds ``text``, ignoring whitespace (rich wraps long paths)."""
    return "".join(text.split()) in "".join(result.output.split())


@pytest.fixture(scope="module")
def isic_copy(phantom_root, tmp_path_factory):
    """The phantom images in ISIC one-hot layout (no lesion ids) + a merging/dropping map."""
    root = tmp_path_factory.mktemp("isic") / "isic-phantoms"
    (root / "images").mkdir(parents=True)
    meta = pd.read_csv(phantom_root / "metadata.csv", dtype=str)
    rows = []
    for k, (image_id, dx) in enumerate(zip(meta["image_id"], meta["dx"])):
        shutil.copyfile(
            phantom_root / "images" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg"
        )
        column = ("AK", "SCC")[k % 2] if dx == "akiec" else dx.upper()
        rows.append({"image": image_id, **{c: float(c == column) for c in ISIC_COLUMNS}})
    pd.DataFrame(rows).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    label_map = root.parent / "isic2019_to_ham.yaml"
    label_map.write_text(yaml.safe_dump(LABEL_MAP))
    return root, label_map, meta


def _run_probs(run) -> pd.DataFrame:
    """The run's own val + test probabilities, indexed by image_id."""
    frames = [read_predictions(run / f"predictions_{s}.csv")[0] for s in ("val", "test")]
    return pd.concat(frames).set_index("image_id")


@pytest.fixture(scope="module")
def isic_eval(tiny_classifier_run, isic_copy, tmp_path_factory):
    root, label_map, _ = isic_copy
    out = tmp_path_factory.mktemp("external") / "isic"
    result = _invoke(
        "evaluate",
        tiny_classifier_run,
        "--data",
        root,
        "--label-map",
        label_map,
        "--out",
        out,
        "--n-boot",
        50,
    )
    assert result.stdout.strip().endswith("report.html")
    return out, result


def test_external_evaluation_reports_dropped_and_merged_classes(isic_eval, isic_copy):
    out, result = isic_eval
    meta = isic_copy[2]
    n_vasc = int((meta["dx"] == "vasc").sum())
    assert n_vasc > 0  # the phantoms have vasc lesions, so the drop is exercised
    for name in ("predictions_external.csv", "metrics.json", "report.html"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    ext = metrics["external"]
    assert ext["source_labels_dropped"] == {"vasc": n_vasc}
    assert ext["images_dropped_by_label_map"] == n_vasc
    assert ext["model_classes_not_in_data"] == ["vasc"]
    assert ext["scored_classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv"]
    assert ext["merged_source_labels"] == {"akiec": ["ak", "scc"]}
    assert ext["images_scored"] == len(meta) - n_vasc
    assert ext["layout"] == "isic"
    assert ext["bootstrap_unit"].startswith("image_id")  # ISIC CSV without lesion ids
    assert ext["decision_rule"] is not None and ext["decision_rule"]["temperature"] > 0
    assert _says(result, "model classes not in the data: ['vasc']")
    assert _says(result, f"dropped by the label map: {{'vasc': {n_vasc}}}")
    # the report says what was dropped and how the CIs were drawn
    html = (out / "report.html").read_text()
    assert "model classes not in the data (not scored)" in html and "vasc: " in html
    assert "treated as its own lesion" in html

    assert metrics["n"] == len(meta) - n_vasc and metrics["n_groups"] == metrics["n"]
    assert metrics["classes"] == ext["scored_classes"]
    for name in ("macro_f1", "balanced_accuracy", "macro_auroc", "ece", "mel_sens_at_spec90"):
        entry = metrics["metrics"][name]
        assert entry["value"] is not None, name
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name

    df, _, probs, classes = read_predictions(out / "predictions_external.csv")
    assert len(df) == len(meta) - n_vasc
    assert classes == ext["scored_classes"]
    assert set(df.loc[df["label"] == "akiec", "source_label"]) == {"ak", "scc"}
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_external_predictions_equal_the_runs_own_on_the_same_images(isic_eval, tiny_classifier_run):
    """Same crop policy and decision rule: on the same images the external probabilities
    are the run's own, restricted to the scored classes and renormalised."""
    out, _ = isic_eval
    ext, _, probs, classes = read_predictions(out / "predictions_external.csv")
    own = _run_probs(tiny_classifier_run)
    common = [i for i in ext["image_id"] if i in own.index]
    assert len(common) > 20
    mine = pd.DataFrame(probs, index=ext["image_id"], columns=classes).loc[common]
    theirs = own.loc[common, [f"prob_{c}" for c in classes]].to_numpy()
    theirs = theirs / theirs.sum(1, keepdims=True)
    np.testing.assert_allclose(mine.to_numpy(), theirs, atol=2e-5)


def test_external_evaluation_on_the_training_dataset_layout_reproduces_the_run(
    tiny_classifier_run, phantom_root, tmp_path
):
    """HAM10000 layout, no label map: all classes scored, lesion-level bootstrap, and the
    probabilities are exactly the run's own (no class removed, nothing renormalised)."""
    from dermkit.eval.external import evaluate_external

    done = evaluate_external(tiny_classifier_run, phantom_root, out_dir=tmp_path / "ham", n_boot=20)
    ext = done["result"]["external"]
    assert ext["model_classes_not_in_data"] == [] and ext["source_labels_dropped"] == {}
    assert ext["bootstrap_unit"] == "lesion_id"
    assert (
        done["result"]["n_groups"]
        == pd.read_csv(phantom_root / "metadata.csv")["lesion_id"].nunique()
    )
    df, _, probs, classes = read_predictions(done["predictions"])
    own = _run_probs(tiny_classifier_run)
    ours = pd.DataFrame(probs, index=df["image_id"], columns=classes).loc[own.index]
    np.testing.assert_allclose(ours.to_numpy(), own[[f"prob_{c}" for c in classes]], atol=2e-5)
    assert (df.set_index("image_id").loc[own.index, "pred"] == own["pred"]).all()


def test_label_map_errors_name_the_file_and_the_field(tiny_classifier_run, isic_copy, tmp_path):
    root, _, _ = isic_copy
    bad = tmp_path / "bad_map.yaml"
    bad.write_text(yaml.safe_dump({**LABEL_MAP, "scc": "scc"}))
    result = _invoke("evaluate", tiny_classifier_run, "--data", root, "--label-map", bad, code=2)
    assert _says(result, "bad_map.yaml") and _says(result, "'scc' -> 'scc'")
    assert _says(result, "label-map targets that the model does not have")

    partial = tmp_path / "partial_map.yaml"
    partial.write_text(yaml.safe_dump({k: v for k, v in LABEL_MAP.items() if k != "df"}))
    result = _invoke(
        "evaluate", tiny_classifier_run, "--data", root, "--label-map", partial, code=2
    )
    assert _says(result, "label 'df' is not in the label map")

    # no label map: the ISIC labels (ak, scc, ...) are not the run's classes
    result = _invoke("evaluate", tiny_classifier_run, "--data", root, code=2)
    assert _says(result, "unknown label 'ak'")

    # --label-map alone is an error; a run folder without a model cannot be run
    result = _invoke("evaluate", tiny_classifier_run, "--label-map", bad, code=2)
    assert _says(result, "--label-map needs --data")
    predictions_only = tmp_path / "baseline"
    predictions_only.mkdir()
    shutil.copy(tiny_classifier_run / "predictions_test.csv", predictions_only)
    result = _invoke("evaluate", predictions_only, "--data", root, code=2)
    assert _says(result, "model.safetensors not found")


def test_evaluate_on_a_run_folder_still_scores_its_test_predictions(tiny_classifier_run, tmp_path):
    result = _invoke("evaluate", tiny_classifier_run, "--out", tmp_path / "ev", "--n-boot", 10)
    assert result.stdout.strip().endswith("report.html")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_test = len(pd.read_csv(tiny_classifier_run / "predictions_test.csv"))
    assert metrics["n"] == n_test and "external" not in metrics
