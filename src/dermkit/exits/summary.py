"""One ablation-table row for an exits run (``dermkit exits train`` + ``calibrate``).

An exits run has no predictions file: its test predictions are the calibrated policy
applied to the saved test logits of one head type (the one with the best *val* macro-F1
unless ``exit_head`` names one), each sample's probabilities from its exit's val-fitted
temperature. GFLOPs is the *average* over test images of the cumulative GFLOPs recorded
per exit in ``exits.json``; latency is the average over test images of the batch-1 time of
the dropping inference (early exits make latency depend on the image, so one synthetic
image would not do). The exits bench's batched per-image time is copied when ``bench.json``
has it. Metrics, cache and table are :mod:`dermkit.eval.summary`'s; the cache is
``summary_<head>.json`` in the run folder.

:func:`summarize_run` summarises any run folder: an exits run here, a classifier run by
:func:`dermkit.eval.summary.summarize_classifier_run`. It lives here because exits sit
above eval in the layers (``tests/test_layers.py``): eval cannot know an exits run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dermkit.core.predictions import read_predictions
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.transforms import to_float
from dermkit.eval.summary import (
    FLOP_CONVENTION,
    LATENCY_WARMUP,
    base_summary,
    cache_key,
    inputs_sha256,
    latency_settings,
    read_cache,
    summarize_classifier_run,
    summarize_predictions,
    write_summary,
)
from dermkit.exits.infer import predict_early_exit
from dermkit.exits.policy import softmax
from dermkit.exits.run_io import INFO, ExitRun, logits_file, policy_file

EXIT_LATENCY_IMAGES = 64
EXIT_LATENCY_ROUNDS = 3


def summarize_run(
    run_dir: Path,
    *,
    latency: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    exit_head: str | None = None,
) -> dict:
    """Test metrics with lesion-level CIs and model facts of any run folder.

    ``run_dir`` is a finetune, distill, baseline, ensemble or exits run folder; the other
    arguments and the result are :func:`dermkit.eval.summary.summarize_classifier_run`'s,
    with the exit runs' keys added (``exit_head``, ``gflops_plain``, ``exit_fractions``).
    ``exit_head``: exit runs only: the head type to summarise (default: the calibrated
    head type with the best val macro-F1).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if (run_dir / INFO).exists():
        return _summarize_exit_run(run_dir, latency, n_boot, seed, exit_head)
    if exit_head is not None:
        raise ValueError(f"exit_head={exit_head!r} given but {run_dir} is not an exits run")
    return summarize_classifier_run(run_dir, latency=latency, n_boot=n_boot, seed=seed)


def _choose_exit_head(run, exit_head: str | None) -> str:
    """The named head type, else the calibrated one with the best val macro-F1."""
    if exit_head is not None:
        if exit_head not in run.head_types:
            raise ValueError(f"{run.path}: no {exit_head!r} exits (trained: {run.head_types})")
        return exit_head
    scores = {}
    for head in run.head_types:
        path = policy_file(run.path, head)
        if path.exists():
            scores[head] = json.loads(path.read_text()).get("val_macro_f1") or 0.0
    if not scores:
        raise FileNotFoundError(
            f"{run.path}: no policy_<head>.json; run `dermkit exits calibrate {run.path}` first"
        )
    return max(scores, key=scores.get)


def _exit_test_groups(run, y: np.ndarray) -> np.ndarray:
    """Lesion ids (N,) of the exit run's test rows, in the order of its saved logits.

    The base run's predictions_test.csv lists the same test split in the same order
    (both come from ``prepare_data`` with the base run's split); its labels must agree
    with the saved ones, else the data is prepared again to read them.
    """
    base_predictions = Path(run.info["base_run"]) / "predictions_test.csv"
    if base_predictions.exists():
        df, y_base, _, base_classes = read_predictions(base_predictions)
        if base_classes == run.classes and np.array_equal(y_base, y):
            return df["lesion_id"].to_numpy()
    return run.data().part("test")["lesion_id"].to_numpy()


