"""Optional dependency groups: a missing extra stops with the pip line that installs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.optional import EXTRAS, MissingExtraError, installed, require, require_extra

ROOT = Path(__file__).resolve().parents[1]


def test_require_names_the_extra_of_a_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'dermkit\[synth\]'"):
        require("diffusers", "synth")
    assert require("json", "none") is sys.modules["json"]  # present: the module itself


def test_require_extra_checks_every_module_of_the_group_without_importing(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert not installed("onnxscript") and installed("json")
    with pytest.raises(MissingExtraError, match=r"onnxscript .*'dermkit\[export\]'"):
        require_extra("export")
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require_extra("gpu")


@pytest.mark.parametrize(
    ("args", "blocked", "extra"),
    [
        (["serve", "runs/none"], "fastapi", "serve"),
        (["synth", "autoencoder"], "diffusers", "synth"),
        (["exits", "export", "x", "--head", "linear", "--out", "y"], "mambapy", "exits"),
        (["export", "runs/none", "--out", "x"], "onnxruntime", "export"),
    ],
)
def test_a_command_whose_extra_is_missing_says_what_to_install(monkeypatch, args, blocked, extra):
    monkeypatch.setitem(sys.modules, blocked, None)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"pip install 'dermkit[{extra}]'" in " ".join(result.output.split())


def test_the_extras_match_pyproject_and_all_installs_every_one():
    text = (ROOT / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    groups = set(re.findall(r"(?m)^([a-z]+) = \[", text))
    assert set(EXTRAS) <= groups
    all_extras = re.search(r'(?m)^all = \["dermkit\[([a-z,]+)\]"\]', text).group(1).split(",")
    assert set(EXTRAS) <= set(all_extras)
    assert '".[all,' in (ROOT / "Makefile").read_text()  # make setup installs everything


def test_training_and_the_pipeline_import_without_any_extra():
    blocked = [m for mods in EXTRAS.values() for m in mods] + ["umap", "plotly"]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import dermkit.cli, dermkit.train.finetune, dermkit.train.distill, "
        "dermkit.train.baseline, dermkit.eval.summary, dermkit.pipeline.dermae\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
