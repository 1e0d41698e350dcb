"""The DerMAE chain as pipeline stages (``dermkit.pipeline``): one build + run per stage.

::

    data ─┬─ baseline ─────────────────────────────────────────────────┐
          ├─ autoencoder ─ diffusion ─ sample ┐                         │
          └──────────────────────────────────┴─ pretrain ─ teacher ─ distill ─ exits ─ export
                                                                           └── explain   evaluate

Each stage's config is its preset (``configs/<preset>/<stage>.yaml``) < the pipeline's seed
and data < the pipeline file's overrides for the stage < the wiring to its inputs (their
folders). The wiring also keeps the chain consistent where two stages must agree: the
teacher fine-tunes the pretrained encoder's architecture at its resolution, and synthetic
rows are used (``synthetic_ratio`` > 0) only while ``sample`` is on; with synthesis off,
pretraining and fine-tuning read real images only.

Stage-only keys of a pipeline entry (not config fields): ``pretrain.method`` (mae or vae)
and ``sample.balance`` (``uniform``, or per-class ``totals``/``shares`` as a mapping or a
JSON file). ``export``, ``explain`` and ``evaluate`` take the fields of their small
configs below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from dermkit.config import (
    AutoencoderRunConfig,
    BaselineRunConfig,
    ConfigError,
    DataConfig,
    DiffusionRunConfig,
    DistillRunConfig,
    ExitsRunConfig,
    FinetuneRunConfig,
    MaePretrainRunConfig,
    SampleConfig,
    Strict,
    VaePretrainRunConfig,
    load_config,
)
from dermkit.core.files import write_json_atomic
from dermkit.eval.report import HtmlReport, format_estimate, markdown_rows, to_jsonable
from dermkit.pipeline import PhantomsSource, Stage, StageContext, flatten_overrides
from dermkit.runs import RunDir

log = logging.getLogger(__name__)


def _write_json(obj, path: Path) -> Path:
    return write_json_atomic(path, to_jsonable(obj), default=str)


def _metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def _resolve(ctx: StageContext, schema, preset_stage: str, base: dict, wiring: dict):
    """preset < pipeline (seed, data) < the file's overrides < wiring, validated."""
    items = [
        *flatten_overrides(base),
        *flatten_overrides(ctx.overrides),
        *flatten_overrides(wiring),
    ]
    return load_config(schema, preset_stage, ctx.preset, None, items)


# ----------------------------------------------------------------------------- data


class DataStageConfig(Strict):
    """``data``: phantoms (generated in the stage folder) or a dataset, split once."""

    phantoms: PhantomsSource | None = None
    path: str | None = None
    fingerprint: str | None = Field(None, description="sha256 of the dataset and split file")
    layout: Literal["auto", "ham10000", "isic", "folder"] = "auto"
    split_file: str | None = None
    split_seed: int = 0
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    image_size: int = Field(64, description="cache resolution of the near-duplicate check")
    near_duplicate_distance: int = 4
    cache_dir: str | None = None


def dataset_fingerprint(root: str | Path, split_file: str | None = None) -> str:
    """sha256 of the metadata file (HAM10000 layout) or of every file's name and size, and
    of the split file's content.

    Cheap enough for 10k images; it changes when images are added, removed or relabelled or
    the committed split changes, so the data stage (and everything after it) runs again.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist")
    h = hashlib.sha256()
    meta = root / "metadata.csv"
    if meta.is_file():
        h.update(meta.read_bytes())
        h.update(str(sum(1 for _ in (root / "images").glob("*"))).encode())
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(root)}\x1f{p.stat().st_size}\n".encode())
    if split_file is not None:
        if not Path(split_file).is_file():
            raise ConfigError(f"split file {split_file} does not exist")
        h.update(Path(split_file).read_bytes())
    return h.hexdigest()


def cache_dir(ctx: StageContext) -> str | None:
    """The image cache: the pipeline's, ``<out_dir>/cache`` for phantoms, else the default."""
    d = ctx.pipeline.data
    if d.cache_dir:
        return d.cache_dir
    return str(Path(ctx.pipeline.out_dir) / "cache") if d.phantoms is not None else None


