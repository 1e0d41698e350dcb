"""The teacher a distilled student learns from: one finished run, or an ensemble of runs.

``distill.teacher`` names either a finetune/distill run folder or a folder written by
``dermkit ensemble`` (``ensemble.json``: member runs and their val-chosen weights). Both
become a :class:`Teacher`, whose :meth:`Teacher.module` maps the *student's* batches
(normalised the student's way, at the student's size) to the teacher's logits.

An ensemble teacher outputs the weighted mean of its members' log-probabilities after each
member's own decision rule (temperature and class scales, ``decision.json``), so softmax of
its output is exactly the probability the ensemble's ``predictions_*.csv`` hold. Why the
rule-applied probabilities and not raw logits: the ensemble's weights were chosen, and its
test score measured, on those; a teacher should be the model that was selected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dermkit.config import ConfigError
from dermkit.core.files import sha256_file
from dermkit.models.backbones import input_stats
from dermkit.models.packaged import INPUT_NORMS
from dermkit.models.runs_io import WEIGHTS_FILE
from dermkit.tasks.classification import DECISION_FILE, ClassificationTask
from dermkit.tasks.runs import TaskRun, open_run

ENSEMBLE_FILE = "ensemble.json"


class ResizeInput(nn.Module):
    """Feed a model trained at another resolution and normalisation: x -> renorm -> resize.

    Bilinear resizing of normalised images equals resizing then normalising (both linear),
    so a 224 px teacher can score the batches of a student trained at 112 px. Likewise the
    change of normalisation is a per-channel affine map: images normalised for the student
    (``input_norm``, e.g. ImageNet mean/std) are mapped to the teacher's own (e.g. [-1, 1]).
    The wrapper records ``input_norm`` as its own, so ``predict_logits`` feeds it images
    normalised the student's way.
    """

    def __init__(self, model: nn.Module, size: int, input_norm: str = "imagenet"):
        super().__init__()
        self.model, self.size = model, size
        self.dermkit_spec = {"input_norm": input_norm}
        (m_in, s_in), (m_out, s_out) = INPUT_NORMS[input_norm], input_stats(model)
        # x_out = (x_in * s_in + m_in - m_out) / s_out = x_in * scale + shift
        scale = torch.tensor(s_in) / torch.tensor(s_out)
        shift = (torch.tensor(m_in) - torch.tensor(m_out)) / torch.tensor(s_out)
        self.identity = bool((scale == 1).all() and (shift == 0).all())
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int | None:
        """The model's outputs per image (K-1 for a CORN head): ``predict_logits`` reads it."""
        return getattr(self.model, "num_classes", None)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) -> (B, 3, S, S) at the model's size (unchanged when it already is)."""
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return x

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, s, s) -> the model's normalisation and size (B, 3, S, S)."""
        if not self.identity:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return self.resize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapt(x))