def _exit_latency_ms(model, policy, images: torch.Tensor, rounds: int) -> float:
    """Mean over images of the median (over rounds) batch-1 dropping-inference time (ms)."""
    model = model.float().cpu().eval()
    times = np.zeros((rounds, len(images)))
    with torch.inference_mode():
        for i in range(min(LATENCY_WARMUP, len(images))):
            predict_early_exit(model, images[i : i + 1], policy)
        for r in range(rounds):
            for i in range(len(images)):
                start = time.perf_counter()
                predict_early_exit(model, images[i : i + 1], policy)
                times[r, i] = time.perf_counter() - start
    return float(np.median(times, axis=0).mean() * 1e3)


def _summarize_exit_run(
    run_dir: Path, latency: bool, n_boot: int, seed: int, exit_head: str | None
) -> dict:
    """The summary of an exits run folder (see module doc); arguments as :func:`summarize_run`."""
    run = ExitRun.open(run_dir)
    head = _choose_exit_head(run, exit_head)
    policy_path = policy_file(run.path, head)
    if not policy_path.exists():
        raise FileNotFoundError(
            f"{policy_path} not found: run `dermkit exits calibrate {run.path}` first"
        )
    inputs = [logits_file(run.path, head), policy_path]
    base_predictions = Path(run.info["base_run"]) / "predictions_test.csv"
    if base_predictions.exists():
        inputs.append(base_predictions)
    key = cache_key(inputs_sha256(*inputs), n_boot, seed)
    cache = run.path / f"summary_{head}.json"
    cached = read_cache(cache, key)
    if cached is not None and (cached["latency_measured"] or not latency):
        return cached

    policy = run.policy(head)
    test = run.logits(head)["test"]  # (E, N, C)
    y = run.logits(head)["test_labels"].astype(int)
    logits, exit_index = policy.select(list(test))
    temperatures = np.asarray([policy.temperature(j) for j in range(policy.n_exits)])
    probs = softmax(logits / temperatures[exit_index][:, None])
    flops = run.info["gflops"][head]

    summary = base_summary(run.path, "exits", n_boot, seed)
    if cached is None:
        groups = _exit_test_groups(run, y)
        summary.update(
            summarize_predictions(y, probs, run.classes, groups, n_boot=n_boot, seed=seed)
        )
    else:
        summary = cached
    model = run.model(head)
    summary.update(
        model=f"{run.info['backbone']} + {head} exits",
        image_size=run.info["img_size"],
        exit_head=head,
        params=sum(p.numel() for p in model.parameters()),
        gflops=float(np.asarray(flops["cumulative_gflops"])[exit_index].mean()),
        gflops_plain=float(flops["plain_gflops"]),
        exit_fractions=(np.bincount(exit_index, minlength=policy.n_exits) / len(y)).tolist(),
        gflops_note="mean over test images of the cumulative GFLOPs at the exit each takes "
        f"(recorded in exits.json: {FLOP_CONVENTION})",
    )
    bench = run.path / "bench.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        ms = b.get("heads", {}).get(head, {}).get("wall_ms_per_image")
        summary["exits_bench_ms_per_image"] = ms
        summary["exits_bench_batch_size"] = b.get("timing", {}).get("batch_size")
    if latency:
        data = run.data()
        test_ds = CachedImageDataset(data.cache, data.part("test"), run.classes)
        n = min(EXIT_LATENCY_IMAGES, len(test_ds))
        images = to_float(test_ds.__getitems__(np.arange(n))[0])
        summary["latency_ms_batch1"] = _exit_latency_ms(model, policy, images, EXIT_LATENCY_ROUNDS)
        summary["latency_measured"] = True
        summary["latency_note"] = latency_settings(
            EXIT_LATENCY_ROUNDS,
            min(LATENCY_WARMUP, n),
            f"mean over the first {n} test images of the median batch-1 time of the "
            "dropping early-exit inference",
        )
    summary["cache_key"] = key
    write_summary(cache, summary)
    return summary
