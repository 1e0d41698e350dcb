"""Load a trained classifier from its run folder: the hand-off to distill, exits, export, serve.

A classifier run folder (``dermkit finetune`` or ``dermkit distill``) holds everything
needed to rebuild its model: ``config.yaml`` (the fully resolved run config, whose
``model.name``, ``data.image_size`` and, for a distill run, ``distill.dist_token`` fix the
architecture), ``model.safetensors`` (the selected weights, loaded strictly: a key that
does not fit is an error, never a silently random layer) and the class order. The class
order is read from ``classes.json`` when the run wrote one, else from ``metrics.json``
(``classes``), else from the ``prob_<class>`` columns of ``predictions_test.csv``: all
three are written in the same order.

Every classifier run opens here, of either task kind (config.yaml's ``task.kind``): a
classification run has one output per class, an ordinal run a CORN head of K-1 outputs
for its K classes (``dermkit.tasks.ordinal``). Callers that read the outputs as softmax
logits (export, serving, exits, the summary) keep the default ``kinds`` and so refuse an
ordinal run by name; ``dermkit.tasks.runs.open_run`` opens both, with the run's task.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from dermkit.config import ConfigError
from dermkit.core.predictions import prediction_classes
from dermkit.models.backbones import create_backbone
from dermkit.train.settings import DistillRunConfig, FinetuneRunConfig

# Stage (run.json "stage") -> the schema its config.yaml follows. Every schema describes a
# single classifier trained by the supervised loop, so all share FinetuneRunConfig's fields.
RUN_SCHEMAS: dict[str, type[FinetuneRunConfig]] = {
    "finetune": FinetuneRunConfig,
    "distill": DistillRunConfig,
}
WEIGHTS_FILE = "model.safetensors"
TASK_KINDS = ("classification", "ordinal")


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: a classifier run folder needs config.yaml, {WEIGHTS_FILE} and "
            "classes.json (or metrics.json / predictions_test.csv); is this a finished run?"
        )
    return path


def read_run_config(run_dir: str | Path) -> FinetuneRunConfig:
    """The run's config.yaml validated by its stage's schema (from run.json, else by trying)."""
    run_dir = Path(run_dir)
    path = _require(run_dir / "config.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    stage = None
    if (run_dir / "run.json").exists():
        stage = json.loads((run_dir / "run.json").read_text()).get("stage")
    schemas = [RUN_SCHEMAS[stage]] if stage in RUN_SCHEMAS else list(RUN_SCHEMAS.values())
    errors = []
    for schema in schemas:
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            errors.append(f"as {schema.__name__}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}")
    raise ConfigError(f"{path}: not a classifier run config ({'; '.join(errors)})")


def read_run_classes(run_dir: str | Path) -> list[str]:
    """Class names in logit order: classes.json, else metrics.json, else predictions_test.csv."""
    run_dir = Path(run_dir)
    classes = None
    if (run_dir / "classes.json").exists():
        classes = json.loads((run_dir / "classes.json").read_text())
    elif (run_dir / "metrics.json").exists():
        classes = json.loads((run_dir / "metrics.json").read_text()).get("classes")
    elif (run_dir / "predictions_test.csv").exists():
        header = (run_dir / "predictions_test.csv").open().readline().strip().split(",")
        classes = prediction_classes(header)
    else:
        _require(run_dir / "classes.json")  # raises, naming the preferred file
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{run_dir}: could not read the class list (got {classes!r})")
    return list(classes)


def build_run_model(cfg: FinetuneRunConfig, n_classes: int) -> torch.nn.Module:
    """The run's architecture with a ``n_classes`` head, randomly initialised.

    A distill run with ``distill.dist_token`` is a ``DistilledViT`` (``models/distilled.py``):
    the ViT with a distillation token and a second head, whose output is the heads' mean.
    """
    create = create_backbone
    if isinstance(cfg, DistillRunConfig) and cfg.distill.dist_token:
        from dermkit.models.distilled import create_distilled_vit as create
    return create(cfg.model.name, **architecture_kwargs(cfg, n_classes, run_input_norm(cfg)))


def architecture_kwargs(cfg: FinetuneRunConfig, n_outputs: int, input_norm: str) -> dict:
    """Keywords of ``create_backbone``/``create_distilled_vit`` for a run config's model.

    The head width ``n_outputs``, the input size, the dropout rates and ``input_norm``
    (training passes the configured one; a finished run the one it trained with).
    """
    return {
        "num_classes": n_outputs,
        "img_size": cfg.data.image_size,
        "drop_path_rate": cfg.model.drop_path_rate,
        "drop_rate": cfg.model.drop_rate,
        "input_norm": input_norm,
    }


def run_input_norm(cfg: FinetuneRunConfig) -> str:
    """The input normalisation a finished run trained with (config.yaml's ``model.input_norm``).

    Runs record the resolved value; a config that still says ``auto`` (written before the
    field existed) trained with ImageNet mean/std, unless its weights were a packaged source.
    """
    from dermkit.models.packaged import is_packaged, resolve_input_norm

    weights = cfg.model.weights if is_packaged(cfg.model.weights) else None
    return resolve_input_norm(cfg.model.input_norm, weights)


def run_outputs(cfg: FinetuneRunConfig, classes: list[str]) -> int:
    """Head outputs per image: one per class, K-1 for an ordinal run's CORN head."""
    return len(classes) - 1 if cfg.task.kind == "ordinal" else len(classes)


def load_run_model(
    run_dir: str | Path,
    kinds: tuple[str, ...] = ("classification",),
    purpose: str = "this command",
) -> tuple[torch.nn.Module, FinetuneRunConfig, list[str]]:
    """(model in eval mode on CPU, run config, class names) of a classifier run folder.

    The model maps normalised float images (B, 3, S, S), S = ``cfg.data.image_size``, to
    logits (B, len(classes)), or for an ordinal run (only when ``kinds`` has "ordinal") to
    the CORN head's conditional logits (B, len(classes) - 1). A run whose ``task.kind`` is
    not in ``kinds`` is a ``ConfigError`` naming the kind and ``purpose``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    cfg = read_run_config(run_dir)
    if cfg.task.kind not in kinds:
        column = f" of column '{cfg.task.column}'" if cfg.task.column else ""
        raise ConfigError(
            f"{run_dir} is a task.kind={cfg.task.kind} run{column}: {purpose} supports "
            f"{' and '.join(kinds)} runs only"
        )
    classes = read_run_classes(run_dir)
    weights = _require(run_dir / WEIGHTS_FILE)
    n_outputs = run_outputs(cfg, classes)
    model = build_run_model(cfg, n_outputs)
    try:
        model.load_state_dict(load_file(weights))
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches
        head = f"a CORN head of {n_outputs} outputs" if n_outputs != len(classes) else ""
        raise ConfigError(
            f"{weights} does not fit {cfg.model.name} with {head or f'{len(classes)} classes'} "
            f"at {cfg.data.image_size} px: {e}"
        ) from e
    return model.eval(), cfg, classes


def load_trained_classifier(
    run_dir: str | Path, purpose: str
) -> tuple[torch.nn.Module, FinetuneRunConfig, list[str]]:
    """:func:`load_run_model` of a classification run, for a command that scores new images.

    A folder without weights is named for what it is (the classical baseline saves no
    model) before its config is read; ``purpose`` names the command in the errors.
    """
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"{run_dir / WEIGHTS_FILE} not found: {purpose} needs a trained torch classifier "
            "run (finetune or distill; the classical baseline saves no model)"
        )
    return load_run_model(run_dir, purpose=purpose)
