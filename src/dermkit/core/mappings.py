"""Nested settings mappings: merge them, and spell dotted keys as nesting.

Settings travel as dicts from the YAML file or command line to the schema that validates
them (``config.load_config``, the pipeline runner): these are the only operations on them.
"""

from __future__ import annotations

from typing import Any


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, recursively where both hold a mapping; neither is changed."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nested(keys: list[str], value: Any) -> dict:
    """``(["a", "b"], 3)`` -> ``{"a": {"b": 3}}``."""
    tree: Any = value
    for k in reversed(keys):
        tree = {k: tree}
    return tree


def expand_dotted(tree: dict) -> dict:
    """Nested or dotted keys -> nested only: ``{"a.b": 1, "c": {"d.e": 2}}`` ->
    ``{"a": {"b": 1}, "c": {"d": {"e": 2}}}`` (later keys win where they overlap)."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        out = merge(out, nested(str(key).split("."), value))
    return out
