"""``dermkit bench ablation``: what each ingredient of the DerMAE recipe buys, in one table.

An ablation file (``pipelines/ablation-<preset>.yaml``) names a base pipeline, one output
folder and rows. A row is a variant of the base pipeline (``key=value`` overrides of the
pipeline file) plus the stage whose run gives the row's numbers. Every row runs through
:func:`dermkit.pipeline.dermae.run` into the *same* folder with only the stages its target
needs, so stages that rows share (the data split, the synthetic set, an MAE encoder, the
teacher) have the same key and are computed once; a killed ablation re-run resumes where
it stopped, and rows already finished cost nothing. All rows share the data stage, hence
one lesion-grouped split and one seed. A row may instead be an ensemble of rows above it
(``ensemble: [ids]``): their folders' probabilities combined with weights chosen on val
(:mod:`dermkit.eval.ensemble`), written to ``<out_dir>/ensemble-<id>``, seconds of work.
A row with ``teacher: <id>`` distils from that earlier row's folder (an ensemble row's
ensemble, say) instead of the pipeline's own finetune stage.

Each row is summarised by :func:`dermkit.exits.summary.summarize_run` (test metrics with
lesion-level bootstrap CIs, params, GFLOPs, batch-1 latency); the table is written to
``<out_dir>/ablation.md`` (+ ``ablation.json`` and ``ablation.html``, which links each row's
stage report).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from dermkit.config import ConfigError, Strict, _read_yaml
from dermkit.core.files import write_json_atomic, write_text_atomic
from dermkit.pipeline import dermae
from dermkit.pipeline.dermae import load_pipeline, resolve_pipeline_path
from dermkit.pipeline.runner import PipelineResult

log = logging.getLogger(__name__)


class AblationRow(Strict):
    """One row: a pipeline variant and the stage whose predictions give the numbers, or an
    ensemble of earlier rows (``dermkit.eval.ensemble``: weights chosen on val only)."""

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    target: str | None = Field(None, description="stage whose run folder is summarised")
    overrides: list[str] = Field(default_factory=list, description="pipeline key=value items")
    ensemble: list[str] = Field(default_factory=list, description="ids of earlier rows")
    select: Literal["greedy", "all"] = "greedy"
    teacher: str | None = Field(
        None,
        description="id of an earlier row whose folder (a run, or an ensemble row's "
        "ensemble) the row's distill stage learns from, instead of the finetune stage",
    )
    member: str | None = Field(
        None,
        description="with target teachers: one member's run (<folder>/members/<member>) "
        "instead of the ensemble; the members train once, for every row that reads them",
    )

    @model_validator(mode="after")
    def _one_source(self) -> AblationRow:
        if bool(self.target) == bool(self.ensemble):
            raise ValueError(f"row {self.id}: give either target (a stage) or ensemble (rows)")
        if self.ensemble and (self.overrides or self.teacher):
            raise ValueError(f"row {self.id}: an ensemble row takes no overrides or teacher")
        if self.member is not None and self.target != "teachers":
            raise ValueError(f"row {self.id}: member goes with target teachers")
        return self


class AblationConfig(Strict):
    """An ablation file: base pipeline, shared output folder, bootstrap size, rows."""

    pipeline: str = Field(description="base pipeline file or shipped name")
    out_dir: str = "runs/bench/ablation"
    overrides: list[str] = Field(default_factory=list, description="applied to every row")
    n_boot: int = Field(1000, ge=0)
    rows: list[AblationRow]
    source: str | None = None

    @model_validator(mode="after")
    def _unique_ids(self) -> AblationConfig:
        ids = [r.id for r in self.rows]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"row ids must be unique: {dupes}")
        for k, row in enumerate(self.rows):
            earlier = {r.id for r in self.rows[:k] if not r.ensemble}
            unknown = [m for m in row.ensemble if m not in earlier]
            if unknown:
                raise ValueError(
                    f"row {row.id}: ensemble members {unknown} are not stage rows above it"
                )
            if row.ensemble and len(row.ensemble) < 2:
                raise ValueError(f"row {row.id}: an ensemble needs at least two rows")
            if row.teacher is not None and row.teacher not in {r.id for r in self.rows[:k]}:
                raise ValueError(f"row {row.id}: teacher {row.teacher!r} is not a row above it")
        return self


def load_ablation(spec: str | Path, out: str | Path | None = None) -> AblationConfig:
    """Read an ablation file (or a shipped name such as ``ablation-cpu``)."""
    path = resolve_pipeline_path(spec)
    data = _read_yaml(path)
    if out is not None:
        data["out_dir"] = str(out)
    try:
        return AblationConfig.model_validate({**data, "source": str(path)})
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid ablation file:\n  " + "\n  ".join(lines)) from e


def select_rows(ablation: AblationConfig, ids: Sequence[str] = ()) -> list[AblationRow]:
    """The rows named by ``ids`` (all when empty), in the file's order."""
    known = [r.id for r in ablation.rows]
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ConfigError(f"unknown ablation rows {unknown}; the rows are {known}")
    # an ensemble row needs its members' folders, a row with a teacher its teacher's (and
    # so on): they come along (cached ones cost nothing)
    by_id = {r.id: r for r in ablation.rows}
    wanted, todo = set(), list(ids)
    while todo:
        row = by_id[todo.pop()]
        if row.id not in wanted:
            wanted.add(row.id)
            todo += [*row.ensemble, *([row.teacher] if row.teacher else [])]
    return [r for r in ablation.rows if not ids or r.id in wanted]


