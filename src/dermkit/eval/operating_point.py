"""A minimum-recall operating point for one class (melanoma), chosen on val.

A classifier tuned for macro-F1 puts its melanoma boundary where precision and recall
balance; a clinic wants the boundary where few melanomas are missed. The operating point
raises the melanoma entry of the decision rule's class scales (``DecisionRule``) by the
smallest factor ``g`` at which val melanoma recall reaches the target:

    pred = argmax_c(p_c * s_c),   s_mel <- s_mel * g

Because it is a class scale, it travels wherever the rule already does (``decision.json``
-> export, serving, the web page, the shift benchmark) with no new code on those paths.
The reported melanoma probability is the rule's, so it rises with ``g``: it is a decision
score, not a calibrated probability (the report shows ECE before and after).

Fitting uses the run's ``predictions_val.csv`` only. Applying ``g`` to stored probabilities
and renormalising equals applying the new rule to the logits, so the run's prediction
files are rewritten without running the model, and the test metrics before and after are
recorded in ``operating_point.json``. The run's ``metrics.json`` test evaluation is
recomputed under the new rule (same bootstrap settings), so the run folder, its model card
and everything that reads ``metrics.json`` describe the same decisions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dermkit.core.files import write_json_atomic
from dermkit.core.predictions import read_predictions, write_predictions
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.metrics import evaluate_predictions

OPERATING_POINT_FILE = "operating_point.json"
DECISION_FILE = "decision.json"
_GRID = np.exp(np.linspace(0.0, np.log(1e4), 2001))  # candidate factors g, 1 .. 1e4


def parse_target(text: str) -> tuple[str, float]:
    """``"mel=0.85"`` -> ("mel", 0.85); a bad text names the expected form."""
    name, eq, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if not eq or not name or not 0.0 < target <= 1.0:
        raise ValueError(f"operating point '{text}': expected CLASS=RECALL, e.g. mel=0.85")
    return name, target


def rescale(probs: np.ndarray, k: int, factor: float) -> np.ndarray:
    """(N, C) probabilities with column k multiplied by ``factor``, rows renormalised."""
    out = np.array(probs, dtype=np.float64)
    out[:, k] *= factor
    return out / out.sum(1, keepdims=True)


def recall_of(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Recall of class k under argmax decisions; NaN when y has no class k."""
    positives = y == k
    return float((probs[positives].argmax(1) == k).mean()) if positives.any() else float("nan")


def fit_factor(probs: np.ndarray, y: np.ndarray, k: int, target: float) -> float:
    """Smallest g in a log grid with recall_k(rescale(probs, k, g)) >= target.

    probs: (N, C) val probabilities under the current rule; y: (N,) int labels. A target
    already met gives 1.0 (the point never lowers recall). Raises ValueError when val has
    no class k.
    """
    if not (y == k).any():
        raise ValueError(f"val has no images of class index {k}: cannot choose its recall")
    # Recall under argmax depends only on p_k / max_{c != k} p_c: positive i is caught once
    # g exceeds needed_i, the inverse of that ratio. Recall(g) is then a step function.
    others = np.delete(probs, k, axis=1).max(1)
    needed = others[y == k] / np.maximum(probs[y == k, k], 1e-300)
    recall = (needed[None, :] < _GRID[:, None]).mean(1)  # (len(_GRID),)
    reached = np.flatnonzero(recall >= target)
    if len(reached) == 0:
        raise ValueError(f"no scale up to {_GRID[-1]:g} reaches recall {target} on val")
    return float(_GRID[reached[0]])


def _summary(y: np.ndarray, probs: np.ndarray, classes: list[str], k: int, df) -> dict:
    result = evaluate_predictions(
        y, probs, classes, groups=df["lesion_id"].to_numpy(), n_boot=0, positive_class=classes[k]
    )["metrics"]
    keep = ("balanced_accuracy", "macro_f1", "ece")
    return {"recall": recall_of(probs, y, k), **{m: result[m]["value"] for m in keep}}


def fit_operating_point(run_dir: str | Path, target_text: str) -> dict:
    """Choose the point on RUN's val predictions, rewrite its rule and prediction files.

    Writes ``decision.json`` (class scale of the class multiplied by g, the point recorded
    under ``min_recall``), ``predictions_val.csv`` / ``predictions_test.csv`` under the new
    rule, and ``operating_point.json`` (g, val and test recall / balanced accuracy /
    macro-F1 / ECE before and after). Refitting starts from the rule without a previous
    point, so running it twice with one target changes nothing. Returns the record.
    """
    run = Path(run_dir)
    name, target = parse_target(target_text)
    files = {s: run / f"predictions_{s}.csv" for s in ("val", "test")}
    for path in files.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: the operating point needs the run's predictions")
    parts = {s: read_predictions(p) for s, p in files.items()}
    classes = parts["val"][3]
    if name not in classes:
        raise ValueError(f"operating point: class '{name}' is not one of {classes} ({run})")
    k = classes.index(name)
    rule = DecisionRule.load(run / DECISION_FILE)
    previous = rule.min_recall["factor"] if rule.min_recall else 1.0
    scales = np.asarray(rule.class_scales or [1.0] * len(classes), dtype=np.float64)
    base = {s: rescale(p[2], k, 1.0 / previous) for s, p in parts.items()}  # undo an old point

    g = fit_factor(base["val"], parts["val"][1], k, target)
    record = {"class": name, "target_recall": target, "factor": g, "before": {}, "after": {}}
    for split, (df, y, _, _) in parts.items():
        after = rescale(base[split], k, g)
        record["before"][split] = _summary(y, base[split], classes, k, df)
        record["after"][split] = _summary(y, after, classes, k, df)
        write_predictions(files[split], df, after, classes)
    scales[k] *= g / previous
    new_rule = DecisionRule(
        rule.temperature,
        scales.tolist(),
        min_recall={"class": name, "target": target, "factor": g},
    )
    new_rule.save(run / DECISION_FILE)
    write_json_atomic(run / OPERATING_POINT_FILE, record)
    _refresh_test_metrics(run, parts["test"], new_rule)
    record["rule"] = asdict(new_rule)
    return record


def _refresh_test_metrics(run: Path, test, rule: DecisionRule) -> None:
    """Recompute metrics.json's test evaluation from the rewritten test predictions.

    The bootstrap settings (B, CI level, seed, positive class) are the run's own; training
    history and report rows are kept; ``decision_rule`` gets the new scales and the point.
    """
    path = run / "metrics.json"
    if not path.exists():
        return  # a predictions-only folder: nothing to keep consistent
    old = json.loads(path.read_text())
    df, y, _, classes = test
    _, _, probs, _ = read_predictions(run / "predictions_test.csv")
    fresh = evaluate_predictions(
        y,
        probs,
        classes,
        groups=df["lesion_id"].to_numpy(),
        n_boot=old.get("n_boot", 1000),
        ci=old.get("ci_level", 0.95),
        seed=old.get("seed", 0),
        positive_class=old.get("positive_class", "mel"),
    )
    decision = {**old.get("decision_rule", {}), **asdict(rule)}
    write_json_atomic(path, {**old, **fresh, "decision_rule": decision})
