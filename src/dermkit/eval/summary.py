"""One row of an ablation table per run: test metrics with lesion-level CIs and model cost.

:func:`summarize_run` reads any classifier run folder and returns the benchmark protocol's
headline numbers (DESIGN.md) in one flat dict:

* metrics on the run's test predictions, each ``{"value", "lo", "hi"}`` (95% percentile
  bootstrap over lesions, :func:`dermkit.eval.metrics.evaluate_predictions`): accuracy,
  balanced_accuracy, macro_f1, macro_auroc, mel_sens_at_90_spec (melanoma one-vs-rest on
  P(mel), at the lowest threshold whose specificity is >= 90%) and ece (15 bins);
* model facts when the run has a torch model: ``params`` (parameter count), ``gflops``
  (one image at the run's image size, ``torch.utils.flop_counter.FlopCounterMode`` via
  :func:`dermkit.models.cost.model_cost`: a multiply-add counts as 2 FLOPs; only the
  operations FlopCounterMode knows are counted, i.e. matrix products and convolutions) and
  ``latency_ms_batch1`` (median of batch-1 fp32 forward passes on the CPU after warm-up,
  with torch's intra-op threads as the caller configured them). None where not applicable.

Run kinds:

* ``finetune`` / ``distill`` (and compare arms): ``predictions_test.csv`` + the model
  (``dermkit.models.runs_io.load_run_model``).
* ``baseline`` (classical): predictions only; the sklearn model is never saved (no
  pickles), so params, GFLOPs and latency are None.
* ``exits`` (``dermkit exits train`` + ``calibrate``): no predictions file; the test
  predictions are the calibrated policy applied to the saved test logits of one head type
  (the one with the best *val* macro-F1 unless ``exit_head`` names one), each sample's
  probabilities from its exit's val-fitted temperature. GFLOPs is the *average* over test
  images of the cumulative GFLOPs recorded per exit in ``exits.json``; latency is the
  average over test images of the batch-1 time of the dropping inference (early exits
  make latency depend on the image, so one synthetic image would not do). The exits
  bench's batched per-image time is copied when ``bench.json`` has it.

The result is cached as ``summary.json`` (``summary_<head>.json`` for exit runs) in the run
folder, keyed by the SHA-256 of the prediction inputs and the bootstrap settings, so a
re-run is instant; it is rewritten (atomically) when those change.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from dermkit.core.files import update_sha256, write_json_atomic
from dermkit.data.labels import MELANOMA
from dermkit.eval.metrics import evaluate_predictions
from dermkit.eval.predictions import read_predictions
from dermkit.eval.report import to_jsonable

SUMMARY_FILE = "summary.json"
SUMMARY_VERSION = 1
# Summary key -> evaluate_predictions metric name (positive class = melanoma).
METRIC_KEYS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced_accuracy",
    "macro_f1": "macro_f1",
    "macro_auroc": "macro_auroc",
    "mel_sens_at_90_spec": f"{MELANOMA}_sens_at_spec90",
    "ece": "ece",
}
COST_KEYS: tuple[str, ...] = ("params", "gflops", "latency_ms_batch1")
LATENCY_WARMUP = 5
LATENCY_CALLS = 50
EXIT_LATENCY_IMAGES = 64
EXIT_LATENCY_ROUNDS = 3
FLOP_CONVENTION = (
    "torch.utils.flop_counter.FlopCounterMode on one (1, 3, S, S) image; a multiply-add "
    "counts as 2 FLOPs; matrix products and convolutions only"
)

# Table columns: (header, summary key, formatter).
_TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("macro-F1", "macro_f1"),
    ("macro AUROC", "macro_auroc"),
    ("mel sens @90% spec", "mel_sens_at_90_spec"),
    ("ECE", "ece"),
)
_TABLE_COSTS: tuple[tuple[str, str], ...] = (
    ("params (M)", "params"),
    ("GFLOPs", "gflops"),
    ("batch-1 latency (ms)", "latency_ms_batch1"),
)
NA = "n/a"


# ----------------------------------------------------------------------------- metrics


def summarize_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    groups: np.ndarray | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The headline metrics of (y_true (N,), probs (N, C)) as {key: {"value", "lo", "hi"}}.

    ``groups`` (N,) are lesion ids for the lesion-level bootstrap (None: one image per
    group). A metric that is undefined (e.g. no melanoma among the classes) is None.
    """
    result = evaluate_predictions(
        y_true, probs, classes, groups=groups, n_boot=n_boot, seed=seed, positive_class=MELANOMA
    )
    out = {}
    for key, name in METRIC_KEYS.items():
        m = result["metrics"][name]
        out[key] = {"value": m["value"], "lo": m["ci_low"], "hi": m["ci_high"]}
    out["ci"] = result["ci_level"]
    out["n_images"] = result["n"]
    out["n_lesions"] = result["n_groups"]
    out["classes"] = result["classes"]
    return out


