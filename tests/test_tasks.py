"""dermkit.tasks: the Task protocol, and one loader for every classifier run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dermkit.config import ConfigError, load_config
from dermkit.models.backbones import create_backbone
from dermkit.models.runs_io import TASK_KINDS, load_run_model
from dermkit.models.weights import save_weights
from dermkit.runs import RunDir
from dermkit.tasks import ClassificationTask, OrdinalTask, Task, task_from_config
from dermkit.tasks.runs import open_run
from dermkit.train.settings import FinetuneRunConfig

THICKNESS = [
    "task.kind=ordinal",
    "task.column=thickness",
    "task.thresholds=[0, 0.8, 1, 2]",
    "model.name=vit_nano_patch4_32",
]
CLASSES = ["<=0", "0-0.8", "0.8-1", "1-2", ">2"]


@pytest.fixture
def ordinal_run(tmp_path):
    """A finished ordinal run folder as finetune writes it (untrained weights)."""
    cfg = load_config(
        FinetuneRunConfig, "finetune", "tiny", None, [f"out_dir={tmp_path / 'run'}", *THICKNESS]
    )
    task = task_from_config(cfg.task)
    task.centres = [0.0, 0.5, 0.9, 1.4, 3.0]
    torch.manual_seed(0)
    model = create_backbone(cfg.model.name, num_classes=task.n_outputs, img_size=32)
    with RunDir(cfg.out_dir, cfg, "finetune") as run:
        save_weights(model, run / "model.safetensors")
        task.save(run.path)
    return run.path, model


def test_both_tasks_follow_the_protocol():
    ordinal = OrdinalTask("thickness", CLASSES, thresholds=[0, 0.8, 1, 2])
    for task in (ClassificationTask(["a", "b", "c"]), ordinal):
        assert isinstance(task, Task)
    assert (ClassificationTask(["a", "b"]).n_outputs, ordinal.n_outputs) == (2, 4)
    assert (ClassificationTask.selection_metric, ordinal.selection_metric) == ("macro_f1", "qwk")
    probs = ordinal.probs(np.random.default_rng(0).normal(size=(6, 4)))
    assert probs.shape == (6, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_an_ordinal_run_opens_through_the_one_loader(ordinal_run):
    path, trained = ordinal_run
    assert json.loads((path / "classes.json").read_text()) == CLASSES
    model, cfg, classes = load_run_model(path, kinds=TASK_KINDS)
    assert cfg.task.kind == "ordinal" and classes == CLASSES
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 4)  # the CORN head: K-1 conditional logits
        torch.testing.assert_close(out, trained.eval()(x))  # the saved weights, strictly
    run = open_run(path)
    assert isinstance(run.task, OrdinalTask) and run.ordinal is run.task
    assert run.task.centres == [0.0, 0.5, 0.9, 1.4, 3.0]  # from ordinal.json
    assert run.task.n_outputs == run.model.num_classes == 4


def test_softmax_consumers_refuse_an_ordinal_run_by_name(ordinal_run, tmp_path):
    from dermkit.deploy.export import export_run

    path, _ = ordinal_run
    with pytest.raises(ConfigError, match=r"task\.kind=ordinal run of column 'thickness'.*export"):
        export_run(path, tmp_path / "export")
    with pytest.raises(ConfigError, match=r"the summary supports classification runs only"):
        load_run_model(path, purpose="the summary")
