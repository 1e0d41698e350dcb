"""``dermkit synth merge``: one synthetic set, each class from the generator named for it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.data.manifest import (
    ManifestError,
    read_manifest,
    read_synthetic_rows,
    write_manifest,
)
from dermkit.synth.merge import merge_manifests, write_merged


def _manifest(path: Path, tag: str, labels: list[str], kept: list[bool] | None = None) -> Path:
    rows = pd.DataFrame(
        {
            "image_id": [f"syn-{tag}-{label}-{i}" for i, label in enumerate(labels)],
            "path": [f"/images/{tag}/{i}.png" for i in range(len(labels))],
            "label": labels,
            "lesion_id": [f"syn-{tag}-{i}" for i in range(len(labels))],
            "split": "",
            "source": f"synthetic:{tag}",
            "synthetic": True,
        }
    )
    if kept is not None:
        rows["kept"] = kept
    return write_manifest(rows, path)


def test_each_class_comes_from_its_source_and_filter_records_travel(tmp_path):
    latent = _manifest(tmp_path / "latent.csv", "latent", ["df", "df", "vasc", "mel"])
    pixel = _manifest(
        tmp_path / "pixel.csv", "pixel", ["vasc", "vasc", "df"], kept=[True, False, True]
    )
    merged = merge_manifests({"vasc": pixel, "default": latent})
    by_class = merged.groupby("label")["source"].agg(set).to_dict()
    assert by_class == {"df": {"synthetic:latent"}, "mel": {"synthetic:latent"},
                        "vasc": {"synthetic:pixel"}}  # fmt: skip
    assert len(merged) == 5  # both pixel vasc rows, the rejected one too; latent's vasc dropped
    # The unfiltered source's rows count as kept; the rejected vasc row stays out of training.
    out = tmp_path / "merged.csv"
    result = CliRunner().invoke(
        app,
        ["synth", "merge", str(out), "--source", f"vasc={pixel}", "--source", f"default={latent}"],
    )
    assert result.exit_code == 0, result.output
    training = read_synthetic_rows(out)
    assert training["label"].value_counts().to_dict() == {"df": 2, "mel": 1, "vasc": 1}


def test_merge_errors_name_the_source_and_the_problem(tmp_path):
    latent = _manifest(tmp_path / "latent.csv", "latent", ["df", "mel"])
    with pytest.raises(ValueError, match=r"latent\.csv: no synthetic rows of class 'vasc'"):
        merge_manifests({"vasc": latent})
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        merge_manifests({"default": tmp_path / "missing.csv"})
    # Two generators that reuse an image id: refused on writing, naming the id.
    clash = write_manifest(
        read_manifest(latent).assign(label="vasc").iloc[:1], tmp_path / "clash.csv"
    )
    with pytest.raises(ManifestError, match="duplicate image_id 'syn-latent-df-0'"):
        write_merged({"vasc": clash, "default": latent}, tmp_path / "merged.csv")
    assert not (tmp_path / "merged.csv").exists()
    bad = ["synth", "merge", str(tmp_path / "x.csv"), "--source", "vasc"]
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2 and "expected CLASS=MANIFEST" in result.output
    twice = ["synth", "merge", str(tmp_path / "x.csv"), "--source", f"df={latent}"] * 2
    result = CliRunner().invoke(app, twice[:5] + twice[-2:])
    assert result.exit_code == 2 and "'df' is given twice" in result.output
    assert not (tmp_path / "x.csv").exists()
