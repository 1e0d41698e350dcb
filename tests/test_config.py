import pytest

from dermkit.config import ConfigError, load_config, save_config
from dermkit.train.settings import BaselineRunConfig


def test_preset_file_and_overrides_resolve_in_order(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("data:\n  image_size: 40\nseed: 5\n")
    cfg = load_config(
        BaselineRunConfig,
        "baseline",
        "tiny",
        user,
        ["data.image_size=32", "eval.n_boot=7", "baseline.lbp_radii=[1]"],
    )
    assert cfg.data.image_size == 32  # override beats file
    assert cfg.seed == 5  # file beats default
    assert cfg.eval.n_boot == 7
    assert cfg.baseline.lbp_radii == [1]
    assert cfg.baseline.max_iter == 150  # from the tiny preset


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"data\.imag_size"):
        load_config(BaselineRunConfig, "baseline", None, None, ["data.imag_size=3"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_config(BaselineRunConfig, "baseline", None, None, ["data.image_size=abc"])


def test_bad_override_syntax_and_preset():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(BaselineRunConfig, "baseline", None, None, ["image_size"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(BaselineRunConfig, "baseline", "huge")


def test_override_mappings_read_with_or_without_spaces_after_the_colons():
    from dermkit.config import parse_override

    for text in ("{mel:2,df:4.5}", "{mel: 2, df: 4.5}", '{"mel": 2, "df": 4.5}'):
        assert parse_override(f"sampler.guidance={text}") == (
            ["sampler", "guidance"],
            {"mel": 2, "df": 4.5},
        )
    assert parse_override("a={x: null}")[1] == {"x": None}  # a spaced mapping stays as is
    assert parse_override("a=http://host:80")[1] == "http://host:80"  # no mapping: untouched


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(BaselineRunConfig, "baseline", "cpu", None, ["seed=3"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(BaselineRunConfig, "baseline", None, path)
    assert again == cfg


def test_compare_preset_fine_tunes_exactly_like_the_finetune_preset():
    from dermkit.train.settings import CompareRunConfig, FinetuneRunConfig

    for preset in ("tiny", "cpu", "gpu"):
        compare = load_config(CompareRunConfig, "compare", preset)
        finetune = load_config(FinetuneRunConfig, "finetune", preset)
        assert compare.finetune == finetune
    compare = load_config(CompareRunConfig, "compare", "tiny", None, ["finetune.optim.epochs=9"])
    assert compare.finetune.optim.epochs == 9


def test_exits_objective_accepts_the_latency_budget_in_a_config_file():
    """latency=B works from YAML as from the CLI flag; an unknown objective is refused."""
    from pydantic import ValidationError

    from dermkit.exits.settings import ExitsConfig

    assert ExitsConfig(objective="latency=0.5").objective == "latency=0.5"
    with pytest.raises(ValidationError, match="objective"):
        ExitsConfig(objective="speed=1")


def test_every_settings_schema_refuses_unknown_keys():
    """Schemas live beside their domain (``<package>/settings.py``); every one stays strict."""
    import importlib
    import inspect
    from pathlib import Path

    from dermkit.config import Strict

    src = Path(__file__).resolve().parents[1] / "src" / "dermkit"
    modules = sorted(p.parent.name for p in src.glob("*/settings.py"))
    assert {"data", "models", "train", "ssl", "synth", "exits"} <= set(modules)
    for name in modules:
        module = importlib.import_module(f"dermkit.{name}.settings")
        schemas = [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if c.__module__ == module.__name__
        ]
        assert schemas, name
        for schema in schemas:
            assert issubclass(schema, Strict), schema
            assert schema.model_config["extra"] == "forbid", schema
