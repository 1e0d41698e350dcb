"""The DAG runner: stages whose artifacts are cached by key. It knows no stage itself.

A pipeline is a :class:`PipelineSpec` (a name, a seed, an output folder and, per stage,
its settings: ``false`` to switch it off, or a mapping of overrides) and an ordered list of
:class:`Stage` callables. Each stage builds its fully resolved config from the pipeline and
the folders of the stages it reads (recorded as its inputs while it builds), and runs into
its own folder::

    key    = sha256(stage name, dermkit version, resolved config, keys of its inputs)
    folder = <out_dir>/<stage>-<key[:10]>/

Paths of input folders are replaced by ``@<stage>`` in the hashed config (and the stage's
own ``out_dir`` and image-cache folder are left out), so a key names *what* is computed,
not *where*; options added later and marked key-neutral are left out while at their
default, so a new option keeps the keys of the configs that do not use it. A finished
stage ends by writing ``stage.json`` atomically: a folder with that marker and the same
key is skipped; a folder without it is a run that was killed or failed, and its stage is
called again with ``resume=True`` (the training stages continue from their last
checkpoint, sampling skips the images it already wrote). Changing one
stage's settings therefore re-runs that stage and the stages downstream of it, nothing
upstream. Every run rewrites ``pipeline.json`` (what ran, what was reused) and, when the
caller gives one, a summary report.

This module imports no domain code (``tests/test_layers.py`` checks it): which stages
exist and what feeds what is the caller's (``dermkit.pipeline.dermae``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from dermkit import __version__
from dermkit.core.files import write_json_atomic
from dermkit.core.mappings import expand_dotted

log = logging.getLogger(__name__)

MARKER = "stage.json"
STATE_FILE = "pipeline.json"
REPORT = "report.html"  # every stage folder ends up holding one, and metrics.json
METRICS = "metrics.json"


class PipelineError(ValueError):
    """A pipeline file or its stages' settings are wrong; the message names the stage."""


# Config keys that say where files go, not what is computed: left out of the cache key.
_UNHASHED_KEYS = frozenset({"out_dir", "cache_dir"})


class PipelineSpec(BaseModel):
    """What the runner reads of a pipeline file; a concrete pipeline adds its own fields.

    ``stages`` maps a stage name to ``false`` (off), ``true``/``{}`` (on, preset settings)
    or a mapping of overrides of that stage's config: nested (``optim: {epochs: 3}``) or
    dotted (``optim.epochs: 3``) keys; ``enabled: false`` switches it off as well. A stage
    may take extra keys of its own (:attr:`Stage.knobs`).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "pipeline"
    seed: int = 0
    out_dir: str = "runs/pipeline"
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of torch and OpenMP/BLAS while stages run; null: the default. "
        "Tiny models run faster on one thread (synchronisation dominates their small ops).",
    )
    stages: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(None, description="the file this was read from (set on load)")


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One node of the DAG.

    Attributes:
        name: folder prefix and the key in the pipeline file's ``stages``.
        title: what the stage does, for the progress view and the summary.
        build: resolved config from a :class:`StageContext`; reading another stage's
            folder through ``ctx.input`` makes that stage an input.
        run: ``(config, folder, resume)``, the stage's work; the folder must end up
            holding ``metrics.json`` and ``report.html`` (what it returns is not used).
        metric: one short line (the key figure) from a finished folder.
        knobs: extra keys this stage reads from its pipeline entry (not config overrides).
        figures: the pictures of a finished folder a summary shows (:func:`stage_figures`).
        table: (caption, rows) of a finished folder that a summary shows, or None.
        default_on: whether a pipeline file that does not name the stage runs it (an
            optional stage, such as one that needs settings to mean anything, is off).
    """

    name: str
    title: str
    build: Callable[[StageContext], BaseModel]
    run: Callable[[Any, Path, bool], object]
    metric: Callable[[Path], str]
    knobs: tuple[str, ...] = ()
    figures: tuple[FigureSpec, ...] = ()
    table: Callable[[Path], tuple[str, list[dict]] | None] | None = None
    default_on: bool = True


@dataclass(frozen=True)
class FigureSpec:
    """PNG(s) of a stage folder to show: ``pattern`` (a glob relative to the folder),
    which matches to take (``first``, ``last`` or ``all``, in name order) and a caption
    (``{name}``: the file name without ``.png`` and the pattern's fixed prefix)."""

    pattern: str
    caption: str
    take: str = "first"


