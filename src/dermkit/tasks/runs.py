"""A finished classifier run folder, opened with its task: model, config, classes, data.

The model comes from ``models.runs_io.load_run_model`` (the one loader of classifier run
folders, classification and ordinal alike); the task from the run's own files
(``decision.json`` for classification, ``ordinal.json`` for an ordinal run).

The data are the run's own: its ``config.yaml`` data section, with the run's ``split.csv``
as the split file when present (so "test" means the images the run was tested on), and an
optional new dataset root when the data moved since training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dermkit.data.prepare import PreparedData, prepare_data
from dermkit.models.runs_io import TASK_KINDS, load_run_model
from dermkit.tasks.base import Task
from dermkit.tasks.classification import ClassificationTask
from dermkit.tasks.ordinal import OrdinalTask
from dermkit.train.settings import FinetuneRunConfig


@dataclass
class TaskRun:
    """model: eval mode, CPU; maps normalised (B, 3, S, S) to logits (B, task.n_outputs)."""

    path: Path
    model: torch.nn.Module
    cfg: FinetuneRunConfig
    classes: list[str]
    task: Task

    @property
    def ordinal(self) -> OrdinalTask | None:
        """The ordinal task (column, classes, centres) of an ordinal run, else None."""
        return self.task if isinstance(self.task, OrdinalTask) else None


def load_task(run_dir: str | Path, cfg: FinetuneRunConfig, classes: list[str]) -> Task:
    """The task of a finished run, with what it fitted (decision rule, ordinal centres)."""
    if cfg.task.kind == "ordinal":
        return OrdinalTask.load(Path(run_dir), cfg.task)
    return ClassificationTask.load(Path(run_dir), classes)


def open_run(run_dir: str | Path) -> TaskRun:
    """Open a finetune/distill run folder of any task kind."""
    run_dir = Path(run_dir)
    model, cfg, classes = load_run_model(run_dir, kinds=TASK_KINDS)
    return TaskRun(run_dir, model, cfg, classes, load_task(run_dir, cfg, classes))


def run_data(run: TaskRun, data_path: str | Path | None = None) -> PreparedData:
    """The run's dataset with its own split (``split.csv``), optionally from a new root."""
    data_cfg = run.cfg.data.model_copy()
    if data_path is not None:
        data_cfg.path = str(data_path)
    if (run.path / "split.csv").exists():
        data_cfg.split_file = str(run.path / "split.csv")
    return prepare_data(data_cfg)
