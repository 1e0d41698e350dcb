"""``dermkit bench latency``: teacher vs student speed on this CPU, measured in one run.

Four models: teacher PyTorch FP32, student PyTorch FP32, student ONNX FP32, student ONNX
INT8. They are timed *interleaved*: every round visits all four (in a rotated order), so
a slow-down of the machine (another job, thermal throttling) hits all of them alike and
the ratios stay meaningful (DESIGN.md: "speed as ratios measured in one run").

* batch-1 latency: each round makes ``calls`` single-image calls per model; p50/p90 over
  every call of every round.
* batch-32 throughput: one batch of 32 per model per round; images/s of the median round.
* cost: parameters and GFLOPs per image forward, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch model (the ONNX rows run the
  same graph, so they share the student's figures; INT8 changes bytes, not operations).

Both runtimes get the same thread count (default 1: one phone/browser core).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dermkit.models.cost import model_cost

log = logging.getLogger(__name__)


@dataclass
class _Timed:
    """One benchmarked model: a callable on (b, 3, S, S) float32 arrays plus its cost."""

    name: str
    architecture: str
    run: Callable[[np.ndarray], object]
    image_size: int
    cost: dict
    size_bytes: int


def _torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    model = model.float().cpu().eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def _onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    from dermkit.core.onnx import cpu_session

    session = cpu_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _student_files(student: Path, int8: str, work: Path) -> tuple[Path, Path, Path]:
    """(student run folder, ONNX FP32 file, ONNX INT8 file) from a run or an export folder."""
    from dermkit.deploy.export import FP32_FILE, INT8_FILES, export_run

    if (student / "export.json").exists():
        info = json.loads((student / "export.json").read_text())
        run, fp32, q = Path(info["run"]), student / FP32_FILE, student / INT8_FILES[int8]
        for path in (fp32, q):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found in export folder {student}")
        return run, fp32, q
    if not (student / "config.yaml").exists():
        raise FileNotFoundError(f"{student} is neither a run folder nor an export folder")
    log.info("exporting %s to %s for the ONNX rows", student, work)
    export_run(student, work, int8=int8, n_parity=64, n_calibration=64)
    return student, work / FP32_FILE, work / INT8_FILES[int8]


def _teacher_model(source) -> tuple[torch.nn.Module, int]:
    """(model, input size) to time: a run's own model, or the ensemble module fed at its
    largest member's size (each member resizes to its own, as in distillation)."""
    if not source.ensemble:
        return source.members[0].model.eval(), source.cfg.data.image_size
    from dermkit.models.backbones import input_norm_of

    size = max(m.cfg.data.image_size for m in source.members)
    return source.module(input_norm_of(source.members[0].model)).eval(), size


