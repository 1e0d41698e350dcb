"""The stage-command factory of dermkit.cli: parameters, config, run call, clean errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from dermkit.cli.common import RESUMABLE, Param, stage_command

runner = CliRunner()


@pytest.fixture()
def stage(monkeypatch):
    """A fake stage module ``fake_stage``: ``run`` records its config and keywords."""
    calls: list[tuple] = []
    module = types.ModuleType("fake_stage")

    def run(cfg, **kw):
        if cfg.out_dir == "boom":
            raise FileNotFoundError("boom/split.csv not found")
        calls.append((cfg, kw))
        return Path(cfg.out_dir) / "report.html"

    module.run = run
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    return calls


def _app(**factory_kw) -> typer.Typer:
    app = typer.Typer()
    app.command("go")(
        stage_command(
            "Run the fake stage.",
            schema="dermkit.train.settings:FinetuneRunConfig",
            section="finetune",
            run="fake_stage:run",
            **factory_kw,
        )
    )
    app.command("other")(lambda: None)  # two commands: "go" stays a sub-command
    return app


TEACHER = Param(
    "teacher", Annotated[Path | None, typer.Option(help="teacher run folder")], key="seed"
)


def test_the_command_loads_the_config_runs_the_stage_and_prints_its_path(stage):
    app = _app(params=(*RESUMABLE, TEACHER), run_kwargs={"progress": True})
    result = runner.invoke(
        app, ["go", "--preset", "tiny", "out_dir=runs/x", "seed=3", "--resume", "--teacher", "5"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(Path("runs/x") / "report.html")
    [(cfg, kw)] = stage
    assert kw == {"progress": True, "resume": True}
    assert cfg.out_dir == "runs/x"
    assert cfg.seed == 5  # the option's override comes after the user's: the option wins
    assert cfg.model.name == "vit_micro_patch4_32"  # the tiny preset was loaded


def test_an_option_left_out_is_not_passed_and_resume_only_when_declared(stage):
    app = _app(params=("overrides", "preset", "config", TEACHER))
    result = runner.invoke(app, ["go", "seed=3"])
    assert result.exit_code == 0, result.output
    [(cfg, kw)] = stage
    assert cfg.seed == 3 and kw == {}  # no --teacher: seed stays the user's
    assert cfg.model.name != "vit_micro_patch4_32"  # no --preset: the defaults


def test_user_errors_exit_2_with_the_message_and_no_traceback(stage):
    app = _app()
    result = runner.invoke(app, ["go", "out_dir=boom"])
    assert result.exit_code == 2
    assert "error: boom/split.csv not found" in result.output
    bad_key = runner.invoke(app, ["go", "data.imag_size=3"])
    assert bad_key.exit_code == 2 and "data.imag_size" in bad_key.output
    assert not stage


def test_help_lists_the_parameters_in_their_declared_order():
    required = Param(
        "run",
        Annotated[Path, typer.Argument(help="run folder")],
        key="out_dir",
        default=Param.REQUIRED,
    )
    app = _app(params=(required, "overrides", TEACHER, "preset", "config"))
    text = " ".join(runner.invoke(app, ["go", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Run the fake stage." in text
    assert "go [OPTIONS] {run} [overrides]..." in text  # the argument, then the overrides
    assert text.index("--teacher") < text.index("--preset") < text.index("--config")
    assert "--resume" not in text
    missing = runner.invoke(app, ["go"])
    assert missing.exit_code == 2 and "Missing argument" in missing.output


def test_a_param_without_a_config_key_is_a_keyword_of_the_stage_and_show_prints_the_result(
    stage,
):
    rounds = Param.option("rounds", int, "interleaved rounds", default=3)
    shown = []
    app = _app(params=("overrides", rounds), show=shown.append)
    result = runner.invoke(app, ["go", "out_dir=runs/y", "--rounds", "5"])
    assert result.exit_code == 0, result.output
    [(cfg, kw)] = stage
    assert kw == {"rounds": 5} and cfg.out_dir == "runs/y"
    assert shown == [Path("runs/y") / "report.html"]  # show, not print, got the result


def test_reported_turns_every_user_error_into_exit_2_and_lets_bugs_through():
    from dermkit.cli.common import comma_list, reported

    app = typer.Typer()

    @app.command()
    def go(kind: str) -> None:
        errors = {"value": ValueError("bad --size"), "file": FileNotFoundError("no run/x")}
        with reported(KeyError):
            if kind == "bug":
                raise TypeError("a bug keeps its traceback")
            raise errors.get(kind, KeyError("unknown dataset"))

    for kind, message in (("value", "bad --size"), ("file", "no run/x"), ("key", "unknown")):
        result = runner.invoke(app, [kind])
        assert result.exit_code == 2 and "error: " in result.output, result.output
        assert message in result.output
    assert isinstance(runner.invoke(app, ["bug"]).exception, TypeError)
    assert comma_list(" a, b,,c ") == ["a", "b", "c"] and comma_list(None) is None
    assert comma_list("1,3", int) == [1, 3]
