"""``dermkit explain`` (features, saliency) and ``dermkit thickness`` (the Breslow study)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import comma_list, command_group, needs, reported

app = command_group("What a trained run's encoder encodes and where it looks.")
thickness_app = command_group("Melanoma thickness (Breslow category).")
RunArg = Annotated[Path, typer.Argument(help="classifier run folder (finetune or distill)")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="dataset root, if it moved")]
OutOpt = Annotated[Path | None, typer.Option(help="output folder (default: inside the run)")]
PerClass = Annotated[int, typer.Option(help="correct and wrong examples per class")]
SanityImages = Annotated[int, typer.Option(help="images in the randomisation check")]
RandomCopies = Annotated[int, typer.Option(help="randomised models averaged")]


@app.command("features")
def explain_features_cmd(
    run: RunArg,
    data: DataOpt = None,
    out: OutOpt = None,
    splits: Annotated[str, typer.Option(help="comma-separated splits")] = "test",
    color_by: Annotated[
        str | None, typer.Option(help="comma-separated manifest columns (default: the usual)")
    ] = None,
    max_images: Annotated[int | None, typer.Option(help="random subset size")] = None,
    umap: Annotated[bool, typer.Option("--umap/--no-umap", help="UMAP when installed")] = True,
    seed: int = 0,
) -> None:
    """PCA/UMAP of frozen penultimate features coloured by manifest columns, with numbers."""
    from dermkit.explain.features import run_explain_features

    with reported():
        report = run_explain_features(
            run,
            out,
            data,
            splits=tuple(comma_list(splits)),
            color_by=comma_list(color_by),
            max_images=max_images,
            seed=seed,
            use_umap=umap,
        )
    print(report)


@app.command("saliency")
def explain_saliency_cmd(
    run: RunArg,
    data: DataOpt = None,
    out: OutOpt = None,
    split: Annotated[str, typer.Option(help="split whose predictions are explained")] = "test",
    per_class: PerClass = 2,
    sanity_images: SanityImages = 16,
    random_copies: RandomCopies = 3,
    seed: int = 0,
) -> None:
    """Grad-CAM (+ attention rollout for ViTs) overlays per class, and the sanity check."""
    needs("explain")
    from dermkit.explain.saliency import run_explain_saliency

    with reported():
        report = run_explain_saliency(
            run, out, data, split, per_class, sanity_images, seed, random_copies
        )
    print(report)


@app.command("all")
def explain_all_cmd(
    run: RunArg,
    out: Annotated[Path, typer.Option(help="output folder (features/, saliency/, report.html)")],
    splits: Annotated[str, typer.Option(help="comma-separated splits (saliency: the first)")] = (
        "test"
    ),
    max_images: Annotated[int | None, typer.Option(help="features: random subset size")] = 2000,
    umap: Annotated[bool, typer.Option("--umap/--no-umap", help="UMAP when installed")] = False,
    per_class: PerClass = 2,
    sanity_images: SanityImages = 16,
    random_copies: RandomCopies = 3,
    seed: int = 0,
) -> None:
    """Features and saliency into one folder with an index report (the pipeline's stage)."""
    needs("explain")
    from dermkit.explain.index import run_explain

    with reported():
        report = run_explain(
            run,
            out,
            splits=tuple(comma_list(splits)),
            max_images=max_images,
            use_umap=umap,
            per_class=per_class,
            sanity_images=sanity_images,
            random_copies=random_copies,
            seed=seed,
        )
    print(report)


@thickness_app.command("study")
def thickness_study_cmd(
    data: Annotated[Path, typer.Option(help="thickness folder (HAM layout + thickness columns)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/thickness"),
    features: Annotated[
        list[str] | None,
        typer.Option(help="BACKBONE@SIZE[:WEIGHTS][+tta] (SIZE or SIZE/DETAIL), repeatable"),
    ] = None,
    groupings: Annotated[str, typer.Option(help="comma-separated 3class,4class")] = "3class,4class",
    folds: Annotated[int, typer.Option(help="outer stratified folds")] = 5,
    seeds: Annotated[str, typer.Option(help="comma-separated CV seeds")] = "0,1,2",
    inner_folds: Annotated[int, typer.Option(help="inner folds choosing each model")] = 3,
    cs: Annotated[str | None, typer.Option(help="comma-separated probe C grid")] = None,
    gradcam_per_class: Annotated[int, typer.Option(help="Grad-CAM images per category")] = 3,
    random_copies: Annotated[int, typer.Option(help="randomised models (sanity check)")] = 3,
    n_shuffle: Annotated[int, typer.Option(help="shuffled-label controls")] = 200,
    n_boot: Annotated[int, typer.Option(help="bootstrap replicates of pooled metrics")] = 1000,
    cache_dir: Annotated[Path | None, typer.Option(help="image cache root")] = None,
    jobs: Annotated[int, typer.Option(help="outer folds run in parallel")] = 1,
    umap: Annotated[bool, typer.Option("--umap/--no-umap", help="UMAP when installed")] = True,
    finetune: Annotated[
        bool, typer.Option(help="add the fine-tuning arm (ImageNet Lite0, CORN and softmax)")
    ] = False,
    finetune_epochs: Annotated[int | None, typer.Option(help="fine-tuning epochs")] = None,
    finetune_size: Annotated[int | None, typer.Option(help="fine-tuning input px")] = None,
    finetune_batch: Annotated[int | None, typer.Option(help="fine-tuning batch size")] = None,
    finetune_heads: Annotated[
        str | None, typer.Option(help="comma-separated fine-tuned heads: corn,softmax")
    ] = None,
    finetune_model: Annotated[
        str | None,
        typer.Option(help="fine-tuned BACKBONE[:WEIGHTS] (default tf_efficientnet_lite0:imagenet)"),
    ] = None,
) -> None:
    """Nested-CV probes (CORN vs softmax) on frozen features, analyses and report.html.

    ``--finetune`` adds fine-tuned rows on the same outer folds (explain/thickness_ft.py).
    """
    from dermkit.explain.thickness_ft import FinetuneArmConfig
    from dermkit.explain.thickness_study import ThicknessStudyConfig, run_thickness_study

    cfg = ThicknessStudyConfig(
        data=data,
        out=out,
        groupings=comma_list(groupings),
        n_folds=folds,
        seeds=tuple(comma_list(seeds, int)),
        inner_folds=inner_folds,
        gradcam_per_class=gradcam_per_class,
        n_random=random_copies,
        n_shuffle=n_shuffle,
        n_boot=n_boot,
        cache_dir=cache_dir,
        n_jobs=jobs,
        use_umap=umap,
    )
    if features:
        cfg.features = list(features)
    if cs:
        cfg.cs = tuple(comma_list(cs, float))
    if finetune:
        cfg.finetune = FinetuneArmConfig()
        if finetune_epochs is not None:
            cfg.finetune.epochs = finetune_epochs
        if finetune_size is not None:
            cfg.finetune.size = finetune_size
        if finetune_batch is not None:
            cfg.finetune.batch_size = finetune_batch
        if finetune_heads:
            cfg.finetune.heads = tuple(comma_list(finetune_heads))
        if finetune_model:
            name, _, weights = finetune_model.partition(":")
            cfg.finetune.backbone, cfg.finetune.weights = name, weights or None
    with reported():
        report = run_thickness_study(cfg)
    print(report)
