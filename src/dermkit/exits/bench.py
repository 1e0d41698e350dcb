"""``dermkit exits bench``: accuracy vs compute of early exits on the test split.

For every head type of an exit run:

* an accuracy-vs-compute curve: a shared threshold grid (the q-quantiles of each exit's
  val confidence, q from 0 to 1) applied to the test logits, giving mean blocks, GFLOPs
  fraction, accuracy and macro-F1 per point (evaluation only: nothing is chosen on test);
* the calibrated operating point (``policy_<head>.json``, chosen on val) on test, with
  lesion-level bootstrap CIs next to the plain model's;
* the exit distribution per true class at that point;
* wall time of the dropping inference (``predict_early_exit``) against the plain
  backbone on the same test images, measured in interleaved rounds in one process.

Writes ``bench.json``, ``metrics.json`` (its key figures), ``curves.png``,
``exit_distribution.png`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from dermkit.core.files import write_json_atomic
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.plots import save_figure
from dermkit.eval.report import HtmlReport, format_estimate, to_jsonable
from dermkit.exits.infer import predict_early_exit
from dermkit.exits.latency import time_interleaved
from dermkit.exits.policy import ExitPolicy, macro_f1, softmax
from dermkit.exits.run_io import ExitRun
from dermkit.models.backbones import input_stats

log = logging.getLogger(__name__)


def curve(
    val: np.ndarray,
    test: np.ndarray,
    y_test: np.ndarray,
    template: ExitPolicy,
    gflops_fraction: np.ndarray,
    block_fraction: np.ndarray,
    n_points: int = 21,
) -> list[dict]:
    """Test operating points of a shared quantile grid of thresholds.

    Args:
        val, test: (E, N, C) per-exit logits; thresholds come from ``val`` only.
        y_test: (N_test,) labels.
        template: measure, temperatures and protected classes of the policy.
        gflops_fraction, block_fraction: (E,) cost of leaving at each exit.
    """
    E = len(val)
    conf_val = np.stack([template.confidence(val[j], j)[0] for j in range(E - 1)], axis=1)
    points = []
    for q in np.linspace(0.0, 1.0, n_points):
        thresholds = np.quantile(conf_val, q, axis=0) if q < 1 else np.full(E - 1, 2.0)
        policy = ExitPolicy(
            list(thresholds), template.measure, template.temperatures, template.protected_classes
        )
        logits, exit_index = policy.select(list(test))
        pred = logits.argmax(1)
        points.append(
            {
                "q": float(q),
                "thresholds": [float(t) for t in thresholds],
                "gflops_fraction": float(gflops_fraction[exit_index].mean()),
                "blocks_fraction": float(block_fraction[exit_index].mean()),
                "accuracy": float((pred == y_test).mean()),
                "macro_f1": macro_f1(y_test, pred, logits.shape[1]),
            }
        )
    return points


def exit_distribution(exit_index: np.ndarray, y: np.ndarray, n_classes: int, n_exits: int):
    """(C, E) share of each true class's images leaving at each exit (rows sum to 1)."""
    counts = np.zeros((n_classes, n_exits))
    np.add.at(counts, (y, exit_index), 1)
    return counts / np.clip(counts.sum(1, keepdims=True), 1, None)


def plot_curves(curves: dict, points: dict, plain: dict) -> Figure:
    """Macro-F1 vs GFLOPs fraction and accuracy vs mean blocks fraction, a line per head."""
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for (metric, xkey, xlabel), ax in zip(
        [
            ("macro_f1", "gflops_fraction", "mean GFLOPs / plain model"),
            ("accuracy", "blocks_fraction", "mean blocks / depth"),
        ],
        axes,
    ):
        for head, pts in curves.items():
            (line,) = ax.plot([p[xkey] for p in pts], [p[metric] for p in pts], ".-", label=head)
            if head in points:
                op = points[head]
                ax.plot(op[xkey], op[metric], "*", ms=14, color=line.get_color(), mec="k")
        ax.plot(1.0, plain[metric], "kx", ms=10, label="plain model")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric.replace('_', '-')}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Early exits on test: curves from val-quantile thresholds; stars = calibrated")
    fig.tight_layout()
    return fig