def _build_data(ctx: StageContext) -> DataStageConfig:
    d = ctx.pipeline.data
    teacher_size = load_config(FinetuneRunConfig, "finetune", ctx.preset).data.image_size
    base = {
        "phantoms": d.phantoms.model_dump() if d.phantoms else None,
        "path": d.path,
        "fingerprint": dataset_fingerprint(d.path, d.split_file) if d.path else None,
        "layout": d.layout,
        "split_file": d.split_file,
        "split_seed": ctx.seed,
        "train": d.train,
        "val": d.val,
        "test": d.test,
        "image_size": teacher_size,
        "near_duplicate_distance": d.near_duplicate_distance,
        "cache_dir": cache_dir(ctx),
    }
    try:
        return DataStageConfig.model_validate({**base, **ctx.overrides})
    except ValueError as e:
        raise ConfigError(f"invalid data stage settings: {e}") from e


def data_root(cfg: DataStageConfig, folder: Path) -> str:
    return cfg.path if cfg.path else str(folder / "phantoms")


def _data_wiring(ctx: StageContext) -> dict:
    """The ``data`` section every stage gets: the source, its one split, the cache."""
    folder = ctx.input("data")
    cfg: DataStageConfig = ctx.config("data")
    return {
        "data": {
            "path": data_root(cfg, folder),
            "layout": cfg.layout,
            "split_file": str(folder / "split.csv"),
            "near_duplicate_distance": cfg.near_duplicate_distance,
            "cache_dir": cfg.cache_dir,
        }
    }


PHANTOM_GRID = "phantom_grid.png"


