"""The DerMAE pipeline: its file, its stages and what feeds what.

::

    data ─┬─ baseline ─────────────────────┬────────────────────────────────────┐
          │                                │ (filter)                           │
          ├─ autoencoder ─ diffusion ─ sample ┐                                 │
          ├─ [pixel_diffusion] ───────┘       │                                 │
          └───────────────────────────────────┴─ pretrain ─ finetune ─┐         │
                          [teachers: several fine-tunes, one ensemble] ┴─ distill ─ exits ─ export
                                                                          └── explain  evaluate

A stage is named after the ``dermkit`` command it runs, and calls the function that command
calls, so its folder holds what the command writes: ``finetune`` is ``dermkit finetune``,
``autoencoder``/``diffusion``/``sample`` are ``dermkit synth ...``, ``pretrain`` is
``dermkit pretrain mae|vae``, ``exits`` is ``dermkit exits train`` + ``calibrate`` +
``bench``, ``teachers`` (off unless the file names it) is several ``dermkit finetune``
runs combined as ``dermkit ensemble``, the teacher ``distill`` then learns from
(``pipeline/teachers.py``), ``export`` is ``dermkit export`` (+ ``dermkit exits export`` of
the best head), ``explain`` is ``dermkit explain all``.

Each stage's config is its preset (``configs/<preset>/<section>.yaml``) < the pipeline's
seed < the pipeline file's settings for the stage < the wiring to its inputs (their
folders), all merged as mappings. The pipeline file's ``data`` section is a
:class:`~dermkit.config.DataConfig` (plus ``phantoms``): the data stage splits it once, and
every other stage's ``data`` gets the settings the file names, the split and the cache.
The wiring also keeps the chain consistent where two stages must agree: the fine-tuned
model is the pretrained encoder's architecture at its resolution, and synthetic rows are
used (``synthetic_ratio`` > 0) only while ``sample`` is on; with synthesis off,
pretraining and fine-tuning read real images only.

Stage-only keys of a pipeline entry (not config fields): ``finetune.recipe`` and
``distill.recipe`` (a ``recipes/*.yaml`` file, the command's ``--config``, merged over the
preset and under the entry's own settings), ``pretrain.method`` (mae or vae),
``distill.teacher`` (a run or ``dermkit ensemble`` folder from outside the pipeline instead
of the finetune stage; its content is hashed into the key) and ``sample.balance``
(``uniform``, or per-class ``totals``/``shares`` as a mapping or a JSON file) and
``sample.pixel_classes`` (drawn by the ``pixel_diffusion`` stage, off unless the file names
it: a pixel-space UNet for the classes the autoencoder loses). ``sample.filter`` (a mapping
of ``FilterConfig`` fields, ``{}`` for the defaults) keeps only the synthetic images that
the baseline stage's classifier, trained on the real train split, agrees with: the wiring
makes ``baseline`` an input of ``sample`` (``pipeline/sample_stage.py``). ``export``,
``explain`` and ``evaluate`` take the fields of their small configs below.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from dermkit.config import (
    KEY_NEUTRAL_DEFAULT,
    PRESETS,
    ConfigError,
    Strict,
    _read_yaml,
    load_config,
    parse_override,
)
from dermkit.core.mappings import expand_dotted, merge, nested
from dermkit.data.settings import DataConfig
from dermkit.eval.data_folder import PHANTOM_GRID
from dermkit.eval.report import format_estimate
from dermkit.exits.settings import ExitsRunConfig
from dermkit.pipeline.product import ExportStageConfig, export_metric, run_export
from dermkit.pipeline.report import write_summary_report
from dermkit.pipeline.runner import (
    METRICS,
    FigureSpec,
    PipelineResult,
    PipelineSpec,
    Stage,
    StageContext,
    plan_pipeline,
    plan_status,
    run_pipeline,
)
from dermkit.pipeline.sample_stage import (
    build_sample,
    run_sample_stage,
    sample_metric,
    sample_table,
)
from dermkit.pipeline.teachers import (
    TeachersStageConfig,
    build_teachers,
    run_teachers,
    teachers_metric,
)
from dermkit.runs import RunDir
from dermkit.ssl.settings import MaePretrainRunConfig, VaePretrainRunConfig
from dermkit.synth.settings import AutoencoderRunConfig, DiffusionRunConfig
from dermkit.train.settings import BaselineRunConfig, DistillRunConfig, FinetuneRunConfig

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).parents[1] / "pipelines"
# Old stage names -> the command's name they took (a pipeline file naming one is refused).
RENAMED = {"teacher": "finetune"}


# ----------------------------------------------------------------------------- pipeline file


class PhantomsSource(Strict):
    """Generate a phantom dataset inside the data stage's folder (no download)."""

    n_lesions: int = Field(150, ge=14)
    seed: int = 0
    image_size: tuple[int, int] = Field((160, 120), description="(width, height) in px")
    class_weights: dict[str, float] | None = Field(
        None, description="class -> unnormalised share of lesions; null: HAM10000-like"
    )


