"""Patient metadata as baseline features: the encoding, what it refuses, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import ConfigError
from dermkit.models.metadata import MetadataEncoder


def frame(ages, sexes, sites) -> pd.DataFrame:
    return pd.DataFrame({"age": ages, "sex": sexes, "localization": sites, "dx_type": "histo"})


def test_encoding_is_fitted_on_train_and_keeps_missing_age_as_nan():
    train = frame([30.0, 70.0, np.nan], ["male", "female", "male"], ["back", "face", "back"])
    enc = MetadataEncoder(["age", "sex", "localization"]).fit(train)
    assert enc.feature_names() == [
        "age",
        "sex=female",
        "sex=male",
        "localization=back",
        "localization=face",
    ]
    test = frame([45.0, np.nan, 80.0], ["female", None, "unknown"], ["scalp", "face", None])
    x = enc.transform(test)
    assert x.shape == (3, 5) and x.dtype == np.float32
    assert x[0, 0] == 45.0 and np.isnan(x[1, 0])
    np.testing.assert_array_equal(x[0, 1:], [1, 0, 0, 0])  # scalp: not seen in train
    np.testing.assert_array_equal(x[1, 1:], [0, 0, 0, 1])  # sex missing
    np.testing.assert_array_equal(x[2, 1:], [0, 0, 0, 0])  # 'unknown' sex, missing site


def test_label_leaking_and_missing_columns_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"\['dx_type'\] cannot be features"):
        MetadataEncoder(["age", "dx_type"])
    with pytest.raises(
        ConfigError, match=r"no column \['site'\]; it has \['age', 'localization', 'sex'\]"
    ):
        MetadataEncoder(["site"]).fit(frame([1.0], ["male"], ["back"]))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    result = CliRunner().invoke(
        app, ["data", "phantoms", "--out", str(root / "ph"), "--n-lesions", "70"]
    )
    assert result.exit_code == 0, result.output
    return root


def baseline(root, name: str, *overrides: str):
    args = [
        "baseline",
        "--preset",
        "tiny",
        f"data.path={root / 'ph'}",
        f"data.cache_dir={root / 'cache'}",
        f"out_dir={root / name}",
        "eval.n_boot=20",
    ]
    return CliRunner().invoke(app, [*args, *overrides])


def test_baseline_uses_the_metadata_columns_it_is_given(phantoms):
    plain = baseline(phantoms, "plain")
    with_meta = baseline(phantoms, "meta", "baseline.metadata=[age,sex,localization]")
    assert plain.exit_code == 0 and with_meta.exit_code == 0, with_meta.output
    fit = json.loads((phantoms / "meta" / "metrics.json").read_text())["fit"]
    assert fit["metadata_features"][:3] == ["age", "sex=female", "sex=male"]
    assert any(name.startswith("localization=") for name in fit["metadata_features"])
    assert (
        json.loads((phantoms / "plain" / "metrics.json").read_text())["fit"]["metadata_features"]
        == []
    )
    # the features changed the model: its test probabilities differ
    a = pd.read_csv(phantoms / "plain" / "predictions_test.csv").filter(like="prob_")
    b = pd.read_csv(phantoms / "meta" / "predictions_test.csv").filter(like="prob_")
    assert np.abs(a.to_numpy() - b.to_numpy()).max() > 1e-3


def test_baseline_refuses_dx_type_with_exit_2(phantoms):
    result = baseline(phantoms, "leak", "baseline.metadata=[age,dx_type]")
    assert result.exit_code == 2
    assert "dx_type" in result.output and "leaks the label" in result.output


def test_tstr_refuses_metadata_when_the_config_loads():
    from pydantic import ValidationError

    from dermkit.synth.settings import QualityConfig

    with pytest.raises(ValidationError, match=r"tstr\.baseline[\s\S]*no patient metadata"):
        QualityConfig.model_validate({"tstr": {"baseline": {"metadata": ["age"]}}})
    assert QualityConfig().tstr.baseline.metadata == []
