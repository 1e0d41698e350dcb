"""Task settings: what a classifier predicts (the ``label`` column, or an ordinal column).

What belongs here: the ``task`` section of classifier run configs and its checks
(``tasks/ordinal.py`` reads it). Schemas only (see ``dermkit.config``); settings modules are
read at every layer (``tests/test_layers.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dermkit.config import Strict


class TaskConfig(Strict):
    """What the classifier predicts: the ``label`` column, or ordered classes of a column.

    ordinal (``tasks/ordinal.py``): a continuous column cut at ``thresholds`` (class k holds
    t_k < x <= t_{k+1}; e.g. thickness [0, 0.8, 1, 2]) or a categorical column whose values
    ``order`` lists lowest first; a CORN head with K-1 outputs.
    """

    kind: Literal["classification", "ordinal"] = "classification"
    column: str | None = Field(None, description="ordinal: the manifest column to predict")
    thresholds: list[float] | None = Field(None, description="ordinal: increasing cut points")
    order: list[str] | None = Field(None, description="ordinal: categorical values, lowest first")
    drop_missing: bool = Field(False, description="ordinal: leave out rows without a value")

    @model_validator(mode="after")
    def _check_ordinal(self) -> TaskConfig:
        if self.kind != "ordinal":
            return self
        if not self.column:
            raise ValueError("task.kind=ordinal needs task.column")
        if (self.thresholds is None) == (self.order is None):
            raise ValueError("task.kind=ordinal needs exactly one of task.thresholds, task.order")
        t = self.thresholds
        if t is not None and (not t or sorted(set(t)) != list(t)):
            raise ValueError(f"task.thresholds must be non-empty and strictly increasing: {t}")
        o = self.order
        if o is not None and (len(o) < 2 or len(set(o)) < len(o)):
            raise ValueError(f"task.order needs >= 2 distinct values: {self.order}")
        return self