class PipelineData(DataConfig):
    """The data source, how it is split and read: generated phantoms or a dataset folder.

    Every :class:`DataConfig` field; those the file sets reach every stage's ``data``.
    ``cache_dir`` null: ``<out_dir>/cache`` for phantoms, else the default.
    """

    phantoms: PhantomsSource | None = None
    path: str | None = Field(None, description="dataset root (HAM10000, ISIC or folder layout)")
    image_size: int | None = Field(
        None, ge=16, le=1024, description="null: each stage's preset (data stage: finetune's)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> PipelineData:
        if (self.phantoms is None) == (self.path is None):
            raise ValueError("data needs exactly one of 'phantoms' and 'path'")
        return self


class PipelineConfig(PipelineSpec):
    """A DerMAE pipeline file: the runner's fields, the preset (scale) and the data."""

    preset: Literal["tiny", "cpu", "gpu"] = "tiny"
    data: PipelineData


def resolve_pipeline_path(spec: str | Path) -> Path:
    """A pipeline file path, or a shipped pipeline's name (``dermae-tiny``)."""
    path = Path(spec)
    if path.is_file():
        return path
    for candidate in (PIPELINE_DIR / path.name, PIPELINE_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"pipeline file {spec} not found (shipped pipelines: {shipped})")


def load_pipeline(spec: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a pipeline file (or shipped name) and apply command-line ``key=value`` overrides.

    Overrides address the file's structure, e.g. ``seed=1``, ``out_dir=runs/x`` or
    ``stages.distill.distill.temperature=2``; ``stages.synth=false`` switches stages off.
    """
    path = resolve_pipeline_path(spec)
    data = _read_yaml(path)
    for item in overrides:
        data = merge(data, nested(*parse_override(item)))
    for old, new in RENAMED.items():
        if old in (data.get("stages") or {}):
            raise ConfigError(
                f"{path}: stage '{old}' is now called '{new}', after the `dermkit {new}` "
                f"command it runs: rename stages.{old} to stages.{new}"
            )
    try:
        cfg = _validate(PipelineConfig, {**data, "source": str(path)}, "pipeline")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if cfg.preset not in PRESETS:  # pragma: no cover - Literal already checks
        raise ConfigError(f"{path}: unknown preset {cfg.preset}")
    return cfg


def run(
    cfg: PipelineConfig,
    targets: Sequence[str] | None = None,
    progress: bool = True,
    summary: bool = True,
) -> PipelineResult:
    """Run the DerMAE stages ``targets`` need (all when None); ``summary``: write
    ``<out_dir>/report.html`` (:func:`dermkit.pipeline.report.write_summary_report`)."""
    return run_pipeline(
        cfg, DERMAE_STAGES, targets, progress, write_summary_report if summary else None
    )


def plan(cfg: PipelineConfig) -> dict:
    """Every enabled stage's resolved config, key and folder (nothing runs)."""
    return plan_pipeline(cfg, DERMAE_STAGES)


def status(cfg: PipelineConfig, targets: Sequence[str] | None = None) -> list[dict]:
    """What :func:`run` would do: one row per stage (``runner.plan_status``)."""
    return plan_status(cfg, DERMAE_STAGES, targets)


# ----------------------------------------------------------------------------- helpers


def _metrics(path: Path) -> dict:
    return json.loads((path / METRICS).read_text())


def _resolve(ctx: StageContext, schema, section: str, wiring: dict):
    """preset < the stage's ``recipe`` file < the pipeline's seed < the file's settings <
    wiring, merged as mappings and validated once (the preset as ``load_config`` reads it:
    the fields its YAML sets). The recipe's content, not its path, enters the stage key."""
    data = load_config(schema, section, ctx.pipeline.preset).model_dump(exclude_unset=True)
    layers = [{"seed": ctx.seed}, ctx.overrides, wiring]
    if ctx.knobs.get("recipe"):
        layers.insert(0, _read_recipe(ctx, ctx.knobs["recipe"]))
    for update in layers:
        data = merge(data, expand_dotted(update))
    return _validate(schema, data, section)


def _read_recipe(ctx: StageContext, path: str) -> dict:
    """A ``recipes/*.yaml`` file (the ``--config`` of the stage's command) as a mapping."""
    if not Path(path).is_file():
        raise ConfigError(f"stages.{ctx.stage}.recipe: no file {path}")
    return _read_yaml(Path(path))


def _validate(schema, data: dict, what: str):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {what} settings:\n  " + "\n  ".join(lines)) from e


def _out(cfg, out: Path):
    """The config with its ``out_dir`` set to the stage folder."""
    return cfg.model_copy(update={"out_dir": str(out)})


# ----------------------------------------------------------------------------- data


class DataStageConfig(PipelineData):
    """``data``: the pipeline's data section, split once (phantoms drawn in the folder)."""

    fingerprint: str | None = Field(None, description="sha256 of the dataset and split file")


def cache_dir(ctx: StageContext) -> str | None:
    """The image cache: the pipeline's, ``<out_dir>/cache`` for phantoms, else the default."""
    d = ctx.pipeline.data
    if d.cache_dir:
        return d.cache_dir
    return str(Path(ctx.pipeline.out_dir) / "cache") if d.phantoms is not None else None


def _build_data(ctx: StageContext) -> DataStageConfig:
    from dermkit.data.prepare import dataset_fingerprint

    d: PipelineData = ctx.pipeline.data
    base = d.model_dump() | {
        "fingerprint": dataset_fingerprint(d.path, d.split_file) if d.path else None,
        "cache_dir": cache_dir(ctx),
    }
    if "split_seed" not in d.model_fields_set:
        base["split_seed"] = ctx.seed
    if d.image_size is None:  # the pHash check at the classifier's size
        preset = ctx.pipeline.preset
        base["image_size"] = load_config(FinetuneRunConfig, "finetune", preset).data.image_size
    return _validate(DataStageConfig, merge(base, ctx.overrides), "data stage")


def data_root(cfg: DataStageConfig, folder: Path) -> str:
    return cfg.path if cfg.path else str(folder / "phantoms")


def _data_wiring(ctx: StageContext) -> dict:
    """The ``data`` section every stage gets: what the file sets, the one split, the cache."""
    folder = ctx.input("data")
    cfg: DataStageConfig = ctx.config("data")
    named = ctx.pipeline.data.model_dump(
        exclude_unset=True, exclude={"phantoms", "split_seed", "train", "val", "test"}
    )
    if named.get("image_size") is None:
        named.pop("image_size", None)  # null: each stage's own
    return {
        "data": named
        | {
            "path": data_root(cfg, folder),
            "layout": cfg.layout,
            "split_file": str(folder / "split.csv"),
            "near_duplicate_distance": cfg.near_duplicate_distance,
            "cache_dir": cfg.cache_dir,
        }
    }


def _run_data(cfg: DataStageConfig, out: Path, resume: bool) -> Path:
    from dermkit.data.phantoms import generate_phantoms
    from dermkit.eval.data_folder import write_data_folder

    root = Path(data_root(cfg, out))
    if cfg.phantoms is not None and not (root / "metadata.csv").exists():
        p = cfg.phantoms
        generate_phantoms(
            root, p.n_lesions, image_size=p.image_size, seed=p.seed, class_weights=p.class_weights
        )
    with RunDir(out, cfg, "data") as run:
        fields = cfg.model_dump(exclude={"phantoms", "fingerprint"}) | {"path": str(root)}
        data_cfg = DataConfig.model_validate(fields)
        return write_data_folder(data_cfg, run.path, phantoms=cfg.phantoms is not None)


def _metric_data(path: Path) -> str:
    m = _metrics(path)
    return f"{m['images']} images, {m['lesions']} lesions, {len(m['classes'])} classes"


# ----------------------------------------------------------------------------- classifiers


def _metric_classifier(path: Path) -> str:
    m = _metrics(path)["metrics"]
    return f"test macro-F1 {format_estimate(m['macro_f1'])}"


def _build_baseline(ctx: StageContext) -> BaselineRunConfig:
    return _resolve(ctx, BaselineRunConfig, "baseline", _data_wiring(ctx))


def _run_baseline(cfg: BaselineRunConfig, out: Path, resume: bool) -> None:
    from dermkit.train.baseline import run_baseline

    run_baseline(_out(cfg, out))


def _synthetic_wiring(ctx: StageContext, cfg):
    """Use the sampled set when ``sample`` is on and the ratio > 0; else real images only.

    Sets ``cfg``'s synthetic fields in place and returns it.
    """
    if cfg.synthetic_ratio > 0 and ctx.on("sample"):
        cfg.synthetic_manifest = str(ctx.input("sample") / "manifest.csv")
    else:
        cfg.synthetic_ratio = 0.0
        cfg.synthetic_manifest = None
    return cfg


def _build_finetune(ctx: StageContext) -> FinetuneRunConfig:
    wiring = _data_wiring(ctx)
    if ctx.on("pretrain"):  # fine-tune the pretrained encoder, at its resolution
        pre = ctx.config("pretrain")
        wiring["model"] = {"name": pre.model.name, "weights": str(ctx.input("pretrain"))}
        wiring["data"]["image_size"] = pre.data.image_size
    return _synthetic_wiring(ctx, _resolve(ctx, FinetuneRunConfig, "finetune", wiring))


def _run_classifier(cfg: FinetuneRunConfig, out: Path, resume: bool) -> None:
    """``dermkit finetune`` or, for a distill config, ``dermkit distill``."""
    from dermkit.train.distill import run_distill
    from dermkit.train.finetune import run_finetune

    if isinstance(cfg, DistillStageConfig):  # the run's config.yaml holds run fields only
        cfg = DistillRunConfig.model_validate(cfg.model_dump(exclude={"teacher_content"}))
    train = run_distill if isinstance(cfg, DistillRunConfig) else run_finetune
    train(_out(cfg, out), resume, progress=False)


class DistillStageConfig(DistillRunConfig):
    """``distill``: :class:`DistillRunConfig` plus, for a teacher from outside the pipeline
    (the ``teacher`` knob), that teacher's content hash, so the stage key follows what the
    teacher is, not only where it lies. Not part of the run: stripped before it starts."""

    teacher_content: str | None = Field(
        None,
        description="teacher_content_hash of a teacher named by the knob",
        json_schema_extra=KEY_NEUTRAL_DEFAULT,
    )


def _build_distill(ctx: StageContext) -> DistillStageConfig:
    """The student of the finetune stage, or of the ``teacher`` knob's folder: a run or a
    ``dermkit ensemble`` folder made outside the pipeline (an ablation's ensemble row, say).

    With the knob the finetune stage is not an input: nothing trains a teacher that is not
    used. A knob folder that does not exist yet (an ablation plans rows before the rows
    they read have run) is keyed as ``missing``: the plan shows the stage to do.
    """
    from dermkit.train.teacher import teacher_content_hash

    teacher = ctx.knobs.get("teacher")
    content = None
    if teacher is None:  # the teachers stage's ensemble when it is on, else the fine-tune
        teacher = str(ctx.input("teachers" if ctx.on("teachers") else "finetune"))
    elif not Path(teacher).is_dir():
        content = "missing"
    else:
        content = teacher_content_hash(teacher)
    wiring = _data_wiring(ctx) | {"teacher": str(teacher)}
    cfg = _synthetic_wiring(ctx, _resolve(ctx, DistillRunConfig, "distill", wiring))
    return DistillStageConfig.model_validate(cfg.model_dump() | {"teacher_content": content})


def _build_teachers(ctx: StageContext) -> TeachersStageConfig:
    return build_teachers(ctx, _resolve, _data_wiring, _synthetic_wiring)


def deployed_model(ctx: StageContext) -> Path:
    """The classifier that ships: the student when distillation is on, else the fine-tune."""
    return ctx.input("distill") if ctx.on("distill") else ctx.input("finetune")


# ----------------------------------------------------------------------------- synth


def _build_autoencoder(ctx: StageContext) -> AutoencoderRunConfig:
    return _resolve(ctx, AutoencoderRunConfig, "synth_autoencoder", _data_wiring(ctx))


def _run_autoencoder(cfg: AutoencoderRunConfig, out: Path, resume: bool) -> None:
    from dermkit.synth.autoencoder import train_autoencoder

    train_autoencoder(_out(cfg, out), resume, False)


def _metric_autoencoder(path: Path) -> str:
    v = _metrics(path)["val"]
    return f"val PSNR {v['psnr']:.1f} dB, SSIM {v['ssim']:.3f}"


def _build_diffusion(ctx: StageContext) -> DiffusionRunConfig:
    wiring = _data_wiring(ctx)
    # Without the autoencoder stage the UNet runs in pixel space.
    wiring["autoencoder"] = str(ctx.input("autoencoder")) if ctx.on("autoencoder") else None
    return _resolve(ctx, DiffusionRunConfig, "synth_diffusion", wiring)


def _build_sample(ctx: StageContext):
    return build_sample(ctx, _resolve)


def _build_pixel_diffusion(ctx: StageContext) -> DiffusionRunConfig:
    # A second UNet, in pixel space, for the classes the codec loses (sample.pixel_classes).
    wiring = {**_data_wiring(ctx), "autoencoder": None}
    return _resolve(ctx, DiffusionRunConfig, "synth_diffusion", wiring)


def _run_diffusion(cfg: DiffusionRunConfig, out: Path, resume: bool) -> None:
    from dermkit.synth.diffusion import train_diffusion

    train_diffusion(_out(cfg, out), resume, False)


def _metric_diffusion(path: Path) -> str:
    m = _metrics(path)
    return f"{m['steps']} steps, final loss {m['final_train_loss']:.4f}"


# ----------------------------------------------------------------------------- pretrain


def _build_pretrain(ctx: StageContext) -> MaePretrainRunConfig | VaePretrainRunConfig:
    method = ctx.knobs.get("method", "mae")
    if method not in ("mae", "vae"):
        raise ConfigError(f"pretrain.method must be mae or vae, got {method!r}")
    schema = MaePretrainRunConfig if method == "mae" else VaePretrainRunConfig
    return _synthetic_wiring(ctx, _resolve(ctx, schema, f"pretrain_{method}", _data_wiring(ctx)))


def _run_pretrain(cfg, out: Path, resume: bool) -> None:
    from dermkit.ssl.pretrain import run_pretrain_mae, run_pretrain_vae

    pretrain = run_pretrain_mae if isinstance(cfg, MaePretrainRunConfig) else run_pretrain_vae
    pretrain(_out(cfg, out), resume, progress=False)


def _metric_pretrain(path: Path) -> str:
    probe = _metrics(path).get("probe") or {}
    return f"linear probe val macro-F1 {probe.get('linear_val_macro_f1', float('nan')):.3f}"


# ----------------------------------------------------------------------------- exits


def _build_exits(ctx: StageContext) -> ExitsRunConfig:
    wiring = {"base_run": str(deployed_model(ctx)), "cache_dir": cache_dir(ctx)}
    return _resolve(ctx, ExitsRunConfig, "exits", wiring)


def _run_exits(cfg: ExitsRunConfig, out: Path, resume: bool) -> None:
    from dermkit.exits.bench import run_exits_bench
    from dermkit.exits.calibrate import run_exits_calibrate
    from dermkit.exits.train import run_exits_train

    run_exits_train(_out(cfg, out), progress=False, resume=resume)
    run_exits_calibrate(out)
    run_exits_bench(out)


def _metric_exits(path: Path) -> str:
    from dermkit.exits.bench import best_head

    heads = _metrics(path)["heads"]
    head = best_head(path)
    if head is None or head not in heads:
        return "no calibrated head"
    h = heads[head]
    return (
        f"{head}: test macro-F1 {format_estimate(h['test_metrics']['macro_f1'])} at "
        f"{h['gflops_fraction']:.0%} GFLOPs"
    )


# ----------------------------------------------------------------------------- export


def _build_export(ctx: StageContext) -> ExportStageConfig:
    cfg = _validate(ExportStageConfig, ctx.overrides, "export")
    cfg.model_run = str(deployed_model(ctx))
    cfg.exits_run = str(ctx.input("exits")) if cfg.exits and ctx.on("exits") else None
    return cfg


# ----------------------------------------------------------------------------- explain


class ExplainStageConfig(Strict):
    """``explain``: feature maps and saliency of the deployed classifier."""

    model_run: str = ""
    features: bool = True
    saliency: bool = True
    splits: list[str] = Field(default_factory=lambda: ["test"])
    max_images: int | None = Field(2000, ge=10)
    umap: bool = False
    per_class: int = Field(2, ge=1)
    sanity_images: int = Field(16, ge=1)
    random_copies: int = Field(3, ge=1)
    seed: int = 0


def _build_explain(ctx: StageContext) -> ExplainStageConfig:
    cfg = _validate(ExplainStageConfig, {"seed": ctx.seed, **ctx.overrides}, "explain")
    cfg.model_run = str(deployed_model(ctx))
    return cfg


def _run_explain(cfg: ExplainStageConfig, out: Path, resume: bool) -> None:
    from dermkit.explain.index import run_explain

    run_explain(
        cfg.model_run,
        out,
        features=cfg.features,
        saliency=cfg.saliency,
        splits=tuple(cfg.splits),
        max_images=cfg.max_images,
        use_umap=cfg.umap,
        per_class=cfg.per_class,
        sanity_images=cfg.sanity_images,
        random_copies=cfg.random_copies,
        seed=cfg.seed,
    )


def _metric_explain(path: Path) -> str:
    m = _metrics(path)
    parts = []
    if "saliency" in m:
        rho = {k: v["mean"] for k, v in m["saliency"]["sanity_rank_correlation"].items()}
        parts.append("sanity rho " + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()))
    if "features" in m:
        parts.append(f"{m['features']['n_images']} images mapped")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- evaluate


class EvaluateStageConfig(Strict):
    """``evaluate``: one table of every classifier of the pipeline (``eval/table.py``)."""

    runs: dict[str, str] = Field(default_factory=dict, description="row name -> run folder")
    latency: bool = True
    n_boot: int = Field(1000, ge=0)
    seed: int = 0


EVALUATED = {
    "baseline": "classical baseline",
    "finetune": "teacher (fine-tuned)",
    "teachers": "ensemble teacher",
    "distill": "distilled student",
    "exits": "student + exits",
}


def _build_evaluate(ctx: StageContext) -> EvaluateStageConfig:
    cfg = _validate(EvaluateStageConfig, {"seed": ctx.seed, **ctx.overrides}, "evaluate")
    runs = {}
    for stage, name in EVALUATED.items():
        if ctx.on(stage):
            if stage == "exits" and not ctx.on("distill"):
                name = "teacher + exits"
            runs[name] = str(ctx.input(stage))
    if not runs:
        raise ConfigError("evaluate needs at least one of baseline, finetune, distill, exits")
    cfg.runs = runs
    return cfg


def _run_evaluate(cfg: EvaluateStageConfig, out: Path, resume: bool) -> None:
    from dermkit.eval.table import run_table
    from dermkit.exits.summary import summarize_run

    run_table(cfg.runs, out, summarize_run, latency=cfg.latency, n_boot=cfg.n_boot, seed=cfg.seed)


def _metric_evaluate(path: Path) -> str:
    rows = _metrics(path)["rows"]
    best = max(rows, key=lambda r: (r.get("macro_f1") or {}).get("value") or -1)
    return f"{len(rows)} classifiers; best macro-F1: {best['name']}"


# ----------------------------------------------------------------------------- the chain

_CLASSIFIER_FIGURES = (
    FigureSpec("learning_curves.png", "learning curves"),
    FigureSpec("confusion_matrix.png", "confusion matrix (test)"),
)

DERMAE_STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "source, one split, image cache",
        _build_data,
        _run_data,
        _metric_data,
        figures=(FigureSpec(PHANTOM_GRID, "input images, one per class first"),),
    ),
    Stage(
        "baseline",
        "classical baseline",
        _build_baseline,
        _run_baseline,
        _metric_classifier,
        figures=(FigureSpec("confusion_matrix.png", "confusion matrix (test)"),),
    ),
    Stage(
        "autoencoder",
        "KL autoencoder (latents for synthesis)",
        _build_autoencoder,
        _run_autoencoder,
        _metric_autoencoder,
        figures=(FigureSpec("reconstructions.png", "images and their reconstructions"),),
    ),
    Stage(
        "diffusion",
        "class-conditional latent diffusion",
        _build_diffusion,
        _run_diffusion,
        _metric_diffusion,
        figures=(FigureSpec("samples.png", "samples of the generator"),),
    ),
    Stage(
        "pixel_diffusion",
        "class-conditional pixel-space diffusion (the classes the codec loses)",
        _build_pixel_diffusion,
        _run_diffusion,
        _metric_diffusion,
        figures=(FigureSpec("samples.png", "samples of the pixel-space generator"),),
        default_on=False,
    ),
    Stage(
        "sample",
        "class-balanced synthetic set",
        _build_sample,
        run_sample_stage,
        sample_metric,
        knobs=("balance", "pixel_classes"),
        figures=(FigureSpec("grid_*.png", "synthetic {name}", "all"),),
        table=sample_table,
    ),
    Stage(
        "pretrain",
        "self-supervised pretraining (MAE or VAE)",
        _build_pretrain,
        _run_pretrain,
        _metric_pretrain,
        knobs=("method",),
        figures=(FigureSpec("grids/epoch-*.png", "MAE reconstructions, last epoch", "last"),),
    ),
    Stage(
        "finetune",
        "fine-tuned teacher",
        _build_finetune,
        _run_classifier,
        _metric_classifier,
        knobs=("recipe",),
        figures=_CLASSIFIER_FIGURES,
    ),
    Stage(
        "teachers",
        "ensemble teacher (members chosen on val)",
        _build_teachers,
        run_teachers,
        teachers_metric,
        figures=(FigureSpec("confusion_matrix.png", "confusion matrix (test)"),),
        default_on=False,
    ),
    Stage(
        "distill",
        "distilled student",
        _build_distill,
        _run_classifier,
        _metric_classifier,
        knobs=("teacher", "recipe"),
        figures=(
            *_CLASSIFIER_FIGURES,
            FigureSpec("teacher_vs_student.png", "teacher against student"),
        ),
    ),
    Stage(
        "exits",
        "early exits, thresholds, benchmark",
        _build_exits,
        _run_exits,
        _metric_exits,
        figures=(FigureSpec("curves.png", "accuracy and macro-F1 against compute"),),
    ),
    Stage("export", "ONNX (+ INT8) export, model card", _build_export, run_export, export_metric),
    Stage(
        "explain",
        "feature maps and saliency",
        _build_explain,
        _run_explain,
        _metric_explain,
        figures=(
            FigureSpec("saliency/saliency/class_*.png", "saliency: {name}", "all"),
            FigureSpec("features/pca_label.png", "features (PCA) by class"),
        ),
    ),
    Stage("evaluate", "all classifiers", _build_evaluate, _run_evaluate, _metric_evaluate),
)
