"""``dermkit data``: read, validate, split, generate and download datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import command_group, console, fail, reported

app = command_group("Read, validate, split, generate and download datasets.")


@app.command("phantoms")
def data_phantoms(
    out: Annotated[Path, typer.Option(help="output folder (HAM10000 layout)")] = Path(
        "demo/phantoms"
    ),
    n_lesions: Annotated[int, typer.Option(help="number of lesions")] = 300,
    size: Annotated[str, typer.Option(help="image size WxH")] = "160x120",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a deterministic phantom dataset of dermoscopy-like images."""
    from dermkit.data.phantoms import generate_phantoms

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        fail(f"--size must look like 160x120, got '{size}'")
    csv = generate_phantoms(out, n_lesions, image_size=(w, h), seed=seed)
    print(csv)


MaxImageMB = Annotated[
    float | None,
    typer.Option(
        "--max-image-mb",
        help="refuse image files larger than this, unread (default 64, or $DERMKIT_MAX_IMAGE_MB)",
    ),
]


def _set_max_image_mb(megabytes: float | None) -> None:
    """Apply --max-image-mb to the whole process, so the image cache obeys it as well."""
    from dermkit.data.images import MAX_IMAGE_MB_ENV

    if megabytes is None:
        return
    if megabytes <= 0:
        fail(f"--max-image-mb must be positive, got {megabytes}")
    os.environ[MAX_IMAGE_MB_ENV] = str(megabytes)


def _validation_advice(error: Exception, skip_bad: bool, rejects: Path) -> str:
    """What to do after a failed validation, for the flags actually given."""
    from dermkit.data.readers import LayoutError

    if isinstance(error, LayoutError):
        # Fatal problems (no CSV, bad header, missing column) leave no row to keep.
        return "fix the problems above: --skip-bad cannot skip them, nothing could be read"
    if skip_bad:
        return "--skip-bad was given, but every row was rejected: nothing is left to use"
    return f"rerun with --skip-bad to continue without these rows (listed then in {rejects})"


def _report_rejects(rejects_table, rejects: Path) -> None:
    """Name the first rejected rows/files and where the full list was written."""
    if not len(rejects_table):
        return
    shown = rejects_table.head(5)
    names = ", ".join(f"{r.image_id or Path(r.path).name} ({r.reason})" for r in shown.itertuples())
    more = f" and {len(rejects_table) - 5} more" if len(rejects_table) > 5 else ""
    console.print(
        f"[yellow]{len(rejects_table)} rejected[/]: {names}{more}; listed in {rejects}",
        highlight=False,
    )


@app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="dataset folder")],
    layout: Annotated[str, typer.Option(help="auto, ham10000, isic or folder")] = "auto",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="drop bad rows into rejects.csv")
    ] = False,
    rejects: Annotated[Path, typer.Option(help="where --skip-bad writes the rejects")] = Path(
        "rejects.csv"
    ),
    manifest_out: Annotated[Path | None, typer.Option("--manifest", help="write manifest")] = None,
    max_image_mb: MaxImageMB = None,
) -> None:
    """Read a dataset and check every row and image; exit 1 naming every problem."""
    from dermkit.data.manifest import write_manifest
    from dermkit.data.readers import DataValidationError, load_dataset

    _set_max_image_mb(max_image_mb)
    try:
        loaded = load_dataset(path, layout=layout, skip_bad=skip_bad, rejects_path=rejects)
    except DataValidationError as e:
        console.print(str(e), highlight=False, markup=False)
        advice = _validation_advice(e, skip_bad, rejects)
        console.print(f"[red]validation failed[/]: {advice}", highlight=False)
        raise typer.Exit(1) from e
    m = loaded.manifest
    console.print(
        f"{len(m)} images, {m['lesion_id'].nunique()} lesions, "
        f"classes {m['label'].value_counts().to_dict()}",
        highlight=False,
    )
    if loaded.conversions:
        console.print(f"converted at load time: {loaded.conversions}", highlight=False)
    _report_rejects(loaded.rejects, rejects)
    if manifest_out:
        write_manifest(m, manifest_out)
        print(manifest_out)


@app.command("split")
def data_split(
    data: Annotated[Path, typer.Option(help="dataset folder")],
    out: Annotated[
        Path | None, typer.Option(help="write the id list (image_id,lesion_id,split)")
    ] = None,
    train: float = 0.7,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    kfold: Annotated[int, typer.Option(help="also assign K lesion-grouped folds")] = 0,
    layout: str = "auto",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="drop bad rows into the rejects file")
    ] = False,
    rejects: Annotated[Path, typer.Option(help="where --skip-bad writes the rejects")] = Path(
        "rejects.csv"
    ),
    image_size: Annotated[int, typer.Option(help="cache resolution for the pHash check")] = 64,
    near_duplicate_distance: Annotated[int, typer.Option(help="pHash bits; -1 disables")] = 4,
    max_image_mb: MaxImageMB = None,
) -> None:
    """Label-stratified, lesion-grouped split with a leakage report."""
    from dermkit.data.prepare import prepare_data, write_fold_file, write_split_file
    from dermkit.data.readers import DataValidationError
    from dermkit.data.settings import DataConfig
    from dermkit.data.splits import lesion_grouped_kfold, split_summary

    cfg = DataConfig(
        path=str(data),
        layout=layout,
        train=train,
        val=val,
        test=test,
        split_seed=seed,
        skip_bad=skip_bad,
        image_size=image_size,
        near_duplicate_distance=near_duplicate_distance,
    )
    _set_max_image_mb(max_image_mb)
    with reported():  # after the validation failure, which gets its advice
        try:
            prepared = prepare_data(cfg, rejects_path=rejects if skip_bad else None, progress=True)
        except DataValidationError as e:
            fail(f"{e}\n{_validation_advice(e, skip_bad, rejects)}")
    _report_rejects(prepared.rejects, rejects)
    m = prepared.manifest
    summary = split_summary(m)
    console.print(summary.round(2).to_string(), highlight=False)
    counts = {
        s: (int((m["split"] == s).sum()), int(m.loc[m["split"] == s, "lesion_id"].nunique()))
        for s in ("train", "val", "test")
    }
    console.print(f"images/lesions per split: {counts}", highlight=False)
    console.print(
        f"largest class-share difference from overall: {summary['max_abs_diff'].max():.2f} points",
        highlight=False,
    )
    console.print(prepared.leakage.summary(), highlight=False, markup=False)
    if kfold:
        folds = lesion_grouped_kfold(m, kfold, seed)
        m = m.assign(fold=folds.to_numpy())
    if out:
        write_split_file(m, out)
        if kfold:
            write_fold_file(m, out, kfold)
        print(out)


@app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="dataset name: ham10000 or dermamnist")],
    dest: Annotated[Path, typer.Option(help="destination folder")] = Path("data"),
    base_url: Annotated[str | None, typer.Option(help="mirror replacing the official host")] = None,
) -> None:
    """Download a dataset from its official source with checksums and resume."""
    from dermkit.data.download import DownloadError, download_dataset

    with reported(DownloadError, KeyError):
        print(download_dataset(name, dest, base_url=base_url))
