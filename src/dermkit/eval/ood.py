"""A flag for unfamiliar images: out-of-distribution scores, their threshold, their AUROC.

Two scores, higher = less like the training images:

* **energy** (Liu et al. 2020): ``E(x) = -T * logsumexp(logits / T)`` with T = 1 on the raw
  logits. It needs nothing but the logits, so the server, the exported ONNX model and the
  page in the browser all compute it the same way: it is the score that serving flags with.
* **Mahalanobis** (Lee et al. 2018): the smallest squared Mahalanobis distance of the
  penultimate features (timm's ``forward_head(..., pre_logits=True)``) to the class means
  of the training split, under one covariance shared by the classes (pooled within-class,
  with a small ridge). It needs the features, which the ONNX export does not output, so it
  is computed by ``dermkit evaluate`` only (reports and AUROCs), never in serving.

The threshold of each score is its ``quantile`` (default 0.95) over the run's val images,
so that 5% of in-distribution val images are flagged. ``fit_ood`` stores the thresholds in
the run folder's ``ood.json`` and the Mahalanobis means and precision matrix in
``ood_mahalanobis.safetensors`` (JSON and safetensors: nothing is pickled).

Importing this module costs numpy only (the server reads ``ood.json`` through it); torch,
scikit-learn and the data code are imported by the functions that need them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dermkit.core.files import write_json_atomic

log = logging.getLogger(__name__)

OOD_FILE = "ood.json"
MAHALANOBIS_FILE = "ood_mahalanobis.safetensors"
UNFAMILIAR_MESSAGE = "This image looks unlike the training images; the estimate is unreliable."


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp(logits / T)`` over the last axis (N, C) -> (N,); higher = stranger."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(-1, keepdims=True)
    return -temperature * (m[..., 0] + np.log(np.exp(z - m).sum(-1)))


@dataclass
class Mahalanobis:
    """Class means (C, D) and the shared precision matrix (D, D) of penultimate features."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> Mahalanobis:
        """Class means and the inverse of the pooled within-class covariance (+ ridge * mean
        variance on the diagonal, so a rank-deficient covariance still inverts)."""
        f = np.asarray(features, np.float64)
        y = np.asarray(y)
        classes = np.unique(y)
        means = np.zeros((int(y.max()) + 1, f.shape[1]))
        centred = np.empty_like(f)
        for c in classes:
            means[c] = f[y == c].mean(0)
            centred[y == c] = f[y == c] - means[c]
        cov = centred.T @ centred / max(len(f) - len(classes), 1)
        cov += ridge * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
        missing = np.setdiff1d(np.arange(len(means)), classes)
        means[missing] = np.nan  # a class absent from training: never the nearest
        return cls(means, np.linalg.inv(cov))

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) smallest squared distance to a class mean."""
        f = np.asarray(features, np.float64)
        best = np.full(len(f), np.inf)
        for mu in self.means:
            if np.isnan(mu).any():
                continue
            d = f - mu
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return best

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file(
            {"means": np.ascontiguousarray(self.means), "precision": self.precision},
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> Mahalanobis:
        from safetensors.numpy import load_file

        t = load_file(str(path))
        return cls(t["means"], t["precision"])


@dataclass
class OodRule:
    """The flag: score > threshold. ``ood.json`` of a run folder."""

    score: str = "energy"
    temperature: float = 1.0
    threshold: float = 0.0
    quantile: float = 0.95
    n_val: int = 0
    val_flagged: float = 0.0
    mahalanobis_threshold: float | None = None
    mahalanobis_file: str | None = None
    n_train: int = 0
    message: str = UNFAMILIAR_MESSAGE
    notes: dict = field(default_factory=dict)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return energy(logits, self.temperature)

    def flags(self, logits: np.ndarray) -> np.ndarray:
        return self.scores(logits) > self.threshold

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> OodRule:
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def load_ood(run_dir: str | Path) -> OodRule | None:
    """The run's ``ood.json``, or None when ``dermkit evaluate RUN --fit-ood`` never ran."""
    path = Path(run_dir) / OOD_FILE
    return OodRule.load(path) if path.exists() else None


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out`` images (positive) from ``in`` images by a score (higher = out)."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("an OOD AUROC needs images on both sides")
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    return float(roc_auc_score(y, np.r_[a, b]))


# ----------------------------------------------------------------------------- with a model


