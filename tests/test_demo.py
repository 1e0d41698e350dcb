"""`make demo` / `dermkit demo` are the tiny pipeline on phantoms (run end to end in
tests/test_pipeline.py, whose shared fixture is ``run_demo``)."""

from pathlib import Path

from dermkit.demo import demo_pipeline
from dermkit.pipeline import dermae
from dermkit.pipeline.dermae import DERMAE_STAGES

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_runs_the_tiny_pipeline_on_phantoms():
    make = (REPO / "Makefile").read_text()
    demo_recipe = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "dermkit run pipelines/dermae-tiny.yaml" in demo_recipe
    # The repository's pipelines/ files are the packaged ones (an installed dermkit has them).
    for path in (REPO / "pipelines").glob("*.yaml"):
        packaged = REPO / "src" / "dermkit" / "pipelines" / path.name
        assert path.read_text() == packaged.read_text()


def test_demo_pipeline_is_offline_and_every_stage_is_on(tmp_path):
    cfg = demo_pipeline(tmp_path / "d", n_lesions=40, seed=3)
    assert cfg.preset == "tiny" and cfg.data.path is None  # phantoms: nothing to download
    assert cfg.data.phantoms.n_lesions == 40 and cfg.data.phantoms.seed == 3 and cfg.seed == 3
    plans = dermae.plan(cfg)
    # every stage but the opt-in second generator (tests/test_pipeline_sources.py)
    assert list(plans) == [s.name for s in DERMAE_STAGES if s.name != "pixel_diffusion"]
    assert all(p.path.parent == tmp_path / "d" for p in plans.values())


def test_demo_split_holds_enough_images_of_every_class_to_score_it(tmp_path):
    """Macro-F1 averages the classes: with 2-3 test images of a rare class (the demo's old
    150 HAM-like lesions) it was noise. The demo's phantoms give every class at least 10 test
    and 40 training images. Whether its models then learn is asserted on the full demo run
    in tests/test_pipeline.py (test_demo_teacher_and_student_learn_the_phantom_classes)."""
    import json

    cfg = demo_pipeline(tmp_path / "d")
    result = dermae.run(cfg, targets=["data"], progress=False, summary=False)
    counts = json.loads((result.path("data") / "metrics.json").read_text())["class_counts"]
    assert len(counts["test"]) == 7
    assert min(counts["test"].values()) >= 10, counts["test"]
    assert min(counts["train"].values()) >= 40, counts["train"]
    assert (result.path("data") / "phantoms" / "phantoms.json").is_file()  # provenance