def _phantom_grid(root: Path, n: int = 14):
    """A figure with the first phantom image of each class, then more, with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from PIL import Image

    meta = pd.read_csv(root / "metadata.csv")
    first = meta.drop_duplicates("dx").head(n)
    meta = pd.concat([first, meta.drop(first.index).head(n - len(first))])
    cols = (len(meta) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.4))
    for ax, (_, row) in zip(np.ravel(axes), meta.iterrows(), strict=False):
        ax.imshow(Image.open(root / "images" / f"{row.image_id}.jpg"))
        ax.set_title(f"{row.dx}", fontsize=8)
        ax.axis("off")
    for ax in np.ravel(axes)[len(meta) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _run_data(cfg: DataStageConfig, out: Path, resume: bool) -> Path:
    from dermkit.data.phantoms import generate_phantoms
    from dermkit.data.prepare import prepare_data, write_split_file

    root = Path(data_root(cfg, out))
    if cfg.phantoms is not None and not (root / "metadata.csv").exists():
        p = cfg.phantoms
        generate_phantoms(
            root, p.n_lesions, image_size=p.image_size, seed=p.seed, class_weights=p.class_weights
        )
    with RunDir(out, cfg, "data") as run:
        data_cfg = DataConfig(
            path=str(root),
            layout=cfg.layout,
            image_size=cfg.image_size,
            split_file=cfg.split_file,
            split_seed=cfg.split_seed,
            train=cfg.train,
            val=cfg.val,
            test=cfg.test,
            near_duplicate_distance=cfg.near_duplicate_distance,
            cache_dir=cfg.cache_dir,
        )
        prepared = prepare_data(data_cfg, rejects_path=run / "rejects.csv")
        write_split_file(prepared.manifest, run / "split.csv")
        m = prepared.manifest
        counts = m.groupby(["split", "label"]).size().unstack(fill_value=0)
        metrics = {
            "source": str(root),
            "images": len(m),
            "lesions": int(m["lesion_id"].nunique()),
            "classes": prepared.classes,
            "split": {
                s: {
                    "images": int((m["split"] == s).sum()),
                    "lesions": int(m.loc[m["split"] == s, "lesion_id"].nunique()),
                }
                for s in ("train", "val", "test")
            },
            "class_counts": {s: counts.loc[s].to_dict() for s in counts.index},
            "near_duplicate_pairs_across_splits": len(prepared.leakage.near_duplicates),
            "rejected": len(prepared.rejects),
        }
        _write_json(metrics, run / "metrics.json")
        report = HtmlReport(f"dermkit data: {root.name}")
        report.add_paragraph(
            f"{metrics['images']} images of {metrics['lesions']} lesions from {root}; "
            + (
                f"split file {cfg.split_file}"
                if cfg.split_file
                else f"label-stratified, lesion-grouped {cfg.train}/{cfg.val}/{cfg.test} "
                f"split, seed {cfg.split_seed}"
            )
            + ". Every later stage reads this split (split.csv)."
        )
        report.add_table(
            [{"split": s, **v} for s, v in metrics["split"].items()], caption="Images per split"
        )
        report.add_table(
            counts.reset_index().rename(columns={"split": "split \\ class"}),
            caption="Images per split and class",
        )
        report.add_paragraph(prepared.leakage.summary())
        if cfg.phantoms is not None:
            report.add_paragraph(
                "Phantoms are procedurally drawn lesions: they exercise the code path; their "
                "numbers say nothing about real dermoscopy."
            )
            import matplotlib.pyplot as plt

            from dermkit.eval.plots import save_figure

            fig = _phantom_grid(root)
            grid = save_figure(fig, run / PHANTOM_GRID)  # the pipeline's summary embeds it
            plt.close(fig)
            report.add_figure(grid, "phantom images, one per class first")
        return report.write(run / "report.html")


def _metric_data(path: Path) -> str:
    m = _metrics(path)
    return f"{m['images']} images, {m['lesions']} lesions, {len(m['classes'])} classes"


# ----------------------------------------------------------------------------- classifiers


def _metric_classifier(path: Path) -> str:
    m = _metrics(path)["metrics"]
    return f"test macro-F1 {format_estimate(m['macro_f1'])}"


def _build_baseline(ctx: StageContext) -> BaselineRunConfig:
    return _resolve(ctx, BaselineRunConfig, "baseline", {"seed": ctx.seed}, _data_wiring(ctx))


def _run_baseline(cfg: BaselineRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.train.baseline import run_baseline

    return run_baseline(cfg.model_copy(update={"out_dir": str(out)}))


def _synthetic_wiring(ctx: StageContext, cfg) -> None:
    """Use the sampled set when ``sample`` is on and the ratio > 0; else real images only."""
    if cfg.synthetic_ratio > 0 and ctx.on("sample"):
        cfg.synthetic_manifest = str(ctx.input("sample") / "manifest.csv")
    else:
        cfg.synthetic_ratio = 0.0
        cfg.synthetic_manifest = None


def _build_teacher(ctx: StageContext) -> FinetuneRunConfig:
    wiring = _data_wiring(ctx)
    if ctx.on("pretrain"):  # fine-tune the pretrained encoder, at its resolution
        pre = ctx.config("pretrain")
        wiring["model"] = {"name": pre.model.name, "weights": str(ctx.input("pretrain"))}
        wiring["data"]["image_size"] = pre.data.image_size
    cfg = _resolve(ctx, FinetuneRunConfig, "finetune", {"seed": ctx.seed}, wiring)
    _synthetic_wiring(ctx, cfg)
    return cfg


def _run_finetune(cfg: FinetuneRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.train.finetune import run_finetune

    return run_finetune(cfg.model_copy(update={"out_dir": str(out)}), resume, progress=False)


def _build_distill(ctx: StageContext) -> DistillRunConfig:
    wiring = _data_wiring(ctx) | {"teacher": str(ctx.input("teacher"))}
    cfg = _resolve(ctx, DistillRunConfig, "distill", {"seed": ctx.seed}, wiring)
    _synthetic_wiring(ctx, cfg)
    return cfg


def _run_distill(cfg: DistillRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.train.distill import run_distill

    return run_distill(cfg.model_copy(update={"out_dir": str(out)}), resume, progress=False)


def deployed_model(ctx: StageContext) -> Path:
    """The classifier that ships: the student when distillation is on, else the teacher."""
    return ctx.input("distill") if ctx.on("distill") else ctx.input("teacher")


# ----------------------------------------------------------------------------- synth


def _build_autoencoder(ctx: StageContext) -> AutoencoderRunConfig:
    return _resolve(
        ctx, AutoencoderRunConfig, "synth_autoencoder", {"seed": ctx.seed}, _data_wiring(ctx)
    )


def _run_autoencoder(cfg: AutoencoderRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.synth.autoencoder import train_autoencoder

    return train_autoencoder(cfg.model_copy(update={"out_dir": str(out)}), resume, False)


def _metric_autoencoder(path: Path) -> str:
    v = _metrics(path)["val"]
    return f"val PSNR {v['psnr']:.1f} dB, SSIM {v['ssim']:.3f}"


def _build_diffusion(ctx: StageContext) -> DiffusionRunConfig:
    wiring = _data_wiring(ctx)
    # Without the autoencoder stage the UNet runs in pixel space.
    wiring["autoencoder"] = str(ctx.input("autoencoder")) if ctx.on("autoencoder") else None
    return _resolve(ctx, DiffusionRunConfig, "synth_diffusion", {"seed": ctx.seed}, wiring)


def _run_diffusion(cfg: DiffusionRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.synth.diffusion import train_diffusion

    return train_diffusion(cfg.model_copy(update={"out_dir": str(out)}), resume, False)


def _metric_diffusion(path: Path) -> str:
    m = _metrics(path)
    return f"{m['steps']} steps, final loss {m['final_train_loss']:.4f}"


class SampleStageConfig(Strict):
    """``sample``: SampleConfig plus the balance target itself (hashed, not its file path)."""

    sample: SampleConfig
    balance: str | dict = "uniform"


def _build_sample(ctx: StageContext) -> SampleStageConfig:
    from dermkit.synth.sample import load_target, parse_target

    balance = ctx.knobs.get("balance", "uniform")
    if isinstance(balance, str) and balance != "uniform":
        balance = load_target(balance)  # the target's content is hashed, not its path
    parse_target(balance)  # errors now, not after the generator is trained
    wiring = {"generator": str(ctx.input("diffusion")), "balance": "uniform"}
    cfg = _resolve(ctx, SampleConfig, "synth_sample", {"seed": ctx.seed}, wiring)
    return SampleStageConfig(sample=cfg, balance=balance)


def _run_sample(cfg: SampleStageConfig, out: Path, resume: bool) -> Path:
    import pandas as pd

    from dermkit.synth.sample import run_sample

    sample = cfg.sample.model_copy(update={"out_dir": str(out)})
    if cfg.balance != "uniform":
        target = _write_json(cfg.balance, out / "balance.json")
        sample = sample.model_copy(update={"balance": str(target)})
    manifest = run_sample(sample, progress=False)
    plan = json.loads((out / "plan.json").read_text())
    rows = pd.read_csv(manifest)
    metrics = {
        "synthetic_images": len(rows),
        "per_class": rows["label"].value_counts().to_dict(),
        **plan,
    }
    _write_json(metrics, out / "metrics.json")
    report = HtmlReport("dermkit synth sample: the class-balanced synthetic set")
    report.add_paragraph(
        f"{len(rows)} images from {cfg.sample.generator} ({cfg.sample.sampler.sampler}, "
        f"{cfg.sample.sampler.steps} steps, guidance {cfg.sample.sampler.guidance}); "
        f"target {json.dumps(cfg.balance)}. Manifest: manifest.csv."
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
    for grid in sorted(out.glob("grid_*.png")):
        report.add_figure(grid, f"{grid.stem.removeprefix('grid_')}: synthetic samples")
    return report.write(out / "report.html")


def _metric_sample(path: Path) -> str:
    return f"{_metrics(path)['synthetic_images']} synthetic images"


# ----------------------------------------------------------------------------- pretrain


def _build_pretrain(ctx: StageContext) -> MaePretrainRunConfig | VaePretrainRunConfig:
    method = ctx.knobs.get("method", "mae")
    if method not in ("mae", "vae"):
        raise ConfigError(f"pretrain.method must be mae or vae, got {method!r}")
    schema = MaePretrainRunConfig if method == "mae" else VaePretrainRunConfig
    cfg = _resolve(ctx, schema, f"pretrain_{method}", {"seed": ctx.seed}, _data_wiring(ctx))
    _synthetic_wiring(ctx, cfg)
    return cfg


def _run_pretrain(cfg, out: Path, resume: bool) -> Path:
    from dermkit.ssl.pretrain import run_pretrain_mae, run_pretrain_vae

    run = run_pretrain_mae if isinstance(cfg, MaePretrainRunConfig) else run_pretrain_vae
    return run(cfg.model_copy(update={"out_dir": str(out)}), resume, progress=False)


def _metric_pretrain(path: Path) -> str:
    probe = _metrics(path).get("probe") or {}
    return f"linear probe val macro-F1 {probe.get('linear_val_macro_f1', float('nan')):.3f}"


# ----------------------------------------------------------------------------- exits


def _build_exits(ctx: StageContext) -> ExitsRunConfig:
    wiring = {"base_run": str(deployed_model(ctx)), "cache_dir": cache_dir(ctx)}
    return _resolve(ctx, ExitsRunConfig, "exits", {"seed": ctx.seed}, wiring)


def _run_exits(cfg: ExitsRunConfig, out: Path, resume: bool) -> Path:
    from dermkit.exits.bench import run_exits_bench
    from dermkit.exits.calibrate import run_exits_calibrate
    from dermkit.exits.train import run_exits_train

    run_exits_train(cfg.model_copy(update={"out_dir": str(out)}), progress=False, resume=resume)
    run_exits_calibrate(out)
    report = run_exits_bench(out)
    bench = json.loads((out / "bench.json").read_text())
    heads = {
        h: {
            "test_metrics": v["test_metrics"],
            "gflops_fraction": v["test"]["gflops_fraction"],
            "mean_blocks": v["test"]["mean_blocks"],
            "speedup_vs_plain": v.get("speedup_vs_plain"),
        }
        for h, v in bench["heads"].items()
        if "error" not in v
    }
    metrics = {"plain": bench["plain"]["test_metrics"], "heads": heads}
    _write_json(metrics, out / "metrics.json")
    return report


def best_exit_head(folder: Path) -> str | None:
    """The calibrated head type with the best val macro-F1 (None when none is calibrated)."""
    scores = {}
    for policy in folder.glob("policy_*.json"):
        scores[policy.stem.removeprefix("policy_")] = (
            json.loads(policy.read_text()).get("val_macro_f1") or 0.0
        )
    return max(scores, key=scores.get) if scores else None


def _metric_exits(path: Path) -> str:
    heads = _metrics(path)["heads"]
    head = best_exit_head(path)
    if head is None or head not in heads:
        return "no calibrated head"
    h = heads[head]
    return (
        f"{head}: test macro-F1 {format_estimate(h['test_metrics']['macro_f1'])} at "
        f"{h['gflops_fraction']:.0%} GFLOPs"
    )


# ----------------------------------------------------------------------------- export


class ExportStageConfig(Strict):
    """``export``: the deployed classifier as ONNX (+ INT8), and its exit segments."""

    model_run: str = ""
    exits_run: str | None = None
    int8: Literal["dynamic", "static", "both"] | None = "dynamic"
    parity_images: int = Field(512, ge=1)
    calibration_images: int = Field(64, ge=1)
    exits: bool = Field(True, description="also export the exit segments when exits is on")


def _build_export(ctx: StageContext) -> ExportStageConfig:
    try:
        cfg = ExportStageConfig.model_validate(ctx.overrides)
    except ValueError as e:
        raise ConfigError(f"invalid export settings: {e}") from e
    cfg.model_run = str(deployed_model(ctx))
    cfg.exits_run = str(ctx.input("exits")) if cfg.exits and ctx.on("exits") else None
    return cfg


def _run_export(cfg: ExportStageConfig, out: Path, resume: bool) -> Path:
    from dermkit.deploy.export import export_run

    result = export_run(cfg.model_run, out, cfg.int8, cfg.parity_images, cfg.calibration_images)
    metrics = {"model_run": cfg.model_run, "files": result["files"], "exits": None}
    if cfg.exits_run is not None:
        from dermkit.exits.onnx_segments import export_segments
        from dermkit.exits.run_io import ExitRun

        run = ExitRun.open(cfg.exits_run)
        head = best_exit_head(run.path)
        if head is not None:
            segments = out / "exits"
            export_segments(run.model(head), segments, run.info["img_size"])
            run.policy(head).save(segments / "policy.json", run.classes)
            metrics["exits"] = {
                "head": head,
                "files": sorted(p.name for p in segments.iterdir()),
            }
    _write_json(metrics, out / "metrics.json")
    report = HtmlReport(f"dermkit export: {result['model']}")
    report.add_paragraph(
        f"ONNX export of {cfg.model_run}: input {result['input']}, output {result['output']}, "
        f"opset {result['opset']}. Parity against PyTorch on {result['parity_images']} val "
        "images. Model card: model_card.json."
    )
    report.add_table(
        [{"key": k, **f} for k, f in result["files"].items()],
        caption="Exported files",
    )
    if metrics["exits"]:
        report.add_paragraph(
            f"Early-exit segments of the {metrics['exits']['head']} heads and their policy in "
            f"exits/: {', '.join(metrics['exits']['files'])}."
        )
    report.add_link("model_card.json", "model card (JSON)")
    report.add_link("export.json", "export.json (all numbers)")
    return report.write(out / "report.html")


def _metric_export(path: Path) -> str:
    files = _metrics(path)["files"]
    fp32 = files["fp32"]
    text = f"model.onnx {fp32['size_bytes'] / 1e6:.2f} MB"
    for key in ("dynamic", "static"):
        if key in files:
            text += f", INT8 {key} agreement {files[key]['prediction_agreement']:.3f}"
    return text


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
    try:
        cfg = ExplainStageConfig.model_validate({"seed": ctx.seed, **ctx.overrides})
    except ValueError as e:
        raise ConfigError(f"invalid explain settings: {e}") from e
    cfg.model_run = str(deployed_model(ctx))
    return cfg


def _run_explain(cfg: ExplainStageConfig, out: Path, resume: bool) -> Path:
    from dermkit.explain.features import run_explain_features
    from dermkit.explain.saliency import run_explain_saliency

    metrics, links = {}, []
    if cfg.features:
        report = run_explain_features(
            cfg.model_run,
            out / "features",
            splits=tuple(cfg.splits),
            max_images=cfg.max_images,
            seed=cfg.seed,
            use_umap=cfg.umap,
        )
        metrics["features"] = json.loads((out / "features" / "features_metrics.json").read_text())
        links.append((report, "feature maps (PCA/UMAP) and class separation"))
    if cfg.saliency:
        report = run_explain_saliency(
            cfg.model_run,
            out / "saliency",
            split=cfg.splits[0],
            per_class=cfg.per_class,
            sanity_images=cfg.sanity_images,
            seed=cfg.seed,
            random_copies=cfg.random_copies,
        )
        metrics["saliency"] = json.loads((out / "saliency" / "saliency_metrics.json").read_text())
        links.append((report, "saliency overlays and the randomisation sanity check"))
    _write_json(metrics, out / "metrics.json")
    index = HtmlReport(f"dermkit explain: {Path(cfg.model_run).name}")
    index.add_paragraph(f"What the classifier of {cfg.model_run} encodes and where it looks.")
    for report, text in links:
        index.add_link(str(report.relative_to(out)), text)
    return index.write(out / "report.html")


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
    """``evaluate``: one table of every classifier of the pipeline (``eval/summary.py``)."""

    runs: dict[str, str] = Field(default_factory=dict, description="row name -> run folder")
    latency: bool = True
    n_boot: int = Field(1000, ge=0)
    seed: int = 0


EVALUATED = {
    "baseline": "classical baseline",
    "teacher": "teacher (fine-tuned)",
    "distill": "distilled student",
    "exits": "student + exits",
}


def _build_evaluate(ctx: StageContext) -> EvaluateStageConfig:
    try:
        cfg = EvaluateStageConfig.model_validate({"seed": ctx.seed, **ctx.overrides})
    except ValueError as e:
        raise ConfigError(f"invalid evaluate settings: {e}") from e
    runs = {}
    for stage, name in EVALUATED.items():
        if ctx.on(stage):
            if stage == "exits" and not ctx.on("distill"):
                name = "teacher + exits"
            runs[name] = str(ctx.input(stage))
    if not runs:
        raise ConfigError("evaluate needs at least one of baseline, teacher, distill, exits")
    cfg.runs = runs
    return cfg


def _run_evaluate(cfg: EvaluateStageConfig, out: Path, resume: bool) -> Path:
    from dermkit.eval.summary import ablation_table_markdown, summarize_run

    rows = [
        (name, summarize_run(Path(run), latency=cfg.latency, n_boot=cfg.n_boot, seed=cfg.seed))
        for name, run in cfg.runs.items()
    ]
    table = ablation_table_markdown(rows)
    (out / "table.md").write_text(table)
    _write_json({"rows": [{"name": n, **s} for n, s in rows]}, out / "metrics.json")
    report = HtmlReport("dermkit evaluate: every classifier of the pipeline on the test split")
    report.add_paragraph(
        f"Test metrics with 95% lesion-level bootstrap CIs (B = {cfg.n_boot}); params, GFLOPs "
        "per image and batch-1 CPU latency where the run has a torch model."
    )
    report.add_table(markdown_rows(table), caption="test split")
    for name, run in cfg.runs.items():
        report.add_link(os.path.relpath(Path(run, "report.html"), out), f"{name}: full report")
    return report.write(out / "report.html")


def _metric_evaluate(path: Path) -> str:
    rows = _metrics(path)["rows"]
    best = max(rows, key=lambda r: (r.get("macro_f1") or {}).get("value") or -1)
    return f"{len(rows)} classifiers; best macro-F1: {best['name']}"


# ----------------------------------------------------------------------------- the chain

DERMAE_STAGES: tuple[Stage, ...] = (
    Stage("data", "source, one split, image cache", _build_data, _run_data, _metric_data),
    Stage(
        "baseline",
        "classical baseline",
        _build_baseline,
        _run_baseline,
        _metric_classifier,
    ),
    Stage(
        "autoencoder",
        "KL autoencoder (latents for synthesis)",
        _build_autoencoder,
        _run_autoencoder,
        _metric_autoencoder,
    ),
    Stage(
        "diffusion",
        "class-conditional latent diffusion",
        _build_diffusion,
        _run_diffusion,
        _metric_diffusion,
    ),
    Stage(
        "sample",
        "class-balanced synthetic set",
        _build_sample,
        _run_sample,
        _metric_sample,
        knobs=("balance",),
    ),
    Stage(
        "pretrain",
        "self-supervised pretraining (MAE or VAE)",
        _build_pretrain,
        _run_pretrain,
        _metric_pretrain,
        knobs=("method",),
    ),
    Stage("teacher", "fine-tuned teacher", _build_teacher, _run_finetune, _metric_classifier),
    Stage("distill", "distilled student", _build_distill, _run_distill, _metric_classifier),
    Stage("exits", "early exits, thresholds, benchmark", _build_exits, _run_exits, _metric_exits),
    Stage("export", "ONNX (+ INT8) export, model card", _build_export, _run_export, _metric_export),
    Stage("explain", "feature maps and saliency", _build_explain, _run_explain, _metric_explain),
    Stage("evaluate", "all classifiers", _build_evaluate, _run_evaluate, _metric_evaluate),
)