MAX_PER_SPEC = 8  # "all" shows at most this many (one per class for 7 classes)


def stage_figures(stage: Stage, folder: Path) -> list[tuple[Path, str]]:
    """(PNG path, caption) of a finished stage folder, in ``stage.figures`` order; files a
    stage did not draw (another method, a switched-off part) are left out."""
    shown = []
    for spec in stage.figures:
        matches = sorted(folder.glob(spec.pattern))
        if spec.take == "first":
            matches = matches[:1]
        elif spec.take == "last":
            matches = matches[-1:]
        prefix = Path(spec.pattern).name.split("*")[0]
        for path in matches[:MAX_PER_SPEC]:
            name = path.stem.removeprefix(prefix)
            shown.append((path, spec.caption.format(name=name)))
    return shown


@dataclass
class StageContext:
    """What a stage's ``build`` sees: the pipeline, its own settings and earlier stages."""

    pipeline: Any  # the pipeline's PipelineSpec (subclass)
    stage: str
    overrides: dict
    knobs: dict
    _plans: dict[str, Planned]
    _enabled: dict[str, bool]
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.pipeline.seed

    def on(self, stage: str) -> bool:
        """Whether ``stage`` is switched on in this pipeline."""
        return self._enabled.get(stage, False)

    def input(self, stage: str) -> Path:
        """The folder of an earlier stage; records it as an input of this one."""
        if not self.on(stage):
            raise PipelineError(f"stage '{self.stage}' needs stage '{stage}', which is off")
        if stage not in self._plans:
            raise PipelineError(f"stage '{self.stage}' needs '{stage}', which must come earlier")
        planned = self._plans[stage]
        self.inputs[stage] = planned.key
        return planned.path

    def config(self, stage: str) -> BaseModel:
        """The resolved config of an earlier stage (also records it as an input)."""
        self.input(stage)
        return self._plans[stage].config

    def part(self, name: str, overrides: dict, knobs: dict) -> StageContext:
        """A context for one part of this stage (a member it trains, say) with its own
        settings; the stages it reads are recorded as this stage's inputs."""
        return StageContext(
            self.pipeline, name, overrides, knobs, self._plans, self._enabled, self.inputs
        )


@dataclass
class Planned:
    """A stage with its resolved config, key and folder (before or after running)."""

    stage: Stage
    config: BaseModel
    inputs: dict[str, str]
    key: str
    path: Path
    material: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.stage.name


def _settings(cfg: PipelineSpec, stage: Stage) -> tuple[bool, dict, dict]:
    """(enabled, config overrides, knobs) of a stage's entry in the pipeline file."""
    entry = cfg.stages.get(stage.name, stage.default_on)
    if entry is None or entry is True:
        return True, {}, {}
    if entry is False:
        return False, {}, {}
    if not isinstance(entry, dict):
        raise PipelineError(
            f"{cfg.source}: stages.{stage.name} must be true, false or a mapping, got {entry!r}"
        )
    entry = dict(entry)
    enabled = entry.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise PipelineError(f"{cfg.source}: stages.{stage.name}.enabled must be true or false")
    knobs = {k: entry.pop(k) for k in stage.knobs if k in entry}
    return enabled, expand_dotted(entry), knobs


def _normalise(value: Any, replace: list[tuple[str, str]]) -> Any:
    """Config dump -> hashable form: input folders as @stage tokens, location keys dropped."""
    if isinstance(value, dict):
        return {
            k: _normalise(v, replace) for k, v in sorted(value.items()) if k not in _UNHASHED_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_normalise(v, replace) for v in value]
    if isinstance(value, str):
        for prefix, token in replace:
            if value == prefix or value.startswith(prefix + os.sep):
                return token + value[len(prefix) :]
    return value


