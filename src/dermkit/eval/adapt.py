"""Label-free adaptation of a trained classifier to a new clinic's images.

Each method uses the target images only, never their labels:

* ``bn`` (AdaBN, Li et al. 2016): the BatchNorm running statistics are re-estimated on
  the target images: every BN layer's statistics are reset and accumulated as a cumulative
  average over all target batches (``momentum=None``), with only the BN layers in train
  mode and no gradients. A model without BatchNorm (a ViT: LayerNorm only) cannot be
  adapted this way: :class:`NoBatchNormError`.
* ``priors`` (Saerens, Latinne & Decaestecker 2002, Neural Computation 14:21-41): the
  target class priors are estimated by EM from the calibrated posteriors and the source
  priors (the training split's class frequencies), and the posteriors re-weighted,
  ``p'(y|x) ∝ p(y|x) * π_t(y) / π_s(y)``.
* ``tta``: multi-scale test-time augmentation: the crop zoomed in (0.8), as is (1.0) and
  zoomed out (1.2, the shrunk image reflect-padded back to size), each also flipped
  horizontally and vertically: 9 views whose probabilities are averaged.

Composition with the run's decision rule (``decision.json``: temperature T, class scales
s): the posteriors EM needs are the temperature-calibrated ``softmax(z / T)`` (averaged
over the views with ``tta``); the class scales stay what they are, a decision preference
fitted on val relative to the source case mix, so the reported probabilities are
``normalise(softmax(z / T) * π_t / π_s * s)``. Folding ``π_t / π_s`` into the class scales
gives the same rule, which is how an adapted run folder carries it to export and serving
(:func:`write_adapted_run`).

Nothing here imports the training code: batches are built from a
:class:`~dermkit.data.dataset.CachedImageDataset` with the model's own input normalisation.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dermkit.config import ConfigError
from dermkit.data.transforms import to_float
from dermkit.eval.calibration import DecisionRule

ADAPTATIONS = ("bn", "priors", "tta")
TTA_SCALES = (0.8, 1.0, 1.2)
ADAPTATION_FILE = "adaptation.json"
BN_STATS_FILE = "bn_stats.safetensors"
# Files of a classifier run folder that an adapted copy keeps as they are (not ood.json:
# adapted BN statistics move the scores, so the copy needs its own `--fit-ood`).
RUN_FILES = ("config.yaml", "run.json", "classes.json", "split.csv", "metrics.json")


class NoBatchNormError(ConfigError):
    """AdaBN asked of a model that has no BatchNorm layer (e.g. a ViT, LayerNorm only)."""


def parse_adaptations(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"bn,priors"`` -> ("bn", "priors"), in :data:`ADAPTATIONS` order; unknown: ConfigError."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    names = {s.strip().lower() for s in items if s.strip()}
    unknown = sorted(names - set(ADAPTATIONS))
    if unknown:
        raise ConfigError(
            f"--adapt: unknown adaptation(s) {unknown}; choose from {', '.join(ADAPTATIONS)} "
            "(a comma list, e.g. bn,priors)"
        )
    return tuple(a for a in ADAPTATIONS if a in names)


# ----------------------------------------------------------------------------- batches


def image_batches(
    dataset,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """Normalised float batches (B, 3, S, S) of ``dataset`` rows (a CachedImageDataset)."""
    rows = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    for i in range(0, len(rows), batch_size):
        x, _ = dataset.__getitems__(rows[i : i + batch_size])
        yield to_float(x.to(device), mean, std)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 3, S, S) -> the same size, zoomed: ``scale`` < 1 crops the central ``scale``
    fraction and enlarges it (the lesion fills more of the frame); > 1 shrinks the image
    to S / scale and reflect-pads it back to S (the lesion is smaller in the frame)."""
    if scale == 1.0:
        return x
    s = x.shape[-1]
    if scale < 1.0:
        k = max(1, round(s * scale))
        lo = (s - k) // 2
        crop = x[..., lo : lo + k, lo : lo + k]
        return F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)
    k = max(2, round(s / scale))
    small = F.interpolate(x, size=(k, k), mode="bilinear", align_corners=False, antialias=True)
    pad = s - k
    before = pad // 2
    return F.pad(small, (before, pad - before, before, pad - before), mode="reflect")


