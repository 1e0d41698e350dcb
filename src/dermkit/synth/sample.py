"""``dermkit synth sample``: a class-balanced synthetic set as PNGs plus a manifest.

Plan: ``plan_counts`` turns the real training counts and a target (``uniform``, per-class
totals or per-class shares) into images to generate per class, reaching the target
exactly (shares: the smallest total whose largest-remainder apportionment keeps every
real image). Generate: image ``i`` of class ``c`` starts from noise seeded by
(seed, c, i) and the samplers are deterministic, so an image is the same whichever batch
it is drawn in; PNGs are written atomically and existing ones are skipped, so an
interrupted run re-run finishes the same set without duplicates. The manifest lists the
planned images whose PNG exists and is rewritten (atomically) after every batch.

Manifest columns: the dermkit contract (image_id, path, label, lesion_id = image_id,
split = "", source = "synthetic:<run>", synthetic = True) plus generator_run, seed,
guidance, sampler, steps. With ``filter`` (``synth/filtering.py``) the sampler draws in
rounds until a real-trained classifier keeps the planned count per class, and the
manifest lists every drawn image with ``kept``, ``reject_reason`` and ``requested_prob``.

``guidance`` is the scale of the row's class: ``sampler.guidance`` may be set per class
(``sample.json`` then records every class's scale). With ``from_real`` (image-guided
variations, ``synth/variations.py``) two columns follow: source_image_id (the real train
image an image started from) and strength.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermkit.config import ConfigError
from dermkit.data.manifest import new_manifest, write_manifest
from dermkit.runs import RunDir
from dermkit.synth.images import save_grid, write_png
from dermkit.synth.settings import SampleConfig
from dermkit.synth.training import write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SETTINGS = "sample.json"
DRAWN = "drawn.csv"  # a filtered run's manifest while it draws, before the verdicts
FILTER = "filter.json"  # a filtered run's per-class drawn / kept summary


# ----------------------------------------------------------------------------- planning


def _largest_remainder(total: int, shares: dict[str, Fraction]) -> dict[str, int]:
    """Integer counts summing to ``total`` with |count_c - total * share_c| < 1 (Hamilton)."""
    exact = {c: total * s for c, s in shares.items()}
    counts = {c: math.floor(v) for c, v in exact.items()}
    left = total - sum(counts.values())
    # Largest fractional parts first; ties broken by class order (stable sort).
    for c in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[:left]:
        counts[c] += 1
    return counts


def parse_target(target: str | Mapping) -> tuple[str, dict]:
    """("uniform", {}), ("totals" | "generate", {class: int}) or ("shares", {class: Fraction}).

    A mapping may be ``{"totals": {...}}``, ``{"shares": {...}}``, ``{"generate": {...}}``
    (images to generate per class whatever the real counts: e.g. an all-class set for
    TSTR), or flat: all-integer values are totals, otherwise they are shares that must sum
    to 1.
    """
    if isinstance(target, str):
        if target != "uniform":
            raise ConfigError(f"balance: expected 'uniform' or a mapping, got {target!r}")
        return "uniform", {}
    target = dict(target)
    if set(target) in ({"totals"}, {"shares"}, {"generate"}):
        kind, values = next(iter(target.items()))
    else:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in target.values())
        kind, values = ("totals" if ints else "shares"), target
    if not isinstance(values, Mapping) or not values:
        raise ConfigError(f"balance {kind}: expected a non-empty mapping class -> value")
    bad = {c: v for c, v in values.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad or any(v < 0 for v in values.values()):
        raise ConfigError(f"balance {kind}: values must be numbers >= 0, got {values}")
    if kind in ("totals", "generate"):
        if any(not float(v).is_integer() for v in values.values()):
            raise ConfigError(f"balance {kind} must be whole numbers, got {values}")
        return kind, {c: int(v) for c, v in values.items()}
    shares = {c: Fraction(v).limit_denominator(10**9) for c, v in values.items()}
    total = sum(shares.values())
    if abs(float(total) - 1) > 1e-6:
        raise ConfigError(f"balance shares must sum to 1, got {float(total):.6f}")
    return kind, {c: s / total for c, s in shares.items()}


def target_totals(real_counts: Mapping[str, int], target: str | Mapping) -> dict[str, int]:
    """Final per-class totals (real + synthetic) that reach ``target`` exactly.

    uniform: every class up to the largest class count. totals: as given (a class left
    out keeps its real count). generate: the real count + the images asked for (none for
    a class left out). shares: the smallest overall total T whose largest-remainder
    apportionment of T gives every class at least its real count.
    """
    real = {c: int(n) for c, n in real_counts.items()}
    if any(n < 0 for n in real.values()):
        raise ConfigError(f"real counts must be >= 0, got {real}")
    kind, values = parse_target(target)
    unknown = sorted(set(values) - set(real))
    if unknown:
        raise ConfigError(
            f"balance names classes {unknown} the generator does not know: {list(real)}"
        )
    if kind == "uniform":
        top = max(real.values(), default=0)
        return dict.fromkeys(real, top)
    if kind == "generate":
        return {c: n + values.get(c, 0) for c, n in real.items()}
    if kind == "totals":
        totals = {c: values.get(c, n) for c, n in real.items()}
        short = {c: (totals[c], real[c]) for c in real if totals[c] < real[c]}
        if short:
            raise ConfigError(
                "balance totals below the real counts (images cannot be removed): "
                + ", ".join(f"{c}: {t} < {r}" for c, (t, r) in short.items())
            )
        return totals
    shares = {c: values.get(c, Fraction(0)) for c in real}
    impossible = [c for c in real if shares[c] == 0 and real[c] > 0]
    if impossible:
        raise ConfigError(f"balance shares are 0 for classes with real images: {impossible}")
    # count_c < T * s_c + 1 must reach real_c, so T > (real_c - 1) / s_c; and T >= sum(real).
    # At T = max ceil(real_c / s_c) every floor already reaches real_c, so the loop ends.
    positive = {c: s for c, s in shares.items() if s > 0}
    low = max(
        [sum(real.values())] + [math.floor((real[c] - 1) / s) + 1 for c, s in positive.items()]
    )
    high = max([low] + [math.ceil(real[c] / s) for c, s in positive.items()])
    for total in range(low, high + 1):
        counts = _largest_remainder(total, shares)
        if all(counts[c] >= real[c] for c in real):
            return counts
    raise AssertionError("unreachable: the upper bound always satisfies every class")


def plan_counts(real_counts: Mapping[str, int], target: str | Mapping) -> dict[str, int]:
    """Synthetic images to generate per class so that real + synthetic reaches ``target``.

    Args:
        real_counts: class -> real training images (the class universe, in order).
        target: "uniform", or a mapping of per-class totals (ints) or shares (sum 1), or
            ``{"totals": {...}}`` / ``{"shares": {...}}``.
    Returns:
        class -> images to generate (>= 0), in the order of ``real_counts``.
    """
    totals = target_totals(real_counts, target)
    return {c: totals[c] - int(n) for c, n in real_counts.items()}


def load_target(spec: str) -> str | dict:
    """``uniform`` or the content of a JSON target file."""
    if spec == "uniform":
        return spec
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"balance target file not found: {path} (or use 'uniform')")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e


# ----------------------------------------------------------------------------- generation


def image_seed(seed: int, label: str, index: int) -> int:
    """Seed of image ``index`` of class ``label``: independent of batches and other classes."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(label.encode()), index]).generate_state(1)[0]
    )


