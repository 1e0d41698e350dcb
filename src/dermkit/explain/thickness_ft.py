"""Fine-tuning arm of the thickness study: the whole network trained in each outer fold.

The probes (``explain/thickness_cv.py``) read frozen ImageNet features; this arm trains
the network itself, on the *same* outer folds (:func:`thickness_cv.outer_splits`), so its
rows sit beside the probes' in one table:

- **start**: a backbone with its packaged weights (default EfficientNet-Lite0 ImageNet,
  ``models/packaged.py``) and a fresh head: CORN (K-1 conditional logits,
  ``tasks/ordinal.py``) or softmax (K logits, plain cross-entropy);
- **loss**: class-weighted (inverse class frequency, as the probes' "balanced"): weighted
  cross-entropy, or CORN with each row's terms scaled by its class weight;
- **training**: dermkit's supervised loop on the training engine (``train/loop.py``,
  ``train/engine.py``): batch augmentation (flips, rot90, small rotation/scale/shift,
  colour jitter: ``data/transforms.py``), AdamW with layer decay (the head at the peak
  lr, each earlier block a factor ``layer_decay`` lower), warm-up + cosine, weight EMA;
- **choosing the epoch on inner validation only**: a stratified ``holdout`` share of the
  outer training fold is held out; every epoch (EMA weights) is scored on it and the
  epoch of the best inner balanced accuracy is kept. That checkpoint predicts the outer
  test fold; nothing is retrained and the test fold is never seen before that.

Every setting is fixed a priori in :class:`FinetuneArmConfig` (no search: with 247 images
there is no data for one); ``epochs`` is the schedule's length, not a choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from dermkit.core.devices import make_accelerator, thread_limit
from dermkit.core.files import write_json_atomic
from dermkit.data.cache import build_cache
from dermkit.data.dataset import CachedImageDataset
from dermkit.eval.inference import predict_logits
from dermkit.eval.report import to_jsonable
from dermkit.explain.thickness_cv import FamilyResult, fold_metrics, outer_splits
from dermkit.tasks.ordinal import corn_class_probs, corn_loss
from dermkit.train.finetune import build_model, resolve_model_config
from dermkit.train.loop import load_best, train_classifier
from dermkit.train.losses import class_weights
from dermkit.train.settings import FinetuneRunConfig

log = logging.getLogger(__name__)

FT_HEADS: tuple[str, ...] = ("corn", "softmax")


@dataclass
class FinetuneArmConfig:
    """The fine-tuning recipe, fixed before any data is seen (see module docstring).

    Attributes:
        backbone: timm / dermkit name; ``weights``: its initialisation (``imagenet``: the
            packaged source of that architecture; None: random, for tests).
        size: input side (px) of the image cache the arm trains on.
        heads: ``corn`` and/or ``softmax``.
        epochs: the cosine schedule's length; the kept epoch is chosen on the holdout.
        head_lr: peak lr of the head (the loop's base_lr is scaled from it).
        layer_decay: lr factor per block going down from the head (timm layer decay).
        holdout: share of each outer training fold that scores the epochs.
        threads: CPU threads of torch and BLAS while the arm trains.
    """

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"
    size: int = 160
    heads: tuple[str, ...] = FT_HEADS
    epochs: int = 12
    batch_size: int = 32
    head_lr: float = 1e-3
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    ema_decay: float | None = 0.9
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1
    holdout: float = 0.2
    tta: bool = False
    precision: str = "auto"
    # One torch/BLAS thread: on the shared 2-core CPU, two threads spinning at each op's
    # barrier while another job holds the cores train ~10x slower than one (None: as is).
    threads: int | None = 1

    def check(self) -> None:
        unknown = [h for h in self.heads if h not in FT_HEADS]
        if unknown or not self.heads:
            raise ValueError(f"fine-tune heads {unknown or '[]'}: expected some of {FT_HEADS}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"fine-tune holdout must be in (0, 1), got {self.holdout}")

    @property
    def name(self) -> str:
        """``BACKBONE@SIZE:WEIGHTS``, the feature-set naming of the probes."""
        return f"{self.backbone}@{self.size}:{self.weights or 'random'}"

    def family(self, head: str) -> str:
        return f"finetune {head} | {self.name}"

    def run_config(self, seed: int) -> FinetuneRunConfig:
        """The loop's run config: every field the loop and ``build_model`` read."""
        return FinetuneRunConfig.model_validate(
            {
                "seed": seed,
                "model": {
                    "name": self.backbone,
                    "weights": self.weights,
                    "drop_rate": self.drop_rate,
                    "drop_path_rate": self.drop_path_rate,
                },
                "data": {"image_size": self.size},
                "optim": {
                    "epochs": self.epochs,
                    "batch_size": self.batch_size,
                    "base_lr": self.head_lr * 256 / self.batch_size,  # peak lr = head_lr
                    "layer_decay": self.layer_decay,
                    "weight_decay": self.weight_decay,
                    "warmup_epochs": self.warmup_epochs,
                    "ema_decay": self.ema_decay,
                    "precision": self.precision,
                },
                # weighted_ce at power 1: inverse class frequency, as the balanced probes
                "loss": {"loss": "weighted_ce", "weight_power": 1.0},
                "augment": {"tta": self.tta},
                "train_eval_images": 0,  # no train-subset scoring: it would double the cost
                "checkpoint_every": 10**9,  # epoch ends only
            }
        )


def _head(head: str, k: int, counts: torch.Tensor):
    """(head outputs, criterion or None, to_probs or None) of a head for K classes.

    softmax: K logits and the loop's configured loss (weighted cross-entropy); CORN: K-1
    conditional logits, the class-weighted CORN loss, CORN class probabilities.
    """
    if head == "softmax":
        return k, None, None
    weights = class_weights(counts, 1.0)

    def criterion(logits, labels, images):
        return corn_loss(logits, labels, weights)

    return k - 1, criterion, corn_class_probs


def _probs(head: str, logits: torch.Tensor) -> np.ndarray:
    """(N, outputs) logits -> (N, K) class probabilities, float64."""
    if head == "corn":
        return corn_class_probs(logits).double().numpy()
    return torch.softmax(logits.double(), dim=-1).numpy()


def train_fold(
    cfg: FinetuneArmConfig,
    head: str,
    datasets: dict[str, CachedImageDataset],
    seed: int,
    accelerator,
) -> tuple[np.ndarray, dict]:
    """Fine-tune on ``datasets["train"]``, keep the best ``datasets["val"]`` epoch, predict
    ``datasets["test"]``: (test probabilities (n, K), the loop's summary)."""
    run_cfg = cfg.run_config(seed)
    resolve_model_config(run_cfg)
    train = datasets["train"]
    outputs, criterion, to_probs = _head(head, len(train.class_names), train.class_counts())
    torch.manual_seed(seed)
    model, _ = build_model(run_cfg, outputs)
    with tempfile.TemporaryDirectory(prefix="thickness-ft-") as tmp:
        summary = train_classifier(
            run_cfg,
            model,
            train,
            datasets["val"],
            Path(tmp),
            accelerator=accelerator,
            progress=False,
            criterion=criterion,
            to_probs=to_probs,
            select="balanced_accuracy",
        )
        model = load_best(model, Path(tmp))
    test = datasets["test"]
    logits = predict_logits(model, test, np.arange(len(test)), accelerator, tta=cfg.tta)
    return _probs(head, logits), summary


def finetune_cv(
    cfg: FinetuneArmConfig,
    manifest: pd.DataFrame,
    y: np.ndarray,
    class_names: tuple[str, ...],
    n_folds: int,
    seeds: tuple[int, ...],
    cache_dir: str | Path | None = None,
    fold_store: str | Path | None = None,
) -> tuple[dict[str, FamilyResult], dict[str, list[dict]]]:
    """The arm over the outer folds x seeds, one family per head.

    Args:
        manifest: the study's rows (``image_id``, ``lesion_id``, ``path``), aligned with y.
        y: (N,) class codes 0..K-1 of the grouping.
        fold_store: folder keeping each finished (head, seed, fold) fit; a rerun of the same
            study reuses the fits whose recipe, data and test rows match, so a killed run
            resumes at its first unfinished fold (one fit is minutes to an hour on a CPU).

    Returns:
        ({family: FamilyResult}: out-of-fold probabilities and one row per fold with the
        chosen epoch and its inner balanced accuracy; no probes), and {family: per fold
        {seed, fold, best_epoch, history}}: the epoch curves on the holdout.
    """
    cfg.check()
    y = np.asarray(y, np.int64)
    k = len(class_names)
    cache = build_cache(manifest, cfg.size, cache_dir=cache_dir)
    rows = manifest.assign(label=np.asarray(class_names, dtype=object)[y])
    accelerator = make_accelerator(cfg.precision)
    results = {cfg.family(h): FamilyResult() for h in cfg.heads}
    curves: dict[str, list[dict]] = {cfg.family(h): [] for h in cfg.heads}
    with thread_limit(cfg.threads):
        for seed, fold, train, test in outer_splits(y, k, n_folds, seeds):
            # The holdout comes out of the training fold only, stratified; the heads of a
            # fold share it, folds and seeds do not.
            fit_rows, val_rows = train_test_split(
                train, test_size=cfg.holdout, stratify=y[train], random_state=seed * 1000 + fold
            )
            parts = {"train": fit_rows, "val": val_rows, "test": test}
            datasets = {
                s: CachedImageDataset(cache, rows.iloc[r], list(class_names))
                for s, r in parts.items()
            }
            for head in cfg.heads:
                key = fold_key(cfg, head, manifest, y, seed, fold, test)
                stored = _load_fold(fold_store, key)
                if stored is None:
                    start = time.perf_counter()
                    probs, summary = train_fold(cfg, head, datasets, seed, accelerator)
                    row = {
                        "seed": seed,
                        "fold": fold,
                        "chosen": f"epoch {summary['best_epoch']}",
                        "inner_balanced_accuracy": summary["best_val_metric"],
                        **fold_metrics(y[test], probs),
                        "train_seconds": time.perf_counter() - start,
                    }
                    curve = {"seed": seed, "fold": fold, "best_epoch": summary["best_epoch"]}
                    curve |= {"history": summary["history"]}
                    _save_fold(fold_store, key, probs, row, curve)
                else:
                    probs, row, curve = stored
                    log.info("%s seed %d fold %d: reused %s", cfg.family(head), seed, fold, key)
                r = results[cfg.family(head)]
                r.oof.setdefault(seed, np.zeros((len(y), k)))[test] = probs
                r.test_index[(seed, fold)] = test
                r.folds.append(row)
                curves[cfg.family(head)].append(curve)
                log.info(
                    "%s seed %d fold %d: epoch %d (inner bacc %.3f), test bacc %.3f, %.0f s",
                    cfg.family(head),
                    seed,
                    fold,
                    curve["best_epoch"],
                    row["inner_balanced_accuracy"],
                    r.folds[-1]["balanced_accuracy"],
                    r.folds[-1]["train_seconds"],
                )
    return results, curves


def fold_key(
    cfg: FinetuneArmConfig,
    head: str,
    manifest: pd.DataFrame,
    y: np.ndarray,
    seed: int,
    fold: int,
    test: np.ndarray,
) -> str:
    """Content key of one fit: the recipe, the head, the images and labels, the test rows.

    Any change to these gives a new key, so a stored fit is reused only for the same job.
    """
    payload = {
        "recipe": asdict(cfg),
        "head": head,
        "images": manifest["image_id"].astype(str).tolist(),
        "y": np.asarray(y).tolist(),
        "seed": seed,
        "fold": fold,
        "test": np.asarray(test).tolist(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return f"{head}-s{seed}-f{fold}-{digest.hexdigest()[:12]}"


def _load_fold(store: str | Path | None, key: str) -> tuple[np.ndarray, dict, dict] | None:
    """(test probabilities, fold row, holdout curve) of a stored fit, or None."""
    if store is None or not (path := Path(store) / f"{key}.json").exists():
        return None
    try:
        saved = json.loads(path.read_text())
        return np.asarray(saved["probs"], dtype=np.float64), saved["row"], saved["curve"]
    except (json.JSONDecodeError, KeyError) as err:  # written atomically: damaged elsewhere
        raise ValueError(
            f"{path}: a stored fine-tuning fit that cannot be read ({err}); delete the file "
            "and rerun the study to train that fit again"
        ) from err


def _save_fold(store, key: str, probs: np.ndarray, row: dict, curve: dict) -> None:
    if store is None:
        return
    Path(store).mkdir(parents=True, exist_ok=True)
    saved = to_jsonable({"probs": probs.tolist(), "row": row, "curve": curve})
    write_json_atomic(Path(store) / f"{key}.json", saved, indent=None)
