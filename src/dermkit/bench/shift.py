"""``dermkit bench shift RUN``: how much a classifier loses under image shifts of HAM10000.

A shift benchmark anyone can run: the run's own test split (its config's data path and
split), each source image shifted (``eval/shifts.py``: zoom, colour temperature, exposure,
contrast, vignetting, blur, JPEG, a clinical camera profile; three severities each), then
exactly the run's evaluation path: its crop policy and colour constancy
(``data.cache.crop_image``), its input normalisation, precision and test-time augmentation
(``train.loop.predict_logits``) and its decision rule (``decision.json``). The shift acts on
the source image before the run's resize and crop, so a zoom is a zoom of the photo, not of
the model's input.

Every shifted condition is compared with the clean images by the paired lesion-level
bootstrap of ``eval/paired.py`` (the same lesion resamples for both), for balanced
accuracy, macro-F1 and the positive class's recall at the decision rule (argmax of the
rule's probabilities). Output (default ``RUN/shift``): ``shift.json``, ``shift.md`` and
``shift.png`` (the balanced-accuracy change per shift and severity, with its interval),
``shift_examples.png`` (one test image, a melanoma where there is one, under every shift
and severity) and ``predictions/<shift>-<severity>.csv`` (``clean.csv`` too) in the
predictions-file format, so two runs can be compared under one shift with
``dermkit evaluate A.csv --against B.csv``.
The worst shift is the one with the largest balanced-accuracy loss at the middle severity.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dermkit.config import ConfigError
from dermkit.core.files import atomic_path, write_json_atomic, write_text_atomic
from dermkit.core.predictions import write_predictions
from dermkit.data.cache import ImageCache, crop_image
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.images import load_rgb
from dermkit.eval.calibration import DecisionRule
from dermkit.eval.paired import compare_predictions
from dermkit.eval.shifts import SEVERITY_NAMES, SHIFTS, apply_shift, to_uint8

log = logging.getLogger(__name__)

MIDDLE = 2


def test_split(cfg) -> pd.DataFrame:
    """The test rows of the run's data config: same path, layout, label map, classes and
    split (split file or lesion-grouped seed) as the run was trained with."""
    from dermkit.data.prepare import read_configured_dataset, split_manifest

    df = split_manifest(read_configured_dataset(cfg.data).manifest, cfg.data)
    return df[df["split"] == "test"].reset_index(drop=True)


def test_sources(run_dir: Path, cfg, classes: list[str], limit: int | None):
    """(the run's test rows of its classes, their decoded source images), first ``limit``."""
    manifest = test_split(cfg)
    manifest = manifest[manifest["label"].isin(classes)].reset_index(drop=True)
    if limit is not None:
        manifest = manifest.iloc[:limit].reset_index(drop=True)
    if manifest.empty:
        raise ConfigError(f"{run_dir}: the run's test split has no images of its classes")
    with ThreadPoolExecutor(max_workers=4) as pool:
        sources = list(pool.map(load_rgb, manifest["path"]))
    return manifest, sources


def _preprocess(sources: list[np.ndarray], cfg) -> np.ndarray:
    """Source images (H, W, 3) uint8 -> (N, S, S, 3) uint8 model inputs, as the run's cache."""
    size, crop, cc = cfg.data.image_size, cfg.data.crop, cfg.data.colour_constancy
    with ThreadPoolExecutor(max_workers=4) as pool:
        return np.stack(list(pool.map(lambda im: crop_image(im, size, crop, cc), sources)))


def shifted_sources(sources: list[np.ndarray], shift: str, severity: int) -> list[np.ndarray]:
    """Every source image under ``shift`` at ``severity``, uint8; images of one size are
    shifted together."""
    out: list[np.ndarray | None] = [None] * len(sources)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(sources):
        by_shape.setdefault(image.shape, []).append(i)
    for rows in by_shape.values():
        for lo in range(0, len(rows), 256):
            chunk = rows[lo : lo + 256]
            x = torch.from_numpy(np.stack([sources[i] for i in chunk])).permute(0, 3, 1, 2)
            y = to_uint8(apply_shift(x.float().div_(255.0), shift, severity))
            for i, image in zip(chunk, y.permute(0, 2, 3, 1).numpy()):
                out[i] = image
    return out  # type: ignore[return-value]


def _logits(model, cfg, images: np.ndarray, manifest, classes, accelerator, batch_size):
    """Logits (N, C) of model inputs (N, S, S, 3) uint8, as the run scored its test split."""
    from dermkit.eval.inference import predict_logits

    cache = ImageCache(images=images, image_ids=manifest["image_id"].to_numpy(), root=Path("."))
    dataset = CachedImageDataset(cache, manifest, classes, in_memory=False)
    logits = predict_logits(
        model,
        dataset,
        np.arange(len(dataset)),
        accelerator,
        batch_size=batch_size,
        tta=cfg.augment.tta,
    )
    return logits.numpy()


def paired_comparer(manifest: pd.DataFrame, classes: list[str], cfg, n_boot: int, seed: int):
    """``compare(probs_a, probs_b) -> result``: :func:`compare_predictions` of two (N, C)
    probability sets on the test rows of ``manifest``, lesion-grouped, at the run's CI level
    and positive class."""
    y = manifest["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    groups = manifest["lesion_id"].to_numpy()

    def compare(probs_a: np.ndarray, probs_b: np.ndarray) -> dict:
        return compare_predictions(
            y,
            probs_a,
            probs_b,
            classes,
            groups,
            n_boot=n_boot,
            seed=seed,
            ci=cfg.eval.ci,
            positive_class=cfg.eval.positive_class,
        )

    return compare


def _summary(result: dict, positive: str, names: tuple[str, str] = ("shifted", "clean")) -> dict:
    """The reported metrics of one paired comparison: balanced accuracy, macro-F1 and the
    positive class's recall, each {names[0]: A, names[1]: B, delta, ci_low, ci_high}."""
    keys = {
        "balanced_accuracy": result["metrics"]["balanced_accuracy"],
        "macro_f1": result["metrics"]["macro_f1"],
        f"{positive}_recall": result["per_class"][positive]["recall"]
        if positive in result["per_class"]
        else None,
    }
    out = {}
    for name, e in keys.items():
        if e is None:
            continue
        out[name] = {
            names[0]: e["value_a"],
            names[1]: e["value_b"],
            "delta": e["delta"],
            "ci_low": e["ci_low"],
            "ci_high": e["ci_high"],
        }
    return out


def run_shift_bench(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    shifts: list[str] | None = None,
    severities: tuple[int, ...] = (1, 2, 3),
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    save_predictions: bool = True,
    progress: bool = False,
) -> dict:
    """Score the run in ``run_dir`` on its test split, clean and under every shift.

    Args:
        run_dir: finetune or distill run folder (model.safetensors, config.yaml,
            decision.json).
        out_dir: output folder (default ``run_dir/shift``).
        shifts: names of ``eval.shifts.SHIFTS`` (default: all).
        severities: of 1 (low), 2 (middle), 3 (high).
        n_boot, seed: paired lesion-bootstrap replicates and their seed.
        batch_size: images per forward pass.
        limit: score only the first ``limit`` test images (a quick look; not a benchmark).
        save_predictions: write ``predictions/clean.csv`` and ``<shift>-<severity>.csv``.

    Returns:
        The ``shift.json`` dict: ``run``, ``n_images``, ``n_lesions``, ``classes``,
        ``positive_class``, ``preprocessing``, ``shifts`` (name -> parameter, levels,
        description), ``clean`` (metrics of the clean images), ``results`` (one row per
        shift and severity: metric -> {shifted, clean, delta, ci_low, ci_high}), ``worst``
        and the paths written.
    """
    from dermkit.core.devices import make_accelerator
    from dermkit.models.runs_io import load_trained_classifier

    run_dir = Path(run_dir)
    shifts = list(SHIFTS) if shifts is None else list(shifts)
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shifts {unknown}; the shifts are {list(SHIFTS)}")
    bad = [s for s in severities if s not in (1, 2, 3)]
    if bad or not severities:
        raise ConfigError(f"severities must be among 1, 2, 3 (low, middle, high), got {bad}")
    model, cfg, classes = load_trained_classifier(run_dir, "the shift bench")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "shift"
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest, sources = test_sources(run_dir, cfg, classes, limit)
    compare = paired_comparer(manifest, classes, cfg, n_boot, seed)
    rule = DecisionRule.load(run_dir / "decision.json")
    accelerator = make_accelerator(cfg.optim.precision)
    positive = cfg.eval.positive_class

    def probs_of(images: list[np.ndarray]) -> np.ndarray:
        x = _preprocess(images, cfg)
        logits = _logits(model, cfg, x, manifest, classes, accelerator, batch_size)
        return rule.probs(logits)

    predictions = out_dir / "predictions"

    def save(name: str, probs: np.ndarray) -> None:
        if save_predictions:
            predictions.mkdir(exist_ok=True)
            with atomic_path(predictions / f"{name}.csv") as tmp:
                write_predictions(tmp, manifest, probs, classes)

    clean = probs_of(sources)
    save("clean", clean)
    agreement = _agreement_with_run(run_dir, manifest, clean, classes)
    clean_check = _summary(compare(clean, clean), positive)
    conditions = [(s, k) for s in shifts for k in severities]
    rows = []
    for i, (shift, severity) in enumerate(conditions, 1):
        probs = probs_of(shifted_sources(sources, shift, severity))
        save(f"{shift}-{severity}", probs)
        result = compare(probs, clean)
        row = {
            "shift": shift,
            "severity": severity,
            "severity_name": SEVERITY_NAMES[severity],
            "parameter": SHIFTS[shift].value(severity),
            "n_pred_differ": result["n_pred_differ"],
            "metrics": _summary(result, positive),
        }
        rows.append(row)
        if progress:
            bal = row["metrics"]["balanced_accuracy"]
            log.info(
                "shift %d/%d %s %s: balanced accuracy %.3f (%+.3f)",
                i,
                len(conditions),
                shift,
                SEVERITY_NAMES[severity],
                bal["shifted"],
                bal["delta"],
            )

    result = {
        "run": str(run_dir),
        "model": cfg.model.name,
        "data": str(cfg.data.path),
        "split_file": cfg.data.split_file,
        "n_images": len(manifest),
        "n_lesions": int(manifest["lesion_id"].nunique()),
        "limited_to": limit,
        "classes": classes,
        "positive_class": positive,
        "ci_level": cfg.eval.ci,
        "n_boot": n_boot,
        "seed": seed,
        "preprocessing": {
            "image_size": cfg.data.image_size,
            "crop": cfg.data.crop,
            "colour_constancy": cfg.data.colour_constancy,
            "tta": cfg.augment.tta,
            "decision_rule": {"temperature": rule.temperature, "class_scales": rule.class_scales},
        },
        "shifts": {
            s: {
                "description": SHIFTS[s].description,
                "parameter": SHIFTS[s].parameter,
                "levels": list(SHIFTS[s].levels),
            }
            for s in shifts
        },
        "clean": {name: e["clean"] for name, e in clean_check.items()},
        "clean_vs_clean": clean_check,
        "clean_vs_run_predictions": agreement,
        "results": rows,
        "worst": worst_shift(rows),
    }
    json_path, md_path, png_path = (
        out_dir / "shift.json",
        out_dir / "shift.md",
        out_dir / "shift.png",
    )
    result["files"] = {
        "json": str(json_path),
        "markdown": str(md_path),
        "figure": str(png_path),
        "predictions": str(predictions) if save_predictions else None,
    }
    write_json_atomic(json_path, result, allow_nan=False)
    write_text_atomic(md_path, shift_markdown(result))
    plot_shift(result, png_path)
    # a melanoma when the split has one: what each shift does to a lesion that matters most
    positives = np.flatnonzero(manifest["label"].to_numpy() == positive)
    example = int(positives[0]) if positives.size else 0
    examples_path = out_dir / "shift_examples.png"
    Image.fromarray(example_grid(sources[example], shifts)).save(examples_path)
    result["files"]["examples"] = str(examples_path)
    result["files"]["example_image"] = str(manifest["image_id"].iloc[example])
    write_json_atomic(json_path, result, allow_nan=False)
    return result


def _agreement_with_run(run_dir: Path, manifest, clean: np.ndarray, classes) -> dict | None:
    """How the bench's clean probabilities agree with the run's own predictions_test.csv
    (the same preprocessing should give the same numbers): {n_images, max_abs_prob_diff}."""
    from dermkit.core.predictions import read_predictions

    path = run_dir / "predictions_test.csv"
    if not path.exists():
        return None
    df, _, probs, run_classes = read_predictions(path)
    if sorted(run_classes) != sorted(classes):
        return None
    row = pd.Series(np.arange(len(df)), index=df["image_id"].astype(str))
    ids = manifest["image_id"].astype(str)
    shared = ids.isin(row.index).to_numpy()
    if not shared.any():
        return {"n_images": 0, "max_abs_prob_diff": None}
    theirs = probs[row[ids[shared]].to_numpy()][:, [run_classes.index(c) for c in classes]]
    diff = float(np.abs(theirs - clean[shared]).max())
    return {"n_images": int(shared.sum()), "max_abs_prob_diff": diff}


def example_grid(source: np.ndarray, shifts: list[str]) -> np.ndarray:
    """One source image under every shift: a row per shift, columns clean / low / middle /
    high, (rows x H, 4 x W, 3) uint8 (what the model's crop is then taken from)."""
    rows = []
    for shift in shifts:
        cells = [shifted_sources([source], shift, severity)[0] for severity in range(4)]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def worst_shift(rows: list[dict]) -> dict | None:
    """The shift with the largest balanced-accuracy loss at the middle severity (else at the
    highest severity scored): {shift, severity, delta}."""
    if not rows:
        return None
    scored = {r["severity"] for r in rows}
    severity = MIDDLE if MIDDLE in scored else max(scored)
    candidates = [r for r in rows if r["severity"] == severity]
    worst = min(candidates, key=lambda r: r["metrics"]["balanced_accuracy"]["delta"])
    return {
        "shift": worst["shift"],
        "severity": severity,
        "severity_name": SEVERITY_NAMES[severity],
        "balanced_accuracy_delta": worst["metrics"]["balanced_accuracy"]["delta"],
    }


def _interval(e: dict) -> str:
    return "" if e["ci_low"] is None else f" [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def _cell(e: dict | None) -> str:
    if e is None or e["shifted"] is None:
        return "n/a"
    return f"{e['shifted']:.3f} ({e['delta']:+.3f}{_interval(e)})"


def _metric_cells(metrics: dict, positive: str, cell) -> str:
    """Balanced accuracy | macro-F1 | positive recall, each formatted by ``cell``."""
    names = ("balanced_accuracy", "macro_f1", f"{positive}_recall")
    return " | ".join(cell(metrics.get(name)) for name in names)


def shift_markdown(result: dict) -> str:
    """The report: what was scored, the clean figures, one row per shift and severity."""
    positive = result["positive_class"]
    level = round(100 * result["ci_level"])
    pre = result["preprocessing"]
    clean = result["clean"]
    lines = [
        f"# Shift benchmark: {result['model']}",
        "",
        f"- run: `{result['run']}`",
        f"- data: `{result['data']}`, test split "
        f"({result['split_file'] or 'lesion-grouped by seed'}):"
        f" {result['n_images']} images of {result['n_lesions']} lesions"
        + (
            f" (first {result['limited_to']} only: not a benchmark)" if result["limited_to"] else ""
        ),
        f"- preprocessing as the run: {pre['image_size']} px, {pre['crop']}, colour constancy "
        f"{pre['colour_constancy']}, TTA {pre['tta']}; decision rule T = "
        f"{pre['decision_rule']['temperature']:.3f}"
        + (", class scales" if pre["decision_rule"]["class_scales"] else ""),
        "- each cell: value under the shift (shifted - clean ["
        f"{level}% CI of the paired "
        f"lesion bootstrap, {result['n_boot']} replicates]); {positive} recall is at the "
        "decision rule (argmax of its probabilities)",
        "",
        f"Clean: balanced accuracy {clean['balanced_accuracy']:.3f}, macro-F1 "
        f"{clean['macro_f1']:.3f}"
        + (
            f", {positive} recall {clean[f'{positive}_recall']:.3f}"
            if clean.get(f"{positive}_recall") is not None
            else ""
        )
        + ".",
        "",
    ]
    worst = result["worst"]
    if worst is not None:
        lines += [
            f"**Worst shift** (largest balanced-accuracy loss at the {worst['severity_name']} "
            f"severity): `{worst['shift']}`, {worst['balanced_accuracy_delta']:+.3f}.",
            "",
        ]
    lines += [
        f"| shift | severity | parameter | balanced accuracy | macro-F1 | {positive} recall |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        m = r["metrics"]
        lines.append(
            f"| {r['shift']} | {r['severity_name']} | {r['parameter']:.3g} | "
            f"{_metric_cells(m, positive, _cell)} |"
        )
    lines += ["", "Shifts (eval/shifts.py):", ""]
    for name, s in result["shifts"].items():
        levels = " / ".join(f"{v:.3g}" for v in s["levels"])
        lines.append(f"- `{name}`: {s['description']}; {s['parameter']} = {levels}")
    return "\n".join(lines) + "\n"


def plot_shift(result: dict, path: Path) -> Path:
    """Bars: balanced-accuracy change (shifted - clean) per shift, one bar per severity,
    with the paired interval as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shifts = list(result["shifts"])
    severities = sorted({r["severity"] for r in result["results"]})
    fig = Figure(figsize=(max(6.0, 0.9 * len(shifts) + 2), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(severities))
    colours = {1: "#9ecae1", 2: "#4292c6", 3: "#08519c"}
    for j, severity in enumerate(severities):
        rows = {r["shift"]: r for r in result["results"] if r["severity"] == severity}
        xs, ds, err = [], [], [[], []]
        for i, s in enumerate(shifts):
            if s not in rows:
                continue
            e = rows[s]["metrics"]["balanced_accuracy"]
            xs.append(i + (j - (len(severities) - 1) / 2) * width)
            ds.append(e["delta"])
            low = e["ci_low"] if e["ci_low"] is not None else e["delta"]
            high = e["ci_high"] if e["ci_high"] is not None else e["delta"]
            err[0].append(max(0.0, e["delta"] - low))
            err[1].append(max(0.0, high - e["delta"]))
        ax.bar(
            xs,
            ds,
            width,
            yerr=err,
            capsize=2,
            color=colours[severity],
            label=SEVERITY_NAMES[severity],
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(
        -0.10, color="#cb181d", linewidth=0.8, linestyle="--", label="-0.10 (issue 20's bound)"
    )
    ax.set_xticks(range(len(shifts)), shifts, rotation=30, ha="right")
    ax.set_ylabel("balanced accuracy: shifted - clean")
    ax.set_title(
        f"{result['model']}: clean balanced accuracy {result['clean']['balanced_accuracy']:.3f}"
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------- two runs, one shift


def shift_dir(path: str | Path) -> Path:
    """A shift bench's output folder: ``path`` itself when it holds shift.json, else
    ``path/shift`` (a run folder benched with the default output)."""
    path = Path(path)
    folder = path if (path / "shift.json").exists() else path / "shift"
    if not (folder / "shift.json").exists():
        raise FileNotFoundError(
            f"no shift.json in {path} or {path / 'shift'}: run `dermkit bench shift` first"
        )
    if not (folder / "predictions").is_dir():
        raise FileNotFoundError(
            f"{folder / 'predictions'} not found: bench with --save-predictions (the default)"
        )
    return folder


def compare_shift_benches(
    a: str | Path,
    b: str | Path,
    out_dir: str | Path | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Run A - run B under every condition (clean and each shift x severity) both benches
    scored, paired by image and lesion (``eval.paired``): was a robustness measure worth it?

    Args:
        a, b: shift bench folders (or run folders benched into ``RUN/shift``).
        out_dir: default ``<A's bench folder>/compare-vs-<B's run name>``.

    Returns:
        The ``shift_compare.json`` dict: ``a``, ``b``, ``positive_class``, ``rows`` (one
        per condition: {condition, shift, severity, metrics: name -> {a, b, delta, ci_low,
        ci_high}}) and ``files``; also written as ``shift_compare.md``.
    """
    from dermkit.eval.paired import compare_prediction_files

    dir_a, dir_b = shift_dir(a), shift_dir(b)
    bench_a = json.loads((dir_a / "shift.json").read_text())
    positive, ci = bench_a["positive_class"], bench_a["ci_level"]
    order = ["clean"] + [f"{r['shift']}-{r['severity']}" for r in bench_a["results"]]
    shared = [c for c in order if (dir_b / "predictions" / f"{c}.csv").exists()]
    shared = [c for c in shared if (dir_a / "predictions" / f"{c}.csv").exists()]
    if not shared:
        raise ConfigError(f"{dir_a} and {dir_b} have no shift condition in common")
    rows = []
    for condition in shared:
        result = compare_prediction_files(
            dir_a / "predictions" / f"{condition}.csv",
            dir_b / "predictions" / f"{condition}.csv",
            n_boot=n_boot,
            seed=seed,
            ci=ci,
            positive_class=positive,
        )
        shift, _, severity = condition.rpartition("-")
        rows.append(
            {
                "condition": condition,
                "shift": shift or "clean",
                "severity": int(severity) if shift else 0,
                "n_images": result["n"],
                "metrics": _summary(result, positive, names=("a", "b")),
            }
        )
    name_b = dir_b.parent.name if dir_b.name == "shift" else dir_b.name
    out_dir = Path(out_dir) if out_dir is not None else dir_a / f"compare-vs-{name_b}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "a": str(dir_a),
        "b": str(dir_b),
        "positive_class": positive,
        "ci_level": ci,
        "n_boot": n_boot,
        "seed": seed,
        "rows": rows,
        "files": {
            "json": str(out_dir / "shift_compare.json"),
            "markdown": str(out_dir / "shift_compare.md"),
        },
    }
    write_json_atomic(out_dir / "shift_compare.json", result, allow_nan=False)
    write_text_atomic(out_dir / "shift_compare.md", shift_compare_markdown(result))
    return result


def _delta_cell(e: dict | None) -> str:
    if e is None or e["delta"] is None:
        return "n/a"
    text = f"{e['a']:.3f} vs {e['b']:.3f}: {e['delta']:+.3f}{_interval(e)}"
    clear = e["ci_low"] is not None and (e["ci_low"] > 0 or e["ci_high"] < 0)
    return f"**{text}**" if clear else text


def shift_compare_markdown(result: dict) -> str:
    """One row per condition: A vs B and A - B with its paired interval (bold: excludes 0)."""
    positive = result["positive_class"]
    level = round(100 * result["ci_level"])
    lines = [
        "# Shift benchmark: A - B",
        "",
        f"- A: `{result['a']}`",
        f"- B: `{result['b']}`",
        f"- each cell: A vs B: A - B [{level}% CI, paired lesion bootstrap, "
        f"{result['n_boot']} replicates]; **bold**: the interval excludes 0",
        "",
        f"| condition | balanced accuracy | macro-F1 | {positive} recall |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['condition']} | {_metric_cells(r['metrics'], positive, _delta_cell)} |")
    return "\n".join(lines) + "\n"