def tta_views(x: torch.Tensor, scales: Sequence[float] = TTA_SCALES) -> list[torch.Tensor]:
    """Each scale (:func:`zoom`) as is, flipped left-right and flipped up-down."""
    views = []
    for s in scales:
        z = zoom(x, s)
        views += [z, z.flip(-1), z.flip(-2)]
    return views


@torch.no_grad()
def view_logits(
    model: nn.Module, batches: Iterable[torch.Tensor], scales: Sequence[float] = TTA_SCALES
) -> np.ndarray:
    """(V, N, C) float64 logits of every :func:`tta_views` view of every image (eval mode)."""
    model.eval()
    out = [torch.stack([model(v).float() for v in tta_views(x, scales)]) for x in batches]
    return torch.cat(out, dim=1).double().numpy()


# ----------------------------------------------------------------------------- AdaBN


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (any dimension, timm's BatchNormAct too) that track statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """AdaBN in place: every BN layer's running statistics re-estimated on ``batches``.

    The statistics are reset and accumulated as a cumulative average over all batches
    (``momentum=None``); only the BN layers run in train mode (dropout and the rest stay in
    eval mode) and no gradient is taken. The model is left in eval mode with each layer's
    momentum restored.

    Returns:
        {"layers": BN layers adapted, "images": target images seen, "batches": batches}.

    Raises:
        NoBatchNormError: the model has no BatchNorm layer.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise NoBatchNormError(
            f"{type(model).__name__} has no BatchNorm layer, so AdaBN (--adapt bn) cannot "
            "adapt it (a ViT normalises with LayerNorm, which keeps no statistics); use "
            "--adapt priors and/or tta"
        )
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n_images = n_batches = 0
    try:
        for x in batches:
            model(x)
            n_images += len(x)
            n_batches += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    if n_images == 0:
        raise ValueError("AdaBN needs at least one target image")
    return {"layers": len(layers), "images": n_images, "batches": n_batches}


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict key: tensor} of every BN buffer (running mean/var, batch count)."""
    names = {id(m) for m in batchnorm_layers(model)}
    out = {}
    for mod_name, m in model.named_modules():
        if id(m) in names:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{mod_name}.{b}"] = getattr(m, b).detach().clone().contiguous()
    return out


# ----------------------------------------------------------------------------- priors


@dataclass
class PriorShift:
    """Source and estimated target class priors (EM), and how the estimate converged."""

    classes: list[str]
    source: list[float]
    target: list[float]
    iterations: int
    converged: bool
    source_from: str = ""
    applied: bool = True
    check: dict | None = None  # EM on the run's own val set: see em_check

    @property
    def weights(self) -> np.ndarray:
        """π_t / π_s per class, the factor on each calibrated posterior (1 when not applied)."""
        if not self.applied:
            return np.ones(len(self.source))
        return np.asarray(self.target) / np.maximum(np.asarray(self.source), 1e-12)

    def to_dict(self) -> dict:
        return asdict(self) | {"weights": self.weights.tolist()}


def em_priors(
    posteriors: np.ndarray,
    source_priors: np.ndarray,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    min_prior: float = 1e-6,
) -> tuple[np.ndarray, int, bool]:
    """Target class priors by EM (Saerens, Latinne & Decaestecker 2002).

    E-step: ``p_t(y|x) = normalise(p_s(y|x) * π_t(y) / π_s(y))``; M-step: ``π_t`` = the
    mean of ``p_t(y|x)`` over the target images; from ``π_t = π_s`` until the largest
    change is below ``tol``.

    Args:
        posteriors: (N, C) calibrated source posteriors of the target images (rows sum 1).
        source_priors: (C,) class frequencies of the training data.

    Returns:
        (target priors (C,), iterations, converged).
    """
    p = np.asarray(posteriors, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"EM needs (N, C) posteriors of at least one image, got {p.shape}")
    ps = np.maximum(np.asarray(source_priors, np.float64), min_prior)
    ps = ps / ps.sum()
    if ps.shape != (p.shape[1],):
        raise ValueError(f"{p.shape[1]} classes in the posteriors, {ps.shape} source priors")
    pt = ps.copy()
    for it in range(1, max_iter + 1):
        q = p * (pt / ps)
        q = q / np.maximum(q.sum(1, keepdims=True), 1e-300)
        new = q.mean(0)
        delta = np.abs(new - pt).max()
        pt = new
        if delta < tol:
            return pt, it, True
    return pt, max_iter, False


def reweight(posteriors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """normalise(posteriors * weights), row-wise."""
    q = np.asarray(posteriors, np.float64) * np.asarray(weights, np.float64)
    return q / np.maximum(q.sum(1, keepdims=True), 1e-300)


def em_check(
    run_dir: str | Path, rule, classes: list[str], source: np.ndarray, max_error: float = 0.1
) -> dict | None:
    """EM where the answer is known: the run's own val set (``predictions_val.csv``).

    The val probabilities are ``normalise(softmax(z / T) * s)``, so dividing by the class
    scales gives back the calibrated posteriors. EM from the source priors should land on
    val's label frequencies; the total-variation distance between the two is the error.
    Above ``max_error`` the posteriors are not calibrated well enough for EM (a weak or
    over-confident model drives it to a degenerate prior), and the priors are not applied.

    Returns:
        {"val_images", "val_frequencies", "em_estimate", "error", "max_error", "ok"}, or
        None when the run has no predictions_val.csv.
    """
    path = Path(run_dir) / "predictions_val.csv"
    if not path.exists():
        return None
    from dermkit.core.predictions import read_predictions

    df, _, probs, names = read_predictions(path)
    if list(names) != list(classes):
        return None
    if rule.class_scales is not None:
        probs = reweight(probs, 1.0 / np.asarray(rule.class_scales))
    freq = df["label"].value_counts(normalize=True).reindex(classes, fill_value=0).to_numpy()
    estimate, _, _ = em_priors(probs, source)
    error = 0.5 * float(np.abs(estimate - freq).sum())
    return {
        "val_images": len(df),
        "val_frequencies": [float(v) for v in freq],
        "em_estimate": [float(v) for v in estimate],
        "error": error,
        "max_error": max_error,
        "ok": error <= max_error,
    }


def source_priors(run_dir: str | Path, cfg, classes: list[str]) -> tuple[np.ndarray, str]:
    """The training split's class frequencies of a run, and where they came from.

    From the run's ``split.csv`` (image ids of each split) joined with its dataset's labels
    (``cfg.data``); when the dataset cannot be read, the labels of ``predictions_val.csv``
    (a lesion-grouped split keeps the class mix, so val's frequencies stand in for train's).
    """
    run_dir = Path(run_dir)
    split = run_dir / "split.csv"
    if split.exists():
        try:
            from dermkit.data.labels import load_label_map
            from dermkit.data.readers import load_dataset

            label_map = load_label_map(cfg.data.label_map) if cfg.data.label_map else None
            manifest = load_dataset(
                cfg.data.path,
                layout=cfg.data.layout,
                skip_bad=True,
                label_map=label_map,
                classes=cfg.data.classes,
            ).manifest
            ids = pd.read_csv(split, dtype=str)
            train = set(ids.loc[ids["split"] == "train", "image_id"])
            labels = manifest.loc[manifest["image_id"].isin(train), "label"]
            if len(labels):
                counts = labels.value_counts().reindex(classes, fill_value=0).to_numpy()
                return counts / counts.sum(), f"train split ({len(labels)} images, split.csv)"
        except (OSError, ValueError, KeyError):
            pass
    val = run_dir / "predictions_val.csv"
    if val.exists():
        labels = pd.read_csv(val, dtype=str)["label"]
        counts = labels.value_counts().reindex(classes, fill_value=0).to_numpy()
        return counts / counts.sum(), f"val split labels ({len(labels)} images, the data unread)"
    raise FileNotFoundError(
        f"{run_dir}: no split.csv with a readable dataset and no predictions_val.csv: the "
        "source class priors that --adapt priors needs are unknown"
    )


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Adapted:
    """What :func:`adapted_predictions` produced."""

    probs: np.ndarray  # (N, C) final probabilities (decision rule and adaptation applied)
    logits: np.ndarray  # (N, C) logits (the views' mean logits with tta)
    applied: list[str]
    bn: dict | None = None
    priors: PriorShift | None = None
    tta_scales: list[float] | None = None


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def adapted_predictions(
    model: nn.Module,
    dataset,
    rule,
    adaptations: Sequence[str],
    *,
    plain_logits=None,
    source: tuple[np.ndarray, str] | None = None,
    classes: list[str] | None = None,
    check: dict | None = None,
    batch_size: int = 256,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> Adapted:
    """Adapt ``model`` to ``dataset`` (its images only) and predict them.

    Args:
        model: the run's classifier (changed in place by ``bn``).
        dataset: a CachedImageDataset of the target images (labels are not read).
        rule: the run's DecisionRule (temperature, class scales).
        adaptations: any of :data:`ADAPTATIONS`.
        plain_logits: (N, C) logits of the (adapted) model when ``tta`` is off (the run's
            own inference, its TTA included); default: one plain view.
        source: (source priors, where from), required with ``priors``.
        classes: class names (for the report of the priors).
        check: :func:`em_check` of the run; when it failed, the priors are estimated and
            reported but not applied.
    """
    adaptations = parse_adaptations(list(adaptations))
    bn = None
    batches = lambda: image_batches(dataset, None, batch_size, mean, std)  # noqa: E731
    if "bn" in adaptations:
        bn = adapt_batchnorm(model, batches())
    if "tta" in adaptations:
        views = view_logits(model, batches())
        logits = views.mean(0)
        posteriors = calibrated(views, rule.temperature).mean(0)
    else:
        if plain_logits is not None:
            logits = np.asarray(plain_logits, np.float64)
        else:
            logits = view_logits(model, batches(), scales=(1.0,))[0]
        posteriors = calibrated(logits, rule.temperature)
    shift = None
    weights = np.ones(posteriors.shape[1])
    if "priors" in adaptations:
        if source is None:
            raise ValueError("--adapt priors needs the source priors")
        pt, it, ok = em_priors(posteriors, source[0])
        names = list(classes) if classes is not None else [str(i) for i in range(len(pt))]
        shift = PriorShift(
            names,
            [float(v) for v in source[0]],
            [float(v) for v in pt],
            it,
            ok,
            source[1],
            applied=check is None or bool(check["ok"]),
            check=check,
        )
        weights = shift.weights
    if rule.class_scales is not None:
        weights = weights * np.asarray(rule.class_scales)
    return Adapted(
        reweight(posteriors, weights),
        logits,
        list(adaptations),
        bn,
        shift,
        list(TTA_SCALES) if "tta" in adaptations else None,
    )


class RunAdapter:
    """A run's model adapted afresh to each target image set it is called with.

    Set up once per run (source priors, the EM check on val, the original weights); each
    call restores the original BN statistics, so targets never leak into each other (the
    shift benchmark adapts to every shift separately).

    Args:
        run_dir, model, cfg, classes, rule: the run (``load_run_model`` and its
            ``decision.json`` DecisionRule); ``model`` is adapted in place.
        adaptations: any of :data:`ADAPTATIONS` ("bn,priors" or a list).
        priors_max_error: the :func:`em_check` limit; None applies the priors regardless.
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: nn.Module,
        cfg,
        classes: list[str],
        rule,
        adaptations: str | Sequence[str],
        *,
        priors_max_error: float | None = 0.1,
        batch_size: int = 256,
    ):
        from dermkit.models.backbones import input_stats

        self.model, self.rule, self.classes = model, rule, list(classes)
        self.adaptations = parse_adaptations(adaptations)
        self.batch_size = batch_size
        self.mean, self.std = input_stats(model)
        self.source = None
        self.check = None
        if "priors" in self.adaptations:
            self.source = source_priors(run_dir, cfg, self.classes)
            if priors_max_error is not None:
                self.check = em_check(run_dir, rule, self.classes, self.source[0], priors_max_error)
        if "bn" in self.adaptations and not batchnorm_layers(model):
            adapt_batchnorm(model, [])  # raises NoBatchNormError, before any image is read
        self._state = copy.deepcopy(model.state_dict()) if "bn" in self.adaptations else None

    def __call__(
        self, dataset, plain_logits: Callable[[nn.Module], np.ndarray] | None = None
    ) -> Adapted:
        """Adapt to ``dataset``'s images and predict them; ``plain_logits(model)``: the run's
        own inference (its TTA included), used when ``tta`` is not asked for."""
        bn = None
        if self._state is not None:
            self.model.load_state_dict(self._state)
            bn = adapt_batchnorm(
                self.model,
                image_batches(dataset, None, self.batch_size, self.mean, self.std),
            )
        plain = None
        if plain_logits is not None and "tta" not in self.adaptations:
            plain = plain_logits(self.model)
        adapted = adapted_predictions(
            self.model,
            dataset,
            self.rule,
            [a for a in self.adaptations if a != "bn"],
            plain_logits=plain,
            source=self.source,
            classes=self.classes,
            check=self.check,
            batch_size=self.batch_size,
            mean=self.mean,
            std=self.std,
        )
        adapted.applied, adapted.bn = list(self.adaptations), bn
        return adapted