@dataclass(frozen=True)
class Job:
    label: str
    index: int
    seed: int
    image_id: str
    path: Path
    source_image: str | None = None  # from_real: the train image it starts from


def plan_jobs(counts: Mapping[str, int], out_dir: Path, seed: int, tag: str) -> list[Job]:
    """Every planned image, class by class; ids and paths are a function of the settings."""
    jobs = []
    for label, n in counts.items():
        for i in range(n):
            image_id = f"syn-{tag}-{label}-{i:06d}"
            path = out_dir / "images" / label / f"{image_id}.png"
            jobs.append(Job(label, i, image_seed(seed, label, i), image_id, path))
    return jobs


def _settings(generator, cfg: SampleConfig) -> dict:
    s = cfg.sampler
    return {
        "generator": str(generator.run),
        "seed": cfg.seed,
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": _guidance_setting(generator, s.guidance),
        "precision": _precision(generator, cfg),
        # only when set: the settings name the folder's images (their tag)
        **({} if cfg.from_real is None else {"from_real": cfg.from_real}),
    }


def _guidance_setting(generator, guidance: float | Mapping[str, float]) -> float | dict:
    """One scale, or every class's scale ({class: scale}) when set per class."""
    from dermkit.synth.diffusion import class_guidance

    if not isinstance(guidance, Mapping):
        return float(guidance)
    return class_guidance(guidance, generator.classes)


def _precision(generator, cfg: SampleConfig) -> str:
    """The resolved UNet autocast precision of this sampling run ("bf16", "fp16", "no")."""
    from dermkit.train.engine import resolve_precision

    return resolve_precision(cfg.precision, torch.device(generator.device))