def _drop_key_neutral_defaults(model: BaseModel, dump: dict) -> dict:
    """``dump`` (``model.model_dump()``) without the fields marked key-neutral that sit at
    their default, nested sections included: ``json_schema_extra={"stage_key":
    "omit_default"}`` (``dermkit.config.KEY_NEUTRAL_DEFAULT``; not imported: the runner
    imports no dermkit package but core)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra
        neutral = isinstance(extra, dict) and extra.get("stage_key") == "omit_default"
        if neutral and value == info.get_default(call_default_factory=True):
            dump.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dump.get(name), dict):
            _drop_key_neutral_defaults(value, dump[name])
    return dump


def stage_key(name: str, config: BaseModel, inputs: dict[str, str], folders: dict[str, Path]):
    """(sha256 hex key, the hashed material) of a stage; see the module docstring."""
    replace = [(str(folders[s]), f"@{s}") for s in inputs]
    replace.sort(key=lambda pair: -len(pair[0]))  # longest prefix first
    material = {
        "stage": name,
        "dermkit": __version__,
        "config": _normalise(
            _drop_key_neutral_defaults(config, config.model_dump(mode="json")), replace
        ),
        "inputs": dict(sorted(inputs.items())),
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), material


def plan_pipeline(cfg: PipelineSpec, stages: Sequence[Stage]) -> dict[str, Planned]:
    """Resolve every enabled stage in order: config, inputs, key and folder."""
    names = [s.name for s in stages]
    unknown = sorted(set(cfg.stages) - set(names))
    if unknown:
        raise PipelineError(f"{cfg.source}: unknown stages {unknown}; the stages are {names}")
    enabled, plans = {}, {}
    settings = {s.name: _settings(cfg, s) for s in stages}
    for s in stages:
        enabled[s.name] = settings[s.name][0]
    out = Path(cfg.out_dir)
    for s in stages:
        on, overrides, knobs = settings[s.name]
        if not on:
            continue
        ctx = StageContext(cfg, s.name, overrides, knobs, plans, enabled)
        try:
            config = s.build(ctx)
        except ValueError as e:  # the stage's settings are wrong (ConfigError and the like)
            raise PipelineError(f"{cfg.source}: stage '{s.name}': {e}") from e
        folders = {d: plans[d].path for d in ctx.inputs}
        key, material = stage_key(s.name, config, ctx.inputs, folders)
        path = out / f"{s.name}-{key[:10]}"
        plans[s.name] = Planned(s, config, dict(ctx.inputs), key, path, material)
    return plans


def needed_stages(plans: dict[str, Planned], targets: Sequence[str] | None) -> list[str]:
    """Stages to run for ``targets`` (they and everything they read), in pipeline order."""
    if not targets:
        return list(plans)
    missing = [t for t in targets if t not in plans]
    if missing:
        raise PipelineError(f"target stages {missing} are off or unknown (on: {list(plans)})")
    need: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(plans[name].inputs)
    return [n for n in plans if n in need]


# ----------------------------------------------------------------------------- state


def read_marker(path: Path) -> dict | None:
    """The completion marker of a stage folder, or None when the stage has not finished."""
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def stage_status(planned: Planned) -> str:
    """``cached`` (finished, same key), ``partial`` (started, no marker) or ``todo``."""
    marker = read_marker(planned.path)
    if marker is not None and marker.get("key") == planned.key:
        return "cached"
    return "partial" if planned.path.exists() else "todo"


@dataclass
class StageRecord:
    """What happened to one stage in this run."""

    name: str
    title: str
    status: str  # ran | resumed | cached | failed | not run
    key: str | None = None
    path: str | None = None
    report: str | None = None
    seconds: float | None = None  # this run's wall time
    wall_s: float | None = None  # wall time of the run that produced the folder
    cpu_s: float | None = None  # CPU time of this process (all threads) while it ran
    metric: str = ""
    error: str | None = None


@dataclass
class PipelineResult:
    """The records of one ``run_pipeline`` call and the summary report's path."""

    config: Any  # the PipelineSpec (subclass) that ran
    records: dict[str, StageRecord]
    report: Path | None
    plans: dict[str, Planned]
    stages: dict[str, Stage] = field(default_factory=dict)

    @property
    def executed(self) -> list[str]:
        """Stages whose runner was called in this run (fresh or resumed)."""
        return [n for n, r in self.records.items() if r.status in ("ran", "resumed")]

    def path(self, stage: str) -> Path:
        return self.plans[stage].path


# ----------------------------------------------------------------------------- running


