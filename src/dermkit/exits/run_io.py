"""Exit-run folders: what ``dermkit exits train`` writes and calibrate/bench read.

An exit run holds ``config.yaml`` (``ExitsRunConfig``), ``exits.json`` (base run, classes,
exit depths, head settings, GFLOPs per exit), ``weights_<head>.safetensors`` (the exit
heads; in joint mode the whole model), ``logits_<head>.safetensors`` (every exit's val and
test logits, (E, N, C), with the labels), ``history.json`` and ``checkpoints/`` (for
``--resume``); calibrate adds ``policy_<head>.json`` and ``calibration.json``. The base
classifier is rebuilt from its own run folder with
:func:`dermkit.models.runs_io.load_run_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dermkit.config import ConfigError, load_config
from dermkit.data.prepare import PreparedData, prepare_data
from dermkit.exits.infer import exit_gflops
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.policy import ExitPolicy, macro_f1
from dermkit.exits.settings import ExitsRunConfig
from dermkit.models.runs_io import load_run_model, read_run_config
from dermkit.train.settings import FinetuneRunConfig

INFO = "exits.json"


def weights_file(run: Path, head_type: str) -> Path:
    return Path(run) / f"weights_{head_type}.safetensors"


def logits_file(run: Path, head_type: str) -> Path:
    return Path(run) / f"logits_{head_type}.safetensors"


def policy_file(run: Path, head_type: str) -> Path:
    return Path(run) / f"policy_{head_type}.json"


def head_kwargs(cfg: ExitsRunConfig) -> dict:
    """``make_head`` arguments from the exits config."""
    e = cfg.exits
    return {
        "mlp_hidden": e.mlp_hidden,
        "attention_heads": e.attention_heads,
        "ssm_d_model": e.ssm_d_model,
        "ssm_layers": e.ssm_layers,
        "ssm_d_state": e.ssm_d_state,
        "ssm_expand": e.ssm_expand,
        "ssm_grid_pool": e.ssm_grid_pool,
    }


def base_data(
    base_dir: Path, base_cfg: FinetuneRunConfig, data_path: str | None, cache_dir: str | None
) -> PreparedData:
    """The base run's data with its exact split (its ``split.csv`` when present)."""
    data_cfg = base_cfg.data.model_copy()
    if data_path:
        data_cfg.path = data_path
    if cache_dir:
        data_cfg.cache_dir = cache_dir
    if (base_dir / "split.csv").exists():
        data_cfg.split_file = str(base_dir / "split.csv")
    return prepare_data(data_cfg)


def check_classes(data: PreparedData, classes: list[str], base_dir: Path) -> None:
    if list(data.classes) != list(classes):
        raise ConfigError(
            f"{base_dir}: the run's classes {classes} differ from the data's {data.classes}; "
            "is data_path the dataset the run was trained on?"
        )


