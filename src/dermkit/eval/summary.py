"""One row of an ablation table per run: test metrics with lesion-level CIs and model cost.

:func:`summarize_classifier_run` reads a classifier run folder and returns the benchmark
protocol's headline numbers (DESIGN.md) in one flat dict:

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
* ``exits``: summarised by :mod:`dermkit.exits.summary` with this module's metrics, cache
  and table (exits sit above eval in the layers); its ``summarize_run`` takes any run.

The result is cached as ``summary.json`` in the run folder, keyed by the SHA-256 of the
prediction inputs and the bootstrap settings, so a re-run is instant; it is rewritten
(atomically) when those change.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from dermkit.core.files import update_sha256, write_json_atomic
from dermkit.core.predictions import read_predictions
from dermkit.data.labels import MELANOMA
from dermkit.eval.metrics import evaluate_predictions
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


def latency_settings(calls: int, warmup: int, what: str) -> dict:
    """The ``latency_note`` of a summary: what was timed, how often, on which device."""
    return {
        "what": what,
        "calls": calls,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "device": "cpu",
    }


# ----------------------------------------------------------------------------- cache


def inputs_sha256(*paths: Path) -> str:
    """One SHA-256 over the names and bytes of a summary's input files."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\x1f")
        update_sha256(h, path)
    return h.hexdigest()


def cache_key(inputs_hash: str, n_boot: int, seed: int) -> str:
    """The cached summary's key: format version, inputs and bootstrap settings."""
    return f"v{SUMMARY_VERSION}|{inputs_hash}|n_boot={n_boot}|seed={seed}"


def read_cache(path: Path, key: str) -> dict | None:
    """The summary cached at ``path`` when its key is ``key``, else None."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:  # a corrupt cache is recomputed, not trusted
        return None
    return cached if isinstance(cached, dict) and cached.get("cache_key") == key else None


def write_summary(path: Path, data: dict) -> None:
    """Write a summary (the cache) atomically, as strict JSON."""
    write_json_atomic(path, to_jsonable(data), allow_nan=False)


def _stage(run_dir: Path) -> str | None:
    if (run_dir / "run.json").exists():
        return json.loads((run_dir / "run.json").read_text()).get("stage")
    return None


# ----------------------------------------------------------------------------- runs


def base_summary(run_dir: Path, kind: str | None, n_boot: int, seed: int) -> dict:
    """The keys every summary has, cost entries None until measured."""
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


def summarize_classifier_run(
    run_dir: Path, *, latency: bool = True, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Test metrics with lesion-level CIs and model facts of a classifier run folder.

    Exit runs are summarised by :func:`dermkit.exits.summary.summarize_run`, which takes
    any run folder and hands a classifier run to this function.

    Args:
        run_dir: a finetune, distill, baseline or ensemble run folder.
        latency: measure batch-1 latency (seconds of CPU); False leaves it None unless a
            cached summary already has it.
        n_boot: bootstrap replicates over lesions (0: no intervals, lo/hi None).
        seed: bootstrap seed.

    Returns:
        {"run", "kind", "model", "image_size", <metric>: {"value", "lo", "hi"} for every
        key of ``METRIC_KEYS``, "params", "gflops", "latency_ms_batch1", "n_images",
        "n_lesions", "classes", "n_boot", "seed", "ci", notes on how cost was measured,
        "cache_key"}; cost entries are None where not applicable.
    """
    from dermkit.models.runs_io import WEIGHTS_FILE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    predictions = run_dir / "predictions_test.csv"
    if not predictions.exists():
        raise FileNotFoundError(
            f"{predictions} not found: summaries need a finished run's test predictions"
        )
    key = cache_key(inputs_sha256(predictions), n_boot, seed)
    cache = run_dir / SUMMARY_FILE
    has_model = (run_dir / WEIGHTS_FILE).exists() and (run_dir / "config.yaml").exists()
    cached = read_cache(cache, key)
    if cached is not None and (cached["latency_measured"] or not latency or not has_model):
        return cached

    summary = base_summary(run_dir, _stage(run_dir), n_boot, seed)
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
            summary["latency_note"] = latency_settings(
                LATENCY_CALLS, LATENCY_WARMUP, "median of batch-1 forward passes"
            )
    elif summary["kind"] == "baseline":
        summary["model"] = "classical baseline (features + gradient boosting)"
    summary["cache_key"] = key
    write_summary(cache, summary)
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
    """A GitHub markdown table, one row per (name, run summary dict).

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
