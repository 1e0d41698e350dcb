"""Every ``dermkit`` command quoted in README.md and BENCHMARKS.md still parses.

Issue 17 asks that a refactor never leave a documented command behind. Each command in a
fenced code block is parsed by the real click/typer command tree, without running it:
the subcommand must exist and every ``--option`` must be one the command takes. Paths that
do not exist here (run folders of earlier benchmarks) are not an error; a renamed or
removed command or option is.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md")


def fenced_lines(text: str) -> list[str]:
    """Lines inside ``` fences, backslash continuations joined, comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def documented_commands(text: str) -> list[list[str]]:
    """The argument lists after each ``dermkit`` in the fenced shell lines of ``text``."""
    commands = []
    for line in fenced_lines(text):
        # $VAR / ${VAR}: a placeholder path (loops and variables in benchmark scripts).
        line = re.sub(r"\$\{?\w+\}?", "X", line)
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue  # not shell (a JSON or YAML block)
        for i, token in enumerate(tokens):
            if token == "dermkit":
                args = []
                for t in tokens[i + 1 :]:
                    if t in {";", "&&", "||", "|", ">", "2>&1", "do", "done"} or t.startswith(">"):
                        break
                    args.append(t)
                commands.append(args)
    return commands


def parse(args: list[str]) -> None:
    """Parse ``dermkit ARGS`` through the command tree without running it.

    ``--help`` is appended: click parses every argument first (an unknown command or option
    exits with code 2), then the eager help option ends the call before any value is
    converted, so paths that exist only on the benchmark machine do not matter.
    """
    result = CliRunner().invoke(app, [*args, "--help"])
    if result.exit_code != 0:
        raise AssertionError(f"dermkit {' '.join(args)}: {result.output.strip()[-400:]}")


CASES = [
    pytest.param(args, id=f"{doc}:{' '.join(args)[:60]}")
    for doc in DOCS
    for args in documented_commands((ROOT / doc).read_text())
    if args  # a bare `dermkit` prints help
]


def test_the_docs_quote_commands():
    assert len(CASES) > 60  # the extraction found the docs' commands, not nothing


@pytest.mark.parametrize("args", CASES)
def test_documented_command_parses(args):
    parse(args)


def test_parse_rejects_what_the_docs_must_not_say():
    with pytest.raises(AssertionError, match="No such"):
        parse(["finetune", "--no-such-option", "1"])
    with pytest.raises(AssertionError, match="No such"):
        parse(["teacher", "--preset", "cpu"])
    parse(["finetune", "--preset", "cpu", "optim.epochs=1"])
