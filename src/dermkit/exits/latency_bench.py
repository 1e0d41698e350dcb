"""``dermkit exits latency``: an exit model against its plain model, one image at a time.

For one calibrated head type of an exit run: exports the plain model (every block, the
backbone's head, one ONNX graph) and the fused, pruned exit segments
(:func:`~dermkit.exits.onnx_segments.export_segments` with the policy), then runs test
images at batch 1 through both with ONNX Runtime on ``threads`` intra-op threads, the two
alternating per image (interleaved, so the load of a shared machine hits both alike), and
reports the median milliseconds per image of each and their ratio (n images evenly
spaced over the test split). Test macro-F1 of both
comes from the run's saved logits (the whole test split) and is recomputed from the ONNX
outputs on the timed images. The per-part breakdown of
:func:`~dermkit.exits.latency.measure_overhead` goes in too. Writes
``latency_bench_<head>.json`` in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dermkit.core.onnx import cpu_session
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.eval.report import to_jsonable
from dermkit.exits.latency import measure_overhead, medians_ms, time_interleaved
from dermkit.exits.onnx_segments import OnnxEarlyExitRunner, export_segments
from dermkit.exits.policy import ExitPolicy, macro_f1
from dermkit.exits.run_io import ExitRun
from dermkit.models.backbones import input_stats


def run_exits_latency(
    exit_run: str | Path,
    head: str,
    n_images: int = 300,
    threads: int = 2,
    overhead_rounds: int = 200,
    eager: bool = True,
) -> dict:
    """Interleaved batch-1 ONNX latency of the plain and the exit model; returns the record.

    ``eager=False``: the per-part breakdown in ONNX Runtime only (see ``measure_overhead``).
    """
    run = ExitRun.open(exit_run)
    policy, model = run.policy(head), run.model(head)
    size, n_classes = run.info["img_size"], len(run.classes)
    out = run.path / f"onnx_{head}"
    export_segments(model.keep_exits([]), out / "plain", size)
    export_segments(model, out / "exits", size, policy=policy, class_names=run.classes)
    plain = cpu_session(out / "plain" / "segment_0.onnx", threads)
    plain_input = plain.get_inputs()[0].name
    runner = OnnxEarlyExitRunner(
        out / "exits", ExitPolicy.load(out / "exits" / "policy.json"), threads=threads
    )
    data = run.data()
    part = data.part("test")
    ds = CachedImageDataset(data.cache, part, run.classes)
    n = min(n_images, len(ds))
    # evenly spaced over the split: its rows are grouped by class, and the first n would
    # time mostly one or two classes (with their own exit rates)
    timed = np.linspace(0, len(ds) - 1, n).round().astype(int)
    images = to_float(ds.__getitems__(timed)[0], *input_stats(model.backbone)).numpy()
    outputs: dict[str, list] = {"plain": [], "exits": []}

    def plain_fn():  # call k runs test image k % n
        x = images[len(outputs["plain"]) % n][None]
        outputs["plain"].append(plain.run(None, {plain_input: x})[0][0])

    def exits_fn():
        x = images[len(outputs["exits"]) % n][None]
        outputs["exits"].append(runner.predict(x)[0][0])

    times = time_interleaved({"plain": plain_fn, "exits": exits_fn}, n)
    ms = medians_ms(times)
    logits = run.logits(head)
    test, y = logits["test"], logits["test_labels"].astype(int)
    exit_logits, exit_index = policy.select(list(test))
    record = {
        "exit_run": str(run.path),
        "head": head,
        "threads": threads,
        "images_timed": n,
        "ms_per_image": ms,
        "ratio_exits_over_plain": ms["exits"] / ms["plain"],
        # the median is the done-when figure; the mean is what the latency objective bounds
        "mean_ms_per_image": {k: 1e3 * float(np.mean(t)) for k, t in times.items()},
        "test_macro_f1": {
            "plain": macro_f1(y, test[-1].argmax(1), n_classes),
            "exits": macro_f1(y, exit_logits.argmax(1), n_classes),
        },
        "test_exit_fractions": np.bincount(exit_index, minlength=len(test)) / len(y),
        "kept_exits": json.loads((out / "exits" / "segments.json").read_text())["kept_exits"],
        "policy": policy.to_dict(run.classes),
        "overhead_ms": measure_overhead(model, size, overhead_rounds, threads, policy, eager),
    }
    # the ONNX answers on the timed images (call k ran image timed[k % n]; the test order
    # is the order of the saved logits)
    record["timed_macro_f1_onnx"] = {
        k: macro_f1(y[timed], np.asarray(rows[:n]).argmax(1), n_classes)
        for k, rows in outputs.items()
    }
    path = run.path / f"latency_bench_{head}.json"
    path.write_text(json.dumps(to_jsonable(record), indent=2))
    record["path"] = str(path)
    return record