@dataclass
class ExitRun:
    """A trained exit run: its config, info, the base model and data access."""

    path: Path
    config: ExitsRunConfig
    info: dict

    @classmethod
    def open(cls, path: str | Path) -> ExitRun:
        path = Path(path)
        for name in ("config.yaml", INFO):
            if not (path / name).exists():
                raise FileNotFoundError(
                    f"{path / name} not found: is {path} a finished `dermkit exits train` run?"
                )
        cfg = load_config(ExitsRunConfig, "exits", file=path / "config.yaml")
        return cls(path, cfg, json.loads((path / INFO).read_text()))

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def head_types(self) -> list[str]:
        return list(self.info["head_types"])

    def base_model(self) -> tuple[torch.nn.Module, FinetuneRunConfig]:
        model, base_cfg, _ = load_run_model(self.info["base_run"], purpose="early exits")
        return model, base_cfg

    def model(self, head_type: str, backbone: torch.nn.Module | None = None) -> EarlyExitModel:
        """The trained EarlyExitModel of ``head_type`` in eval mode (CPU)."""
        if head_type not in self.head_types:
            raise ValueError(f"{self.path}: no {head_type!r} exits (trained: {self.head_types})")
        if backbone is None or self.info["mode"] == "joint":
            backbone = self.base_model()[0]
        model = EarlyExitModel(
            backbone, self.info["exit_blocks"], head_type, len(self.classes), self.info["heads"]
        )
        path = weights_file(self.path, head_type)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        state = load_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        frozen = self.info["mode"] == "frozen"
        bad = [k for k in missing if not (frozen and k.startswith("backbone."))]
        if bad or unexpected:
            raise ConfigError(
                f"{path} does not fit the model: missing {bad}, unexpected {unexpected}"
            )
        return model.eval()

    def logits(self, head_type: str) -> dict[str, np.ndarray]:
        """{"val", "test": (E, N, C) logits, "val_labels", "test_labels": (N,)} as numpy."""
        path = logits_file(self.path, head_type)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        return {k: v.numpy() for k, v in load_file(path).items()}

    def policy(self, head_type: str) -> ExitPolicy:
        path = policy_file(self.path, head_type)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run `dermkit exits calibrate {self.path}` first"
            )
        return ExitPolicy.load(path)

    def costs(self, head_type: str, measure: str | None = None) -> np.ndarray:
        """(E,) cost of leaving at each exit, as a fraction of the plain model."""
        measure = measure or self.config.exits.compute
        flops = self.info["gflops"][head_type]
        return np.asarray(flops["cost_fraction" if measure == "gflops" else "block_fraction"])

    def data(self) -> PreparedData:
        base_dir = Path(self.info["base_run"])
        base_cfg = read_run_config(base_dir)
        data = base_data(base_dir, base_cfg, self.config.data_path, self.config.cache_dir)
        check_classes(data, self.classes, base_dir)
        return data


def save_logits(path: Path, logits: dict[str, np.ndarray]) -> None:
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in logits.items()}, path)


def saved_state(model: EarlyExitModel, mode: str) -> dict[str, torch.Tensor]:
    """What an exit run saves: the heads (frozen; prefixed as in the model) or everything."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if mode == "joint" or k.startswith("heads.")}


def write_exit_run(
    run: Path,
    cfg: ExitsRunConfig,
    base_dir: Path,
    base_cfg: FinetuneRunConfig,
    classes: list[str],
    models: dict[str, EarlyExitModel],
    logits: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    history: list[dict],
    best_epoch: dict[str, int],
) -> None:
    """Write a trained exit run's files (see the module docstring) but config.yaml.

    Args:
        models: {head type: trained model} (moved to the CPU, eval mode).
        logits: {"val", "test": {head type: (E, N, C) every exit's logits}}, computed in
            fp32 as deployed inference runs: thresholds are calibrated on them.
        labels: {"val", "test": (N,)}.
    """
    img_size = base_cfg.data.image_size
    flops = {}
    for h, m in models.items():
        m.cpu().eval()
        save_file(saved_state(m, cfg.exits.mode), weights_file(run, h))
        save_logits(
            logits_file(run, h),
            {
                "val": logits["val"][h],
                "test": logits["test"][h],
                "val_labels": labels["val"],
                "test_labels": labels["test"],
            },
        )
        flops[h] = exit_gflops(m, img_size)
    first = next(iter(models.values()))
    info = {
        "base_run": str(Path(base_dir).resolve()),
        "backbone": base_cfg.model.name,
        "family": first.parts.family,
        "img_size": img_size,
        "classes": classes,
        "mode": cfg.exits.mode,
        "features": cfg.exits.features,
        "exit_blocks": list(first.exit_blocks),
        "exit_depths": list(first.exit_depths),
        "head_types": list(models),
        "heads": head_kwargs(cfg),
        "head_params": {h: m.describe()["head_params"] for h, m in models.items()},
        "best_epoch": best_epoch,
        "gflops": flops,
        "val_macro_f1": {
            h: [macro_f1(labels["val"], lg.argmax(1), lg.shape[1]) for lg in logits["val"][h]]
            for h in models
        },
    }
    (run / INFO).write_text(json.dumps(info, indent=2))
    (run / "history.json").write_text(json.dumps(history, indent=2))