class EnsembleTeacher(nn.Module):
    """Weighted geometric mean of members' decision-rule probabilities, as logits.

    ``forward``: student-normalised (B, 3, s, s) -> (B, C) = sum_k w_k * log p_k, with
    ``log p_k = log_softmax(z_k / T_k) + log(class_scales_k)`` and weights summing to 1. The
    per-row constant the renormalisation would add cancels in any softmax of the output.
    """

    def __init__(self, members: list[ResizeInput], rules: list, weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dermkit_spec = dict(members[0].dermkit_spec)
        n = members[0].num_classes
        w = torch.tensor(weights, dtype=torch.float32)
        inv_t = torch.tensor([1.0 / r.temperature for r in rules])
        scales = torch.tensor([r.class_scales or [1.0] * n for r in rules], dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.register_buffer("inv_temperature", inv_t, persistent=False)
        self.register_buffer("log_scales", scales.log(), persistent=False)

    @property
    def num_classes(self) -> int | None:
        return self.members[0].num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0.0
        for k, member in enumerate(self.members):
            log_p = F.log_softmax(member(x).float() * self.inv_temperature[k], dim=1)
            out = out + self.weights[k] * (log_p + self.log_scales[k])
        return out


@dataclass
class Teacher:
    """A teacher run, or the members of an ensemble folder with their weights (> 0)."""

    path: Path
    members: list[TaskRun]
    weights: list[int]
    ensemble: bool

    @property
    def cfg(self):
        """The (first) member's run config: task, classes and data agree across members."""
        return self.members[0].cfg

    @property
    def task(self):
        """How the teacher's outputs become probabilities (an ensemble's: plain softmax)."""
        if not self.ensemble:
            return self.members[0].task
        return ClassificationTask(list(self.members[0].classes))

    @property
    def tta(self) -> bool:
        """Score with flips/rotations? An ensemble's members were averaged without."""
        return False if self.ensemble else self.cfg.augment.tta

    @property
    def name(self) -> str:
        """The teacher's model name, or "ensemble(a x1 + b x2)" over the members' names."""
        if not self.ensemble:
            return self.cfg.model.name
        parts = [f"{m.cfg.model.name} x{w}" for m, w in zip(self.members, self.weights)]
        return f"ensemble({' + '.join(parts)})"

    def module(self, input_norm: str) -> nn.Module:
        """The teacher on student-normalised batches: (B, 3, s, s) -> logits (B, K)."""
        wrapped = [ResizeInput(m.model, m.cfg.data.image_size, input_norm) for m in self.members]
        if not self.ensemble:
            return wrapped[0]
        rules = [m.task.rule for m in self.members]
        return EnsembleTeacher(wrapped, rules, [float(w) for w in self.weights])

    def fingerprint(self) -> str:
        """sha256 of what the teacher's outputs depend on: a changed teacher changes it.

        One run: its weights (its raw logits are the targets). An ensemble: each member's
        weights, decision rule (it enters the output) and weight in the ensemble.
        """
        if not self.ensemble:  # a single run's fingerprint is its weights' sha256 (as before)
            return sha256_file(self.members[0].path / WEIGHTS_FILE)
        text = "\n".join(
            f"{sha256_file(m.path / WEIGHTS_FILE)} {m.task.rule} x{w}"
            for m, w in zip(self.members, self.weights)
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def cost(self) -> dict:
        """Parameters and GFLOPs per image, summed over the members at their own sizes."""
        from dermkit.models.cost import model_cost

        costs = [model_cost(m.model, m.cfg.data.image_size) for m in self.members]
        return {k: sum(c[k] for c in costs) for k in ("params", "gflops")}


def teacher_run_dirs(path: str | Path) -> tuple[list[Path], list[int], bool]:
    """(member run folders, weights, is_ensemble) of a teacher folder, without loading models.

    Members with weight 0 (not chosen on val) are left out. A member path in ensemble.json
    is taken as written (relative to the working directory, as ``dermkit ensemble`` was
    given it), else relative to the ensemble folder's parent.

    Raises:
        FileNotFoundError: the folder, or a member run it names, does not exist.
        ConfigError: ensemble.json has no member with a positive weight.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher run folder {path} does not exist")
    spec_file = path / ENSEMBLE_FILE
    if not spec_file.exists():
        return [path], [1], False
    spec = json.loads(spec_file.read_text())
    dirs, weights = [], []
    for k, member in enumerate(spec.get("members", [])):
        if int(member.get("weight", 0)) <= 0:
            continue
        run = Path(member["run"])
        found = next((p for p in (run, path.parent / run) if p.is_dir()), None)
        if found is None:
            raise FileNotFoundError(
                f"{spec_file}: members[{k}].run = {member['run']!r} is not a folder (looked "
                f"in the working directory and in {path.parent})"
            )
        dirs.append(found)
        weights.append(int(member["weight"]))
    if not dirs:
        raise ConfigError(f"{spec_file}: no member has a positive weight")
    return dirs, weights, True


def teacher_content_hash(path: str | Path) -> str:
    """sha256 of what a teacher folder's outputs depend on, read from files (no model loaded).

    Each member's weights file, its decision-rule file and its weight in the ensemble; for
    one run, the run's own two files. A pipeline stage whose teacher comes from outside the
    pipeline hashes this into its key, so a retrained or re-weighted teacher means a new
    student (paths alone would not change).

    Raises:
        FileNotFoundError: as :func:`teacher_run_dirs`.
    """
    dirs, weights, _ = teacher_run_dirs(path)
    digest = hashlib.sha256()
    for run, weight in zip(dirs, weights):
        rule = run / DECISION_FILE
        rule_sha = sha256_file(rule) if rule.exists() else "-"
        digest.update(f"{sha256_file(run / WEIGHTS_FILE)} {rule_sha} x{weight}\n".encode())
    return digest.hexdigest()


def open_teacher(path: str | Path) -> Teacher:
    """Open a teacher folder (run or ensemble); an ensemble's members must agree on classes.

    Raises:
        ConfigError: an ensemble member is not a classification run, or its classes differ
            from the first member's (naming both runs).
    """
    dirs, weights, ensemble = teacher_run_dirs(path)
    members = [open_run(d) for d in dirs]
    if ensemble:
        first = members[0]
        for m in members:
            if m.cfg.task.kind != "classification":
                raise ConfigError(
                    f"ensemble teacher {path}: member {m.path} is a {m.cfg.task.kind} run; "
                    "ensembles combine classification runs only"
                )
            if list(m.classes) != list(first.classes):
                raise ConfigError(
                    f"ensemble teacher {path}: member {m.path} has classes {m.classes}, "
                    f"{first.path} has {first.classes}"
                )
    return Teacher(Path(path), members, weights, ensemble)
