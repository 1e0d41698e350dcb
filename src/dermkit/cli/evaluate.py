"""``dermkit evaluate``: metrics and reports from prediction files or run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import console, fail, user_errors


def evaluate(
    predictions: Annotated[Path, typer.Argument(help="predictions.csv or a run folder")],
    out: Annotated[Path | None, typer.Option(help="report folder (default: beside input)")] = None,
    n_boot: int = 1000,
    seed: int = 0,
    positive_class: str = "mel",
    data: Annotated[
        Path | None, typer.Option(help="external dataset: run the model of the RUN folder on it")
    ] = None,
    label_map: Annotated[
        Path | None, typer.Option(help="with --data: YAML/JSON dataset label -> run class/null")
    ] = None,
    layout: Annotated[str, typer.Option(help="with --data: auto, ham10000, isic, folder")] = "auto",
    skip_bad: Annotated[bool, typer.Option(help="with --data: drop unreadable rows/files")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="with --data: image cache root")] = None,
    against: Annotated[
        Path | None,
        typer.Option(help="predictions.csv or run folder B: paired comparison A - B, same images"),
    ] = None,
) -> None:
    """Metrics with lesion-level bootstrap CIs and an HTML report from a predictions file.

    With --data (and --label-map) the run folder's model is evaluated on another dataset.
    With --against B: metric(A) - metric(B) with paired lesion-bootstrap CIs -> paired.json
    and paired.md (default folder: A's folder/paired-vs-<B's name>).
    """
    from dermkit.eval.evaluate import evaluate_file

    if against is not None:
        from dermkit.eval import paired

        if data is not None or label_map is not None:
            fail("--against compares two predictions files; it does not take --data/--label-map")
        try:
            result = paired.compare_prediction_files(
                predictions, against, n_boot=n_boot, seed=seed, positive_class=positive_class
            )
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        console.print(paired.comparison_table(result))
        out = out or paired.default_output_dir(predictions, against)
        _, md = paired.write_comparison(result, out)
        print(md)
        return
    if data is not None:
        from dermkit.eval.external import evaluate_external

        try:
            done = evaluate_external(
                predictions,
                data,
                label_map,
                out,
                layout=layout,
                skip_bad=skip_bad,
                cache_dir=cache_dir,
                n_boot=n_boot,
                seed=seed,
                positive_class=positive_class,
                progress=True,
            )
        except user_errors() as e:
            fail(str(e))
        ext = done["result"]["external"]
        console.print(
            f"scored {ext['images_scored']} images, classes {ext['scored_classes']}; model "
            f"classes not in the data: {ext['model_classes_not_in_data'] or 'none'}; dropped "
            f"by the label map: {ext['source_labels_dropped'] or 'none'}",
            highlight=False,
        )
        print(done["report"])
        return
    if label_map is not None:
        fail("--label-map needs --data (external evaluation of a run folder)")
    try:
        done = evaluate_file(predictions, out, n_boot, seed, positive_class)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    for row in done.ordinal_rows:
        console.print(" | ".join(str(v) for v in row.values()), highlight=False)
    print(done.report)