def summary_lines(adapted: Adapted) -> dict[str, str]:
    """Report rows: what was applied and the priors estimated."""
    rows = {"adaptation (label-free)": ", ".join(adapted.applied) or "none"}
    if adapted.bn is not None:
        b = adapted.bn
        rows["AdaBN"] = f"{b['layers']} BatchNorm layers re-estimated on {b['images']} images"
    if adapted.priors is not None:
        s = adapted.priors
        pairs = ", ".join(
            f"{c} {a:.3f} -> {b:.3f}" for c, a, b in zip(s.classes, s.source, s.target)
        )
        state = "converged" if s.converged else "NOT converged"
        rows["class priors, source -> target (EM)"] = (
            f"{pairs} ({state} in {s.iterations} iterations; source: {s.source_from})"
        )
        if s.check is not None:
            c = s.check
            verdict = (
                "applied"
                if s.applied
                else "NOT applied: the posteriors are not calibrated well enough for EM"
            )
            rows["EM check on the run's val set"] = (
                f"error {c['error']:.3f} (total variation to val's label frequencies; "
                f"limit {c['max_error']}): {verdict}"
            )
    if adapted.tta_scales is not None:
        rows["test-time augmentation"] = (
            f"scales {adapted.tta_scales} x (as is, left-right flip, up-down flip): "
            "probabilities averaged"
        )
    return rows


