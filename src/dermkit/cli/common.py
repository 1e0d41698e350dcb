"""What every ``dermkit`` command shares: the console, clean failures, and the stage factory.

A *stage command* loads a run config (``--preset``, ``--config``, trailing ``key=value``
overrides), calls one stage function with it and prints the path it returns. ``stage_command``
builds such a command from a few names, so the load / run / report body and the list of
user errors (``user_errors``) are written once. Imports of heavy or optional modules stay
lazy ("module:attr" strings) so that ``dermkit --help`` starts fast and needs no extra.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)
# The extras a whole pipeline run needs (its stages train generators, exits, export, explain).
PIPELINE_EXTRAS = ("synth", "exits", "export", "explain")

Preset = Annotated[str | None, typer.Option(help="config preset: tiny, cpu or gpu")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML config file")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides")]
Resume = Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad user input)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def needs(*extras: str) -> None:
    """Stop with the pip line when an optional dependency group (extra) is not installed."""
    from rich.markup import escape

    from dermkit.core.optional import MissingExtraError, require_extra

    try:
        require_extra(*extras)
    except MissingExtraError as e:
        fail(escape(str(e)))  # escaped: rich would take "[serve]" for markup


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input: reported as ``error: ...`` without a traceback.

    Called only inside ``except`` clauses, so the modules are imported when an error
    happens, not when the CLI starts.
    """
    from dermkit.config import ConfigError
    from dermkit.data.manifest import ManifestError
    from dermkit.data.prepare import SplitFileError
    from dermkit.data.readers import DataValidationError
    from dermkit.data.splits import LeakageError
    from dermkit.models.weights import WeightsError
    from dermkit.pipeline.runner import PipelineError
    from dermkit.synth.encoders import EncoderError

    return (
        ConfigError,
        ManifestError,
        SplitFileError,
        DataValidationError,
        LeakageError,
        FileNotFoundError,
        WeightsError,
        EncoderError,
        PipelineError,
    )


def resolve(target: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imports the module)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_stage_config(
    schema: str, section: str, preset: str | None, config: Path | None, overrides: list[str]
) -> Any:
    """The run config of a stage: ``schema`` ("module:Class") filled from the preset
    ``section``, the ``--config`` file and the overrides (later wins)."""
    from dermkit.config import load_config

    return load_config(resolve(schema), section, preset, config, overrides)


@dataclass(frozen=True)
class Param:
    """A command-line parameter of a stage command beyond overrides/preset/config/resume.

    ``key``: the config key the value is given to, as the override ``key=value`` appended
    after the user's overrides (so the option wins); ``None`` values are not passed.
    """

    name: str
    annotation: Any
    key: str
    default: Any = None

    REQUIRED: ClassVar[Any] = inspect.Parameter.empty  # the default of a required argument


STANDARD_PARAMS: dict[str, tuple[Any, Any]] = {
    "overrides": (Overrides, None),
    "preset": (Preset, None),
    "config": (ConfigFile, None),
    "resume": (Resume, False),
}

# The parameters of a stage that continues from its last checkpoint with --resume.
RESUMABLE = ("overrides", "preset", "config", "resume")


def stage_command(
    doc: str,
    *,
    schema: str,
    section: str,
    run: str,
    params: tuple[str | Param, ...] = ("overrides", "preset", "config"),
    extras: tuple[str, ...] = (),
    run_kwargs: dict[str, Any] | None = None,
) -> Callable[..., None]:
    """Build the typer callback of a standard stage command.

    Args:
        doc: the command's help (first line: the summary in ``dermkit --help``).
        schema: "module:Class" of the run config, e.g. "dermkit.train.settings:FinetuneRunConfig".
        section: the preset section it is loaded from, e.g. "finetune".
        run: "module:function" called as ``function(cfg, **run_kwargs[, resume=...])``;
            it returns the path that is printed (a report, a run folder, a manifest).
        params: the command's parameters in their order on the command line: the names
            in ``STANDARD_PARAMS`` and ``Param`` entries; "resume" is passed to ``run``.
        extras: optional dependency groups the command needs (``needs``).
        run_kwargs: fixed keyword arguments of ``run``, e.g. ``{"progress": True}``.

    The command exits 2 with ``error: <message>`` on any of ``user_errors()``.
    """
    custom = [p for p in params if isinstance(p, Param)]
    names = [p if isinstance(p, str) else p.name for p in params]

    def command(**kw: Any) -> None:
        if extras:
            needs(*extras)
        items = [*(kw.get("overrides") or [])]
        items += [f"{p.key}={kw[p.name]}" for p in custom if kw[p.name] is not None]
        call = dict(run_kwargs or {}) | ({"resume": kw["resume"]} if "resume" in names else {})
        try:
            cfg = load_stage_config(schema, section, kw.get("preset"), kw.get("config"), items)
            out = resolve(run)(cfg, **call)
        except user_errors() as e:
            fail(str(e))
        print(out)

    def parameter(p: str | Param) -> inspect.Parameter:
        if isinstance(p, str):
            (annotation, default), name = STANDARD_PARAMS[p], p
        else:
            annotation, default, name = p.annotation, p.default, p.name
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
        )

    # typer reads the parameters from the signature and the help from the docstring.
    command.__signature__ = inspect.Signature([parameter(p) for p in params])  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command
