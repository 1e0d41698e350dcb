"""The pipeline's ``sample`` stage: ``dermkit synth sample`` on the diffusion stage's generator.

Stage-only keys: ``balance`` (``uniform``, or per-class ``totals``/``shares`` as a mapping
or a JSON file; its content is hashed, not its path) and ``pixel_classes`` (classes drawn
by the ``pixel_diffusion`` stage's generator instead, ``synth/sources.py``). ``filter`` (a
mapping of ``FilterConfig`` fields) keeps only the images the ``baseline`` stage's
classifier, trained on the real train split, agrees with: the wiring makes ``baseline`` an
input. ``resolve`` is the pipeline's config resolver (``pipeline/dermae.py``), passed in
as ``teachers`` takes it, so this module does not import the pipeline that imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from dermkit.config import KEY_NEUTRAL_DEFAULT, ConfigError, Strict
from dermkit.core.files import write_json_atomic
from dermkit.pipeline.runner import METRICS, StageContext
from dermkit.synth.settings import SampleConfig


class SampleStageConfig(Strict):
    """``sample``: SampleConfig plus the balance target itself (hashed, not its file path)."""

    sample: SampleConfig
    balance: str | dict = "uniform"
    # The classes drawn by the pixel_diffusion stage's generator (synth/sources.py).
    pixel: SampleConfig | None = Field(None, json_schema_extra=KEY_NEUTRAL_DEFAULT)
    pixel_classes: list[str] = Field(default_factory=list, json_schema_extra=KEY_NEUTRAL_DEFAULT)


def build_sample(ctx: StageContext, resolve) -> SampleStageConfig:
    from dermkit.synth.sample import load_target, parse_target

    balance = ctx.knobs.get("balance", "uniform")
    if isinstance(balance, str) and balance != "uniform":
        balance = load_target(balance)  # the target's content is hashed, not its path
    parse_target(balance)  # errors now, not after the generator is trained
    wiring = {"generator": str(ctx.input("diffusion")), "balance": "uniform"}
    if ctx.overrides.get("filter") is not None:  # judged by the real-trained baseline
        wiring["filter"] = {"classifier": str(ctx.input("baseline"))}
    cfg = resolve(ctx, SampleConfig, "synth_sample", wiring)
    classes = list(ctx.knobs.get("pixel_classes") or [])
    if ctx.on("pixel_diffusion") != bool(classes):
        raise ConfigError(
            "stages.sample.pixel_classes names the classes the pixel_diffusion stage draws: "
            "set both or neither"
        )
    pixel = None
    if classes:  # the same settings, another generator
        pixel = cfg.model_copy(update={"generator": str(ctx.input("pixel_diffusion"))})
        trained = ctx.config("pixel_diffusion").train_classes
        if trained is not None and set(classes) - set(trained):
            raise ConfigError(
                f"stages.sample.pixel_classes {sorted(set(classes) - set(trained))}: not in "
                f"stages.pixel_diffusion.train_classes {trained}"
            )
    return SampleStageConfig(sample=cfg, balance=balance, pixel=pixel, pixel_classes=classes)


def run_sample_stage(cfg: SampleStageConfig, out: Path, resume: bool) -> None:
    from dermkit.synth.sample import run_sample

    sample = cfg.sample.model_copy(update={"out_dir": str(out)})
    if cfg.balance != "uniform":  # `dermkit synth sample --balance FILE`
        target = write_json_atomic(out / "balance.json", cfg.balance)
        sample = sample.model_copy(update={"balance": str(target)})
    if cfg.pixel is None:
        run_sample(sample, progress=False)
    else:
        from dermkit.synth.sources import run_sample_by_class

        pixel = cfg.pixel.model_copy(update={"balance": sample.balance})
        run_sample_by_class(sample, pixel, cfg.pixel_classes, out)


def sample_metric(path: Path) -> str:
    m = json.loads((path / METRICS).read_text())
    f = m.get("filter")
    if not f:
        return f"{m['synthetic_images']} synthetic images"
    short = [
        f"{c} {f['per_class'][c]['kept']}/{f['per_class'][c]['requested']}"
        for c in f["short_classes"]
    ]
    return f"{f['kept']} synthetic images kept of {f['drawn']} drawn by the filter" + (
        f"; short of the count: {', '.join(short)}" if short else ""
    )


def sample_table(path: Path) -> tuple[str, list[dict]] | None:
    from dermkit.synth.filtering import filter_rows

    f = json.loads((path / METRICS).read_text()).get("filter")
    return ("synthetic images drawn and kept per class", filter_rows(f)) if f else None
