"""A finished run re-scored with test-time augmentation: the 8 dihedral views of each image.

``dermkit evaluate RUN --tta`` predicts the run's own val and test images (its
``split.csv``) as the mean logits over the image's 4 rotations x 2 flips
(:func:`dermkit.eval.inference.dihedral_views`), refits the run's decision rule on the val
logits (the same ``decision_rule`` mode; the run's own fit was made on single-view logits,
whose temperature and class scales do not transfer), and scores test once. The model, its
selected epoch and the split are the run's; only inference changes, at 8x the cost per
image. The output folder is a prediction folder (``predictions_{val,test}.csv``,
``decision.json``, ``metrics.json``, ``report.html``), so ``dermkit evaluate OUT --against
B`` pairs it with any other run.

Why a separate command and not ``augment.tta`` at training time: that flag also changes
which epoch val selects, so its runs are not the same model; this isolates the effect of
the views on one fixed model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import get_args

import numpy as np

from dermkit.core.devices import make_accelerator
from dermkit.data.dataset import CachedImageDataset
from dermkit.eval.ensemble import macro_f1
from dermkit.eval.inference import predict_logits
from dermkit.tasks.classification import ClassificationTask
from dermkit.tasks.runs import open_run, run_data
from dermkit.train.settings import FinetuneRunConfig

# The modes ``decision_rule`` takes (train/settings.py), in the order the help lists them.
DECISION_RULES: tuple[str, ...] = get_args(
    FinetuneRunConfig.model_fields["decision_rule"].annotation
)


def evaluate_run_tta(
    run_dir: str | Path,
    out: str | Path | None = None,
    seed: int = 0,
    decision_rule: str | None = None,
) -> dict:
    """Re-score ``run_dir``'s val/test with dihedral TTA into ``out`` (default RUN/tta).

    ``decision_rule`` names the rule refitted on the val TTA logits (default: the run's
    own). Why it is a choice: seven class scales refitted on a val split with 11 df and 14
    vasc images can fit its noise (BENCHMARKS.md, TTA); ``auto`` keeps them only when they
    hold up on held-out halves of val.

    Returns the result the evaluation report writes to ``out/metrics.json``: ``metrics``
    (test, with the refitted rule), ``single_view`` (the run's own test metrics, for
    reference), ``val_macro_f1`` and ``decision_rule`` (mode and fitted parameters).

    Raises:
        ValueError: the run is not a classification run (an ordinal run's decision is its
            expected class, which this command does not refit).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "tta"
    run = open_run(run_dir)
    if not isinstance(run.task, ClassificationTask):
        raise ValueError(
            f"{run_dir}: --tta re-scores classification runs; this one is {run.cfg.task.kind}"
        )
    cfg: FinetuneRunConfig = run.cfg
    data = run_data(run)
    n_train = len(data.part("train"))
    parts, _ = run.task.prepare(data, np.zeros(n_train, bool), cfg.task.drop_missing)
    classes = run.task.class_names
    accelerator = make_accelerator(cfg.optim.precision)
    logits, labels = {}, {}
    for split in ("val", "test"):
        dataset = CachedImageDataset(data.cache, parts[split], classes)
        index = np.arange(len(dataset))
        logits[split] = predict_logits(run.model, dataset, index, accelerator, tta=True).numpy()
        labels[split] = dataset.labels.numpy()
    task = ClassificationTask(list(classes))
    mode = decision_rule or cfg.decision_rule
    if mode not in DECISION_RULES:
        raise ValueError(f"decision rule {mode!r}: expected one of {DECISION_RULES}")
    task.fit_probs(logits["val"], labels["val"], mode)
    probs = {s: task.probs(v) for s, v in logits.items()}
    out.mkdir(parents=True, exist_ok=True)
    task.save(out)
    for split in ("val", "test"):
        task.write_predictions(out / f"predictions_{split}.csv", parts[split], probs[split])
    result = task.evaluate(labels["test"], probs["test"], parts["test"], cfg.eval, seed)
    own = run_dir / "metrics.json"
    single = json.loads(own.read_text()).get("metrics") if own.is_file() else None
    result.update(
        {
            "run": str(run_dir),
            "tta": "dihedral-8",
            "single_view": single,
            "val_macro_f1": macro_f1(labels["val"], probs["val"], len(classes)),
            "decision_rule": {"mode": mode, **asdict(task.rule)},
        }
    )
    task.write_report(
        result,
        labels["test"],
        probs["test"],
        parts["test"],
        out,
        title=f"dermkit evaluate --tta: {run_dir.name} (test split, 8 dihedral views)",
        extra={"run": str(run_dir), "test-time augmentation": "mean logits of 8 dihedral views"},
        extra_figures={},
    )
    return result