def logits_and_features(model, batches) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits (N, C), penultimate features (N, D) or None) of normalised float batches.

    Features are timm's ``forward_head(forward_features(x), pre_logits=True)``; a model
    without that interface gives logits only.
    """
    import torch

    model.eval()
    has_head = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    logits, feats = [], []
    with torch.no_grad():
        for x in batches:
            if has_head:
                tokens = model.forward_features(x)
                feats.append(model.forward_head(tokens, pre_logits=True).float().flatten(1))
                logits.append(model.forward_head(tokens).float())
            else:
                logits.append(model(x).float())
    z = torch.cat(logits).double().numpy()
    return z, (torch.cat(feats).double().numpy() if feats else None)


def run_split_data(run_dir: Path, cfg):
    """The run's prepared data, split exactly as the run split it (its split.csv)."""
    from dermkit.data.prepare import prepare_data

    data_cfg = cfg.data
    if (run_dir / "split.csv").exists():
        data_cfg = data_cfg.model_copy(update={"split_file": str(run_dir / "split.csv")})
    return prepare_data(data_cfg)


def fit_ood(
    run_dir: str | Path,
    quantile: float = 0.95,
    batch_size: int = 256,
    mahalanobis: bool = True,
) -> OodRule:
    """Fit the flag of a classifier run: thresholds on val, Mahalanobis on train; writes
    ``ood.json`` (and ``ood_mahalanobis.safetensors``) into the run folder."""
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.eval.adapt import image_batches
    from dermkit.models.backbones import input_stats
    from dermkit.models.runs_io import load_run_model

    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    run_dir = Path(run_dir)
    model, cfg, classes = load_run_model(run_dir)
    mean, std = input_stats(model)
    data = run_split_data(run_dir, cfg)
    sets = {s: CachedImageDataset(data.cache, data.part(s), classes) for s in ("train", "val")}
    if len(sets["val"]) == 0:
        raise ValueError(f"{run_dir}: the run's val split is empty; cannot choose a threshold")
    z_val, f_val = logits_and_features(
        model, image_batches(sets["val"], None, batch_size, mean, std)
    )
    rule = OodRule(quantile=quantile, n_val=len(z_val))
    e_val = rule.scores(z_val)
    rule.threshold = float(np.quantile(e_val, quantile))
    rule.val_flagged = float((e_val > rule.threshold).mean())
    if mahalanobis and f_val is not None:
        z_tr, f_tr = logits_and_features(
            model, image_batches(sets["train"], None, batch_size, mean, std)
        )
        maha = Mahalanobis.fit(f_tr, sets["train"].labels.numpy())
        maha.save(run_dir / MAHALANOBIS_FILE)
        rule.mahalanobis_file = MAHALANOBIS_FILE
        rule.mahalanobis_threshold = float(np.quantile(maha.score(f_val), quantile))
        rule.n_train = len(z_tr)
    rule.notes = {
        "energy": "-T*logsumexp(logits/T) of the raw logits (before the decision rule)",
        "threshold": f"{quantile:.0%} quantile of the val scores: "
        f"{1 - quantile:.0%} of in-distribution val images are flagged",
        "serving": "the server and the page flag with energy (ONNX gives logits, not features)",
    }
    rule.save(run_dir / OOD_FILE)
    return rule


def score_dataset(model, dataset, rule: OodRule, run_dir: Path, batch_size: int = 256):
    """{"energy": (N,), "mahalanobis": (N,) or None} of a CachedImageDataset's images."""
    from dermkit.eval.adapt import image_batches
    from dermkit.models.backbones import input_stats

    mean, std = input_stats(model)
    z, f = logits_and_features(model, image_batches(dataset, None, batch_size, mean, std))
    out = {"energy": rule.scores(z), "mahalanobis": None}
    if rule.mahalanobis_file and f is not None and (run_dir / rule.mahalanobis_file).exists():
        out["mahalanobis"] = Mahalanobis.load(run_dir / rule.mahalanobis_file).score(f)
    return out


def flag_counts(scores: dict, rule: OodRule) -> dict:
    """{"energy": {...}, "mahalanobis": {...}}: images flagged by each score's threshold."""
    out = {}
    thresholds = {"energy": rule.threshold, "mahalanobis": rule.mahalanobis_threshold}
    for name, s in scores.items():
        if s is None or thresholds[name] is None:
            continue
        flagged = s > thresholds[name]
        out[name] = {
            "threshold": float(thresholds[name]),
            "flagged": int(flagged.sum()),
            "of": len(s),
            "fraction": float(flagged.mean()) if len(s) else 0.0,
        }
    return out


