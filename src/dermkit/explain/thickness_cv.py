"""Small-data protocol for thickness: probes on frozen features, nested cross-validation.

With 247 images a model chosen on the test folds is worthless, so every choice is made
inside the training part of each outer fold:

- **outer**: stratified K-fold (default 5) on the class codes, one image per case,
  repeated over seeds (default 3): K x seeds test folds, every image tested once per seed;
- **inner**: inside each outer training fold, a stratified inner K-fold (default 3) scores
  every candidate (feature set x head x C x class weighting) by the balanced accuracy of its
  pooled inner out-of-fold predictions (QWK breaks ties). A *family* (e.g. "CORN probe on
  lite0@224") picks its best member on that inner score, is refit on the whole training
  fold and predicts the test fold. The family ``selected`` may pick any candidate: it is
  the headline, chosen without ever seeing a test fold.

**Heads** (linear probes on standardised features, scikit-learn's L2 logistic regression):

- ``softmax``: multinomial logistic regression (plain cross-entropy);
- ``corn``: CORN (Shi, Cao & Raschka 2021) with a linear head: K-1 binary logistic
  regressions, the k-th fit on the rows with y > k-1 to predict y > k. CORN's loss is the sum
  of these conditional binary cross-entropies; with a linear head per task and nothing
  shared, minimising the sum is minimising each term, so separate fits *are* the CORN fit.
  Probabilities: :func:`dermkit.tasks.ordinal.corn_class_probs` of the K-1 logits.

Class weighting ("balanced"): each row weighted by N / (K n_class(y)) in every fit.
Prediction: the most probable class.

**Metrics** per test fold (:func:`fold_metrics`); the summary is the mean over the K x seeds
folds with a 95% t-interval of that mean (folds share training images, so the interval is
a convention, slightly narrow, not an exact coverage guarantee).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dermkit.data.thickness import BINARY_CUTS
from dermkit.eval.ordinal import quadratic_kappa
from dermkit.tasks.ordinal import corn_class_probs

log = logging.getLogger(__name__)

HEADS: tuple[str, ...] = ("corn", "softmax")
DEFAULT_CS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)
SELECTED = "selected"


@dataclass(frozen=True)
class ProbeSpec:
    """One candidate: a feature set, a head, the inverse L2 strength C, class weighting."""

    features: str
    head: str
    c: float
    balanced: bool

    @property
    def family(self) -> str:
        return f"{self.head} | {self.features}"

    def __str__(self) -> str:
        return f"{self.family} | C={self.c:g}{' | balanced' if self.balanced else ''}"


def class_weights(y: np.ndarray, k: int) -> np.ndarray:
    """(N,) row weights N / (K n_class(y)): every class carries the same total weight."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    return len(y) / (k * np.maximum(counts[y], 1.0))


@dataclass
class Probe:
    """A fitted probe: ``linear`` holds the head in the *raw* feature space.

    Attributes:
        spec: the candidate it was fit as.
        weight: (K or K-1, D) logit weights on raw features (the scaler folded in).
        bias: (K or K-1,) logit biases.
        k: number of classes K.
    """

    spec: ProbeSpec
    weight: np.ndarray
    bias: np.ndarray
    k: int

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, K) softmax logits or (N, K-1) CORN conditional logits."""
        return np.asarray(x, np.float64) @ self.weight.T + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, K) class probabilities."""
        z = torch.from_numpy(self.logits(x))
        if self.spec.head == "corn":
            return corn_class_probs(z).double().numpy()
        return torch.softmax(z, dim=-1).numpy()


def _logistic(x: np.ndarray, y: np.ndarray, c: float, w: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=500).fit(x, y, sample_weight=w)


