"""Melanoma thickness (Breslow category) data: the HAM layout plus ``thickness`` columns.

Layout (e.g. ``shared/data/derm7pt-thickness``): ``root/metadata.csv`` with the HAM10000
columns (lesion_id, image_id, dx) plus

- ``thickness``: one of ``in_situ``, ``lt_0.76mm``, ``0.76_to_1.5mm``, ``gt_1.5mm``;
- ``thickness_class``: the same as an ordinal integer 0-3 (must agree with ``thickness``);

and ``root/images/<image_id>.jpg``. :func:`load_thickness` reads it with
:func:`dermkit.data.readers.load_dataset` (every row and image checked) and then checks the
two thickness columns, naming the CSV row and field of every bad value.

Groupings (:data:`GROUPINGS`): the 4 categories as they are, and the 3-class clinical
grouping in situ / < 0.76 mm / >= 0.76 mm (0.76 mm: the historical T1a/T1b surgical cut).
A grouping maps the 4 category codes to its own ordered class codes, lowest first.

One image per case: the protocol's folds must never hold two images of one lesion, so
when a lesion has several rows only the first (CSV order) is kept (logged).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.data.readers import HAM10000_CSV, DataValidationError, Problem, load_dataset

log = logging.getLogger(__name__)

# The 4 Breslow categories of the ``thickness`` column, lowest first (code = position).
THICKNESS_CATEGORIES: tuple[str, ...] = ("in_situ", "lt_0.76mm", "0.76_to_1.5mm", "gt_1.5mm")
THICKNESS_COLUMNS: tuple[str, ...] = ("thickness", "thickness_class")


@dataclass(frozen=True)
class Grouping:
    """Ordered classes built from the 4 thickness categories.

    Attributes:
        name: "3class" or "4class".
        class_names: K readable names, lowest first.
        codes: for each of the 4 category codes, its class code 0..K-1.
    """

    name: str
    class_names: tuple[str, ...]
    codes: tuple[int, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def classes_of(self, category: np.ndarray) -> np.ndarray:
        """(N,) category codes 0-3 -> (N,) class codes 0..K-1 of this grouping."""
        return np.asarray(self.codes, np.int64)[np.asarray(category, np.int64)]


GROUPINGS: dict[str, Grouping] = {
    "3class": Grouping("3class", ("in situ", "< 0.76 mm", ">= 0.76 mm"), (0, 1, 2, 2)),
    "4class": Grouping("4class", ("in situ", "< 0.76 mm", "0.76-1.5 mm", "> 1.5 mm"), (0, 1, 2, 3)),
}
# The binary cuts of the seed study, as "class code >= c" in both groupings:
# invasive (anything beyond in situ) and >= 0.76 mm (T1a/T1b).
BINARY_CUTS: dict[str, int] = {"invasive_vs_in_situ": 1, "ge_0.76mm_vs_below": 2}


def _csv_rows(csv_path: Path) -> dict[str, int]:
    """image_id -> 1-based CSV line (header = row 1), as the reader's error messages count."""
    rows: dict[str, int] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        line = 1
        for fields in reader:
            values = [v.strip() for v in fields]
            if header is None:
                if any(values):
                    header = values
                line = reader.line_num + 1
                continue
            if any(values) and "image_id" in header and len(values) == len(header):
                rows.setdefault(values[header.index("image_id")], line)
            line = reader.line_num + 1
    return rows


def _thickness_problems(manifest: pd.DataFrame, csv_path: Path) -> list[Problem]:
    """Every row whose thickness or thickness_class is missing, unknown or inconsistent."""
    rows = _csv_rows(csv_path)
    problems = []
    for image_id, path, name, code in zip(
        manifest["image_id"],
        manifest["path"],
        manifest["thickness"].astype(str),
        manifest["thickness_class"],
        strict=True,
    ):
        reasons = []
        if name not in THICKNESS_CATEGORIES:
            reasons.append(f"thickness '{name}' is not one of {list(THICKNESS_CATEGORIES)}")
        number = pd.to_numeric(pd.Series([code]), errors="coerce").iloc[0]
        if pd.isna(number) or number != int(number) or not 0 <= number <= 3:
            reasons.append(f"thickness_class '{code}' is not an integer 0-3")
        elif name in THICKNESS_CATEGORIES and THICKNESS_CATEGORIES.index(name) != int(number):
            reasons.append(
                f"thickness_class {int(number)} disagrees with thickness '{name}' "
                f"(expected {THICKNESS_CATEGORIES.index(name)})"
            )
        if reasons:
            problems.append(
                Problem(path, image_id, rows.get(image_id), "; ".join(reasons), str(csv_path))
            )
    return problems


def load_thickness(root: str | Path, check_images: bool = True) -> pd.DataFrame:
    """The manifest of a thickness folder, one row per lesion, with ``category`` (0-3) added.

    Raises:
        DataValidationError: a reader problem, a missing thickness column, or bad values
            (every bad row named by its CSV line and field).
    """
    root = Path(root).absolute()
    manifest = load_dataset(root, layout="ham10000", check_images=check_images).manifest
    csv_path = root / HAM10000_CSV
    missing = [c for c in THICKNESS_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataValidationError(
            [Problem(str(csv_path), "", None, f"missing required column '{c}'") for c in missing],
            root,
        )
    problems = _thickness_problems(manifest, csv_path)
    if problems:
        raise DataValidationError(problems, root)
    repeated = manifest["lesion_id"].duplicated()
    if repeated.any():
        log.info("one image per case: leaving out %d further images of a lesion", repeated.sum())
        manifest = manifest[~repeated].reset_index(drop=True)
    manifest = manifest.copy()
    manifest["category"] = manifest["thickness_class"].astype(np.int64)
    return manifest
