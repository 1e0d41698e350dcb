"""A trained classifier run folder, opened for explanation: model, config, classes, data.

Classification runs load through ``dermkit.models.runs_io.load_run_model``. An ordinal run
(``task.kind=ordinal``, see ``dermkit.train.ordinal``) has a CORN head with K-1 outputs for
its K classes, which ``load_run_model`` (one output per class) does not describe; it is
built here from the same ``runs_io`` pieces with the K-1 head and loaded strictly.

The data are the run's own: its ``config.yaml`` data section, with the run's ``split.csv``
as the split file when present (so "test" means the images the run was tested on), and an
optional new dataset root when the data moved since training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dermkit.config import ConfigError, FinetuneRunConfig
from dermkit.data.prepare import PreparedData, prepare_data
from dermkit.models.runs_io import (
    WEIGHTS_FILE,
    build_run_model,
    load_run_model,
    read_run_classes,
    read_run_config,
)
from dermkit.train.ordinal import OrdinalTask

ORDINAL_FILE = "ordinal.json"


@dataclass
class ExplainRun:
    """model: eval mode, CPU; maps normalised (B, 3, S, S) to logits (B, C) or (B, K-1)."""

    path: Path
    model: torch.nn.Module
    cfg: FinetuneRunConfig
    classes: list[str]
    ordinal: OrdinalTask | None


def load_ordinal_task(run_dir: Path, cfg: FinetuneRunConfig) -> OrdinalTask:
    """The run's ordinal task: ``ordinal.json`` (with fitted centres), else from the config."""
    if (run_dir / ORDINAL_FILE).exists():
        data = json.loads((run_dir / ORDINAL_FILE).read_text())
        return OrdinalTask(**data)
    return OrdinalTask.from_config(cfg.task)


def load_explain_run(run_dir: str | Path) -> ExplainRun:
    """Open a finetune/distill run folder (classification or ordinal)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.task.kind != "ordinal":
        model, cfg, classes = load_run_model(run_dir)
        return ExplainRun(run_dir, model, cfg, classes, None)
    classes = read_run_classes(run_dir)
    task = load_ordinal_task(run_dir, cfg)
    weights = run_dir / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: is {run_dir} a finished run?")
    model = build_run_model(cfg, len(classes) - 1)
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as e:
        raise ConfigError(
            f"{weights} does not fit {cfg.model.name} with a CORN head of {len(classes) - 1} "
            f"outputs: {e}"
        ) from e
    return ExplainRun(run_dir, model.eval(), cfg, classes, task)


def run_data(run: ExplainRun, data_path: str | Path | None = None) -> PreparedData:
    """The run's dataset with its own split (``split.csv``), optionally from a new root."""
    data_cfg = run.cfg.data.model_copy()
    if data_path is not None:
        data_cfg.path = str(data_path)
    if (run.path / "split.csv").exists():
        data_cfg.split_file = str(run.path / "split.csv")
    return prepare_data(data_cfg)
