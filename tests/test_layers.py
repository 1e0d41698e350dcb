"""The layers contract of ``src/dermkit``: imports run downhill only, and never in a circle.

Layers, top to bottom (a module may import its own package and any LOWER layer):

    cli                                 command-line entry points
    demo | bench                        one-command runs of whole pipelines
    pipeline                            dermae (the stage wiring) > report > runner (the
                                        DAG runner: it imports no domain code, only core)
    deploy                              export, inference, serving, latency benches
    explain | exits | synth | ssl       methods built on trained classifiers
    train                               supervised training, distillation
    tasks                               what a classifier predicts: classification, ordinal
    eval                                metrics, calibration, reports, batched inference
    models | data                       architectures, weights; datasets, caches, splits
    runs                                run folders (config.yaml, run.json)
    config                              the schema base, presets, overrides
    core                                atomic files, hashing, macro-F1, prediction files,
                                        devices, optional extras
    dermkit                             the package root (``__version__``)

Packages joined by ``|`` are siblings: they may not import each other. Every import
counts, including those inside functions (``ast.walk`` sees them all): a lazy import
still couples the modules.

Settings modules (``<package>/settings.py``: the pydantic config schemas of a domain) are
the one exception, because a run's ``config.yaml`` is read at every layer: e.g.
``models.runs_io`` (models) opens finetune/distill run folders, whose schema is composed
in ``train.settings`` from the data, model, eval, task and train sections. So any module
may import any settings module, and in return a settings module holds declarations only:
it imports nothing of dermkit but ``config``, ``core`` and the settings modules of its own
or lower layers (schemas compose downhill, as the code does).

``KNOWN_UPHILL`` lists the imports that break the contract today, each with the change
that removes it; an entry that no longer occurs fails the test too, so the list only
shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dermkit"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("demo", "bench"),
    ("pipeline",),
    ("deploy",),
    ("explain", "exits", "synth", "ssl"),
    ("train",),
    ("tasks",),
    ("eval",),
    ("models", "data"),
    ("runs",),
    ("config",),
    ("core",),
    ("dermkit",),
)

# (importer, imported module) -> why it is still there / what removes it.
KNOWN_UPHILL: dict[tuple[str, str], str] = {}
# Import circles allowed for now (sorted module names) -> what removes them.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path, root: Path) -> str:
    """``root/a/b.py`` -> ``<root.name>.a.b``; a package's ``__init__.py`` -> the package."""
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules of the same top-level package it imports}, every import statement.

    ``from pkg.a import b`` counts as an import of ``pkg.a.b`` when that is a module,
    else of ``pkg.a``; relative imports are resolved against the importing module.
    """
    pkg = root.name
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in paths else base)
            for t in targets:
                while t and t not in paths and "." in t:  # `import pkg.a.b` of a name
                    t = t.rsplit(".", 1)[0]
                if t in paths and t != mod and t.split(".")[0] == pkg:
                    graph[mod].add(t)
    return graph


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> tuple[int, str]:
    """(layer index, top-level name) of a module; index 0 is the top layer."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for i, layer in enumerate(layers):
        if top in layer:
            return i, top
    raise LookupError(f"{module}: package {top!r} is in no layer; add it to LAYERS")


SETTINGS = "settings"  # the module name of a package's config schemas (see the docstring)
SETTINGS_MAY_IMPORT = ("config", "core")  # besides other settings modules


def is_settings(module: str) -> bool:
    return module.rsplit(".", 1)[-1] == SETTINGS