# ----------------------------------------------------------------------------- saved state


def write_adapted_run(
    run_dir: str | Path, out_dir: str | Path, model: nn.Module, rule, adapted: Adapted, info: dict
) -> Path:
    """An adapted copy of a classifier run folder, for ``dermkit export`` and ``serve``.

    ``model.safetensors``: the model with its adapted BN statistics; ``decision.json``: the
    run's temperature, class scales multiplied by π_t / π_s (priors); ``adaptation.json``:
    what was adapted, on which images, the priors; ``bn_stats.safetensors``: the BN buffers
    alone. The other run files are copied. Test-time augmentation is not carried (one
    view is exported). Safetensors and JSON only: nothing is pickled.
    """
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    scales = np.ones(len(adapted.probs[0])) if rule.class_scales is None else rule.class_scales
    scales = np.asarray(scales, np.float64)
    if adapted.priors is not None:
        scales = scales * adapted.priors.weights
        scales = scales / scales.max()
    keep_identity = rule.class_scales is None and adapted.priors is None
    DecisionRule(
        float(rule.temperature),
        None if keep_identity else [float(v) for v in scales],
        min_recall=rule.min_recall,  # the operating point's factor is inside the scales
    ).save(out / "decision.json")
    if adapted.bn is not None:
        save_file(batchnorm_state(model), str(out / BN_STATS_FILE))
    record = {
        "source_run": str(run_dir),
        "applied": adapted.applied,
        "carried_to_export": [a for a in adapted.applied if a != "tta"],
        "bn": adapted.bn,
        "bn_stats_file": BN_STATS_FILE if adapted.bn is not None else None,
        "priors": adapted.priors.to_dict() if adapted.priors is not None else None,
        "decision_rule_of_source": {
            "temperature": rule.temperature,
            "class_scales": rule.class_scales,
        },
        **info,
    }
    (out / ADAPTATION_FILE).write_text(json.dumps(record, indent=2))
    return out
