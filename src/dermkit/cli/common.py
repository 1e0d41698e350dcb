"""What every ``dermkit`` command shares: the console, clean failures, option declarations
and the stage factory.

A *stage command* loads a run config (``--preset``, ``--config``, trailing ``key=value``
overrides), calls one stage function with it and shows what it returns. ``stage_command``
builds such a command from a few names, so the load / run / report body is written once.
Every command reports bad input the same way: ``with reported():`` turns the one tuple of
user errors (``user_errors``) into ``error: <message>`` and exit code 2. Imports of heavy or
optional modules stay lazy ("module:attr" strings, imports inside commands) so that
``dermkit --help`` starts fast and needs no extra.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, NoReturn

import typer
from rich.console import Console

# soft_wrap: a message is never cut by inserted line breaks, so the file paths and row
# numbers it names stay whole (copyable, greppable) however long the path; the terminal
# folds long lines on screen. Tables still fit themselves to the width.
console = Console(stderr=True, soft_wrap=True)
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

    dermkit's own input errors (``ConfigError``, ``ManifestError``, ``SplitFileError``,
    ``DataValidationError``, ``WeightsError``, ``EncoderError``, ``PipelineError``) are
    ``ValueError``s, as are the domain functions' refusals of bad arguments; a missing file
    or folder is a ``FileNotFoundError``; a split that leaks lesions a ``LeakageError``.
    Called only inside ``except`` clauses, so nothing is imported when the CLI starts.
    """
    from dermkit.data.splits import LeakageError

    return (ValueError, FileNotFoundError, LeakageError)


@contextmanager
def reported(*extra: type[Exception]) -> Iterator[None]:
    """Run the body; ``user_errors()`` (and ``extra``) end the command with ``error: ...``,
    exit 2. The traceback is logged at debug level (``dermkit -v``) for bug reports."""
    try:
        yield
    except (*user_errors(), *extra) as e:
        logging.getLogger(__name__).debug("traceback of the error below", exc_info=True)
        fail(str(e))


def comma_list(text: str | None, convert: Callable[[str], Any] = str) -> list | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (each through ``convert``); None stays None."""
    if text is None:
        return None
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def print_json(result: Any) -> None:
    """Print a result dict as indented JSON on stdout."""
    print(json.dumps(result, indent=2))


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
    after the user's overrides (so the option wins); ``None`` values are not passed. With
    ``key=None`` the value is a keyword argument of the stage function instead, named
    ``name`` (e.g. a benchmark's number of rounds, which is no config field). ``convert``
    turns the value into the override's text first (e.g. a JSON file into its content).
    """

    name: str
    annotation: Any
    key: str | None = None
    default: Any = None
    convert: Callable[[Any], str] = str

    REQUIRED: ClassVar[Any] = inspect.Parameter.empty  # the default of a required argument

    @classmethod
    def argument(cls, name: str, kind: Any, help: str, key: str | None = None) -> Param:
        """A required positional argument, e.g. the run folder a stage starts from."""
        return cls(name, Annotated[kind, typer.Argument(help=help)], key, cls.REQUIRED)

    @classmethod
    def option(
        cls,
        name: str,
        kind: Any,
        help: str,
        key: str | None = None,
        default: Any = None,
        convert: Callable[[Any], str] = str,
    ) -> Param:
        """``--name``: with the default None the option is ``kind | None`` and left out
        unless given."""
        kind = kind | None if default is None else kind
        return cls(name, Annotated[kind, typer.Option(help=help)], key, default, convert)


STANDARD_PARAMS: dict[str, tuple[Any, Any]] = {
    "overrides": (Overrides, None),
    "preset": (Preset, None),
    "config": (ConfigFile, None),
    "resume": (Resume, False),
}

# The parameters of every stage: its config from preset, file and overrides; a stage that
# continues from its last checkpoint adds --resume.
CONFIG_PARAMS = ("overrides", "preset", "config")
RESUMABLE = (*CONFIG_PARAMS, "resume")


def stage_command(
    doc: str,
    *,
    schema: str,
    section: str,
    run: str,
    params: tuple[str | Param, ...] = CONFIG_PARAMS,
    extras: tuple[str, ...] = (),
    run_kwargs: dict[str, Any] | None = None,
    show: Callable[[Any], None] = print,
) -> Callable[..., None]:
    """Build the typer callback of a standard stage command.

    Args:
        doc: the command's help (first line: the summary in ``dermkit --help``).
        schema: "module:Class" of the run config, e.g. "dermkit.train.settings:FinetuneRunConfig".
        section: the preset section it is loaded from, e.g. "finetune".
        run: "module:function" called as ``function(cfg, **run_kwargs[, resume=...])``,
            plus the ``Param`` values without a config key; what it returns is shown.
        params: the command's parameters in their order on the command line: the names
            in ``STANDARD_PARAMS`` and ``Param`` entries; "resume" is passed to ``run``.
        extras: optional dependency groups the command needs (``needs``).
        run_kwargs: fixed keyword arguments of ``run``, e.g. ``{"progress": True}``.
        show: prints what ``run`` returns (default: ``print``, for a path).

    The command exits 2 with ``error: <message>`` on any of ``user_errors()``.
    """
    to_config = [p for p in params if isinstance(p, Param) and p.key is not None]
    to_run = [p.name for p in params if isinstance(p, Param) and p.key is None]
    names = [p if isinstance(p, str) else p.name for p in params]

    def command(**kw: Any) -> None:
        if extras:
            needs(*extras)
        call = dict(run_kwargs or {}) | {name: kw[name] for name in to_run}
        call |= {"resume": kw["resume"]} if "resume" in names else {}
        with reported():
            items = [*(kw.get("overrides") or [])]
            items += [
                f"{p.key}={p.convert(kw[p.name])}" for p in to_config if kw[p.name] is not None
            ]
            cfg = load_stage_config(schema, section, kw.get("preset"), kw.get("config"), items)
            out = resolve(run)(cfg, **call)
        show(out)

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


def command_group(help: str) -> typer.Typer:
    """A ``dermkit <group>`` sub-app; without a sub-command it prints its help."""
    return typer.Typer(help=help, no_args_is_help=True)


def add_commands(group: typer.Typer, commands: dict[str, Callable[..., None]]) -> None:
    """Register ``{name: callback}`` on ``group``, in order (the order of ``--help``)."""
    for name, command in commands.items():
        group.command(name)(command)