def bench_latency(
    teacher_run: str | Path,
    student: str | Path,
    int8: str = "dynamic",
    rounds: int = 10,
    calls: int = 5,
    batch_size: int = 32,
    threads: int = 1,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Time the four models interleaved; returns {"rows": [...], "settings": ..., ...}.

    Args:
        teacher_run: teacher classifier run folder, or a ``dermkit ensemble`` folder (all
            members timed in one call, each at its own resolution).
        student: student run folder (exported on the fly) or ``dermkit export`` folder.
        int8: which INT8 file to time: "dynamic" or "static".
        rounds: interleaved rounds; calls: batch-1 calls per model per round.
        batch_size: batch of the throughput measurement (32).
        threads: intra-op threads for PyTorch and ONNX Runtime alike.
    """
    from dermkit.models.runs_io import WEIGHTS_FILE, load_run_model
    from dermkit.runs import machine_info
    from dermkit.train.teacher import open_teacher

    if int8 not in ("dynamic", "static"):
        raise ValueError(f"int8 must be dynamic or static, got {int8!r}")
    teacher_run, student = Path(teacher_run), Path(student)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dermkit-latency-") as tmp:
            student_run, fp32, q = _student_files(student, int8, Path(tmp))
            source = open_teacher(teacher_run)
            teacher, t_size = _teacher_model(source)
            pupil, s_cfg, _ = load_run_model(student_run)
            s_size = s_cfg.data.image_size
            t_cost, s_cost = source.cost(), model_cost(pupil, s_size)
            t_bytes = sum((m.path / WEIGHTS_FILE).stat().st_size for m in source.members)
            s_name, s_bytes = s_cfg.model.name, (student_run / WEIGHTS_FILE).stat().st_size
            models = [
                _Timed(
                    "teacher PyTorch FP32",
                    source.name,
                    _torch_runner(teacher),
                    t_size,
                    t_cost,
                    t_bytes,
                ),
                _Timed(
                    "student PyTorch FP32", s_name, _torch_runner(pupil), s_size, s_cost, s_bytes
                ),
                _Timed(
                    "student ONNX FP32",
                    s_name,
                    _onnx_runner(fp32, threads),
                    s_size,
                    s_cost,
                    fp32.stat().st_size,
                ),
                _Timed(
                    f"student ONNX INT8 ({int8})",
                    s_name,
                    _onnx_runner(q, threads),
                    s_size,
                    s_cost,
                    q.stat().st_size,
                ),
            ]
            rows = _time_interleaved(models, rounds, calls, batch_size, warmup, seed)
    finally:
        torch.set_num_threads(previous_threads)
    base = rows[0]["latency_b1_p50_ms"]
    for row in rows:
        row["speedup_b1_vs_teacher"] = base / row["latency_b1_p50_ms"]
    return {
        "teacher_run": str(teacher_run),
        "student": str(student),
        "settings": {
            "rounds": rounds,
            "batch1_calls_per_round": calls,
            "throughput_batch": batch_size,
            "threads": threads,
            "warmup_rounds": warmup,
            "order": "interleaved round-robin, rotated each round",
        },
        "machine": machine_info(),
        "rows": rows,
    }


def _time_interleaved(
    models: list[_Timed], rounds: int, calls: int, batch_size: int, warmup: int, seed: int
) -> list[dict]:
    """Round-robin timing; each round starts at a different model so none is always first."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for m in models:
        if m.image_size not in inputs:
            shape = (3, m.image_size, m.image_size)
            inputs[m.image_size] = (
                rng.standard_normal((1, *shape)).astype(np.float32),
                rng.standard_normal((batch_size, *shape)).astype(np.float32),
            )
    single: list[list[float]] = [[] for _ in models]
    batched: list[list[float]] = [[] for _ in models]
    for r in range(warmup + rounds):
        for k in range(len(models)):
            i = (r + k) % len(models)
            one, many = inputs[models[i].image_size]
            for _ in range(calls):
                t = time.perf_counter()
                models[i].run(one)
                if r >= warmup:
                    single[i].append(time.perf_counter() - t)
            t = time.perf_counter()
            models[i].run(many)
            if r >= warmup:
                batched[i].append(time.perf_counter() - t)
    rows = []
    for i, m in enumerate(models):
        ms = np.asarray(single[i]) * 1e3
        rows.append(
            {
                "model": m.name,
                "architecture": m.architecture,
                "image_size": m.image_size,
                "params": m.cost["params"],
                "gflops_per_image": m.cost["gflops"],
                "size_mb": m.size_bytes / 1e6,
                "latency_b1_p50_ms": float(np.percentile(ms, 50)),
                "latency_b1_p90_ms": float(np.percentile(ms, 90)),
                f"throughput_b{batch_size}_img_s": batch_size / float(np.median(batched[i])),
            }
        )
    return rows


def markdown_table(result: dict) -> str:
    """The rows of :func:`bench_latency` as a GitHub markdown table."""
    b = result["settings"]["throughput_batch"]
    header = (
        "| model | arch | px | params (M) | GFLOPs/img | size (MB) | b1 p50 (ms) | b1 p90 (ms) "
        f"| b{b} img/s | b1 speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['architecture']} | {r['image_size']} | {r['params'] / 1e6:.2f} "
        f"| {r['gflops_per_image']:.3f} | {r['size_mb']:.2f} | {r['latency_b1_p50_ms']:.2f} "
        f"| {r['latency_b1_p90_ms']:.2f} | {r[f'throughput_b{b}_img_s']:.0f} "
        f"| {r['speedup_b1_vs_teacher']:.2f}x |"
        for r in result["rows"]
    ]
    s = result["settings"]
    note = (
        f"\n{s['rounds']} interleaved rounds, {s['batch1_calls_per_round']} batch-1 calls per "
        f"model per round, {s['threads']} thread(s); {result['machine']['cpu']}.\n"
    )
    return header + "\n".join(lines) + "\n" + note


def write_latency(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``latency.json`` and ``latency.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(result, indent=2))
    (out_dir / "latency.md").write_text(markdown_table(result))
    return out_dir / "latency.json", out_dir / "latency.md"
