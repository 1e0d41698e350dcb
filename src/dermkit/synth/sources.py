"""One synthetic set drawn from two generators: named classes from one, the rest from the other.

Why: no single generator draws every class at the cpu preset. The latent model loses vasc in
its autoencoder (0 of 150 real vasc images survive the codec), while a 32 px pixel-space
model draws vasc (67% judge agreement after filtering) but the other rare classes worse
(BENCHMARKS.md, "Pixel-space diffusion at 32 px"). So the pipeline's ``sample`` stage can
take the classes it names (``pixel_classes``) from its ``pixel_diffusion`` stage.

How: the balance target is planned once, on the real training counts (both generators are
trained on the same split); each generator then draws only its own classes (a ``generate``
target with the others at 0) into a sub-run of its own, with the same sampler and filter
settings; the two manifests are merged class by class (``synth/merge.py``). The folder then
looks like any ``dermkit synth sample`` run: ``manifest.csv``, ``plan.json``,
``filter.json`` (when filtered), ``metrics.json``, ``report.html``, ``grid_<class>.png``,
with ``sources.json`` saying which generator drew which class. Each sub-run is resumable,
so a killed stage redraws nothing it has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dermkit.core.files import write_json_atomic
from dermkit.data.manifest import read_manifest
from dermkit.synth.merge import write_merged
from dermkit.synth.sample import (
    FILTER,
    MANIFEST,
    load_target,
    plan_counts,
    run_sample,
    write_class_grids,
    write_sample_report,
)
from dermkit.synth.settings import SampleConfig

DEFAULT, NAMED = "default", "named"  # sub-run folders: the other classes / the named ones


def split_counts(counts: dict[str, int], classes: Sequence[str]) -> tuple[dict, dict]:
    """(target of the named classes, target of the rest): ``generate`` mappings, 0 elsewhere."""
    named = {c: (n if c in classes else 0) for c, n in counts.items()}
    rest = {c: (0 if c in classes else n) for c, n in counts.items()}
    return {"generate": named}, {"generate": rest}


def merge_filter_summaries(parts: dict[str, dict], source_of: dict[str, str]) -> dict:
    """One filter summary: each class's row from the part that drew it, totals recomputed."""
    first = next(iter(parts.values()))  # the settings (classifier, min_prob...) are shared
    per_class = {c: parts[source_of[c]]["per_class"][c] for c in first["per_class"]}
    return {
        **first,
        "drawn": sum(r["drawn"] for r in per_class.values()),
        "kept": sum(r["kept"] for r in per_class.values()),
        "short_classes": [c for c, r in per_class.items() if r["short"] > 0],
        "per_class": per_class,
    }


def run_sample_by_class(
    default: SampleConfig,
    named: SampleConfig,
    classes: Sequence[str],
    out: str | Path,
    progress: bool = False,
) -> Path:
    """Draw ``classes`` with ``named.generator`` and the rest with ``default.generator``.

    ``default`` carries the balance target, seed, sampler and filter of the whole set;
    ``named`` differs only in its generator (the pipeline builds both so). Returns the
    merged manifest's path, ``out/manifest.csv``.
    """
    from dermkit.synth.diffusion import load_generator

    out = Path(out)
    real = load_generator(default.generator, device="cpu").train_counts
    unknown = sorted(set(classes) - set(real))
    if unknown:
        raise ValueError(f"pixel_classes {unknown}: not classes of the generator ({list(real)})")
    target = load_target(default.balance)
    counts = plan_counts(real, target)
    targets = dict(zip((NAMED, DEFAULT), split_counts(counts, classes), strict=True))
    configs = {DEFAULT: default, NAMED: named}
    manifests, source_of = {}, {c: (NAMED if c in classes else DEFAULT) for c in counts}
    for part, cfg in configs.items():
        sub = out / part
        sub.mkdir(parents=True, exist_ok=True)
        balance = write_json_atomic(sub / "balance.json", targets[part])
        update = {"out_dir": str(sub / "run"), "balance": str(balance)}
        manifests[part] = run_sample(cfg.model_copy(update=update), progress=progress)
    drawn_named = [c for c in classes if counts[c] > 0]  # a class at its target draws none
    merged = read_manifest(
        write_merged(
            {**dict.fromkeys(drawn_named, manifests[NAMED]), DEFAULT: manifests[DEFAULT]},
            out / MANIFEST,
        )
    )
    plans = {p: json.loads((m.parent / "plan.json").read_text()) for p, m in manifests.items()}
    plan = {
        **plans[DEFAULT],
        "target": target,
        "generate": counts,
        "synthetic_counts": {
            c: plans[source_of[c]]["synthetic_counts"][c] for c in plans[DEFAULT]["generate"]
        },
    }
    plan["final_counts"] = {c: real[c] + plan["synthetic_counts"][c] for c in real}
    write_json_atomic(out / "plan.json", plan)
    generators = {DEFAULT: default.generator, NAMED: named.generator}
    write_json_atomic(out / "sources.json", {c: generators[p] for c, p in source_of.items()})
    if default.filter is not None:
        summaries = {p: json.loads((m.parent / FILTER).read_text()) for p, m in manifests.items()}
        write_json_atomic(out / FILTER, merge_filter_summaries(summaries, source_of))
    if default.grid_per_class:
        write_class_grids(merged, out, default.grid_per_class)
    described = f"{default.generator} (classes {', '.join(classes)}: {named.generator})"
    write_sample_report(default.model_copy(update={"generator": described}), out, merged)
    return out / MANIFEST
