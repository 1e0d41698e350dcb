"""Ensembles of finished runs: a weighted geometric mean of their class probabilities.

Input: run folders (or any folders) holding ``predictions_val.csv`` and
``predictions_test.csv`` scored on the same images, e.g. the rows of the ablation table.
The weights are chosen on the validation split only, so the test score of an ensemble is
as honest as any single run's:

* ``greedy``: forward selection with replacement (Caruana et al., ICML 2004). Start from
  the member with the best val macro-F1, then repeatedly add the member (again, if it is
  already in: that raises its weight) whose addition raises val macro-F1 most; stop when
  nothing raises it or after ``max_rounds``. A weight is the number of times its member
  was picked, so a member that only hurts on val gets weight 0.
* ``all``: weight 1 each, the usual "average the models" ensemble.

Probabilities are combined as a geometric mean (weighted mean of log-probabilities, then
softmax): unlike an arithmetic mean it lets a confident "not this class" from one member
veto, and it equals averaging logits for softmax models with one temperature.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.core.metrics import macro_f1 as core_macro_f1
from dermkit.core.predictions import write_predictions
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.paired import align_prediction_files
from dermkit.eval.report import write_evaluation_report

SPLITS = ("val", "test")
SELECTIONS = ("greedy", "all")
_LOG_FLOOR = 1e-7  # probabilities are written with 6 significant digits; 0 would be -inf


def prediction_file(run: Path, split: str) -> Path:
    """A run folder's predictions for one split; a clear error when it has none."""
    path = Path(run) / f"predictions_{split}.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: an ensemble member needs val and test predictions "
            f"(predictions_val.csv, predictions_test.csv) from a finished run"
        )
    return path


def load_members(runs: list[Path]) -> tuple[dict[str, pd.DataFrame], dict[str, np.ndarray], list]:
    """Read every member's val and test predictions, rows and classes in the first's order.

    Returns:
        ``(frames, probs, classes)``: per split the first member's frame (image_id,
        lesion_id, label) and a (M, N, C) probability array over the M members.
    Raises:
        ValueError: fewer than two members; naming the files when their classes, image ids,
            labels or lesion ids differ (``align_prediction_files``).
    """
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least two runs, got {len(runs)}")
    frames, probs, classes = {}, {}, []
    for split in SPLITS:
        first = prediction_file(runs[0], split)
        stack = []
        for run in runs[1:]:
            frame, p_first, p_other, classes = align_prediction_files(
                first, prediction_file(run, split)
            )
            stack.append(p_other)
        frames[split] = frame[["image_id", "lesion_id", "label"]]
        probs[split] = np.stack([p_first, *stack])
    return frames, probs, classes


def geometric_mean(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted geometric mean of class probabilities, renormalised.

    Args:
        probs: (M, N, C) probabilities of M members.
        weights: (M,) non-negative, not all zero.
    Returns:
        (N, C) probabilities (rows sum to 1).
    """
    w = np.asarray(weights, dtype=float)
    log_p = np.einsum("m,mnc->nc", w / w.sum(), np.log(np.clip(probs, _LOG_FLOOR, 1.0)))
    log_p -= log_p.max(1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(1, keepdims=True)


def macro_f1(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """Macro-F1 of the argmax of probabilities (N, C) (:mod:`dermkit.core.metrics`)."""
    return core_macro_f1(y, probs.argmax(1), n_classes)


def greedy_weights(
    probs: np.ndarray, y: np.ndarray, max_rounds: int = 20
) -> tuple[np.ndarray, list[dict]]:
    """Forward selection with replacement on val macro-F1.

    Args:
        probs: (M, N, C) val probabilities; y: (N,) int labels.
    Returns:
        ``(weights (M,) int counts, trace)``: trace has one entry per pick (member index,
        val macro-F1 after it).
    """
    m, _, c = probs.shape
    scores = [macro_f1(y, probs[k], c) for k in range(m)]
    counts = np.zeros(m, dtype=int)
    counts[int(np.argmax(scores))] = 1
    trace = [{"member": int(np.argmax(scores)), "val_macro_f1": max(scores)}]
    for _ in range(max_rounds - 1):
        trial = [
            macro_f1(y, geometric_mean(probs, counts + np.eye(m, dtype=int)[k]), c)
            for k in range(m)
        ]
        best = int(np.argmax(trial))  # ties go to the earlier member: deterministic
        if trial[best] <= trace[-1]["val_macro_f1"]:
            break
        counts[best] += 1
        trace.append({"member": best, "val_macro_f1": trial[best]})
    return counts, trace


def run_ensemble(
    runs: list[str | Path],
    out_dir: str | Path,
    select: str = "greedy",
    max_rounds: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
) -> dict:
    """Combine runs with val-chosen weights; evaluate on test; write a run-like folder.

    Writes ``predictions_{val,test}.csv`` (so the ensemble is itself a valid member, or the
    A/B of ``dermkit evaluate --against``), ``ensemble.json`` (members, weights, the val
    trace) and the evaluation report (``metrics.json``, ``report.html``).

    Returns:
        ``{"weights", "val_macro_f1", "test": evaluate_predictions result, "report"}``.
    """
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    runs = [Path(r) for r in runs]
    frames, probs, classes = load_members(runs)
    index = {c: i for i, c in enumerate(classes)}
    y = {s: frames[s]["label"].map(index).to_numpy() for s in SPLITS}
    if select == "greedy":
        weights, trace = greedy_weights(probs["val"], y["val"], max_rounds)
    else:
        weights, trace = np.ones(len(runs), dtype=int), []
    combined = {s: geometric_mean(probs[s], weights) for s in SPLITS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_predictions(out / f"predictions_{s}.csv", frames[s], combined[s], classes)
    members = [
        {
            "run": str(r),
            "weight": int(w),
            "val_macro_f1": macro_f1(y["val"], probs["val"][k], len(classes)),
        }
        for k, (r, w) in enumerate(zip(runs, weights))
    ]
    val_f1 = macro_f1(y["val"], combined["val"], len(classes))
    summary = {"select": select, "members": members, "trace": trace, "val_macro_f1": val_f1}
    (out / "ensemble.json").write_text(json.dumps(summary, indent=2) + "\n")
    result = evaluate_predictions(
        y["test"],
        combined["test"],
        classes,
        groups=frames["test"]["lesion_id"].to_numpy(),
        n_boot=n_boot,
        seed=seed,
        positive_class=positive_class,
    )
    chosen = ", ".join(f"{Path(m['run']).name} x{m['weight']}" for m in members if m["weight"])
    report = write_evaluation_report(
        result,
        y["test"],
        combined["test"],
        classes,
        out,
        title=f"dermkit ensemble ({select}, weights chosen on val): test split",
        extra={"members (weight)": chosen, "val macro-F1 of the ensemble": round(val_f1, 4)},
    )
    return {"weights": weights.tolist(), "val_macro_f1": val_f1, "test": result, "report": report}
