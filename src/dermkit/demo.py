"""``dermkit demo``: the whole DerMAE pipeline on phantom data, offline, in minutes.

It is ``dermkit run dermae-tiny`` (``pipelines/dermae-tiny.yaml``): phantoms -> split ->
baseline -> autoencoder -> diffusion -> balanced sampling -> MAE on real + synthetic ->
fine-tuned teacher -> distilled student -> early exits -> ONNX export -> explain ->
evaluate, each stage cached in its own folder, ending in one summary ``report.html`` that
links every stage's report.
"""

from __future__ import annotations

from pathlib import Path

from dermkit.pipeline import dermae

DEMO_PIPELINE = "dermae-tiny"


def demo_pipeline(
    out: str | Path | None = None,
    n_lesions: int | None = None,
    seed: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
):
    """The demo's pipeline config: dermae-tiny with the given folder, size and seed."""
    items = [*overrides]
    if out is not None:
        items.append(f"out_dir={out}")
    if n_lesions is not None:
        items.append(f"data.phantoms.n_lesions={n_lesions}")
    if seed is not None:
        items += [f"seed={seed}", f"data.phantoms.seed={seed}"]
    return dermae.load_pipeline(DEMO_PIPELINE, items)


def run_demo(
    out: str | Path | None = None,
    n_lesions: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> Path:
    """Run the demo pipeline; returns the summary report's path."""
    result = dermae.run(demo_pipeline(out, n_lesions, seed), progress=progress)
    return Path(result.report)