def fit_probe(x: np.ndarray, y: np.ndarray, spec: ProbeSpec, k: int) -> Probe:
    """Fit ``spec``'s head on raw features x (N, D) and class codes y (N,) in 0..K-1."""
    if spec.head not in HEADS:
        raise ValueError(f"unknown head '{spec.head}' (expected one of {HEADS})")
    scaler = StandardScaler().fit(x)
    # The L2 solution lies in the span of the (centred) training rows, so fitting on their
    # coordinates in that span (rank <= N, vs D = 1280 features) is exact and much faster.
    _, sv, vt = np.linalg.svd(scaler.transform(x), full_matrices=False)
    basis = vt[sv > 1e-8 * max(sv[0], 1e-12)]  # (r, D)
    z = scaler.transform(x) @ basis.T  # (N, r)
    w = class_weights(y, k) if spec.balanced else np.ones(len(y))
    if spec.head == "softmax":
        model = _logistic(z, y, spec.c, w)
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # scikit-learn's binary form: one row for class 1
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.r_[-intercept / 2, intercept / 2]
    else:
        rows, biases = [], []
        for j in range(k - 1):
            m = y > j - 1  # CORN: task j is trained on the rows that passed task j-1
            target = (y[m] > j).astype(np.int64)
            if target.min() == target.max():  # one outcome only: a constant logit
                rows.append(np.zeros(z.shape[1]))
                biases.append(8.0 if target[0] else -8.0)
                continue
            model = _logistic(z[m], target, spec.c, w[m])
            rows.append(model.coef_[0])
            biases.append(float(model.intercept_[0]))
        coef, intercept = np.vstack(rows), np.asarray(biases)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = (coef @ basis) / scale
    bias = intercept - weight @ scaler.mean_
    return Probe(spec, weight, bias, k)


# ----------------------------------------------------------------------------- metrics


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b)[0])


def cut_scores(probs: np.ndarray, cut: int) -> np.ndarray:
    """(N, K) class probabilities -> (N,) P(class >= cut)."""
    return np.asarray(probs)[:, cut:].sum(1)


def fold_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics of one test fold: y (N,) class codes, probs (N, K).

    balanced accuracy, accuracy, QWK, MAE (classes), Spearman of the expected class with
    the true class, AUROC of P(class >= cut) for each :data:`BINARY_CUTS` cut, and per true
    class its MAE (``mae_<k>``) and recall (``recall_<k>``).
    """
    y = np.asarray(y, np.int64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    expected = probs @ np.arange(k, dtype=np.float64)
    out = {
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float(np.mean(pred == y)),
        "qwk": quadratic_kappa(y, pred, k),
        "mae": float(np.mean(np.abs(pred - y))),
        "spearman": _spearman(expected, y),
    }
    for name, cut in BINARY_CUTS.items():
        out[f"auroc_{name}"] = _auroc((y >= cut).astype(int), cut_scores(probs, cut))
    for c in range(k):
        m = y == c
        out[f"mae_{c}"] = float(np.mean(np.abs(pred[m] - c))) if m.any() else float("nan")
        out[f"recall_{c}"] = float(np.mean(pred[m] == c)) if m.any() else float("nan")
    return out


def mean_ci(values: list[float] | np.ndarray, level: float = 0.95) -> dict:
    """Mean and t-interval of the mean of fold values (NaN folds left out)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"value": mean, "ci_low": None, "ci_high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(v)}


# ----------------------------------------------------------------------------- protocol


