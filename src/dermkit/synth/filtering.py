"""Filtering synthetic images: keep one only when a real-trained classifier agrees with its
class and it is not a near-copy of a real training image.

A sampler option (``SampleConfig.filter``, ``dermkit synth sample --filter RUN``), after
DiffuLT's sample filtering (Shao et al., "DiffuLT: How to Make Diffusion Model Useful for
Long-tail Recognition", 2024): a generator that draws the rare classes poorly (at the cpu
preset a real-trained classifier saw the requested class in 1% of df samples) should not
hand its failures to training as labelled data.

* The classifier: a run folder trained on the real train split, of one of two kinds, each
  with one code path: a dermkit classifier run (finetune/distill, :func:`is_classifier_run`:
  its torch model), or a ``dermkit baseline`` run (its model refitted, as that run saves no
  model: ``train.baseline.refit_baseline_run``). An image is kept when the requested class
  is the argmax (or, with ``top_k`` k, among the k most probable classes) and, with
  ``min_prob``, that class's probability reaches it.
* Near-copies: the memorisation check of ``synth quality`` in pixel space (32 px
  thumbnails): an image is a near-copy when its nearest real training image (of the
  generator's own train split) is closer than the ``memorisation_percentile`` of
  real-to-real nearest-neighbour distances between different lesions.
* Rounds (:func:`filter_in_rounds`): image ``i`` of a class has its own seed, so drawing
  more means asking the sampler for a larger count; each round draws the shortfall divided
  by the class's acceptance rate so far, up to ``max_draw_factor`` times the count. The
  first ``count`` accepted images of a class (in index order) are kept; accepted images
  beyond it are ``surplus``. A class that cannot reach its count is a warning, not an error.

Every drawn row stays in the manifest with ``kept`` and ``reject_reason``
(``near_copy:<train image id>``, ``disagrees:<predicted class>``, ``low_prob:<p>``,
``surplus``); readers take the kept rows (``data.manifest.read_synthetic_rows``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermkit.config import ConfigError
from dermkit.data.transforms import normalize
from dermkit.synth.metrics import nearest_neighbours
from dermkit.synth.settings import FilterConfig

log = logging.getLogger(__name__)

PIXEL_SIDE = 32  # pixel-space memorisation compares 32 px thumbnails (cheap, layout-level)
THRESHOLD_QUERIES = 2000  # real images whose nearest other lesion sets the near-copy threshold


# ----------------------------------------------------------------------------- near-copies


def resize_images(images: np.ndarray, side: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, side, side) in [0, 1], area-downsampled."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (side, side):
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="area")
    return x


def thumbnails(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, 3 * 32 * 32) float in [0, 1] (area-downsampled)."""
    return resize_images(images, PIXEL_SIDE).flatten(1).numpy()


def memorisation(
    real: np.ndarray,
    real_lesions: np.ndarray,
    fake: np.ndarray,
    percentile: float,
    threshold: float | None = None,
) -> tuple[pd.DataFrame, float]:
    """Nearest real neighbour of each synthetic row and the flag threshold.

    real (N, D) with lesion ids (N,), fake (M, D). Threshold (unless given): the
    ``percentile`` of the real-to-real nearest-neighbour distances, skipping the image's
    own lesion (views of one lesion are near-copies by design).
    """
    if threshold is None:
        rr, _ = nearest_neighbours(real, real, real_lesions, real_lesions)
        rr = rr[np.isfinite(rr)]
        threshold = float(np.percentile(rr, percentile)) if len(rr) else 0.0
    dist, idx = nearest_neighbours(fake, real)
    return pd.DataFrame({"distance": dist, "nearest": idx, "flagged": dist < threshold}), threshold