def ood_auroc(
    run_dir: str | Path,
    data: str | Path | None,
    *,
    layout: str = "auto",
    label_map: str | Path | None = None,
    skip_bad: bool = True,
    cache_dir: str | Path | None = None,
    transform=None,
    batch_size: int = 256,
) -> dict:
    """AUROC of the run's OOD scores for telling ``data``'s images from its own test split.

    Args:
        run_dir: a classifier run with ``ood.json`` (``dermkit evaluate RUN --fit-ood``).
        data: the "unfamiliar" dataset (any supported layout; labels are not used, but
            the readers need them: pass ``label_map`` when they are not the run's classes).
            ``None`` with ``transform``: the run's own test images, transformed.
        transform: ``f(uint8 (N, S, S, 3)) -> uint8 (N, S, S, 3)``, applied to the
            unfamiliar images (e.g. a shift of the shift benchmark on the test split).

    Returns:
        {"in": "test split (n)", "out": ..., "energy": {"auroc", "threshold", "flagged_in",
        "flagged_out"}, "mahalanobis": ... (when fitted)}.
    """
    scorer = OodScorer(run_dir, batch_size)
    if data is None:
        if transform is None:
            raise ValueError("ood_auroc needs data, a transform, or both")
        out_set, name = scorer.test, "test split"
    else:
        out_set = scorer.dataset(data, layout, label_map, skip_bad, cache_dir)
        name = str(data)
    if transform is not None:
        out_set = _Transformed(out_set, transform)
        name += " (transformed)"
    return scorer.compare(out_set, name)


def shift_aurocs(run_dir: str | Path, transforms: dict, batch_size: int = 256) -> dict:
    """{name: ood_auroc result} of the run's test images under each transform (uint8 NHWC
    -> uint8 NHWC) against the clean test images, scoring the clean images once."""
    scorer = OodScorer(run_dir, batch_size)
    return {
        name: scorer.compare(_Transformed(scorer.test, f), f"test split ({name})")
        for name, f in transforms.items()
    }


class OodScorer:
    """A run's model, flag and clean test-split scores, to compare other image sets with."""

    def __init__(self, run_dir: str | Path, batch_size: int = 256):
        from dermkit.data.dataset import CachedImageDataset
        from dermkit.models.runs_io import load_run_model

        self.run_dir = Path(run_dir)
        self.rule = load_ood(self.run_dir)
        if self.rule is None:
            raise FileNotFoundError(
                f"{self.run_dir / OOD_FILE} not found: fit the flag first "
                "(dermkit evaluate RUN --fit-ood)"
            )
        self.model, self.cfg, self.classes = load_run_model(self.run_dir)
        self.batch_size = batch_size
        prepared = run_split_data(self.run_dir, self.cfg)
        self.test = CachedImageDataset(prepared.cache, prepared.part("test"), self.classes)
        self.clean = self.scores(self.test)

    def scores(self, dataset) -> dict:
        return score_dataset(self.model, dataset, self.rule, self.run_dir, self.batch_size)

    def dataset(self, data, layout="auto", label_map=None, skip_bad=True, cache_dir=None):
        """Another dataset's images, cached at the run's size and crop."""
        from dermkit.data.cache import build_cache
        from dermkit.data.dataset import CachedImageDataset
        from dermkit.data.labels import load_label_map
        from dermkit.data.readers import load_dataset

        mapping = load_label_map(label_map) if label_map is not None else None
        loaded = load_dataset(
            data,
            layout=layout,
            skip_bad=skip_bad,
            label_map=mapping,
            classes=self.classes if mapping is None else None,
        )
        cfg = self.cfg.data
        root = cache_dir if cache_dir is not None else cfg.cache_dir
        cache = build_cache(
            loaded.manifest,
            cfg.image_size,
            cfg.crop,
            root,
            colour_constancy=cfg.colour_constancy,
        )
        return CachedImageDataset(cache, loaded.manifest, self.classes, in_memory=False)

    def compare(self, out_set, name: str) -> dict:
        """AUROC (out = positive) and flagged fractions of each fitted score."""
        shifted = self.scores(out_set)
        result = {
            "in": f"test split ({len(self.test)} images)",
            "out": f"{name} ({len(out_set)} images)",
        }
        rule = self.rule
        for key, threshold in (
            ("energy", rule.threshold),
            ("mahalanobis", rule.mahalanobis_threshold),
        ):
            if self.clean[key] is None or shifted[key] is None:
                continue
            result[key] = {
                "auroc": auroc(self.clean[key], shifted[key]),
                "threshold": threshold,
                "flagged_in": float((self.clean[key] > threshold).mean()),
                "flagged_out": float((shifted[key] > threshold).mean()),
            }
        return result


class _Transformed:
    """A CachedImageDataset view whose uint8 batches pass through ``transform`` (NHWC)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        import torch

        x, y = self.dataset.__getitems__(indices)
        nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        out = np.asarray(self.transform(nhwc), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2), y