@dataclass
class FamilyResult:
    """One family's outer-CV result.

    Attributes:
        oof: {seed: (N, K) out-of-fold class probabilities}.
        folds: one metrics dict per (seed, fold), plus ``seed``, ``fold``, ``chosen``.
        probes: {(seed, fold): the probe refit on that outer training fold} (probe
            families; empty for the fine-tuned ones, ``explain/thickness_ft.py``).
        test_index: {(seed, fold): (n,) test row indices}.
    """

    oof: dict[int, np.ndarray] = field(default_factory=dict)
    folds: list[dict] = field(default_factory=list)
    probes: dict[tuple[int, int], Probe] = field(default_factory=dict)
    test_index: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def summary(self, level: float = 0.95) -> dict[str, dict]:
        """{metric: mean_ci over folds x seeds}."""
        names = [n for n in self.folds[0] if n not in ("seed", "fold", "chosen")]
        return {n: mean_ci([f[n] for f in self.folds], level) for n in names}

    def mean_oof(self) -> np.ndarray:
        """(N, K) out-of-fold probabilities averaged over the seeds (one row per image)."""
        return np.mean(np.stack(list(self.oof.values())), axis=0)

    def chosen_counts(self) -> dict[str, int]:
        """How often each candidate was chosen over the folds x seeds."""
        counts: dict[str, int] = {}
        for f in self.folds:
            counts[f["chosen"]] = counts.get(f["chosen"], 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def candidate_grid(
    feature_names: list[str], cs=DEFAULT_CS, heads=HEADS, balanced=(True, False)
) -> list[ProbeSpec]:
    """Every feature set x head x C x class weighting."""
    return [ProbeSpec(*t) for t in itertools.product(feature_names, heads, cs, balanced)]


def _inner_score(
    x: np.ndarray, y: np.ndarray, spec: ProbeSpec, k: int, splits
) -> tuple[float, float]:
    """(balanced accuracy, QWK) of the pooled inner out-of-fold predictions."""
    probs = np.zeros((len(y), k))
    for tr, va in splits:
        probs[va] = fit_probe(x[tr], y[tr], spec, k).predict_proba(x[va])
    pred = probs.argmax(1)
    return float(balanced_accuracy_score(y, pred)), quadratic_kappa(y, pred, k)


def outer_splits(
    y: np.ndarray, k: int, n_folds: int, seeds: tuple[int, ...]
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(seed, fold, train rows, test rows) of the outer stratified K-fold x seeds.

    Every arm of the study (probes, fine-tuning) is tested on these same folds.
    """
    y = np.asarray(y, np.int64)
    if np.bincount(y, minlength=k).min() < n_folds:
        raise ValueError(
            f"every class needs >= {n_folds} images for {n_folds}-fold CV, "
            f"got counts {np.bincount(y, minlength=k).tolist()}"
        )
    splits = []
    for seed in seeds:
        outer = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
        for fold, (train, test) in enumerate(outer.split(np.zeros(len(y)), y)):
            splits.append((seed, fold, train, test))
    return splits


def nested_cv(
    features: dict[str, np.ndarray],
    y: np.ndarray,
    k: int,
    grid: list[ProbeSpec],
    n_folds: int = 5,
    seeds: tuple[int, ...] = (0, 1, 2),
    inner_folds: int = 3,
    n_jobs: int = 1,
) -> dict[str, FamilyResult]:
    """Outer stratified K-fold x seeds; each family chosen on inner CV of the training fold.

    Args:
        features: {feature set name: (N, D) features}, rows aligned with ``y``.
        y: (N,) class codes 0..K-1.
        grid: the candidates (every ``spec.features`` must be a key of ``features``).
        n_jobs: outer folds run in parallel (joblib processes); 1 runs them in turn.

    Returns:
        {family: FamilyResult}: one family per (head, feature set), and ``selected``.
    """
    y = np.asarray(y, np.int64)
    unknown = sorted({s.features for s in grid} - set(features))
    if unknown:
        raise ValueError(f"candidates name feature sets {unknown} that were not extracted")
    families = [*sorted({s.family for s in grid}), SELECTED]
    tasks = outer_splits(y, k, n_folds, seeds)
    if n_jobs == 1:
        done = [_outer_fold(features, y, k, grid, families, inner_folds, *t) for t in tasks]
    else:
        from joblib import Parallel, delayed

        done = Parallel(n_jobs=n_jobs)(
            delayed(_outer_fold)(features, y, k, grid, families, inner_folds, *t) for t in tasks
        )
    results = {f: FamilyResult() for f in families}
    for (seed, fold, _, test), per_family in zip(tasks, done, strict=True):
        for family, (probe, probs, row) in per_family.items():
            r = results[family]
            r.oof.setdefault(seed, np.zeros((len(y), k)))[test] = probs
            r.probes[(seed, fold)] = probe
            r.test_index[(seed, fold)] = test
            r.folds.append(row)
    return results


def _outer_fold(features, y, k, grid, families, inner_folds, seed, fold, train, test) -> dict:
    """{family: (probe refit on ``train``, test probabilities, fold row)} of one outer fold.

    Only ``train`` rows are seen until the chosen probes predict ``test``.
    """
    # Matrices of ~200 x 200: BLAS threads only fight each other (10-100x slower on a
    # busy 2-core machine than one thread).
    with threadpool_limits(limits=1):
        inner = list(
            StratifiedKFold(inner_folds, shuffle=True, random_state=seed).split(
                np.zeros(len(train)), y[train]
            )
        )
        scores = {
            spec: _inner_score(features[spec.features][train], y[train], spec, k, inner)
            for spec in grid
        }
        out = {}
        for family in families:
            members = [s for s in grid if family in (SELECTED, s.family)]
            best = max(members, key=lambda s: scores[s])
            probe = fit_probe(features[best.features][train], y[train], best, k)
            probs = probe.predict_proba(features[best.features][test])
            row = {
                "seed": seed,
                "fold": fold,
                "chosen": str(best),
                "inner_balanced_accuracy": scores[best][0],
                **fold_metrics(y[test], probs),
            }
            out[family] = (probe, probs, row)
    row = out[SELECTED][2]
    log.info(
        "seed %d fold %d: selected %s (inner bacc %.3f), test bacc %.3f",
        seed,
        fold,
        row["chosen"],
        row["inner_balanced_accuracy"],
        row["balanced_accuracy"],
    )
    return out
