"""Evaluation settings: how test metrics and their confidence intervals are computed.

What belongs here: pydantic schemas of the ``eval`` package's options that run configs nest.
Schemas only (see ``dermkit.config``); settings modules are read at every layer
(``tests/test_layers.py``).
"""

from __future__ import annotations

from pydantic import Field

from dermkit.config import Strict


class EvalConfig(Strict):
    """How test metrics and their confidence intervals are computed."""

    n_boot: int = Field(1000, ge=0, description="bootstrap replicates over lesions")
    ci: float = Field(0.95, gt=0, lt=1)
    positive_class: str = "mel"
