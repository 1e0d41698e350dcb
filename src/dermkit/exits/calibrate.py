"""``dermkit exits calibrate``: thresholds per head type from an exit run's val logits.

Reads ``logits_<head>.safetensors`` (val part only: thresholds are never chosen on test),
fits a temperature per exit, searches the thresholds for the objective
(:func:`dermkit.exits.policy.calibrate`; for ``latency=B`` and ``median-latency=B``,
thresholds and which exits to keep, against the batch-1 ONNX Runtime latency measured on
this machine, :func:`dermkit.exits.latency.calibrate_latency`) and writes
``policy_<head>.json`` plus a ``calibration.json`` summary. A head type whose exits cannot
meet a compute budget (its cheapest operating point costs more) is reported there and gets
no policy.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from dermkit.config import ConfigError
from dermkit.eval.report import to_jsonable
from dermkit.exits.latency import calibrate_latency, measure_overhead
from dermkit.exits.policy import Objective, calibrate, fit_temperatures, parse_objective
from dermkit.exits.run_io import ExitRun, policy_file

log = logging.getLogger(__name__)


def resolve_classes(names: list[str], classes: list[str], what: str = "protect") -> list[int]:
    """Class names -> indices; an unknown name is an error naming the known classes."""
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ConfigError(f"{what}: unknown classes {unknown}; the run's classes are {classes}")
    return [classes.index(n) for n in names]


def parse_latency_objective(text: str) -> tuple[float, str] | None:
    """``"latency=0.5"`` -> (0.5, "mean"): a batch-1 latency budget, fraction of the plain
    model, on the mean over images; ``"median-latency=0.5"`` -> (0.5, "median"); None for
    the other objectives."""
    m = re.fullmatch(r"\s*(median-)?latency\s*=\s*([0-9.eE+-]+)\s*", text)
    if not m:
        return None
    value = float(m.group(2))
    if value <= 0:
        raise ConfigError(f"objective {text!r}: the latency budget must be positive")
    return value, "median" if m.group(1) else "mean"


def _latency_kind(latency: tuple[float, str]) -> tuple[str, float]:
    budget, statistic = latency
    return ("latency" if statistic == "mean" else f"{statistic}_latency"), budget


def latency_profile(run: ExitRun, head: str, rounds: int = 300, threads: int = 2) -> dict:
    """Batch-1 ONNX Runtime part timings of the run's ``head`` model (``latency_<head>.json``),
    measured on this machine the first time and read back after (delete the file to
    re-measure)."""
    path = run.path / f"latency_{head}.json"
    if path.exists():
        return json.loads(path.read_text())
    log.info("%s: measuring batch-1 latency of each part (%d rounds)", head, rounds)
    profile = measure_overhead(run.model(head), run.info["img_size"], rounds, threads, eager=False)
    path.write_text(json.dumps(profile, indent=2))
    return profile


def run_exits_calibrate(
    exit_run: str | Path,
    objective: str | None = None,
    protect: list[str] | None = None,
    measure: str | None = None,
    compute: str | None = None,
) -> Path:
    """Calibrate every head type of an exit run; returns the path of calibration.json.

    Arguments left None come from the run's ``exits`` config.
    """
    run = ExitRun.open(exit_run)
    e = run.config.exits
    objective = objective or e.objective
    latency = parse_latency_objective(objective)
    try:
        parsed = Objective(*_latency_kind(latency)) if latency else parse_objective(objective)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    protect = e.protect if protect is None else protect
    measure = measure or e.measure
    compute = compute or e.compute
    protected = resolve_classes(protect, run.classes)
    summary: dict = {
        "objective": str(parsed),
        "measure": measure,
        "compute": compute,
        "protect": protect,
        "heads": {},
    }
    for head in run.head_types:
        logits = run.logits(head)
        val, y = list(logits["val"]), logits["val_labels"].astype(int)
        path = policy_file(run.path, head)
        try:
            if latency:
                result = calibrate_latency(
                    val,
                    y,
                    run.info["exit_depths"],
                    latency_profile(run, head)["onnx"],
                    latency[0],
                    statistic=latency[1],
                    measure=measure,
                    protected_classes=protected,
                    temperatures=fit_temperatures(val, y),
                    grid=e.grid,
                )
            else:
                result = calibrate(
                    val,
                    y,
                    run.costs(head, compute),
                    parsed,
                    measure=measure,
                    protected_classes=protected,
                    temperatures=fit_temperatures(val, y),
                    grid=e.grid,
                )
        except ValueError as err:
            log.warning("%s: %s", head, err)
            summary["heads"][head] = {"error": str(err)}
            path.unlink(missing_ok=True)  # a stale policy must not outlive its objective
            continue
        result.policy.save(
            path,
            run.classes,
            objective=str(parsed),
            compute=compute,
            val_macro_f1=result.macro_f1,
            val_compute=result.compute,
        )
        summary["heads"][head] = result.to_dict(run.classes)
        log.info(
            "%s: thresholds %s, val macro-F1 %.4f (final %.4f), compute %.3f",
            head,
            [round(t, 4) for t in result.policy.thresholds],
            result.macro_f1,
            result.final_macro_f1,
            result.compute,
        )
    out = run.path / "calibration.json"
    out.write_text(json.dumps(to_jsonable(summary), indent=2))
    if all("error" in v for v in summary["heads"].values()):
        raise ConfigError(
            f"objective {parsed} is out of reach for every head type on val: "
            + "; ".join(f"{h}: {v['error']}" for h, v in summary["heads"].items())
        )
    return out
