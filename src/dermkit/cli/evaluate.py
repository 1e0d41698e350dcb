"""``dermkit evaluate``: metrics and reports from prediction files or run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dermkit.cli.common import comma_list, console, fail, print_json, reported


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
    adapt: Annotated[
        str | None,
        typer.Option(help="with --data: label-free adaptation, a comma list of bn,priors,tta"),
    ] = None,
    save_adaptation: Annotated[
        Path | None,
        typer.Option(help="with --adapt: write an adapted run folder (export/serve it)"),
    ] = None,
    priors_limit: Annotated[
        float,
        typer.Option(
            help="with --adapt priors: apply them only if EM on RUN's val set lands within "
            "this total variation of its label frequencies (1 = always)"
        ),
    ] = 0.1,
    fit_ood: Annotated[
        bool, typer.Option(help="fit the unfamiliar-image flag of RUN (writes RUN/ood.json)")
    ] = False,
    fit_operating_point: Annotated[
        str | None,
        typer.Option(
            help="CLASS=RECALL, e.g. mel=0.85: raise CLASS's decision scale until RUN's val "
            "recall reaches RECALL (rewrites decision.json, predictions, metrics.json)"
        ),
    ] = None,
    ood_quantile: Annotated[
        float, typer.Option(help="with --fit-ood: val quantile used as the threshold")
    ] = 0.95,
    ood_auroc: Annotated[
        Path | None,
        typer.Option(help="dataset folder: AUROC of the OOD scores, its images vs RUN's test"),
    ] = None,
    ood_shifts: Annotated[
        bool, typer.Option(help="AUROC of RUN's flag: each shift of the shift bench vs clean")
    ] = False,
    shift_bench: Annotated[
        bool, typer.Option(help="with --adapt: the shift benchmark, each shift as is and adapted")
    ] = False,
    shifts: Annotated[
        str | None, typer.Option(help="with --shift-bench/--ood-shifts: comma list (default all)")
    ] = None,
    severities: Annotated[
        str, typer.Option(help="with --shift-bench/--ood-shifts: of 1, 2, 3 (low/middle/high)")
    ] = "2",
    limit: Annotated[
        int | None, typer.Option(help="with --shift-bench/--ood-shifts: first N test images")
    ] = None,
    tta: Annotated[
        bool,
        typer.Option(
            help="re-score RUN's own val/test as the mean of 8 dihedral views, its decision "
            "rule refitted on val (into --out, default RUN/tta)"
        ),
    ] = False,
    rule: Annotated[
        str | None,
        typer.Option(
            help="with --tta: the decision rule to refit on val (none, temperature, "
            "temperature+class_scales, auto); default: the run's own"
        ),
    ] = None,
) -> None:
    """Metrics with lesion-level bootstrap CIs and an HTML report from a predictions file.

    With --data (and --label-map) the run folder's model is evaluated on another dataset.
    With --against B: metric(A) - metric(B) with paired lesion-bootstrap CIs -> paired.json
    and paired.md (default folder: A's folder/paired-vs-<B's name>).
    --adapt bn,priors,tta (with --data) adapts the model to the data's images without their
    labels; --save-adaptation DIR keeps the result as a run folder to export and serve.
    --fit-operating-point mel=0.85 chooses a minimum-recall operating point on RUN's val
    predictions (eval/operating_point.py) and applies it to the run folder.
    --fit-ood fits the unfamiliar-image flag (RUN/ood.json); --ood-auroc DIR reports how
    well its scores tell DIR's images from RUN's test images.
    --ood-shifts: the flag's AUROC for each shift of the shift benchmark against clean.
    --adapt ... --shift-bench scores RUN's test split under the shifts of `dermkit bench
    shift`, as is and adapted to each shift's images (adapt_shift.json and .md).
    --tta re-scores RUN's own val and test images with 8-view test-time augmentation
    (tasks/tta.py); the output folder pairs with --against like any run.
    """
    from dermkit.eval.evaluate import evaluate_file

    if tta:
        _tta(predictions, out, seed, data, against, rule)
        return
    if rule is not None:
        fail("--rule goes with --tta (it names the rule refitted on the TTA logits)")
    if fit_operating_point is not None:
        _fit_operating_point(predictions, fit_operating_point)
        return
    if shift_bench:
        _adapted_shift_bench(
            predictions, adapt, out, shifts, severities, limit, n_boot, seed, priors_limit
        )
        return
    if fit_ood or ood_auroc is not None or ood_shifts:
        _ood_commands(predictions, fit_ood, ood_quantile, ood_auroc, layout, label_map, cache_dir)
        if ood_shifts:
            _ood_shift_aurocs(predictions, shifts, severities, limit)
        return
    if (adapt is not None or save_adaptation is not None) and data is None:
        fail("--adapt and --save-adaptation adapt the model to a dataset: they need --data")
    if against is not None:
        from dermkit.eval import paired

        if data is not None or label_map is not None:
            fail("--against compares two predictions files; it does not take --data/--label-map")
        with reported():
            result = paired.compare_prediction_files(
                predictions, against, n_boot=n_boot, seed=seed, positive_class=positive_class
            )
        console.print(paired.comparison_table(result))
        out = out or paired.default_output_dir(predictions, against)
        _, md = paired.write_comparison(result, out)
        print(md)
        return
    if data is not None:
        from dermkit.eval.external import evaluate_external

        with reported():
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
                adapt=adapt,
                save_adaptation=save_adaptation,
                priors_max_error=priors_limit,
            )
        ext = done["result"]["external"]
        console.print(
            f"scored {ext['images_scored']} images, classes {ext['scored_classes']}; model "
            f"classes not in the data: {ext['model_classes_not_in_data'] or 'none'}; dropped "
            f"by the label map: {ext['source_labels_dropped'] or 'none'}",
            highlight=False,
        )
        _print_adaptation(ext)
        print(done["report"])
        return
    if label_map is not None:
        fail("--label-map needs --data (external evaluation of a run folder)")
    with reported():
        done = evaluate_file(predictions, out, n_boot, seed, positive_class)
    for row in done.ordinal_rows:
        console.print(" | ".join(str(v) for v in row.values()), highlight=False)
    print(done.report)


def _print_adaptation(ext: dict) -> None:
    """What --adapt did and how many images the OOD flag marked, one line each."""
    adaptation = ext.get("adaptation")
    if adaptation:
        console.print(f"adapted: {', '.join(adaptation['applied'])}", highlight=False)
        if adaptation.get("bn"):
            console.print(f"AdaBN: {adaptation['bn']}", highlight=False)
        priors = adaptation.get("priors")
        if priors:
            pairs = ", ".join(
                f"{c} {a:.3f}->{b:.3f}"
                for c, a, b in zip(priors["classes"], priors["source"], priors["target"])
            )
            console.print(f"class priors (source->target, EM): {pairs}", highlight=False)
            check = priors.get("check")
            if check is not None:
                verdict = (
                    "applied"
                    if priors["applied"]
                    else "NOT applied (the posteriors are too poorly calibrated for EM)"
                )
                console.print(
                    f"EM check on the run's val set: error {check['error']:.3f} "
                    f"(limit {check['max_error']}): {verdict}",
                    highlight=False,
                )
        if adaptation.get("saved_to"):
            console.print(f"adapted run folder: {adaptation['saved_to']}", highlight=False)
    ood = ext.get("ood")
    for name in ("energy", "mahalanobis"):
        if ood and name in ood:
            r = ood[name]
            console.print(
                f"unfamiliar ({name}): {r['flagged']} of {r['of']} images ({r['fraction']:.1%})",
                highlight=False,
            )


def _ood_commands(
    run: Path,
    fit: bool,
    quantile: float,
    auroc_data: Path | None,
    layout: str,
    label_map: Path | None,
    cache_dir: Path | None,
) -> None:
    """--fit-ood and/or --ood-auroc DIR on a run folder."""
    from dermkit.eval.ood import fit_ood, ood_auroc

    with reported():
        if fit:
            rule = fit_ood(run, quantile=quantile)
            console.print(
                f"unfamiliar-image flag: energy > {rule.threshold:.4f} "
                f"({rule.val_flagged:.1%} of {rule.n_val} val images flagged)"
                + (
                    f"; Mahalanobis > {rule.mahalanobis_threshold:.2f}"
                    if rule.mahalanobis_threshold is not None
                    else ""
                )
                + f" -> {run / 'ood.json'}",
                highlight=False,
            )
        if auroc_data is not None:
            result = ood_auroc(
                run, auroc_data, layout=layout, label_map=label_map, cache_dir=cache_dir
            )
            print_json(result)


def _fit_operating_point(run: Path, target: str) -> None:
    """--fit-operating-point CLASS=RECALL on a run folder: val-chosen, test reported."""
    from dermkit.eval.operating_point import fit_operating_point

    with reported():
        record = fit_operating_point(run, target)
    before, after = record["before"], record["after"]
    console.print(
        f"{record['class']} scale x{record['factor']:.3f}: val recall "
        f"{before['val']['recall']:.3f} -> {after['val']['recall']:.3f} "
        f"(target {record['target_recall']}); test recall {before['test']['recall']:.3f} -> "
        f"{after['test']['recall']:.3f}, balanced accuracy "
        f"{before['test']['balanced_accuracy']:.3f} -> {after['test']['balanced_accuracy']:.3f}"
        f" -> {run / 'operating_point.json'}",
        highlight=False,
    )


def _adapted_shift_bench(
    run: Path,
    adapt: str | None,
    out: Path | None,
    shifts: str | None,
    severities: str,
    limit: int | None,
    n_boot: int,
    seed: int,
    priors_limit: float = 0.1,
) -> None:
    """--shift-bench: the shift benchmark as is and adapted (dermkit.bench.adapt_shift)."""
    from dermkit.bench.adapt_shift import run_adapted_shift_bench

    if not adapt:
        fail("--shift-bench compares the run as is with the run adapted: it needs --adapt")
    with reported():
        result = run_adapted_shift_bench(
            run,
            adapt,
            out,
            shifts=comma_list(shifts) or None,
            severities=tuple(comma_list(severities, int)),
            n_boot=n_boot,
            seed=seed,
            limit=limit,
            priors_max_error=priors_limit,
        )
    print(Path(result["files"]["markdown"]).read_text(), end="")


def _ood_shift_aurocs(run: Path, shifts: str | None, severities: str, limit: int | None) -> None:
    """--ood-shifts: the flag's AUROC per shift (dermkit.bench.adapt_shift)."""
    from dermkit.bench.adapt_shift import shift_ood_aurocs

    with reported():
        result = shift_ood_aurocs(
            run,
            shifts=comma_list(shifts) or None,
            severities=tuple(comma_list(severities, int)),
            limit=limit,
        )
    for row in result["rows"]:
        cells = [f"{row['shift']} ({row['severity']})"]
        for key in ("energy", "mahalanobis"):
            if key in row:
                e = row[key]
                cells.append(
                    f"{key} AUROC {e['auroc']:.3f}, flagged {e['flagged_out']:.1%} "
                    f"(clean {e['flagged_in']:.1%})"
                )
        console.print(" | ".join(cells), highlight=False)
    print_json(result)


def _tta(
    run: Path,
    out: Path | None,
    seed: int,
    data: Path | None,
    against: Path | None,
    rule: str | None,
) -> None:
    from dermkit.tasks.tta import DECISION_RULES, evaluate_run_tta

    if data is not None or against is not None:
        fail("--tta re-scores RUN's own split: pair its output folder with --against afterwards")
    if not (run / "config.yaml").is_file():
        fail(f"--tta needs a run folder (config.yaml, model.safetensors); {run} is not one")
    if rule is not None and rule not in DECISION_RULES:
        fail(f"--rule {rule!r}: expected one of {', '.join(DECISION_RULES)}")
    with reported():
        result = evaluate_run_tta(run, out, seed=seed, decision_rule=rule)
    from dermkit.eval.report import format_estimate

    single = result.get("single_view") or {}
    for name in ("macro_f1", "balanced_accuracy"):
        was = f" (single view {format_estimate(single[name])})" if name in single else ""
        console.print(f"{name}: {format_estimate(result['metrics'][name])}{was}")
    print(out or run / "tta")
