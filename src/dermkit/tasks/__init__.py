"""Tasks: what a classifier predicts (``Task`` protocol, ``base.py``) and its two kinds.

``classification`` (softmax over the classes, selected on val macro-F1) and ``ordinal``
(ordered classes of a manifest column with a CORN head, selected on val QWK). The training
commands (``train/finetune.py``, ``train/distill.py``) take a task from the run config
(``task_from_config``); a finished run folder opens with its task through ``tasks.runs``.
"""

from __future__ import annotations

from dermkit.tasks.base import Task, summary_rows
from dermkit.tasks.classification import ClassificationTask
from dermkit.tasks.ordinal import OrdinalTask
from dermkit.tasks.settings import TaskConfig

__all__ = ["ClassificationTask", "OrdinalTask", "Task", "summary_rows", "task_from_config"]


def task_from_config(task: TaskConfig) -> Task:
    """The task of a run config's ``task`` section (classification: classes from the data)."""
    if task.kind == "ordinal":
        return OrdinalTask.from_config(task)
    return ClassificationTask()
