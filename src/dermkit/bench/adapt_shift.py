"""Label-free adaptation on the shift benchmark: each shift scored with and without it.

The images and shifts are those of ``dermkit bench shift`` (:mod:`dermkit.bench.shift`:
the run's own HAM10000 test split, each shift applied to the source images before the
run's crop). For every shifted condition (and the clean images) the run predicts twice:
as it is, and adapted to that condition's images alone
(:class:`dermkit.eval.adapt.RunAdapter`: AdaBN, EM priors, multi-scale TTA; labels are
never read), starting again from the run's own weights for each condition. The two
prediction sets are compared by the paired lesion-level bootstrap (A = adapted,
B = as is) for balanced accuracy, macro-F1 and the positive class's recall.

Output (default ``RUN/shift-adapt-<adaptations>``): ``adapt_shift.json`` and
``adapt_shift.md``.

:func:`shift_ood_aurocs` scores the same conditions with the run's unfamiliar-image flag
(``ood.json``): the AUROC of telling each shift's images from the clean ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermkit.bench.shift import (
    _logits,
    _preprocess,
    _summary,
    paired_comparer,
    shifted_sources,
    test_sources,
)
from dermkit.config import ConfigError
from dermkit.core.files import write_json_atomic, write_text_atomic
from dermkit.data.cache import ImageCache
from dermkit.data.dataset import CachedImageDataset
from dermkit.eval.adapt import RunAdapter, parse_adaptations
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.shifts import SEVERITY_NAMES, SHIFTS


def _check_shifts(shifts: list[str] | None, severities: tuple[int, ...]) -> list[str]:
    shifts = list(SHIFTS) if shifts is None else list(shifts)
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shifts {unknown}; the shifts are {list(SHIFTS)}")
    if not severities or any(k not in (1, 2, 3) for k in severities):
        raise ConfigError(f"severities must be among 1, 2, 3, got {list(severities)}")
    return shifts


def _dataset(images: np.ndarray, manifest, classes: list[str]) -> CachedImageDataset:
    cache = ImageCache(images=images, image_ids=manifest["image_id"].to_numpy(), root=Path("."))
    return CachedImageDataset(cache, manifest, classes, in_memory=False)


def shift_ood_aurocs(
    run_dir: str | Path,
    *,
    shifts: list[str] | None = None,
    severities: tuple[int, ...] = (2,),
    limit: int | None = None,
    batch_size: int = 256,
) -> dict:
    """{"in": ..., "rows": [{shift, severity, energy: {auroc, flagged_in, flagged_out},
    mahalanobis: ...}]}: the run's flag on each shifted copy of its test split (shifted as
    ``dermkit bench shift`` shifts it: the source image, before the crop) against the
    clean test images. Needs ``ood.json`` (``dermkit evaluate RUN --fit-ood``)."""
    from dermkit.eval.ood import OodScorer

    shifts = _check_shifts(shifts, severities)
    scorer = OodScorer(run_dir, batch_size)
    cfg, classes = scorer.cfg, scorer.classes
    manifest, sources = test_sources(Path(run_dir), cfg, classes, limit)
    clean = _dataset(_preprocess(sources, cfg), manifest, classes)
    scorer.test, scorer.clean = clean, scorer.scores(clean)  # the same rows as the shifts
    rows = []
    for shift in shifts:
        for k in severities:
            shifted = _preprocess(shifted_sources(sources, shift, k), cfg)
            name = f"{shift} ({SEVERITY_NAMES[k]})"
            rows.append(
                {
                    "shift": shift,
                    "severity": SEVERITY_NAMES[k],
                    **scorer.compare(_dataset(shifted, manifest, classes), name),
                }
            )
    return {"run": str(run_dir), "n_images": len(manifest), "rows": rows}


def run_adapted_shift_bench(
    run_dir: str | Path,
    adaptations: str,
    out_dir: str | Path | None = None,
    *,
    shifts: list[str] | None = None,
    severities: tuple[int, ...] = (2,),
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    priors_max_error: float | None = 0.1,
) -> dict:
    """Score the run as is and adapted, clean and under each shift; see the module doc.

    Args:
        run_dir: finetune or distill run folder.
        adaptations: "bn", "priors", "tta" or a comma list of them.
        shifts: names of ``eval.shifts.SHIFTS`` (default: all); severities: of 1, 2, 3
            (default: the middle one).
        n_boot, seed: paired lesion-bootstrap replicates and their seed.
        limit: the first ``limit`` test images only (a quick look; not a benchmark).
        priors_max_error: the EM check's limit (:func:`dermkit.eval.adapt.em_check`).

    Returns:
        ``adapt_shift.json``: ``run``, ``adaptations``, ``n_images``, ``rows`` (one per
        condition: shift, severity, metric -> {adapted, as_is, delta, ci_low, ci_high}, the
        priors estimated and whether they were applied), ``files``.
    """
    from dermkit.core.devices import make_accelerator
    from dermkit.models.runs_io import load_run_model

    run_dir = Path(run_dir)
    adapt = parse_adaptations(adaptations)
    if not adapt:
        raise ConfigError("name at least one adaptation (bn, priors, tta)")
    shifts = _check_shifts(shifts, severities)
    model, cfg, classes = load_run_model(run_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rule = DecisionRule.load(run_dir / "decision.json")
    adapter = RunAdapter(
        run_dir,
        model,
        cfg,
        classes,
        rule,
        adapt,
        priors_max_error=priors_max_error,
        batch_size=batch_size,
    )
    manifest, sources = test_sources(run_dir, cfg, classes, limit)
    compare = paired_comparer(manifest, classes, cfg, n_boot, seed)
    accelerator = make_accelerator(cfg.optim.precision)
    positive = cfg.eval.positive_class

    def both(images: list[np.ndarray]):
        x = _preprocess(images, cfg)
        dataset = _dataset(x, manifest, classes)

        def run_logits(m):
            return _logits(m, cfg, x, manifest, classes, accelerator, batch_size)

        model.load_state_dict(state)  # as is: the run's own statistics
        as_is = rule.probs(run_logits(model))
        return as_is, adapter(dataset, run_logits)

    rows = []
    conditions = [("clean", 0)] + [(s, k) for s in shifts for k in severities]
    for shift, severity in conditions:
        images = sources if shift == "clean" else shifted_sources(sources, shift, severity)
        as_is, adapted = both(images)
        paired = compare(adapted.probs, as_is)
        metrics = {
            name: {
                "adapted": e["shifted"],
                "as_is": e["clean"],
                "delta": e["delta"],
                "ci_low": e["ci_low"],
                "ci_high": e["ci_high"],
            }
            for name, e in _summary(paired, positive).items()
        }
        rows.append(
            {
                "shift": shift,
                "severity": SEVERITY_NAMES[severity],
                "metrics": metrics,
                "priors": adapted.priors.to_dict() if adapted.priors is not None else None,
            }
        )
    model.load_state_dict(state)
    out_dir = Path(out_dir) if out_dir else run_dir / f"shift-adapt-{'-'.join(adapt)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "run": str(run_dir),
        "adaptations": list(adapt),
        "n_images": len(manifest),
        "n_lesions": int(manifest["lesion_id"].nunique()),
        "positive_class": positive,
        "rows": rows,
    }
    result["files"] = {
        "json": str(out_dir / "adapt_shift.json"),
        "markdown": str(out_dir / "adapt_shift.md"),
    }
    write_text_atomic(out_dir / "adapt_shift.md", adapted_shift_markdown(result))
    write_json_atomic(out_dir / "adapt_shift.json", result)
    return result


def adapted_shift_markdown(result: dict) -> str:
    """One table row per condition: each metric as is -> adapted, delta [CI]."""
    positive = result["positive_class"]
    names = ["balanced_accuracy", "macro_f1", f"{positive}_recall"]
    head = ["shift", "severity"] + [n.replace("_", " ") for n in names] + ["priors applied"]
    lines = [
        f"Adaptation `{','.join(result['adaptations'])}` on the shift benchmark of "
        f"`{result['run']}` ({result['n_images']} test images, {result['n_lesions']} lesions): "
        "as is -> adapted, adapted - as is [paired lesion-bootstrap CI].",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | --- |" + " ---: |" * len(names) + " --- |",
    ]
    for row in result["rows"]:
        cells = [row["shift"], row["severity"]]
        for n in names:
            e = row["metrics"].get(n)
            if e is None or e["adapted"] is None:
                cells.append("n/a")
                continue
            ci = (
                f" [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"
                if e["ci_low"] is not None and e["ci_high"] is not None
                else ""
            )
            cells.append(f"{e['as_is']:.3f} -> {e['adapted']:.3f}, {e['delta']:+.3f}{ci}")
        priors = row["priors"]
        cells.append("-" if priors is None else "yes" if priors["applied"] else "no (EM check)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