def layer_violations(
    graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]
) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for each import that goes up a layer or across siblings,
    and each import of domain code by a settings module."""
    out = []
    for mod, targets in sorted(graph.items()):
        i, top = layer_of(mod, layers)
        for t in sorted(targets):
            j, t_top = layer_of(t, layers)
            if is_settings(mod) and not is_settings(t) and t_top not in SETTINGS_MAY_IMPORT:
                out.append((mod, t, f"settings module imports {t_top} code, not schemas"))
                continue
            if is_settings(t) and not is_settings(mod):
                continue  # schemas are read at every layer
            if j < i:
                out.append((mod, t, f"{top} imports {t_top}, a higher layer"))
            elif j == i and t_top != top:
                out.append((mod, t, f"{top} imports its sibling {t_top}"))
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# ----------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC)


def test_every_import_runs_downhill(graph):
    found = {(a, b): why for a, b, why in layer_violations(graph, LAYERS)}
    new = [f"{a} -> {b}: {why}" for (a, b), why in found.items() if (a, b) not in KNOWN_UPHILL]
    assert not new, "imports against the layers (see this file's docstring):\n" + "\n".join(new)
    stale = [f"{a} -> {b}" for a, b in KNOWN_UPHILL if (a, b) not in found]
    assert not stale, "fixed, now delete from KNOWN_UPHILL:\n" + "\n".join(stale)


def test_there_are_no_import_circles(graph):
    found = import_cycles(graph)
    new = [" <-> ".join(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, "import circles:\n" + "\n".join(new)
    stale = [" <-> ".join(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, "fixed, now delete from KNOWN_CYCLES:\n" + "\n".join(stale)


# Inside the pipeline package, top to bottom: each module may import only those below it.
PIPELINE_MODULES = ("dermkit.pipeline.dermae", "dermkit.pipeline.report", "dermkit.pipeline.runner")


def test_the_pipeline_runner_imports_no_domain_code(graph):
    runner = graph["dermkit.pipeline.runner"]
    assert runner, "dermkit.pipeline.runner not found or imports nothing"
    assert all(t == "dermkit" or t.startswith("dermkit.core.") for t in runner), runner
    for i, module in enumerate(PIPELINE_MODULES):
        above = set(PIPELINE_MODULES[:i])
        assert not graph[module] & above, (module, graph[module] & above)
    assert graph["dermkit.pipeline"] == set()  # importing the runner loads no stage


def test_core_imports_no_other_dermkit_package(graph):
    core = {m: t for m, t in graph.items() if m.startswith("dermkit.core")}
    assert core, "dermkit.core not found"
    assert all(t.startswith("dermkit.core") for ts in core.values() for t in ts), core


# ----------------------------------------------------------------------------- the checker


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


TOY_LAYERS = (("top",), ("left", "right"), ("low",), ("pkg",))


def test_the_checker_sees_a_function_level_import_that_goes_uphill(tmp_path):
    root = _package(
        tmp_path,
        {
            "top.py": "from pkg.low import x\n",
            "low.py": "def f():\n    from pkg.top import y  # lazy, still an edge\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.low"] == {"pkg.top"}
    assert layer_violations(graph, TOY_LAYERS) == [
        ("pkg.low", "pkg.top", "low imports top, a higher layer")
    ]
    assert import_cycles(graph) == [("pkg.low", "pkg.top")]


def test_the_checker_refuses_sibling_imports_and_resolves_relative_ones(tmp_path):
    root = _package(
        tmp_path,
        {
            "left/__init__.py": "",
            "left/a.py": "from ..right import b\nfrom . import c\n",
            "left/c.py": "import pkg.low\n",
            "right/__init__.py": "",
            "right/b.py": "",
            "low.py": "",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.left.a"] == {"pkg.right.b", "pkg.left.c"}
    assert graph["pkg.left.c"] == {"pkg.low"}
    assert layer_violations(graph, TOY_LAYERS) == [
        ("pkg.left.a", "pkg.right.b", "left imports its sibling right")
    ]
    assert import_cycles(graph) == []


def test_the_checker_lets_any_layer_read_settings_but_settings_import_only_schemas(tmp_path):
    root = _package(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/reader.py": "from pkg.top.settings import RunConfig\n",  # uphill, a schema
            "low/settings.py": "from pkg.left.settings import A\n",  # settings: uphill
            "left/__init__.py": "",
            "left/settings.py": "from pkg.low.settings import B\nfrom pkg.right import c\n",
            "right/__init__.py": "",
            "right/c.py": "",
            "top/__init__.py": "",
            "top/settings.py": "from pkg.left.settings import A\nfrom pkg.low.settings import B\n",
        },
    )
    assert layer_violations(import_graph(root), TOY_LAYERS) == [
        ("pkg.left.settings", "pkg.right.c", "settings module imports right code, not schemas"),
        ("pkg.low.settings", "pkg.left.settings", "low imports left, a higher layer"),
    ]


def test_the_checker_names_a_package_missing_from_the_layers(tmp_path):
    graph = import_graph(_package(tmp_path, {"stray.py": "from pkg.low import x\n", "low.py": ""}))
    with pytest.raises(LookupError, match="'stray' is in no layer"):
        layer_violations(graph, TOY_LAYERS)