def row_folder(ablation: AblationConfig, row: AblationRow, extra: Sequence[str] = ()) -> Path:
    """Where a row's numbers come from: its target stage's folder (or one of its teachers
    members), or its ensemble folder."""
    if row.ensemble:
        return Path(ablation.out_dir) / f"ensemble-{row.id}"
    return _target_folder(row, dermae.plan(row_pipeline(ablation, row, extra))[row.target])


def _target_folder(row: AblationRow, planned) -> Path:
    """The row's folder in its target stage's plan: the stage folder, or a member's."""
    if row.member is None:
        return planned.path
    if row.member not in planned.config.members:
        raise ConfigError(
            f"row {row.id}: member {row.member!r} is not one of the teachers stage's members "
            f"{sorted(planned.config.members)}"
        )
    from dermkit.pipeline.teachers import member_folders

    return member_folders(planned.config, planned.path)[row.member]


def row_pipeline(ablation: AblationConfig, row: AblationRow, extra: Sequence[str] = ()):
    """The row's pipeline config: base file < ablation overrides < extra < row, shared
    out_dir; a row with a teacher row gets ``stages.distill.teacher`` = that row's folder."""
    items = [*ablation.overrides, *extra, *row.overrides, f"out_dir={ablation.out_dir}"]
    if row.teacher is not None:
        teacher = next(r for r in ablation.rows if r.id == row.teacher)
        items.append(f"stages.distill.teacher={row_folder(ablation, teacher, extra)}")
    return load_pipeline(ablation.pipeline, items)


def plan_ablation(
    ablation: AblationConfig, ids: Sequence[str] = (), extra: Sequence[str] = ()
) -> list[tuple[AblationRow, list[dict]]]:
    """Per row, what running it would do (see :func:`dermkit.pipeline.dermae.status`)."""
    plans = []
    for row in select_rows(ablation, ids):
        if row.ensemble:  # computed from its members' folders in seconds: no stages
            plans.append((row, []))
            continue
        rows = dermae.status(row_pipeline(ablation, row, extra), targets=[row.target])
        plans.append((row, rows))
    return plans


def stages_to_compute(plans: list[tuple[AblationRow, list[dict]]]) -> list[str]:
    """Distinct stage folders the whole ablation still has to compute (or resume)."""
    todo = {}
    for _, rows in plans:
        for r in rows:
            if r["status"] in ("todo", "partial"):
                todo[r["folder"]] = f"{r['stage']} ({r['status']})"
    return [f"{v}: {k}" for k, v in todo.items()]