def _check_settings(path: Path, settings: dict) -> None:
    """A folder holds one setting's images: refuse to mix (names the differing fields)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise ConfigError(
            f"{path.parent} holds samples made with other settings "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            + "; choose another --out"
        )


def _row_guidance(guidance: float | dict, label: str) -> float:
    return guidance[label] if isinstance(guidance, dict) else guidance


def _variation_columns(job: Job, settings: dict) -> dict:
    if "from_real" not in settings:
        return {}
    return {"source_image_id": job.source_image, "strength": settings["from_real"]}


def manifest_rows(jobs: list[Job], settings: dict, source: str) -> pd.DataFrame:
    """The manifest of the planned images whose PNG exists, in plan order."""
    rows = [
        {
            "image_id": j.image_id,
            "path": str(j.path.resolve()),
            "label": j.label,
            "lesion_id": j.image_id,  # each synthetic image is its own lesion
            "split": "",
            "source": source,
            "synthetic": True,
            "generator_run": settings["generator"],
            "seed": j.seed,
            "guidance": _row_guidance(settings["guidance"], j.label),
            "sampler": settings["sampler"],
            "steps": settings["steps"],
            **_variation_columns(j, settings),
        }
        for j in jobs
        if j.path.exists()
    ]
    columns = ["image_id", "path", "label", "lesion_id", "split", "source", "synthetic"]
    extra = ["generator_run", "seed", "guidance", "sampler", "steps"]
    extra += ["source_image_id", "strength"] if "from_real" in settings else []
    return new_manifest(rows if rows else pd.DataFrame(columns=columns + extra))


def generate(
    generator,
    cfg: SampleConfig,
    counts: Mapping[str, int],
    out_dir: Path,
    progress: bool = True,
    manifest_name: str = MANIFEST,
) -> pd.DataFrame:
    """Generate the planned images missing from ``out_dir``; returns the final manifest
    (also written to ``out_dir / manifest_name``)."""
    from dermkit.synth.diffusion import row_guidance

    out_dir = Path(out_dir)
    settings = _settings(generator, cfg)
    _check_settings(out_dir / SETTINGS, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings, out_dir / SETTINGS)
    tag = hashlib.sha1(
        json.dumps({**settings, "generator": generator.run.name}, sort_keys=True).encode()
    ).hexdigest()[:8]
    source = f"synthetic:{generator.run.name}"
    jobs = plan_jobs(counts, out_dir, cfg.seed, tag)
    sources = None
    if cfg.from_real is not None:
        from dermkit.synth.diffusion import generator_train_split
        from dermkit.synth.variations import RealSources

        train_split = generator_train_split(generator.run)
        sources = RealSources(*train_split, generator.classes, cfg.seed)
        jobs = [replace(j, source_image=sources.source_of(j.label, j.index)) for j in jobs]
    todo = [j for j in jobs if not j.path.exists()]
    for label in counts:
        (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
    s = cfg.sampler
    bar = None
    if progress and todo:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task("sampling", total=len(jobs), completed=len(jobs) - len(todo))
    try:
        for i in range(0, len(todo), s.batch_size):
            batch = todo[i : i + s.batch_size]
            noise = torch.stack(
                [
                    torch.randn(
                        generator.latent_shape, generator=torch.Generator().manual_seed(j.seed)
                    )
                    for j in batch
                ]
            )
            names = [j.label for j in batch]
            guidance = row_guidance(s.guidance, generator.classes, names)
            start = {}  # from_real: the latents to start from and the strength
            if sources is not None:
                init = sources.latents(generator.codec, [j.source_image for j in batch])
                start = {"init": init, "strength": cfg.from_real}
            images = generator.sample(
                noise, generator.labels_for(names), guidance, s.sampler, s.steps,
                settings["precision"], **start,
            )  # fmt: skip
            for j, image in zip(batch, images.permute(0, 2, 3, 1).numpy()):
                write_png(image, j.path)
            write_manifest(manifest_rows(jobs, settings, source), out_dir / manifest_name)
            if bar is not None:
                bar.update(task, advance=len(batch))
    finally:
        if bar is not None:
            bar.stop()
    manifest = manifest_rows(jobs, settings, source)
    write_manifest(manifest, out_dir / manifest_name)
    return manifest


def generate_filtered(
    generator, cfg: SampleConfig, counts: Mapping[str, int], out_dir: Path, progress: bool = True
) -> pd.DataFrame:
    """Draw in rounds until ``cfg.filter`` keeps ``counts`` images per class (or its draw
    cap is hit: ``synth/filtering.py``); returns the kept rows.

    The manifest lists every drawn image, ``kept`` marking those for training; the rounds'
    unjudged manifest is ``drawn.csv`` until then, and ``filter.json`` has the summary.
    """
    from dermkit.synth.filtering import filter_in_rounds

    out_dir = Path(out_dir)
    rows, summary = filter_in_rounds(
        lambda n: generate(generator, cfg, n, out_dir, progress, manifest_name=DRAWN),
        counts,
        cfg.filter,
        generator.run,
    )
    write_manifest(rows, out_dir / MANIFEST)
    write_json(summary, out_dir / FILTER)
    (out_dir / DRAWN).unlink(missing_ok=True)
    return rows[rows["kept"]].reset_index(drop=True)


def write_class_grids(manifest: pd.DataFrame, out_dir: Path, per_class: int) -> list[Path]:
    """``grid_<class>.png``: the first ``per_class`` images of each class."""
    from PIL import Image

    paths = []
    for label, part in manifest.groupby("label", sort=False):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in part["path"][:per_class]]
        if images:
            paths.append(save_grid(np.stack(images), out_dir / f"grid_{label}.png", nrow=8))
    return paths


def run_sample(cfg: SampleConfig, progress: bool = True) -> Path:
    """Plan, generate (resumably), write the manifest and grids; returns the manifest path."""
    from dermkit.synth.diffusion import load_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = load_generator(cfg.generator, device=device)
    scales = _guidance_setting(generator, cfg.sampler.guidance)
    blind = [c for c in generator.classes if _row_guidance(scales, c) == 0]
    if generator.unconditional or blind:
        log.warning(
            "%s: the images of %s ignore their class (unconditional generator or guidance "
            "0); their labels are only the requested ones",
            cfg.generator,
            "every class" if generator.unconditional else blind,
        )
    target = load_target(cfg.balance)
    counts = plan_counts(generator.train_counts, target)
    trained = generator.trained_classes  # None: every class
    untrained = [c for c, n in counts.items() if n and trained is not None and c not in trained]
    if untrained:
        raise ConfigError(
            f"{cfg.generator} was trained on {generator.trained_classes} only (train_classes); "
            f"the balance target asks it for {untrained}"
        )
    with RunDir(cfg.out_dir, cfg, "synth_sample") as run:
        draw = generate if cfg.filter is None else generate_filtered
        manifest = draw(generator, cfg, counts, run.path, progress=progress)
        real = generator.train_counts
        made = manifest["label"].value_counts()
        write_json(
            {
                "target": target,
                "real_train_counts": real,
                "generate": counts,
                "synthetic_counts": {c: int(made.get(c, 0)) for c in real},
                "final_counts": {c: real[c] + int(made.get(c, 0)) for c in real},
                "unconditional_generator": generator.unconditional,
            },
            run / "plan.json",
        )
        if cfg.grid_per_class:
            write_class_grids(manifest, run.path, cfg.grid_per_class)
        write_sample_report(cfg, run.path, manifest)
        return run / MANIFEST


def write_sample_report(cfg: SampleConfig, out: Path, manifest: pd.DataFrame) -> Path:
    """``metrics.json`` (images per class and the plan) and ``report.html`` of a sample run."""
    from dermkit.eval.report import HtmlReport

    plan = json.loads((out / "plan.json").read_text())
    filtered = json.loads((out / FILTER).read_text()) if cfg.filter is not None else None
    metrics = {
        "synthetic_images": len(manifest),
        "per_class": manifest["label"].value_counts().to_dict(),
        **plan,
        "filter": filtered,
    }
    write_json(metrics, out / "metrics.json")
    report = HtmlReport("dermkit synth sample: the class-balanced synthetic set")
    report.add_paragraph(
        f"{len(manifest)} images from {cfg.generator} ({cfg.sampler.sampler}, "
        f"{cfg.sampler.steps} steps, guidance {cfg.sampler.guidance}); "
        f"target {json.dumps(plan['target'])}. Manifest: {MANIFEST}."
    )
    real = plan["real_train_counts"]
    report.add_table(
        [
            {
                "class": c,
                "real train": real[c],
                "synthetic": plan["synthetic_counts"][c],
                "total": plan["final_counts"][c],
            }
            for c in real
        ],
        caption="Training images per class",
    )
    if filtered is not None:
        from dermkit.synth.filtering import filter_rows

        report.add_table(
            filter_rows(filtered),
            caption=f"Filter: kept when {filtered['classifier']} ({filtered['classifier_kind']}, "
            "trained on real images) predicts the requested class and the image is no "
            f"near-copy of a training image; short: {filtered['short_classes'] or 'none'}",
        )
    for grid in sorted(out.glob("grid_*.png")):
        report.add_figure(grid, f"{grid.stem.removeprefix('grid_')}: synthetic samples")
    return report.write(out / "report.html")
