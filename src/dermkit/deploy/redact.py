"""No server paths in public responses: absolute paths inside JSON strings become names.

A model card records where it came from (``source_run``, the dataset folder, the split
file, a synthetic manifest) as absolute paths of the machine that exported it. Served as
they are, they tell anyone the server's user name and directory layout. :func:`redact_paths`
replaces every absolute path inside any string of a JSON value by its last component
(``/home/ana/runs/vit-s/export`` -> ``export``), keeping the rest of the text
(``"split file /data/split.csv"`` -> ``"split file split.csv"``).
"""

from __future__ import annotations

import re

# POSIX (/a/b), home (~/a, ~user/a), Windows (C:\a, C:/a, \\server\share) and
# parent-relative (../a, ./a: they show the layout around the run) paths, not preceded by
# a word character, a dot, a colon or a slash, so that "1/7", "train/val/test", "0.7/0.15"
# and URLs ("http://x/y") are left alone.
_ABSOLUTE = re.compile(
    r"(?<![\w.:/\\])"
    r"(?:~[\w.-]*/|\.{1,2}[\\/]|/(?=[^\s/])|[A-Za-z]:[\\/]|\\\\)"
    r"[^\s,;'\"()\[\]{}<>]*"
)


def _name(match: re.Match) -> str:
    parts = [p for p in re.split(r"[\\/]+", match.group(0)) if p.strip(".") and p[-1] != ":"]
    return parts[-1] if parts else "<path>"


def redact_text(text: str) -> str:
    """``text`` with each absolute path replaced by its last component."""
    return _ABSOLUTE.sub(_name, text)


def redact_paths(value):
    """A copy of a JSON value (dict, list, str, number...) with :func:`redact_text` applied
    to every string, keys included."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_paths(k): redact_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_paths(v) for v in value]
    return value


# Card fields that hold a path even when it is relative ("data/ham10000"): name only.
PATH_FIELDS = (("source_run",), ("training_data", "dataset"))


def public_card(card: dict) -> dict:
    """The model card as ``GET /model-card`` serves it: path fields reduced to their last
    component, and every other absolute path in its text as in :func:`redact_paths`."""
    card = redact_paths(card)
    for keys in PATH_FIELDS:
        parent = card
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(keys[-1]), str):
            parts = [p for p in re.split(r"[\\/]+", parent[keys[-1]]) if p.strip(".")]
            parent[keys[-1]] = parts[-1] if parts else parent[keys[-1]]
    return card
