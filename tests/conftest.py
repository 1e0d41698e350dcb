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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Torch and OpenMP/BLAS on one thread for the whole session.

    Why: the suite's models are tiny (32 px, a few blocks), so every op is short and a
    second thread mostly waits at the op's barrier; on a 2-core machine that is also
    running something else, that wait made training ~4x slower in CPU time and ~4x in wall
    time (issue 18). One setting for the session also keeps a test's speed independent of
    which earlier test happened to change the thread count.
    """
    from dermkit.core.devices import thread_limit

    with thread_limit(1):
        yield


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


@pytest.fixture(scope="session")
def tiny_classifier_run(phantom_root, cache_dir, tmp_path_factory) -> Path:
    """A finished tiny fine-tune run on the phantoms (4-block ViT, 32 px, 2 epochs, no CIs)."""
    from dermkit.config import load_config
    from dermkit.train.finetune import run_finetune
    from dermkit.train.settings import FinetuneRunConfig

    out = tmp_path_factory.mktemp("tiny-finetune")
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        overrides=[
            f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}",
            f"out_dir={out}",
            "eval.n_boot=0",
            "train_eval_images=0",
        ],
    )
    run_finetune(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_classifier_run, tmp_path_factory) -> Path:
    """``dermkit export`` (FP32 ONNX + model card) of the tiny run: what ``serve`` serves."""
    from dermkit.deploy.export import export_run

    out = tmp_path_factory.mktemp("tiny-export")
    export_run(tiny_classifier_run, out, int8=None, n_parity=64, n_calibration=0)
    return out