def plot_exit_distribution(dists: dict, classes: list[str], depths: list[int]) -> Figure:
    """Stacked bars per class: share of images leaving at each exit, a panel per head."""
    heads = list(dists)
    fig = Figure(figsize=(3.2 * max(1, len(heads)) + 1, 3.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(heads)), sharey=True))
    for ax, head in zip(axes, heads):
        d = np.asarray(dists[head])
        bottom = np.zeros(len(classes))
        for j in range(d.shape[1]):
            ax.bar(classes, d[:, j], bottom=bottom, label=f"after {depths[j]} blocks")
            bottom += d[:, j]
        ax.set_title(head)
        ax.tick_params(axis="x", rotation=60)
    axes[0].set_ylabel("share of the class's test images")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def run_exits_bench(
    exit_run: str | Path,
    rounds: int | None = None,
    batch_size: int | None = None,
    max_images: int | None = None,
) -> Path:
    """Benchmark every calibrated head type of an exit run on test; returns report.html."""
    run = ExitRun.open(exit_run)
    e, classes = run.config.exits, run.classes
    rounds = rounds or e.bench_rounds
    batch_size = batch_size or e.bench_batch_size
    max_images = max_images or e.bench_max_images
    data = run.data()
    test_part = data.part("test")
    test_ds = CachedImageDataset(data.cache, test_part, classes)
    n_time = len(test_ds) if max_images is None else min(max_images, len(test_ds))
    base = run.base_model()[0]
    images = to_float(test_ds.__getitems__(np.arange(n_time))[0], *input_stats(base))
    batches = list(torch.split(images, batch_size))
    shared = base if run.info["mode"] == "frozen" else None
    depths = run.info["exit_depths"]

    def test_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
        """Metrics of test probs (N, C) with the run's lesion-level bootstrap settings."""
        return evaluate_predictions(
            y,
            probs,
            classes,
            groups=test_part["lesion_id"].to_numpy(),
            n_boot=run.config.eval.n_boot,
            ci=run.config.eval.ci,
            seed=run.config.seed,
            positive_class=run.config.eval.positive_class,
        )

    curves, points, dists, heads_out, fns = {}, {}, {}, {}, {}
    plain_result = None
    for head in run.head_types:
        lg = run.logits(head)
        val, test, y = lg["val"], lg["test"], lg["test_labels"].astype(int)
        flops = run.info["gflops"][head]
        gf, bf = np.asarray(flops["cost_fraction"]), np.asarray(flops["block_fraction"])
        if plain_result is None:
            plain_probs = softmax(test[-1])
            plain_result = test_metrics(y, plain_probs)
            plain = {
                "accuracy": float((plain_probs.argmax(1) == y).mean()),
                "macro_f1": macro_f1(y, plain_probs.argmax(1), len(classes)),
            }
        try:
            policy = run.policy(head)
        except FileNotFoundError as err:
            log.warning("%s: %s", head, err)
            heads_out[head] = {"error": str(err)}
            template = ExitPolicy([0.0] * (len(val) - 1), e.measure)
            curves[head] = curve(val, test, y, template, gf, bf)
            continue
        curves[head] = curve(val, test, y, policy, gf, bf)
        logits, exit_index = policy.select(list(test))
        pred = logits.argmax(1)
        probs = softmax(logits)
        result = test_metrics(y, probs)
        points[head] = {
            "gflops_fraction": float(gf[exit_index].mean()),
            "blocks_fraction": float(bf[exit_index].mean()),
            "mean_blocks": float(np.asarray(depths)[exit_index].mean()),
            "mean_gflops": float(np.asarray(flops["cumulative_gflops"])[exit_index].mean()),
            "accuracy": float((pred == y).mean()),
            "macro_f1": macro_f1(y, pred, len(classes)),
        }
        dists[head] = exit_distribution(exit_index, y, len(classes), len(depths))
        model = run.model(head, backbone=shared)
        # The dropping path must reproduce the offline policy on the logits it saved.
        with torch.inference_mode():
            online = [predict_early_exit(model, b, policy) for b in batches]
        online_exit = torch.cat([o.exit_index for o in online]).numpy()
        agreement = float((online_exit == exit_index[:n_time]).mean())
        heads_out[head] = {
            "policy": policy.to_dict(classes),
            "test": points[head],
            "test_metrics": result["metrics"],
            "exit_fractions": np.bincount(exit_index, minlength=len(depths)) / len(y),
            "exit_distribution_per_class": dict(zip(classes, dists[head].tolist())),
            "online_offline_exit_agreement": agreement,
        }

        def early(model=model, policy=policy):
            with torch.inference_mode():
                for b in batches:
                    predict_early_exit(model, b, policy)

        fns[head] = early
    if shared is None:
        shared = run.model(run.head_types[0]).backbone
    backbone = shared.eval()

    def plain_fn():
        with torch.inference_mode():
            for b in batches:
                backbone(b)

    fns = {"plain": plain_fn, **fns}
    times = time_interleaved(fns, rounds)
    per_image = {n: 1e3 * np.median(t) / n_time for n, t in times.items()}
    for head in fns:
        if head == "plain":
            continue
        heads_out[head]["wall_ms_per_image"] = per_image[head]
        heads_out[head]["speedup_vs_plain"] = per_image["plain"] / per_image[head]
    result = {
        "exit_run": str(run.path),
        "classes": classes,
        "exit_depths": depths,
        "objective": json.loads((run.path / "calibration.json").read_text())["objective"]
        if (run.path / "calibration.json").exists()
        else None,
        "timing": {
            "images": n_time,
            "batch_size": batch_size,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
            "seconds": times,
            "plain_ms_per_image": per_image["plain"],
        },
        "plain": {**plain, "test_metrics": plain_result["metrics"]},
        "heads": heads_out,
        "curves": curves,
        "gflops": run.info["gflops"],
    }
    (run.path / "bench.json").write_text(json.dumps(to_jsonable(result), indent=2))
    write_json_atomic(run.path / "metrics.json", to_jsonable(bench_metrics(result)))
    save_figure(plot_curves(curves, points, plain), run.path / "curves.png")
    if dists:
        save_figure(
            plot_exit_distribution(dists, classes, depths), run.path / "exit_distribution.png"
        )
    return _write_report(run, result, points, dists)


