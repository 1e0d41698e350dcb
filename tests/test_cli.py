"""The CLI end to end at tiny scale: what a user types, what they get back."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermkit.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def faulty_ham_folder(tmp_path):
    """HAM10000 layout with 8 good images and the four faults of the acceptance criterion."""
    root = tmp_path / "faulty"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            root / "images" / f"good{i}.jpg"
        )
        rows.append((f"L{i}", f"good{i}", "nv" if i % 2 else "mel"))
    # truncated JPEG: a real JPEG cut in half
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        root / "images" / "trunc.jpg"
    )
    data = (root / "images" / "trunc.jpg").read_bytes()
    (root / "images" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    rows.append(("L8", "trunc", "nv"))
    # RGBA PNG with real transparency
    rgba = rng.integers(0, 255, (30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "images" / "alpha.png")
    rows.append(("L9", "alpha", "bkl"))
    # 0-byte file
    (root / "images" / "empty.jpg").write_bytes(b"")
    rows.append(("L10", "empty", "nv"))
    # CSV row without an image
    rows.append(("L11", "ghost", "nv"))
    pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"]).assign(
        dx_type="histo", age=50, sex="male", localization="back"
    ).to_csv(root / "metadata.csv", index=False)
    return root


def test_validate_names_all_four_faults_and_skip_bad_writes_rejects(faulty_ham_folder, tmp_path):
    result = _invoke("data", "validate", faulty_ham_folder)
    assert result.exit_code != 0
    for name in ("trunc", "alpha", "empty", "ghost"):
        assert name in result.output, f"{name} not named in:\n{result.output}"

    rejects = tmp_path / "rejects.csv"
    manifest = tmp_path / "manifest.csv"
    result = _invoke(
        "data",
        "validate",
        faulty_ham_folder,
        "--skip-bad",
        "--rejects",
        rejects,
        "--manifest",
        manifest,
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(rejects)
    assert sorted(table["image_id"]) == ["alpha", "empty", "ghost", "trunc"]
    assert table["reason"].str.len().min() > 5
    kept = pd.read_csv(manifest)
    assert sorted(kept["image_id"]) == [f"good{i}" for i in range(8)]


def test_phantoms_split_baseline_evaluate(tmp_path):
    data = tmp_path / "ph"
    assert _invoke("data", "phantoms", "--out", data, "--n-lesions", 60).exit_code == 0
    split_file = tmp_path / "split.csv"
    result = _invoke(
        "data", "split", "--data", data, "--out", split_file, "--image-size", 32, "--kfold", 3
    )
    assert result.exit_code == 0, result.output
    assert "lesions on two sides: 0" in result.output
    ids = pd.read_csv(split_file)
    assert set(ids["split"]) == {"train", "val", "test"}
    assert ids.groupby("lesion_id")["split"].nunique().max() == 1
    folds = pd.read_csv(tmp_path / "split-3fold.csv")
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1

    out = tmp_path / "bl"
    result = _invoke(
        "baseline",
        "--preset",
        "tiny",
        f"data.path={data}",
        f"data.split_file={split_file}",
        f"data.cache_dir={tmp_path / 'c'}",
        f"out_dir={out}",
        "eval.n_boot=50",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == int((ids["split"] == "test").sum())
    assert (out / "report.html").exists() and (out / "config.yaml").exists()
    # the split file was honoured: the run's split equals it
    run_split = pd.read_csv(out / "split.csv").set_index("image_id")["split"]
    assert (run_split == ids.set_index("image_id")["split"].loc[run_split.index]).all()

    result = _invoke(
        "evaluate", out / "predictions_test.csv", "--out", tmp_path / "ev", "--n-boot", 50
    )
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["metrics"]["macro_f1"]["value"] == pytest.approx(
        metrics["metrics"]["macro_f1"]["value"], abs=1e-4
    )


def test_config_errors_exit_2_naming_the_key(tmp_path):
    result = _invoke("baseline", "--preset", "tiny", "data.imag_size=3")
    assert result.exit_code == 2
    assert "data.imag_size" in result.output