@dataclass
class NearCopyCheck:
    """The memorisation check against a fixed real training set (thumbnails computed once)."""

    real: np.ndarray  # (N, 3 * 32 * 32) thumbnails
    real_ids: np.ndarray  # (N,) image ids
    threshold: float

    @classmethod
    def of_train_split(cls, images, image_ids, lesion_ids, percentile: float) -> NearCopyCheck:
        """Threshold from up to THRESHOLD_QUERIES real images (a percentile estimate: the
        full N x N distance matrix of a 10k-image split would take gigabytes)."""
        real, lesions = thumbnails(images), np.asarray(lesion_ids)
        rng = np.random.default_rng(0)
        q = np.sort(rng.permutation(len(real))[:THRESHOLD_QUERIES])
        rr, _ = nearest_neighbours(real[q], real, lesions[q], lesions)
        rr = rr[np.isfinite(rr)]
        threshold = float(np.percentile(rr, percentile)) if len(rr) else 0.0
        return cls(real, np.asarray(image_ids), threshold)

    def nearest(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearest train image id (M,), near-copy flag (M,)) of uint8 images (M, S, S, 3)."""
        table, _ = memorisation(self.real, None, thumbnails(images), 0, self.threshold)
        return self.real_ids[table["nearest"].to_numpy()], table["flagged"].to_numpy()


def generator_train_check(generator_run: str | Path, percentile: float) -> NearCopyCheck:
    """The near-copy check against the train split the generator learnt from."""
    from dermkit.data.prepare import images_for
    from dermkit.synth.diffusion import generator_train_split

    data, train = generator_train_split(generator_run)
    return NearCopyCheck.of_train_split(
        images_for(data, train), train["image_id"], train["lesion_id"], percentile
    )


# ----------------------------------------------------------------------------- classifiers


def is_classifier_run(folder: str | Path | None) -> bool:
    """Whether a run folder holds a classifier (config.yaml, classes.json, model.safetensors)."""
    from dermkit.models.runs_io import WEIGHTS_FILE

    if not folder:
        return False
    folder = Path(folder)
    return all((folder / f).is_file() for f in ("config.yaml", "classes.json", WEIGHTS_FILE))


def is_baseline_run(folder: str | Path | None) -> bool:
    """Whether a run folder is a finished ``dermkit baseline`` run (run.json's stage)."""
    if not folder or not (Path(folder) / "run.json").is_file():
        return False
    return json.loads((Path(folder) / "run.json").read_text()).get("stage") == "baseline"


@dataclass
class RealClassifier:
    """A classifier trained on real images, as the filter and the quality study use it."""

    run: Path
    kind: str  # "classifier" (a torch run) or "baseline" (the classical one, refitted)
    classes: list[str]
    probabilities: Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> (N, C)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class names (N,) of uint8 images (N, H, W, 3)."""
        return np.asarray(self.classes)[self.probabilities(images).argmax(1)]


def load_real_classifier(run: str | Path, purpose: str = "the synthetic-image filter"):
    """A :class:`RealClassifier` from a classifier run or a baseline run folder.

    Images of any square size are area-resized to the run's ``data.image_size``.
    """
    run = Path(run)
    if is_classifier_run(run):
        from dermkit.models.backbones import input_stats
        from dermkit.models.runs_io import load_run_model

        model, cfg, classes = load_run_model(run, purpose=purpose)
        side, stats = cfg.data.image_size, input_stats(model)  # e.g. [-1, 1] for ImageNet Lite

        @torch.no_grad()
        def torch_probs(images: np.ndarray, batch_size: int = 256) -> np.ndarray:
            out = [np.zeros((0, len(classes)), np.float32)]
            for i in range(0, len(images), batch_size):
                x = resize_images(images[i : i + batch_size], side)
                out.append(model(normalize(x, *stats)).softmax(1).numpy())
            return np.concatenate(out)

        return RealClassifier(run, "classifier", list(classes), torch_probs)
    if is_baseline_run(run):
        from dermkit.train.baseline import refit_baseline_run

        baseline, cfg, classes = refit_baseline_run(run)
        side = cfg.data.image_size

        def baseline_probs(images: np.ndarray) -> np.ndarray:
            if len(images) == 0:
                return np.zeros((0, len(classes)))
            x = resize_images(images, side).mul(255).round().to(torch.uint8)
            return baseline.predict_proba(baseline.features(x.permute(0, 2, 3, 1).numpy()))

        return RealClassifier(run, "baseline", list(classes), baseline_probs)
    raise ConfigError(
        f"{run}: {purpose} needs a classifier run folder (dermkit finetune/distill: "
        "config.yaml, classes.json, model.safetensors) or a dermkit baseline run folder"
    )


# ----------------------------------------------------------------------------- verdicts


def judge(
    classifier: RealClassifier,
    images: np.ndarray,
    requested: np.ndarray,
    min_prob: float = 0.0,
    near: NearCopyCheck | None = None,
    top_k: int = 1,
) -> pd.DataFrame:
    """Verdict per image: ``passed`` (bool), ``reason`` ("" when passed) and
    ``requested_prob`` (the classifier's probability of the requested class).

    images: uint8 (N, S, S, 3); requested: (N,) class names. A near-copy is named first
    (whatever the classifier says, it must not train anything), then a disagreement: the
    requested class outside the classifier's ``top_k`` most probable ones.
    """
    probs = classifier.probabilities(images)
    index = {c: i for i, c in enumerate(classifier.classes)}
    names = np.asarray(classifier.classes)
    predicted = names[probs.argmax(1)] if len(probs) else np.zeros(0, str)
    p_req = probs[np.arange(len(probs)), [index[c] for c in requested]]
    rank = (probs > p_req[:, None]).sum(1)  # (N,) classes more probable than the requested
    nearest, flagged = near.nearest(images) if near is not None else (None, None)
    reasons = []
    for i in range(len(requested)):
        if flagged is not None and flagged[i]:
            reasons.append(f"near_copy:{nearest[i]}")
        elif rank[i] >= top_k:
            reasons.append(f"disagrees:{predicted[i]}")
        elif p_req[i] < min_prob:
            reasons.append(f"low_prob:{p_req[i]:.2f}")
        else:
            reasons.append("")
    reasons = np.asarray(reasons, dtype=object)
    return pd.DataFrame({"passed": reasons == "", "reason": reasons, "requested_prob": p_req})


def _load_images(paths) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def keep_first(judged: pd.DataFrame, counts: Mapping[str, int]) -> pd.DataFrame:
    """``kept`` and ``reject_reason`` from the verdicts: per class, the first ``counts[c]``
    passed rows (in manifest order) are kept; later passed rows are ``surplus``."""
    rank = judged["passed"].astype(int).groupby(judged["label"]).cumsum()
    quota = judged["label"].map(counts).fillna(0)
    kept = judged["passed"] & (rank <= quota)
    surplus = judged["passed"] & ~kept
    reason = judged["reason"].where(~surplus, "surplus")
    return judged.drop(columns=["passed", "reason"]).assign(kept=kept, reject_reason=reason)


def next_draws(
    drawn: Mapping[str, int], accepted: Mapping[str, int], counts: Mapping[str, int], factor: float
) -> dict[str, int]:
    """Images to draw next per class: the shortfall over the acceptance rate so far (at
    least 1/factor), within the cap of ``factor`` x the count; 0 where a class is done."""
    more = {}
    for c, n in counts.items():
        short = n - accepted.get(c, 0)
        room = math.ceil(factor * n) - drawn.get(c, 0)
        if short <= 0 or room <= 0:
            more[c] = 0
            continue
        rate = max(accepted.get(c, 0) / max(drawn.get(c, 0), 1), 1 / factor)
        more[c] = min(room, math.ceil(short / rate))
    return more


def filter_in_rounds(
    draw: Callable[[dict[str, int]], pd.DataFrame],
    counts: Mapping[str, int],
    cfg: FilterConfig,
    generator_run: str | Path,
) -> tuple[pd.DataFrame, dict]:
    """Draw and judge until every class has ``counts[c]`` kept images or hit the cap.

    Args:
        draw: class -> images (indices 0..n-1) -> the manifest of those images (the
            sampler: it generates the ones it has not yet, so a round only adds images).
        counts: class -> images wanted (kept).
        generator_run: the diffusion run folder, whose train split is the near-copy check's.
    Returns:
        (every drawn row with ``kept``, ``reject_reason``, ``requested_prob``; the summary).
    """
    wanted = {c: n for c, n in counts.items() if n > 0}
    classifier = load_real_classifier(cfg.classifier)
    unknown = sorted(set(wanted) - set(classifier.classes))
    if unknown:
        raise ConfigError(
            f"{cfg.classifier}: the filter's classifier knows {classifier.classes}, not the "
            f"requested classes {unknown}"
        )
    near = (
        generator_train_check(generator_run, cfg.memorisation_percentile)
        if cfg.memorisation
        else None
    )
    drawn = dict(counts)
    verdicts = pd.DataFrame(columns=["passed", "reason", "requested_prob"])
    while True:
        manifest = draw(drawn)
        new = manifest[~manifest["image_id"].isin(verdicts.index)]
        if len(new):
            found = judge(
                classifier,
                _load_images(new["path"]),
                new["label"].to_numpy(),
                cfg.min_prob,
                near,
                cfg.top_k,
            ).set_index(new["image_id"])
            verdicts = pd.concat([verdicts, found]) if len(verdicts) else found
        judged = manifest.join(verdicts, on="image_id")
        accepted = judged.loc[judged["passed"].astype(bool), "label"].value_counts().to_dict()
        more = next_draws(drawn, accepted, counts, cfg.max_draw_factor)
        if not any(more.values()):
            break
        drawn = {c: drawn[c] + more[c] for c in drawn}
    judged["passed"] = judged["passed"].astype(bool)
    rows = keep_first(judged, counts)
    summary = filter_summary(rows, counts, cfg, classifier, near)
    for c, row in summary["per_class"].items():
        if row["short"]:
            log.warning(
                "filter: class %s kept %d of the %d images asked for after drawing %d "
                "(cap %.3gx); reasons %s",
                c,
                row["kept"],
                row["requested"],
                row["drawn"],
                cfg.max_draw_factor,
                row["reasons"],
            )
    return rows, summary


def filter_summary(
    rows: pd.DataFrame,
    counts: Mapping[str, int],
    cfg: FilterConfig,
    classifier: RealClassifier,
    near: NearCopyCheck | None,
) -> dict:
    """Per class: asked for, drawn, kept, kept share, shortfall and rejection reasons."""
    per_class = {}
    for c, n in counts.items():
        part = rows[rows["label"] == c]
        reasons = Counter(
            r.split(":")[0] if r.startswith("near_copy") or r.startswith("low_prob") else r
            for r in part.loc[~part["kept"], "reject_reason"]
        )
        kept = int(part["kept"].sum())
        per_class[c] = {
            "requested": int(n),
            "drawn": len(part),
            "kept": kept,
            "kept_share": kept / len(part) if len(part) else None,
            "short": int(n) - kept,
            "reasons": dict(sorted(reasons.items())),
        }
    return {
        "classifier": str(cfg.classifier),
        "classifier_kind": classifier.kind,
        "min_prob": cfg.min_prob,
        "top_k": cfg.top_k,
        "max_draw_factor": cfg.max_draw_factor,
        "near_copy_threshold": near.threshold if near is not None else None,
        "drawn": len(rows),
        "kept": int(rows["kept"].sum()),
        "short_classes": [c for c, r in per_class.items() if r["short"] > 0],
        "per_class": per_class,
    }


def filter_rows(summary: dict) -> list[dict]:
    """The summary as table rows (the sample report, the pipeline's summary)."""
    return [
        {
            "class": c,
            "asked for": r["requested"],
            "drawn": r["drawn"],
            "kept": r["kept"],
            "kept %": None if r["kept_share"] is None else round(100 * r["kept_share"], 1),
            "short": r["short"],
            "rejected because": ", ".join(f"{k} {v}" for k, v in r["reasons"].items()),
        }
        for c, r in summary["per_class"].items()
    ]
