"""Problems found while reading a dataset: what each one names, and how they are collected.

A reader never stops at the first bad row or file: it records every :class:`Problem` in a
:class:`Collector` and reports them together (:class:`DataValidationError`), or, with
``skip_bad``, drops exactly the rows and files they name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Problem:
    """One reason a row or file cannot be used.

    Attributes:
        path: absolute path of the image file concerned (the expected path for a missing
            file) or of the CSV for file-level problems.
        image_id: the row's or file's image id ("" when unknown).
        row: 1-based line number in ``table`` (header = row 1), or None for a file that no
            CSV row describes.
        reason: short human reason.
        table: the CSV the row number refers to ("" when ``row`` is None).
    """

    path: str
    image_id: str
    row: int | None
    reason: str
    table: str = ""

    def describe(self, root: str | Path | None = None) -> str:
        """One line naming the CSV row and/or the file, paths shown relative to ``root``."""
        if self.row is not None:
            return (
                f"{display_path(self.table, root)} row {self.row} ({self.image_id}): {self.reason}"
            )
        return f"{display_path(self.path, root)}: {self.reason}"

    def __str__(self) -> str:
        return self.describe()


class DataValidationError(ValueError):
    """A dataset has problems. ``problems`` lists every one; the message has one per line."""

    def __init__(self, problems: Iterable[Problem], root: str | Path | None = None):
        self.problems = list(problems)
        self.root = None if root is None else str(root)
        where = f" in {self.root}" if self.root else ""
        lines = "\n  ".join(p.describe(root) for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s){where} "
            f"(row N = line N of the CSV, header is row 1):\n  {lines}"
        )


class LayoutError(DataValidationError):
    """No supported layout fits a folder, or a layout's required file/folder is missing."""


def display_path(path: str | Path, root: str | Path | None) -> str:
    """``path`` relative to ``root`` when inside it (what a user sees), else as given."""
    if root is None:
        return str(path)
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


class Collector:
    """Problems found so far, and which records (labels-CSV rows or files) they reject."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []
        self.bad_records: set[int] = set()
        # Records whose label problem is already reported (e.g. a bad one-hot row).
        self.label_reported: set[int] = set()
        self.fatal = False

    def record(self, idx: int, records: pd.DataFrame, reason: str) -> None:
        """A problem with record ``idx`` (it will be rejected)."""
        rec = records.loc[idx]
        row = None if pd.isna(rec["_row"]) else int(rec["_row"])
        self.problems.append(
            Problem(rec["_path"], rec["image_id"], row, reason, rec["_table"] if row else "")
        )
        self.bad_records.add(idx)

    def file(self, path: Path, reason: str, image_id: str = "", *, fatal: bool = False) -> None:
        """A problem with a file no record describes; ``fatal`` when nothing can be read."""
        self.problems.append(Problem(str(path), image_id, None, reason))
        self.fatal |= fatal

    def row(self, table: Path, row: int, image_id: str, path: Path, reason: str) -> None:
        """A problem with a CSV row that never became a record (e.g. malformed)."""
        self.problems.append(Problem(str(path), image_id, row, reason, str(table)))