# ----------------------------------------------------------------------------- cost


def batch1_latency_ms(
    model: torch.nn.Module,
    image_size: int,
    *,
    calls: int = LATENCY_CALLS,
    warmup: int = LATENCY_WARMUP,
) -> float:
    """Median wall time (ms) of ``calls`` batch-1 fp32 CPU forward passes after ``warmup``.

    The input is one (1, 3, S, S) normal-noise image; threads are whatever
    ``torch.get_num_threads()`` is (the caller's configuration). The model is moved to
    fp32 on the CPU in place.
    """
    model = model.float().cpu().eval()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + calls):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _latency_settings(calls: int, warmup: int, what: str) -> dict:
    return {
        "what": what,
        "calls": calls,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "device": "cpu",
    }


# ----------------------------------------------------------------------------- cache


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\x1f")
        update_sha256(h, path)
    return h.hexdigest()


def _cache_key(inputs_hash: str, n_boot: int, seed: int) -> str:
    return f"v{SUMMARY_VERSION}|{inputs_hash}|n_boot={n_boot}|seed={seed}"


def _read_cache(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:  # a corrupt cache is recomputed, not trusted
        return None
    return cached if isinstance(cached, dict) and cached.get("cache_key") == key else None


def _write_atomic(path: Path, data: dict) -> None:
    write_json_atomic(path, to_jsonable(data), allow_nan=False)


def _stage(run_dir: Path) -> str | None:
    if (run_dir / "run.json").exists():
        return json.loads((run_dir / "run.json").read_text()).get("stage")
    return None


# ----------------------------------------------------------------------------- runs


def summarize_run(
    run_dir: Path,
    *,
    latency: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    exit_head: str | None = None,
) -> dict:
    """Test metrics with lesion-level CIs and model facts of a run folder (see module doc).

    Args:
        run_dir: a finetune, distill, baseline or exits run folder.
        latency: measure batch-1 latency (seconds of CPU); False leaves it None unless a
            cached summary already has it.
        n_boot: bootstrap replicates over lesions (0: no intervals, lo/hi None).
        seed: bootstrap seed.
        exit_head: exit runs only: the head type to summarise (default: the calibrated
            head type with the best val macro-F1).

    Returns:
        {"run", "kind", "model", "image_size", <metric>: {"value", "lo", "hi"} for every
        key of ``METRIC_KEYS``, "params", "gflops", "latency_ms_batch1", "n_images",
        "n_lesions", "classes", "n_boot", "seed", "ci", notes on how cost was measured,
        "cache_key"}; cost entries are None where not applicable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    from dermkit.exits.run_io import INFO

    if (run_dir / INFO).exists():
        return _summarize_exit_run(run_dir, latency, n_boot, seed, exit_head)
    if exit_head is not None:
        raise ValueError(f"exit_head={exit_head!r} given but {run_dir} is not an exits run")
    return _summarize_classifier_run(run_dir, latency, n_boot, seed)


def _base_summary(run_dir: Path, kind: str | None, n_boot: int, seed: int) -> dict:
    return {
        "run": str(run_dir),
        "kind": kind,
        "model": None,
        "image_size": None,
        "n_boot": n_boot,
        "seed": seed,
        "params": None,
        "gflops": None,
        "latency_ms_batch1": None,
        "latency_measured": False,
        "gflops_note": None,
        "latency_note": None,
    }


def _summarize_classifier_run(run_dir: Path, latency: bool, n_boot: int, seed: int) -> dict:
    from dermkit.models.runs_io import WEIGHTS_FILE

    predictions = run_dir / "predictions_test.csv"
    if not predictions.exists():
        raise FileNotFoundError(
            f"{predictions} not found: summaries need a finished run's test predictions"
        )
    key = _cache_key(_sha256(predictions), n_boot, seed)
    cache = run_dir / SUMMARY_FILE
    has_model = (run_dir / WEIGHTS_FILE).exists() and (run_dir / "config.yaml").exists()
    cached = _read_cache(cache, key)
    if cached is not None and (cached["latency_measured"] or not latency or not has_model):
        return cached

    summary = _base_summary(run_dir, _stage(run_dir), n_boot, seed)
    if cached is None:
        df, y, probs, classes = read_predictions(predictions)
        groups = df["lesion_id"].to_numpy()
        summary.update(summarize_predictions(y, probs, classes, groups, n_boot=n_boot, seed=seed))
    else:  # metrics are current; only the latency is missing
        summary = cached
    if has_model:
        from dermkit.models.cost import model_cost
        from dermkit.models.runs_io import load_run_model

        model, cfg, _ = load_run_model(run_dir, purpose="the summary")
        size = cfg.data.image_size
        summary.update(model_cost(model, size), model=cfg.model.name, image_size=size)
        summary["gflops_note"] = FLOP_CONVENTION
        if latency:
            summary["latency_ms_batch1"] = batch1_latency_ms(model, size)
            summary["latency_measured"] = True
            summary["latency_note"] = _latency_settings(
                LATENCY_CALLS, LATENCY_WARMUP, "median of batch-1 forward passes"
            )
    elif summary["kind"] == "baseline":
        summary["model"] = "classical baseline (features + gradient boosting)"
    summary["cache_key"] = key
    _write_atomic(cache, summary)
    return summary


# ----------------------------------------------------------------------------- exit runs


def _choose_exit_head(run, exit_head: str | None) -> str:
    """The named head type, else the calibrated one with the best val macro-F1."""
    from dermkit.exits.run_io import policy_file

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
    from dermkit.exits.infer import predict_early_exit

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
    from dermkit.exits.policy import softmax
    from dermkit.exits.run_io import ExitRun, logits_file, policy_file

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
    key = _cache_key(_sha256(*inputs), n_boot, seed)
    cache = run.path / f"summary_{head}.json"
    cached = _read_cache(cache, key)
    if cached is not None and (cached["latency_measured"] or not latency):
        return cached

    policy = run.policy(head)
    test = run.logits(head)["test"]  # (E, N, C)
    y = run.logits(head)["test_labels"].astype(int)
    logits, exit_index = policy.select(list(test))
    temperatures = np.asarray([policy.temperature(j) for j in range(policy.n_exits)])
    probs = softmax(logits / temperatures[exit_index][:, None])
    flops = run.info["gflops"][head]

    summary = _base_summary(run.path, "exits", n_boot, seed)
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
        from dermkit.data.dataset import CachedImageDataset
        from dermkit.data.transforms import to_float

        data = run.data()
        test_ds = CachedImageDataset(data.cache, data.part("test"), run.classes)
        n = min(EXIT_LATENCY_IMAGES, len(test_ds))
        images = to_float(test_ds.__getitems__(np.arange(n))[0])
        summary["latency_ms_batch1"] = _exit_latency_ms(model, policy, images, EXIT_LATENCY_ROUNDS)
        summary["latency_measured"] = True
        summary["latency_note"] = _latency_settings(
            EXIT_LATENCY_ROUNDS,
            min(LATENCY_WARMUP, n),
            f"mean over the first {n} test images of the median batch-1 time of the "
            "dropping early-exit inference",
        )
    summary["cache_key"] = key
    _write_atomic(cache, summary)
    return summary


# ----------------------------------------------------------------------------- table


def _format_metric(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return NA
    text = f"{entry['value']:.3f}"
    if entry.get("lo") is not None and entry.get("hi") is not None:
        text += f" [{entry['lo']:.3f}, {entry['hi']:.3f}]"
    return text


def _format_cost(key: str, value) -> str:
    if value is None:
        return NA
    if key == "params":
        return f"{value / 1e6:.2f}"
    if key == "gflops":
        return f"{value:.3f}"
    return f"{value:.2f}"


def ablation_table_markdown(rows: list[tuple[str, dict]]) -> str:
    """A GitHub markdown table, one row per (name, :func:`summarize_run` dict).

    Metrics as "0.612 [0.571, 0.650]" (value [95% CI]); params in millions, GFLOPs per
    image, batch-1 latency in ms; "n/a" where a value is None (e.g. the classical
    baseline's cost).
    """
    headers = ["run", *(h for h, _ in _TABLE_METRICS), *(h for h, _ in _TABLE_COSTS)]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for name, summary in rows:
        cells = [str(name).replace("|", "\\|")]
        cells += [_format_metric(summary.get(key)) for _, key in _TABLE_METRICS]
        cells += [_format_cost(key, summary.get(key)) for _, key in _TABLE_COSTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