def _row_record(row: AblationRow, result: PipelineResult, summary: dict, seconds: float) -> dict:
    folder = _target_folder(row, result.plans[row.target])
    return {
        "id": row.id,
        "name": row.name,
        "target": row.target,
        "folder": str(folder),
        "overrides": row.overrides,
        "computed": result.executed,
        "seconds": round(seconds, 1),
        "cpu_s": round(sum(r.cpu_s or 0 for r in result.records.values()), 1),
        # wall time of the run that produced each stage folder the row stands on, computed
        # now or reused: what the row costs from scratch
        "stage_wall_s": {
            r.path: round(r.wall_s, 1)
            for r in result.records.values()
            if r.path and r.wall_s is not None
        },
        "summary": summary,
    }


def _ensemble_record(
    row: AblationRow, records: list[dict], out: Path, n_boot: int, seed: int
) -> dict:
    """Combine the member rows' folders (weights chosen on val) and summarise on test.

    Cost columns are the sums over the members with a non-zero weight that have them (the
    classical baseline has none): an ensemble runs every chosen member.
    """
    from dermkit.eval.ensemble import run_ensemble
    from dermkit.exits.summary import summarize_run

    started = time.time()
    by_id = {r["id"]: r for r in records}
    members = [by_id[m] for m in row.ensemble]
    folder = out / f"ensemble-{row.id}"
    done = run_ensemble(
        [m["folder"] for m in members], folder, row.select, n_boot=n_boot, seed=seed
    )
    summary = summarize_run(folder, latency=False, n_boot=n_boot, seed=seed)
    chosen = [m for m, w in zip(members, done["weights"]) if w > 0]
    for key in ("params", "gflops", "latency_ms_batch1"):
        values = [m["summary"][key] for m in chosen if m["summary"].get(key) is not None]
        summary[key] = sum(values) if values else None
    summary["model"] = " + ".join(f"{m['id']} x{w}" for m, w in zip(members, done["weights"]) if w)
    stage_wall_s = {}
    for m in chosen:
        stage_wall_s.update(m["stage_wall_s"])
    return {
        "id": row.id,
        "name": row.name,
        "target": "ensemble",
        "folder": str(folder),
        "overrides": [],
        "computed": ["ensemble"],
        "seconds": round(time.time() - started, 1),
        "cpu_s": 0.0,
        "stage_wall_s": stage_wall_s,
        "ensemble": {"select": row.select, "weights": dict(zip(row.ensemble, done["weights"]))},
        "val_macro_f1": done["val_macro_f1"],
        "summary": summary,
    }


def _add_member_costs(summary: dict, folder: Path, latency: bool, n_boot: int, seed: int):
    """An ensemble folder's cost columns: the sums over its members with a positive weight
    (an ensemble runs every one of them), as for ensemble rows."""
    from dermkit.exits.summary import summarize_run

    spec = json.loads((folder / "ensemble.json").read_text())
    members = [
        summarize_run(Path(m["run"]), latency=latency, n_boot=n_boot, seed=seed)
        for m in spec["members"]
        if m["weight"] > 0
    ]
    for key in ("params", "gflops", "latency_ms_batch1"):
        values = [m[key] for m in members if m.get(key) is not None]
        summary[key] = sum(values) if values else None
    summary["model"] = " + ".join(f"{Path(m['run']).name} x{m['weight']}" for m in spec["members"])


def total_stage_seconds(records: list[dict]) -> float:
    """Wall seconds of every stage folder behind ``records``, each folder counted once.

    The cost of the whole table from scratch on this machine, whichever stages this
    command reused from the cache (rows share the split, the generator, encoders...).
    """
    folders: dict[str, float] = {}
    for r in records:
        folders.update(r.get("stage_wall_s", {}))
    return sum(folders.values())


