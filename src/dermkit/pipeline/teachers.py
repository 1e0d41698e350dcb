"""The ``teachers`` stage: several fine-tuned models combined into the chain's teacher.

Issue 19 asks the chain's teacher to be "the strongest model it can make: the ImageNet
CNN, the MAE ViT, or an ensemble chosen on val". At the cpu preset no single model is it:
three members with equal weights (Lite1@112 + Lite0@128 from ImageNet + the tuned CNN from
scratch) score 0.758 test macro-F1 against 0.72-0.74 for each alone, and their students
reach 0.735-0.746 (BENCHMARKS.md, "The teacher"). So the stage trains each member as
``dermkit finetune`` would (its preset < its ``recipe`` < the seed < its settings < the
pipeline's data wiring; real images unless a member sets ``synthetic_ratio`` and the
sample stage is on), and combines them like ``dermkit ensemble`` (``eval/ensemble.py``:
a geometric mean of probabilities with weights chosen on val only). The ``distill``
stage then learns from this folder instead of the ``finetune`` stage.

Pipeline entry::

    teachers:
      select: all               # or greedy: forward selection on val macro-F1
      include_finetune: false   # true: the finetune stage (e.g. the MAE ViT) is a member
      members:
        lite0: {recipe: recipes/imagenet-lite0-128.yaml, optim.epochs: 13}
        cnn: {model.name: resnet18d_64, optim.epochs: 30}

Folder: ``members/<name>/`` holds each member's run (a finished one has ``report.html``
and is not retrained: a killed stage resumes at the member it was on, from that member's
last checkpoint), and the stage folder itself is the ensemble (``ensemble.json``,
``predictions_{val,test}.csv``, ``metrics.json``, ``report.html``): a teacher folder that
``dermkit distill``, ``dermkit evaluate`` and ``dermkit bench latency`` all read.

Why the members live inside one stage and not as stages of their own: a pipeline file
names each stage once, and how many teachers a chain has is a setting, not a new DAG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dermkit.config import ConfigError, Strict
from dermkit.pipeline.runner import StageContext
from dermkit.train.settings import FinetuneRunConfig

MEMBERS_DIR = "members"
FINETUNE_MEMBER = "finetune"  # the name of the finetune stage among the members


class TeachersStageConfig(Strict):
    """``teachers``: each member's resolved ``dermkit finetune`` config, plus the ensemble's."""

    members: dict[str, FinetuneRunConfig] = Field(
        default_factory=dict, description="name -> the member's resolved fine-tune config"
    )
    finetune: str | None = Field(
        None, description="the finetune stage's folder when it is a member, else null"
    )
    select: Literal["greedy", "all"] = Field(
        "all", description="member weights: greedy forward selection on val, or 1 each"
    )
    seed: int = 0
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples of the test CIs")

    @model_validator(mode="after")
    def _enough_members(self) -> TeachersStageConfig:
        bad = [n for n in self.members if not re.fullmatch(r"[A-Za-z0-9_]+", n)]
        if bad:  # a name is a folder under members/: nothing that could leave it
            raise ValueError(f"member names are letters, digits and _: {bad}")
        if FINETUNE_MEMBER in self.members:
            raise ValueError(f"members: {FINETUNE_MEMBER!r} names the finetune stage; rename it")
        n = len(self.members) + (self.finetune is not None)
        if n < 2:
            raise ValueError(
                f"an ensemble teacher needs at least two members, got {n} (set members, "
                "and include_finetune: true to add the finetune stage)"
            )
        return self


def build_teachers(ctx: StageContext, resolve, data_wiring, synthetic_wiring):
    """The stage's config from its pipeline entry; ``resolve``/``data_wiring``/
    ``synthetic_wiring`` are the pipeline's own (``pipeline/dermae.py``), so a member is
    resolved exactly as a finetune stage with the same settings would be."""
    entry = dict(ctx.overrides)
    specs = entry.pop("members", {}) or {}
    include = entry.pop("include_finetune", False)
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise ConfigError("teachers.members: a mapping of name -> {recipe?, settings}")
    if not isinstance(include, bool):
        raise ConfigError("teachers.include_finetune must be true or false")
    members = {}
    for name, spec in specs.items():
        spec = dict(spec)
        member_ctx = ctx.part(
            f"teachers.members.{name}",
            {k: v for k, v in spec.items() if k != "recipe"},
            {"recipe": spec["recipe"]} if spec.get("recipe") else {},
        )
        cfg = resolve(member_ctx, FinetuneRunConfig, "finetune", data_wiring(ctx))
        members[name] = synthetic_wiring(member_ctx, cfg)
    finetune = str(ctx.input("finetune")) if include else None
    fields = {"seed": ctx.seed, **entry, "members": members, "finetune": finetune}
    try:
        return TeachersStageConfig.model_validate(fields)
    except ValueError as e:
        raise ConfigError(f"teachers: {e}") from e


def member_folders(cfg: TeachersStageConfig, out: Path) -> dict[str, Path]:
    """name -> run folder of every member, the finetune stage first when it is one."""
    folders = {FINETUNE_MEMBER: Path(cfg.finetune)} if cfg.finetune else {}
    return folders | {name: Path(out) / MEMBERS_DIR / name for name in cfg.members}


def run_teachers(cfg: TeachersStageConfig, out: Path, resume: bool) -> None:
    """Train the members that have not finished, then combine them into ``out``."""
    from dermkit.eval.ensemble import run_ensemble
    from dermkit.train.finetune import run_finetune

    folders = member_folders(cfg, out)
    for name, member in cfg.members.items():
        folder = folders[name]
        if (folder / "report.html").exists():  # finished in an earlier attempt of the stage
            continue
        member = member.model_copy(update={"out_dir": str(folder)})
        run_finetune(member, resume=folder.exists(), progress=False)
    run_ensemble(list(folders.values()), out, cfg.select, n_boot=cfg.n_boot, seed=cfg.seed)


def teachers_metric(path: Path) -> str:
    """``"<members with their weights>; test macro-F1 x"`` of a finished folder."""
    spec = json.loads((Path(path) / "ensemble.json").read_text())
    chosen = [f"{Path(m['run']).name} x{m['weight']}" for m in spec["members"] if m["weight"]]
    test = json.loads((Path(path) / "metrics.json").read_text())
    f1 = test.get("metrics", test).get("macro_f1", {})
    f1 = f1.get("value") if isinstance(f1, dict) else f1
    text = " + ".join(chosen)
    return text + (f"; test macro-F1 {f1:.3f}" if isinstance(f1, float) else "")
