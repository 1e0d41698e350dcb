"""Configuration machinery shared by every stage: the strict schema base, YAML presets and
``key=value`` overrides.

The schemas themselves live beside their domain, one ``settings.py`` per package
(``data``, ``models``, ``eval``, ``tasks``, ``train``, ``ssl``, ``synth``, ``exits``), built
from the pieces below and from each other. This module holds only what they all share:
``Strict`` (unknown keys are errors), ``RunSettings`` (the head of every run config), YAML
reading, preset lookup, dotted overrides, ``load_config`` and ``save_config``.

Resolution order (later wins): schema defaults < preset YAML (``configs/<preset>/<stage>.yaml``
shipped inside the package, so an installed dermkit finds its presets) < user YAML file <
command-line overrides such as ``data.image_size=64``. Unknown keys are errors that name the
key, so a typo never silently falls back to a default. Every run folder keeps the fully
resolved config as ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dermkit.core.mappings import merge, nested

PRESETS = ("tiny", "cpu", "gpu")
PRESET_DIR = Path(__file__).parent / "configs"


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Sections that nest another stage's whole config, {section: that stage}: each starts
    # from the other stage's preset of the same scale (``load_config``), so e.g. `compare
    # --preset cpu` fine-tunes exactly as `finetune --preset cpu` and the presets never drift.
    preset_sections: ClassVar[dict[str, str]] = {}


KEY_NEUTRAL_DEFAULT = {"stage_key": "omit_default"}
"""``Field(..., json_schema_extra=KEY_NEUTRAL_DEFAULT)`` marks an option added after
pipelines cached stages of its schema: left at its default it is not part of the stage's
cache key (``pipeline.runner.stage_key``), so adding an option re-runs no cached stage of a
config that does not use it. A config that sets it gets a key of its own."""


class RunSettings(Strict):
    """The head of a run config: its seed and the run folder (each stage sets the default)."""

    seed: int = 0
    out_dir: str


T = TypeVar("T", bound=Strict)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{item}' has an empty key")
    return key.strip().split("."), _unspaced_mapping(yaml.safe_load(value) if value else "")


def _unspaced_mapping(value: Any) -> Any:
    """YAML reads ``{mel:2,df:4}`` as {"mel:2": None, "df:4": None} (no space after the
    colons); on a command line that can only mean {mel: 2, df: 4}."""
    if not (isinstance(value, dict) and value):
        return value
    if not all(v is None and isinstance(k, str) and ":" in k for k, v in value.items()):
        return value
    pairs = (k.split(":", 1) for k in value)
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def preset_path(preset: str, stage: str) -> Path:
    return PRESET_DIR / preset / f"{stage}.yaml"


def load_config(
    schema: type[T],
    stage: str,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> T:
    """Resolve a stage config: defaults < preset < file < overrides, validated by ``schema``."""
    data: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}', expected one of {PRESETS}")
        for section, other_stage in schema.preset_sections.items():
            if (other := preset_path(preset, other_stage)).exists():
                data = merge(data, {section: _read_yaml(other)})
        path = preset_path(preset, stage)
        if path.exists():
            data = merge(data, _read_yaml(path))
    if file is not None:
        data = merge(data, _read_yaml(Path(file)))
    for item in overrides:
        data = merge(data, nested(*parse_override(item)))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {stage} config:\n  " + "\n  ".join(lines)) from e


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (the run folder's ``config.yaml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