def run_ablation(
    ablation: AblationConfig,
    ids: Sequence[str] = (),
    extra: Sequence[str] = (),
    latency: bool = True,
    progress: bool = True,
) -> Path:
    """Run (or reuse) every selected row and write the table; returns ``ablation.md``."""
    from dermkit.eval.summary import ablation_table_markdown
    from dermkit.exits.summary import summarize_run
    from dermkit.runs import git_commit, machine_info

    rows = select_rows(ablation, ids)
    out = Path(ablation.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records = []
    for i, row in enumerate(rows, 1):
        source = f"stage {row.target}" if row.target else f"ensemble of {', '.join(row.ensemble)}"
        log.info("ablation row %d/%d: %s (%s)", i, len(rows), row.name, source)
        if progress:
            from rich.console import Console

            Console(stderr=True).print(
                f"[bold]ablation row {i}/{len(rows)}[/]: {row.name} ({source})"
            )
        if row.ensemble:
            seed = load_pipeline(ablation.pipeline, [*ablation.overrides, *extra]).seed
            records.append(_ensemble_record(row, records, out, ablation.n_boot, seed))
            write_json_atomic(out / "ablation.json", records, default=str)
            continue
        cfg = row_pipeline(ablation, row, extra)
        started = time.time()
        result = dermae.run(cfg, targets=[row.target], progress=progress, summary=False)
        folder = _target_folder(row, result.plans[row.target])
        summary = summarize_run(folder, latency=latency, n_boot=ablation.n_boot, seed=cfg.seed)
        if row.target == "teachers" and row.member is None:
            _add_member_costs(summary, folder, latency, ablation.n_boot, cfg.seed)
        records.append(_row_record(row, result, summary, time.time() - started))
        # Written after every row, so a long ablation can be followed (and is never lost).
        write_json_atomic(out / "ablation.json", records, default=str)
    table = ablation_table_markdown([(r["name"], r["summary"]) for r in records])
    base = load_pipeline(ablation.pipeline, [*ablation.overrides, *extra])
    source = base.data.path or f"{base.data.phantoms.n_lesions} phantom lesions"
    split = base.data.split_file or f"lesion-grouped split, seed {base.seed}"
    machine = machine_info()
    header = [
        f"# Ablation: {ablation.source}",
        "",
        f"Base pipeline {base.source} (preset {base.preset}), data {source}, {split}; seed "
        f"{base.seed} for every row. Test split; 95% lesion-level bootstrap CIs "
        f"(B = {ablation.n_boot}). Commit {git_commit()}, {machine['cores']} cores "
        f"({machine['cpu']}), torch {machine['torch']}. Wall time of this command "
        f"{time.time() - t0:.0f} s (stages reused from {out} cost nothing); all the "
        f"stages behind the table took {total_stage_seconds(records) / 3600:.2f} h when "
        "they were computed (each stage once, the sum of their wall times).",
        "",
    ]
    footer = [
        "",
        "| row | stage folder | computed in this command | seconds | its stages from scratch (s) |",
        "|---|---|---|---:|---:|",
    ]
    for r in records:
        folder = os.path.relpath(r["folder"], out)
        scratch = sum(r.get("stage_wall_s", {}).values())
        footer.append(
            f"| {r['id']} | {folder} | {', '.join(r['computed']) or '-'} | {r['seconds']} "
            f"| {scratch:.0f} |"
        )
    path = out / "ablation.md"
    write_text_atomic(path, "\n".join(header) + "\n" + table + "\n".join(footer) + "\n")
    _write_report(out, records, table, header[2])
    return path


def _write_report(out: Path, records: list[dict], table: str, text: str) -> Path:
    from dermkit.eval.report import HtmlReport, markdown_rows

    report = HtmlReport("dermkit ablation")
    report.add_paragraph(text)
    report.add_table(markdown_rows(table), caption="test split")
    for r in records:
        stage_marker = Path(r["folder"]) / "stage.json"
        page = json.loads(stage_marker.read_text())["report"] if stage_marker.exists() else None
        href = os.path.relpath(Path(r["folder"]) / (page or "report.html"), out)
        report.add_link(href, f"{r['name']}: {r['target']} stage report")
    return report.write(out / "ablation.html")  # not report.html: a pipeline may share out
