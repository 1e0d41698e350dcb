"""``dermkit distill``: train a small student on a teacher run's soft targets and the labels.

teacher run folder, or a ``dermkit ensemble`` folder (``train/teacher.py``) -> same data
preparation and task (``dermkit.tasks``) as fine-tuning (synthetic rows via
``synthetic_ratio`` too) -> the supervised loop ``train_classifier`` with a criterion that
adds the KD term (``train/kd.py``) -> best student on the task's val metric -> test once ->
teacher and student metrics side by side (same test images, same bootstrap seed).

Teacher logits come from one of two places (``distill.teacher_logits``):

* ``online``: the teacher scores every augmented training micro-batch, so the soft
  target always matches the image the student sees (costs one teacher forward per step).
* ``cached``: the teacher scores the clean cached training images once; the logits are
  stored beside the image cache (``<cache_dir>/teacher_logits/``), one file per teacher
  (its weights' hash), a row per image keyed by the image's content, and reused by resumed
  runs and by every later student of that teacher. Valid only when augmentation is off
  (the student would otherwise learn the clean image's target for an augmented view).
* ``cached-dihedral``: as ``cached``, but each image's logits are the teacher's mean over
  its 8 flips and 90-degree rotations (``eval.inference`` TTA). That mean is the same for
  every flip/rotation of the image, so the stored target is exact for a student whose only
  augmentations are ``flip`` and ``rot90``: one cached pass replaces a teacher forward per
  step, which matters when the teacher is an ensemble costing several times the student.
* ``auto``: cached when augmentation is off, else online; the choice and its reason are
  logged and written into the report.

Options (``distill.*``): a DeiT distillation token for ViT students (``dist_token``,
``models/distilled.py``; ``dist_target`` soft or hard), feature matching through a
training-only projection (``feature_weight``) and last-block CLS attention matching
(``attention_weight``), both in ``train/distill_student.py``; they need the teacher's
features of every batch, so they run online. Ordinal tasks (a CORN teacher and student with
the same column and thresholds/order) distil the K-1 conditional probabilities
(``kd.OrdinalKDLoss``) and are evaluated as ordinal fine-tuning is (``tasks/ordinal.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dermkit.config import ConfigError
from dermkit.core.devices import make_accelerator
from dermkit.data.cache import DEFAULT_CACHE_DIR
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import write_split_file
from dermkit.data.settings import AugmentSettings
from dermkit.eval.curves import plot_learning_curves
from dermkit.eval.inference import dihedral_views, predict_logits
from dermkit.eval.report import format_estimate
from dermkit.models.backbones import feature_dim, input_norm_of
from dermkit.models.runs_io import WEIGHTS_FILE, architecture_kwargs, read_run_config
from dermkit.models.weights import save_weights
from dermkit.runs import RunDir
from dermkit.tasks import OrdinalTask, Task, summary_rows, task_from_config
from dermkit.tasks.runs import TaskRun
from dermkit.train.distill_student import (
    DistillStudent,
    attention_kl,
    feature_matching_loss,
    is_vit_like,
    patch_count,
    teacher_outputs,
)
from dermkit.train.finetune import build_model, load_training_data, resolve_model_config
from dermkit.train.kd import KDLoss, OrdinalKDLoss
from dermkit.train.loop import load_best, train_classifier
from dermkit.train.losses import ClassificationLoss
from dermkit.train.settings import DistillRunConfig
from dermkit.train.teacher import Teacher, open_teacher, teacher_run_dirs

log = logging.getLogger(__name__)

# Augmentation settings that change pixels; tta only affects evaluation.
_PIXEL_AUGMENTS = (
    "flip",
    "rot90",
    "max_rotate_deg",
    "max_scale",
    "max_translate",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "mixup_alpha",
    "cutmix_alpha",
)
# The augmentations the dihedral-mean teacher is invariant to (``cached-dihedral``).
_DIHEDRAL_AUGMENTS = ("flip", "rot90")


def augmentation_is_off(augment: AugmentSettings) -> bool:
    """True when training batches are the clean cached images (no flip, affine, colour, mix)."""
    return not any(getattr(augment, name) for name in _PIXEL_AUGMENTS)


def resolve_teacher_logits(cfg: DistillRunConfig) -> tuple[str, str]:
    """('online' | 'cached' | 'cached-dihedral', reason) for ``distill.teacher_logits``.

    'cached' needs augmentation off; 'cached-dihedral' allows flip and rot90 only.
    """
    mode, off = cfg.distill.teacher_logits, augmentation_is_off(cfg.augment)
    on = [n for n in _PIXEL_AUGMENTS if getattr(cfg.augment, n)]
    not_dihedral = [n for n in on if n not in _DIHEDRAL_AUGMENTS]
    if mode == "cached-dihedral" and not_dihedral:
        raise ConfigError(
            "distill.teacher_logits=cached-dihedral is exact only for flip/rot90 views, but "
            f"augment has {', '.join(not_dihedral)} on: switch those off or use online"
        )
    if mode == "cached" and not off:
        raise ConfigError(
            "distill.teacher_logits=cached needs augmentation off, but augment has "
            f"{', '.join(on)} on: use online (or auto), or switch those off"
        )
    matching = [
        f"distill.{n}={getattr(cfg.distill, n)}"
        for n in ("feature_weight", "attention_weight")
        if getattr(cfg.distill, n) > 0
    ]
    if matching and mode in ("cached", "cached-dihedral"):
        raise ConfigError(
            f"distill.teacher_logits={mode} stores logits only, but {', '.join(matching)} "
            "reads the teacher's features of every batch: use online (or auto)"
        )
    if matching and mode == "auto":
        return "online", f"auto: the teacher scores every batch for {', '.join(matching)}"
    if mode == "auto":
        mode = "cached" if off else "online"
        reason = (
            "auto: augmentation is off, so the clean images' teacher logits are exact"
            if off
            else f"auto: augmentation is on ({', '.join(on)}), the teacher scores each batch"
        )
    elif mode == "cached-dihedral":
        reason = (
            "set by distill.teacher_logits=cached-dihedral: the teacher's mean over 8 "
            "flips/rotations, exact for the student's flip/rot90 views"
        )
    else:
        reason = f"set by distill.teacher_logits={mode}"
    return mode, reason


class _IndexRecorder:
    """A training dataset that remembers the rows of the last batch it served.

    Why: the loop's criterion receives images, not row indices. Cached teacher logits are
    used only without augmentation, where the loop gathers a micro-batch and immediately
    computes its loss, so the last rows served are the rows of the images being scored.
    """

    def __init__(self, dataset: CachedImageDataset):
        self.dataset = dataset
        self.last_rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        self.last_rows = np.asarray(indices)
        return self.dataset.__getitems__(indices)


def image_fingerprints(dataset: CachedImageDataset, chunk: int = 512) -> list[str]:
    """(N,) content hashes of the images exactly as the student sees them (cached uint8)."""
    out = []
    for start in range(0, len(dataset), chunk):
        images, _ = dataset.__getitems__(list(range(start, min(start + chunk, len(dataset)))))
        out += [hashlib.blake2b(im.numpy().tobytes(), digest_size=12).hexdigest() for im in images]
    return out


def cached_teacher_logits(
    teacher: nn.Module,
    source: Teacher,
    dataset: CachedImageDataset,
    store_dir: Path,
    accelerator,
    dihedral: bool = False,
) -> tuple[torch.Tensor, Path]:
    """Teacher logits (N, C) of every clean training image, each computed once and stored.

    ``dihedral``: the mean over each image's 8 flips/rotations instead of the image alone.
    One store file per (teacher weights, dihedral) in ``store_dir`` (the image cache's
    folder, shared by runs), its rows keyed by the content hash of each image as the
    student sees it: a resumed run, another student of the same teacher (a seed, a
    temperature) or a student with extra synthetic images scores only the images the store
    lacks. Why not per run: the ensemble teacher's pass over HAM10000 costs ~20 minutes on
    2 cores, paid again by every distill stage of the ablation.
    """
    weights_sha = source.fingerprint()
    key = hashlib.sha256((weights_sha + ("\ndihedral" if dihedral else "")).encode()).hexdigest()
    path = Path(store_dir) / f"teacher_logits_{key[:16]}.safetensors"
    prints = image_fingerprints(dataset)
    known, stored = {}, None
    if path.exists():
        with safe_open(str(path), "pt") as f:
            known = {p: i for i, p in enumerate(json.loads(f.metadata()["images"]))}
            stored = f.get_tensor("logits")
    todo: dict[str, int] = {}  # print -> first dataset row with it (a repeated image once)
    for i, p in enumerate(prints):
        if p not in known and p not in todo:
            todo[p] = i
    if todo:
        rows = np.array(list(todo.values()))
        fresh = predict_logits(teacher, dataset, rows, accelerator, tta=dihedral)
        order = [*known, *todo]
        stored = fresh if stored is None else torch.cat([stored, fresh])
        known = {p: i for i, p in enumerate(order)}
        if accelerator.is_main_process:
            metadata = {
                "teacher_run": str(source.path.resolve()),
                "teacher_weights_sha256": weights_sha,
                "dihedral": str(dihedral),
                "images": json.dumps(order),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            save_file({"logits": stored.contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)  # atomic: a concurrent run reads the old or the new file
    log.info(
        "teacher logits: %d of %d images scored, the rest from %s",
        len(todo),
        len(prints),
        path,
    )
    return stored[[known[p] for p in prints]], path


def check_teacher_split(teacher_dir: Path, manifest: pd.DataFrame) -> None:
    """Refuse a teacher that trained on lesions this run validates or tests on."""
    split_file = teacher_dir / "split.csv"
    if not split_file.exists():
        log.warning("%s missing: cannot check the teacher's training lesions", split_file)
        return
    teacher = pd.read_csv(split_file, dtype=str)
    taught = set(teacher.loc[teacher["split"] == "train", "lesion_id"])
    held_out = manifest[manifest["split"].isin(["val", "test"])]
    leaked = sorted(set(held_out["lesion_id"].astype(str)) & taught)
    if leaked:
        raise ConfigError(
            f"the teacher ({split_file}) trained on {len(leaked)} lesions in this run's val/test "
            f"split, e.g. {leaked[:5]}: distil on the teacher's split "
            f"(data.split_file={split_file})"
        )


def check_teacher_task(cfg: DistillRunConfig, teacher_dir: Path) -> None:
    """Refuse a teacher whose task differs from the student's (``cfg.task``), before any work.

    The KD targets only mean the same to both models for the same kind of head: a softmax
    over the classes (classification), or a CORN head whose K-1 outputs are the conditional
    logits of P(y > k | y > k-1) (ordinal), which also needs the same column and cut
    points (thresholds) or value order.
    """
    if not teacher_dir.is_dir():
        raise FileNotFoundError(f"teacher run folder {teacher_dir} does not exist")
    teacher = read_run_config(teacher_dir).task
    where = f"teacher run {teacher_dir} ({teacher_dir / 'config.yaml'})"
    if teacher.kind != cfg.task.kind:
        raise ConfigError(
            f"task.kind differs: {where} has task.kind={teacher.kind}, this run has "
            f"task.kind={cfg.task.kind}; distillation needs the same kind of head for both "
            "(classification: softmax over the classes; ordinal: CORN conditional "
            "probabilities, task.kind=ordinal with the teacher's column and thresholds/order)"
        )
    if cfg.task.kind != "ordinal":
        return
    diffs = [
        f"task.{name}: teacher {getattr(teacher, name)!r}, this run {getattr(cfg.task, name)!r}"
        for name in ("column", "thresholds", "order")
        if getattr(teacher, name) != getattr(cfg.task, name)
    ]
    if diffs:
        raise ConfigError(
            f"ordinal definitions differ from the {where}: {'; '.join(diffs)}. The KD targets "
            "are the teacher's K-1 conditional probabilities P(y > k | y > k-1), which mean "
            "the same to the student only for the same column and thresholds/order"
        )


def build_student(cfg: DistillRunConfig, n_outputs: int) -> tuple[nn.Module, str]:
    """The student (``build_model``), as a ``DistilledViT`` with ``distill.dist_token``.

    The plain model is built first, so ``model.weights`` load through the usual reported
    path; its tensors are then copied into the token model (``load_plain_vit_state``).
    """
    model, report = build_model(cfg, n_outputs)
    if not cfg.distill.dist_token:
        return model, report
    from timm.models.vision_transformer import VisionTransformer

    from dermkit.models.distilled import create_distilled_vit, load_plain_vit_state

    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"distill.dist_token=true needs a ViT student (a timm VisionTransformer with a "
            f"class token); model.name={cfg.model.name} is a {type(model).__name__}: use a "
            "ViT student or distill.dist_token=false"
        )
    m = cfg.model
    try:
        distilled = create_distilled_vit(
            m.name, **architecture_kwargs(cfg, n_outputs, m.input_norm)
        )
    except ValueError as e:
        raise ConfigError(f"distill.dist_token=true, model.name={m.name}: {e}") from e
    if m.weights:
        load_plain_vit_state(distilled, model.state_dict())
        report += "; distillation token and head initialised fresh"
    return distilled, report


def check_matching_options(
    cfg: DistillRunConfig, student: nn.Module, teacher: nn.Module, teacher_cfg
) -> None:
    """Refuse attention matching between models that have no comparable attention maps."""
    w = cfg.distill.attention_weight
    if w <= 0:
        return
    names = (f"teacher {teacher_cfg.model.name}", f"student {cfg.model.name}")
    for name, model in zip(names, (teacher, student)):
        if not is_vit_like(model):
            raise ConfigError(
                f"distill.attention_weight={w} matches ViT attention maps, but the {name} is a "
                f"{type(model).__name__}: set distill.attention_weight=0"
            )
    nt, ns = patch_count(teacher), patch_count(student)
    if nt != ns:
        raise ConfigError(
            f"distill.attention_weight={w} needs the same number of patch tokens: the {names[0]} "
            f"has {nt} at {teacher_cfg.data.image_size} px, the {names[1]} has {ns} at "
            f"{cfg.data.image_size} px (choose sizes/patches that give the same grid)"
        )


def _num(value: float | None) -> float:
    return np.nan if value is None else float(value)


def plot_teacher_vs_student(teacher: dict, student: dict, labels: tuple[str, str]) -> Figure:
    """Headline metrics of two evaluate_predictions results with their CIs, side by side."""
    names = [n for n, e in student["metrics"].items() if e["value"] is not None]
    fig = Figure(figsize=(7.5, 0.45 * len(names) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (result, label) in enumerate(((teacher, labels[0]), (student, labels[1]))):
        y = np.arange(len(names)) + (0.15 if k else -0.15)
        vals, lo, hi = (
            np.array([_num(result["metrics"][n][key]) for n in names])
            for key in ("value", "ci_low", "ci_high")
        )
        # A percentile CI need not contain the point estimate (ECE's bootstrap is biased
        # upwards), and errorbar refuses negative lengths: such a side gets no bar.
        err = np.clip(np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0), 0.0, None)
        ax.errorbar(vals, y, xerr=err, fmt="o", color=f"C{k}", capsize=3, label=label)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("test value (bars: bootstrap CI over lesions)")
    ax.legend(loc="best")
    return fig


def split_logits(model, datasets: dict, accelerator, tta: bool) -> dict[str, np.ndarray]:
    """Logits (N_split, C) of ``model`` for each named dataset."""
    return {
        s: predict_logits(model, ds, np.arange(len(ds)), accelerator, tta=tta).numpy()
        for s, ds in datasets.items()
    }


def make_kd_loss(cfg: DistillRunConfig, task: Task, train_ds, real: np.ndarray, device) -> KDLoss:
    """The KD loss of the task: softmax KD with the configured label loss, or ordinal KD.

    Chosen here rather than by the task: the KD losses build on the training losses
    (``train/kd.py``, ``train/losses.py``), a layer above ``dermkit.tasks``.
    """
    dc = cfg.distill
    if isinstance(task, OrdinalTask):
        return OrdinalKDLoss(dc.alpha, dc.temperature, teacher_target=dc.dist_target)
    n_classes = len(train_ds.class_names)
    counts = torch.bincount(train_ds.labels[real], minlength=n_classes)
    hard = ClassificationLoss.from_config(cfg.loss, counts).to(device)
    return KDLoss(dc.alpha, dc.temperature, hard_loss=hard, teacher_target=dc.dist_target)


def train_student(
    cfg: DistillRunConfig,
    run_dir: Path,
    accelerator,
    student: nn.Module,
    teacher: nn.Module,
    source: Teacher,
    datasets: dict,
    synthetic_mask: np.ndarray,
    mode: str,
    resume: bool,
    progress: bool,
    task: Task,
) -> tuple[nn.Module, dict, Path | None]:
    """Train ``student`` on the teacher's targets in the shared loop.

    ``teacher`` is ``source.module(...)``: a ``ResizeInput`` around one run's model, or an
    ``EnsembleTeacher`` (logits only: feature/attention matching need a single teacher).

    Returns (the selected student in eval mode, the loop's summary, the cached teacher
    logits file or None). With a distillation token or feature/attention matching the loop
    trains a ``DistillStudent`` wrapper (the projection included); only the student is
    returned, and only it is saved as the run's model.
    """
    device = accelerator.device
    dc = cfg.distill
    features, attention = dc.feature_weight > 0, dc.attention_weight > 0
    train_ds = datasets["train"]
    kd = make_kd_loss(cfg, task, train_ds, ~np.asarray(synthetic_mask), device)
    trainee = student
    if dc.dist_token or features or attention:
        width = feature_dim(teacher.model) if features else None
        trainee = DistillStudent(student, teacher_features=width, attention=attention)

    cache_file = None
    if mode in ("cached", "cached-dihedral"):
        dihedral = mode == "cached-dihedral"
        store = Path(cfg.data.cache_dir or DEFAULT_CACHE_DIR) / "teacher_logits"
        table, cache_file = cached_teacher_logits(
            teacher, source, train_ds, store, accelerator, dihedral
        )
        table = table.to(device)
        recorder = _IndexRecorder(train_ds)
        checked = []

        def teacher_targets(images: torch.Tensor) -> dict[str, torch.Tensor]:
            rows = recorder.last_rows
            if rows is None or len(rows) != len(images):
                raise RuntimeError("cached teacher logits: batch rows unknown")
            soft = table[torch.as_tensor(rows, device=device)]
            if not checked:  # once: the recorded rows really are these images
                with torch.no_grad():  # a flipped/rotated view: the dihedral mean is the same
                    views = dihedral_views(images) if dihedral else [images]
                    live = torch.stack([teacher(v).float() for v in views]).mean(0)
                tol = 0.05 * (1 + float(live.abs().max()))
                if float((live - soft).abs().max()) > tol:
                    raise RuntimeError("cached teacher logits do not match the batch")
                checked.append(True)
            return {"logits": soft}

        train_source = recorder
    else:

        def teacher_targets(images: torch.Tensor) -> dict[str, torch.Tensor]:
            if not (features or attention):
                with torch.no_grad():
                    return {"logits": teacher(images)}
            return teacher_outputs(teacher.model, teacher.adapt(images), features, attention)

        train_source = train_ds

    def criterion(out, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """out: the student's logits (B, C), or ``DistillStudent``'s dict in training."""
        t = teacher_targets(images)
        if isinstance(out, torch.Tensor):
            return kd(out, t["logits"], targets)
        loss = kd(out["logits"], t["logits"], targets, student_dist=out.get("dist_logits"))
        if features:
            loss = loss + dc.feature_weight * feature_matching_loss(out["features"], t["features"])
        if attention:
            loss = loss + dc.attention_weight * attention_kl(out["attention"], t["attention"])
        return loss

    summary = train_classifier(
        cfg,
        trainee,
        train_source,
        datasets["val"],
        run_dir,
        synthetic_mask=synthetic_mask,
        resume=resume,
        progress=progress,
        accelerator=accelerator,
        criterion=criterion,
        to_probs=task.loop_probs,
    )
    trainee = load_best(trainee, run_dir)
    best = trainee.student if isinstance(trainee, DistillStudent) else trainee
    return best.eval(), summary, cache_file


def distillation_info(cfg: DistillRunConfig, source: Teacher, mode, reason) -> dict:
    """The distillation settings recorded in metrics.json."""
    dc = cfg.distill
    return {
        "teacher_run": str(source.path),
        "teacher_model": source.name,
        "teacher_members": [
            {"run": str(m.path), "model": m.cfg.model.name, "weight": w}
            for m, w in zip(source.members, source.weights)
        ],
        "student_model": cfg.model.name,
        "alpha": dc.alpha,
        "temperature": dc.temperature,
        "dist_token": dc.dist_token,
        "dist_target": dc.dist_target,
        "feature_weight": dc.feature_weight,
        "attention_weight": dc.attention_weight,
        "teacher_logits": mode,
        "teacher_logits_reason": reason,
    }


def options_text(cfg: DistillRunConfig) -> str:
    """One line for the report: the KD terms in use."""
    dc = cfg.distill
    parts = [f"alpha {dc.alpha}, T {dc.temperature}, teacher target {dc.dist_target}"]
    if dc.dist_token:
        parts.append("distillation token (inference: mean of the CLS and distillation heads)")
    if dc.feature_weight:
        parts.append(f"feature matching x {dc.feature_weight}")
    if dc.attention_weight:
        parts.append(f"attention matching x {dc.attention_weight}")
    return "; ".join(parts)


def teacher_student_figures(
    run_dir: Path,
    cfg: DistillRunConfig,
    teacher_name: str,
    teacher_result: dict,
    result: dict,
    history: list[dict],
) -> dict[str, str]:
    """Write learning_curves.png and teacher_vs_student.png; return the side-by-side rows.

    Shared by the classification and the ordinal distillation reports, whose metrics
    differ but are laid out the same way: ``{"<metric>: teacher | student": "a | b"}``.
    """
    plot_learning_curves({cfg.model.name: history}).savefig(
        run_dir / "learning_curves.png", dpi=110
    )
    labels = (f"teacher {teacher_name}", f"student {cfg.model.name}")
    plot_teacher_vs_student(teacher_result, result, labels).savefig(
        run_dir / "teacher_vs_student.png", dpi=110
    )
    return {
        f"{name}: teacher | student": f"{format_estimate(teacher_result['metrics'][name])} | "
        f"{format_estimate(entry)}"
        for name, entry in result["metrics"].items()
    }


def run_distill(cfg: DistillRunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Distil end to end; returns the path of report.html."""
    resolve_model_config(cfg)
    member_dirs, _, is_ensemble = teacher_run_dirs(cfg.teacher)
    for d in member_dirs:
        check_teacher_task(cfg, d)
    mode, reason = resolve_teacher_logits(cfg)
    if is_ensemble and (cfg.distill.feature_weight > 0 or cfg.distill.attention_weight > 0):
        raise ConfigError(
            f"distill.teacher={cfg.teacher} is an ensemble: it has logits but no one feature "
            "map or attention map to match; set distill.feature_weight=0 and "
            "distill.attention_weight=0, or distil from one of its member runs"
        )
    source = open_teacher(cfg.teacher)
    teacher_cfg = source.cfg
    task = task_from_config(cfg.task)
    torch.manual_seed(cfg.seed)
    student, weights_report = build_student(cfg, source.task.n_outputs)
    check_matching_options(cfg, student, source.members[0].model, teacher_cfg)
    task.check_config(cfg)
    log.info("teacher logits: %s (%s)", mode, reason)
    accelerator = make_accelerator(cfg.optim.precision)
    device = accelerator.device
    with RunDir(cfg.out_dir, cfg, "distill", write=accelerator.is_main_process) as run:
        if getattr(student, "dermkit_weights_provenance", None):
            run.info["pretrained_weights"] = student.dermkit_weights_provenance
        with accelerator.main_process_first():
            data, synthetic_mask = load_training_data(cfg, run)
        parts, synthetic_mask = task.prepare(data, synthetic_mask, cfg.task.drop_missing)
        for member in source.members:
            check_teacher_classes(member, task)
            check_teacher_split(member.path, data.manifest)
        if accelerator.is_main_process:
            write_split_file(data.manifest, run / "split.csv")
        classes = task.class_names
        datasets = {s: CachedImageDataset(data.cache, p, classes) for s, p in parts.items()}

        teacher = source.module(input_norm_of(student)).to(device).eval()
        teacher.requires_grad_(False)
        student, summary, cache_file = train_student(
            cfg,
            run.path,
            accelerator,
            student,
            teacher,
            source,
            datasets,
            synthetic_mask,
            mode,
            resume,
            progress,
            task,
        )
        eval_sets = {s: datasets[s] for s in ("val", "test")}
        logits = split_logits(student, eval_sets, accelerator, cfg.augment.tta)
        # As in fine-tuning: the decision rule is fitted on val only; the teacher keeps its own.
        task.fit_probs(logits["val"], datasets["val"].labels.numpy(), cfg.decision_rule)
        probs = {s: task.probs(v) for s, v in logits.items()}
        # The teacher is reported as the student saw it: with the dihedral mean if cached so.
        teacher_tta = source.tta or mode == "cached-dihedral"
        teacher_logits = split_logits(teacher, eval_sets, accelerator, teacher_tta)
        teacher_probs = {s: source.task.probs(v) for s, v in teacher_logits.items()}
        if not accelerator.is_main_process:
            return run / "report.html"
        save_weights(student, run / WEIGHTS_FILE)  # the student alone, never a projection
        task.save(run.path)
        for s in ("val", "test"):
            task.write_predictions(run / f"predictions_{s}.csv", parts[s], probs[s])
        y_test = datasets["test"].labels.numpy()

        def evaluate(p):  # same images, lesions and bootstrap seed for both models
            return task.evaluate(y_test, p, parts["test"], cfg.eval, cfg.seed)

        result, teacher_result = evaluate(probs["test"]), evaluate(teacher_probs["test"])
        from dermkit.models.cost import model_cost

        cost = {
            "teacher": source.cost(),
            "student": model_cost(student, cfg.data.image_size),
        }
        result["distillation"] = {
            **distillation_info(cfg, source, mode, reason),
            "teacher_logits_file": str(cache_file) if cache_file else None,
            "cost": cost,
            "teacher_metrics": teacher_result["metrics"],
        }
        result["training"] = {k: v for k, v in summary.items() if k != "history"}
        result["history"] = summary["history"]
        side_by_side = teacher_student_figures(
            run.path, cfg, source.name, teacher_result, result, summary["history"]
        )
        rule_rows = task.probs_rows(cfg.decision_rule, logits["test"], y_test, result, cfg.seed)
        kind = "" if task.kind == "classification" else f" ({task.kind} '{cfg.task.column}')"
        label = task.selection_label
        return task.write_report(
            result,
            y_test,
            probs["test"],
            parts["test"],
            run.path,
            title=f"dermkit distill{kind}: {source.name} -> {cfg.model.name} (test split)",
            extra={
                "teacher run": str(source.path),
                "teacher logits": f"{mode} ({reason})",
                "alpha / temperature": f"{cfg.distill.alpha} / {cfg.distill.temperature}",
                "distillation terms": options_text(cfg),
                "params teacher | student": f"{cost['teacher']['params']:,} | "
                f"{cost['student']['params']:,}",
                "GFLOPs per image teacher | student": f"{cost['teacher']['gflops']:.4g} | "
                f"{cost['student']['gflops']:.4g}",
                **side_by_side,
                "student initialisation": weights_report,
                **summary_rows(task, summary),
                "epochs run": summary["epochs_run"],
                **{k: v for k, v in rule_rows.items() if k.startswith("decision rule")},
                "precision": summary["precision"],
                "processes": summary["processes"],
            },
            extra_figures={
                "teacher_vs_student.png": "Teacher vs student on the same test images: headline "
                "metrics with lesion-level bootstrap CIs (same bootstrap draws for both).",
                "learning_curves.png": f"Student learning curves: loss and {label} per epoch "
                f"(dashed: clean train subset, solid: val); the best epoch is the best val "
                f"{label}.",
            },
        )


def check_teacher_classes(teacher: TaskRun, task: Task) -> None:
    """Refuse a teacher whose classes differ from this run's (names and order)."""
    if list(teacher.classes) != list(task.class_names):
        raise ConfigError(
            f"classes differ: teacher {teacher.path} has {teacher.classes}, this run's "
            f"{task.kind} task has {task.class_names}; soft targets need the same classes in "
            "the same order (check data.path, data.classes, data.label_map and "
            "task.column/thresholds/order against the teacher's)"
        )