def bench_metrics(bench: dict) -> dict:
    """The run's ``metrics.json``: test metrics of the plain model and of each calibrated
    head type, with its compute fraction, mean blocks and speed-up (from ``bench.json``)."""
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
    return {"plain": bench["plain"]["test_metrics"], "heads": heads}


def best_head(exit_run: str | Path) -> str | None:
    """The calibrated head type with the best val macro-F1 (None when none is calibrated)."""
    scores = {}
    for policy in Path(exit_run).glob("policy_*.json"):
        scores[policy.stem.removeprefix("policy_")] = (
            json.loads(policy.read_text()).get("val_macro_f1") or 0.0
        )
    return max(scores, key=scores.get) if scores else None


def _write_report(run: ExitRun, result: dict, points: dict, dists: dict) -> Path:
    classes, depths = result["classes"], result["exit_depths"]
    report = HtmlReport(
        f"dermkit exits bench: {run.info['backbone']} ({run.info['mode']} backbone)"
    )
    report.add_paragraph(
        f"Exit run {run.path}; base run {run.info['base_run']}. Exits after blocks {depths} "
        f"(the last is the backbone's own head). Objective (chosen on val): "
        f"{result['objective']}. Wall time: median of {result['timing']['rounds']} interleaved "
        f"rounds over {result['timing']['images']} test images, batch "
        f"{result['timing']['batch_size']}, {result['timing']['threads']} threads."
    )
    rows = []
    pm = result["plain"]["test_metrics"]
    rows.append(
        {
            "model": "plain",
            "macro-F1 [CI]": format_estimate(pm["macro_f1"]),
            "balanced acc. [CI]": format_estimate(pm["balanced_accuracy"]),
            "mean blocks": float(depths[-1]),
            "GFLOPs fraction": 1.0,
            "ms / image": result["timing"]["plain_ms_per_image"],
            "speed-up": 1.0,
        }
    )
    for head, h in result["heads"].items():
        if "error" in h:
            rows.append({"model": head, "macro-F1 [CI]": h["error"]})
            continue
        m = h["test_metrics"]
        rows.append(
            {
                "model": head,
                "thresholds": ", ".join(f"{t:.3f}" for t in h["policy"]["thresholds"]),
                "macro-F1 [CI]": format_estimate(m["macro_f1"]),
                "balanced acc. [CI]": format_estimate(m["balanced_accuracy"]),
                "mean blocks": h["test"]["mean_blocks"],
                "GFLOPs fraction": h["test"]["gflops_fraction"],
                "ms / image": h.get("wall_ms_per_image"),
                "speed-up": h.get("speedup_vs_plain"),
                "online = offline exits": h["online_offline_exit_agreement"],
            }
        )
    report.add_heading("Calibrated operating points on test")
    report.add_table(rows, caption="Test metrics with 95% lesion-level bootstrap CIs")
    report.add_figure(
        run.path / "curves.png",
        "Test accuracy/macro-F1 against mean compute; each point is a shared quantile of the "
        "val confidences used as thresholds; stars: the calibrated operating points.",
    )
    if dists:
        report.add_heading("Where each class leaves")
        report.add_figure(
            run.path / "exit_distribution.png",
            "Share of each true class's test images leaving at each exit (calibrated points).",
        )
        for head, d in dists.items():
            report.add_table(
                [
                    {
                        "class": c,
                        **{f"after {depths[j]}": float(d[i, j]) for j in range(len(depths))},
                    }
                    for i, c in enumerate(classes)
                ],
                caption=f"{head}: exit distribution per class",
            )
    report.add_heading("Compute per exit")
    report.add_table(
        [
            {
                "head": head,
                "head params": run.info["head_params"][head],
                **{
                    f"GFLOPs after {depths[j]}": g
                    for j, g in enumerate(run.info["gflops"][head]["cumulative_gflops"])
                },
                "plain GFLOPs": run.info["gflops"][head]["plain_gflops"],
            }
            for head in run.head_types
        ],
        caption="Cumulative GFLOPs per image when leaving at each exit (FlopCounterMode: "
        "matrix products only; the SSM scan's element-wise ops are not counted)",
    )
    report.add_link("bench.json", "bench.json (all numbers)")
    return report.write(run.path / "report.html")