@contextmanager
def _stage_log(path: Path, quiet_console: bool) -> Iterator[None]:
    """Log to ``<stage>/stage.log``; with a live progress view, only warnings on the console."""
    root = logging.getLogger()
    handler = logging.FileHandler(path / "stage.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_root_level = root.level
    quieted = []
    if quiet_console:
        for h in root.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                quieted.append((h, h.level))
                h.setLevel(max(h.level, logging.WARNING))
    root.addHandler(handler)
    root.setLevel(min(old_root_level, logging.INFO) if old_root_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_root_level)
        for h, level in quieted:
            h.setLevel(level)


def _safe_metric(planned: Planned) -> str:
    try:
        return planned.stage.metric(planned.path)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.debug("%s: no key metric (%s)", planned.name, e)
        return ""


ATTEMPTS = ".attempts.json"  # wall/CPU time of the killed attempts of an unfinished stage
HEARTBEAT_S = 10.0


@contextmanager
def _attempt_clock(path: Path) -> Iterator[dict]:
    """Time one attempt at a stage, adding the time of the attempts killed before it.

    A stage killed mid-way and resumed would otherwise record only its last attempt, and
    the ablation's "what the whole table costs" would undercount it. While the attempt
    runs, a daemon thread rewrites ``.attempts.json`` every ``HEARTBEAT_S`` seconds with
    the total so far, so a SIGKILL loses at most that much. Yields a dict that holds, once
    the block ends, ``wall_s``/``cpu_s`` (all attempts), ``last_wall_s``/``last_cpu_s``
    (this one) and ``attempts``.
    """
    import threading

    try:
        earlier = json.loads((path / ATTEMPTS).read_text())
    except (OSError, ValueError):
        earlier = {}
    before_wall, before_cpu = earlier.get("wall_s", 0.0), earlier.get("cpu_s", 0.0)
    attempts = earlier.get("attempts", 0) + 1
    started, cpu_started = time.time(), time.process_time()
    out: dict = {"attempts": attempts}

    def write() -> None:
        out["last_wall_s"] = round(time.time() - started, 2)
        out["last_cpu_s"] = round(time.process_time() - cpu_started, 2)
        out["wall_s"] = round(before_wall + out["last_wall_s"], 2)
        out["cpu_s"] = round(before_cpu + out["last_cpu_s"], 2)
        write_json_atomic(
            path / ATTEMPTS,
            {"wall_s": out["wall_s"], "cpu_s": out["cpu_s"], "attempts": attempts},
            default=str,
        )

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            write()

    write()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        write()


def _run_stage(planned: Planned, resume: bool, quiet: bool) -> StageRecord:
    """Run one stage into its folder and write the completion marker last."""
    planned.path.mkdir(parents=True, exist_ok=True)
    with _attempt_clock(planned.path) as clock, _stage_log(planned.path, quiet):
        log.info("stage %s (key %s), resume=%s", planned.name, planned.key[:10], resume)
        planned.stage.run(planned.config, planned.path, resume)
    wall, cpu = clock["last_wall_s"], clock["last_cpu_s"]
    report = planned.path / REPORT
    for required in (METRICS, REPORT):
        if not (planned.path / required).exists():
            raise RuntimeError(f"stage {planned.name} finished without {planned.path / required}")
    record = StageRecord(
        planned.name,
        planned.stage.title,
        "resumed" if resume else "ran",
        planned.key,
        str(planned.path),
        os.path.relpath(report, planned.path.parent),
        wall,
        clock["wall_s"],
        cpu,
        _safe_metric(planned),
    )
    marker = {
        "stage": planned.name,
        "key": planned.key,
        "inputs": planned.inputs,
        "report": os.path.relpath(report, planned.path),
        "wall_s": clock["wall_s"],  # every attempt's, killed ones included
        "cpu_s": clock["cpu_s"],
        "attempts": clock["attempts"],
        "last_attempt_wall_s": wall,
        "resumed": resume,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dermkit": __version__,
        "metric": record.metric,
        "config": planned.material.get("config"),
    }
    write_json_atomic(planned.path / MARKER, marker, default=str)  # last: the stage is done
    # the marker holds the total now; a forced re-run of the folder starts a fresh count
    (planned.path / ATTEMPTS).unlink(missing_ok=True)
    return record


def _cached_record(planned: Planned) -> StageRecord:
    marker = read_marker(planned.path) or {}
    report = planned.path / marker.get("report", REPORT)
    return StageRecord(
        planned.name,
        planned.stage.title,
        "cached",
        planned.key,
        str(planned.path),
        os.path.relpath(report, planned.path.parent),
        0.0,
        marker.get("wall_s"),
        None,
        marker.get("metric") or _safe_metric(planned),
    )


def plan_status(
    cfg: PipelineSpec,
    stages: Sequence[Stage],
    targets: Sequence[str] | None = None,
) -> list[dict]:
    """What ``run_pipeline`` would do, without running: one row per stage.

    status: cached (reused), partial (resumed), todo (computed), off, or not needed (for
    ``targets``).
    """
    plans = plan_pipeline(cfg, stages)
    order = set(needed_stages(plans, targets))
    rows = []
    for s in stages:
        planned = plans.get(s.name)
        if planned is None:
            status = "off"
        elif s.name not in order:
            status = "not needed"
        else:
            status = stage_status(planned)
        rows.append(
            {
                "stage": s.name,
                "status": status,
                "key": planned.key[:10] if planned else None,
                "full_key": planned.key if planned else None,
                "folder": str(planned.path) if planned else None,
            }
        )
    return rows


def run_pipeline(
    cfg: PipelineSpec,
    stages: Sequence[Stage],
    targets: Sequence[str] | None = None,
    progress: bool = True,
    summary: Callable[[PipelineResult, float], Path] | None = None,
) -> PipelineResult:
    """Run the stages ``targets`` need (all when None), reusing finished ones.

    Returns the records; writes ``<out_dir>/pipeline.json`` and calls ``summary(result,
    seconds)`` (when given) for the summary report, whose path lands in ``result.report``.
    A failing stage is recorded, then its error re-raised.
    """
    from dermkit.core.devices import thread_limit  # torch: only when a pipeline runs

    t0 = time.time()
    plans = plan_pipeline(cfg, stages)
    order = needed_stages(plans, targets)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = {
        s.name: StageRecord(s.name, s.title, "not run" if s.name in plans else "off")
        for s in stages
    }
    view = _ProgressView(order, plans, enabled=progress)
    error: BaseException | None = None
    with view, thread_limit(cfg.threads):
        for name in order:
            planned = plans[name]
            status = stage_status(planned)
            if status == "cached":
                records[name] = _cached_record(planned)
                view.done(name, records[name])
                continue
            view.start(name, resumed=status == "partial")
            try:
                records[name] = _run_stage(planned, status == "partial", quiet=view.live)
            except BaseException as e:  # recorded, then re-raised (KeyboardInterrupt too)
                records[name].status, records[name].error = "failed", f"{type(e).__name__}: {e}"
                records[name].key, records[name].path = planned.key, str(planned.path)
                view.done(name, records[name])
                error = e
                break
            view.done(name, records[name])
    result = PipelineResult(cfg, records, None, plans, {s.name: s for s in stages})
    _write_state(result, time.time() - t0)
    if summary is not None:
        result.report = summary(result, time.time() - t0)
    if error is not None:
        raise error
    return result


def _write_state(result: PipelineResult, seconds: float) -> Path:
    cfg = result.config
    state = {
        "name": cfg.name,
        "source": cfg.source,
        "seed": cfg.seed,
        "seconds": round(seconds, 2),
        "executed": result.executed,
        "stages": {n: r.__dict__ for n, r in result.records.items()},
        "pipeline": cfg.model_dump(mode="json"),
    }
    return write_json_atomic(Path(cfg.out_dir) / STATE_FILE, state, default=str)


class _ProgressView:
    """One rich progress view over the stages (a line each: status, key figure, time)."""

    STYLE: ClassVar[dict[str, str]] = {
        "ran": "green",
        "resumed": "green",
        "cached": "cyan",
        "failed": "bold red",
        "running": "yellow",
    }

    def __init__(self, order: list[str], plans: dict[str, Planned], enabled: bool):
        self.order, self.plans, self.enabled = order, plans, enabled
        self.live = False
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> _ProgressView:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(finished_text="•"),
            TextColumn("{task.fields[stage]:<12}"),
            TextColumn("{task.fields[state]}"),
            BarColumn(bar_width=12),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metric]}"),
            console=console,
            transient=False,
        )
        self._progress.start()
        self.live = console.is_terminal
        for name in self.order:
            self._tasks[name] = self._progress.add_task(
                name, total=1, start=False, stage=name, state="[dim]waiting", metric=""
            )
        return self

    def start(self, name: str, resumed: bool) -> None:
        if self._progress is not None:
            task = self._tasks[name]
            state = "resuming" if resumed else "running"
            self._progress.update(task, state=f"[yellow]{state}")
            self._progress.start_task(task)
        else:
            log.info("stage %s: %s", name, "resuming" if resumed else "running")

    def done(self, name: str, record: StageRecord) -> None:
        if self._progress is not None:
            task = self._tasks[name]
            style = self.STYLE.get(record.status, "white")
            self._progress.update(
                task,
                completed=1,
                state=f"[{style}]{record.status}",
                metric=record.error or record.metric,
            )
            self._progress.stop_task(task)
        else:
            log.info("stage %s: %s %s", name, record.status, record.metric)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
