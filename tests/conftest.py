"""Shared fixtures: the phantom dataset (the suite's fast fixture) and the real HAM10000 path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAM10000 = Path(os.environ.get("DERMKIT_HAM10000", REPO.parent / "shared" / "data" / "ham10000"))


@pytest.fixture(scope="session")
def ham10000_root() -> Path:
    """The real HAM10000 copy. Missing data fails under CI=true and skips elsewhere."""
    if not (HAM10000 / "metadata.csv").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"HAM10000 data not found at {HAM10000} (required under CI=true)")
        pytest.skip(f"HAM10000 data not found at {HAM10000}")
    return HAM10000


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small deterministic phantom dataset in HAM10000 layout (120 lesions, 160x120)."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, n_lesions=120, seed=0)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A session-wide image cache folder (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("cache")
