"""The sample stage drawing named classes from the pixel_diffusion stage (synth/sources.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dermkit.config import ConfigError
from dermkit.core.files import write_json_atomic
from dermkit.pipeline.dermae import load_pipeline, plan, run
from dermkit.pipeline.runner import PipelineError
from dermkit.synth.sample import run_sample
from dermkit.synth.settings import SampleConfig
from dermkit.synth.sources import merge_filter_summaries, split_counts

PIXEL = [
    "stages.pixel_diffusion.data.image_size=16",
    "stages.pixel_diffusion.optim.epochs=2",
    "stages.pixel_diffusion.preview_per_class=1",
    "stages.pixel_diffusion.train_classes=[vasc, df]",
    "stages.sample.pixel_classes=[vasc, df]",
]


def _pipeline(out, *overrides):
    return load_pipeline("dermae-tiny", [f"out_dir={out}", *overrides])


def test_split_counts_and_merged_filter_summary_take_each_class_from_its_source():
    named, rest = split_counts({"nv": 0, "df": 5, "vasc": 3, "mel": 2}, ["vasc", "df"])
    assert named == {"generate": {"nv": 0, "df": 5, "vasc": 3, "mel": 0}}
    assert rest == {"generate": {"nv": 0, "df": 0, "vasc": 0, "mel": 2}}

    def row(kept, drawn, requested):
        return {"kept": kept, "drawn": drawn, "requested": requested, "short": requested - kept}

    latent = {"classifier": "b", "min_prob": 0.5, "drawn": 9, "kept": 4, "short_classes": ["df"],
              "per_class": {"df": row(0, 6, 3), "mel": row(4, 4, 4)}}  # fmt: skip
    pixel = {"classifier": "b", "min_prob": 0.5, "drawn": 5, "kept": 3, "short_classes": ["mel"],
             "per_class": {"df": row(3, 5, 3), "mel": row(0, 0, 0)}}  # fmt: skip
    merged = merge_filter_summaries(
        {"default": latent, "named": pixel}, {"df": "named", "mel": "default"}
    )
    assert merged["per_class"] == {"df": row(3, 5, 3), "mel": row(4, 4, 4)}
    assert (merged["drawn"], merged["kept"], merged["short_classes"]) == (9, 7, [])
    assert merged["min_prob"] == 0.5


def test_pixel_classes_need_the_pixel_stage_and_key_the_sample_stage(tmp_path):
    plain = plan(_pipeline(tmp_path))
    assert "pixel_diffusion" not in plain  # off unless the file names it
    both = plan(_pipeline(tmp_path, *PIXEL))
    assert both["pixel_diffusion"].config.autoencoder is None  # pixel space
    assert both["pixel_diffusion"].config.data.image_size == 16
    assert "pixel_diffusion" in both["sample"].inputs
    assert both["sample"].key != plain["sample"].key
    assert both["sample"].config.pixel.generator == str(both["pixel_diffusion"].path)
    assert both["sample"].config.sample.generator == str(both["diffusion"].path)
    assert both["diffusion"].key == plain["diffusion"].key  # the latent generator is shared
    with pytest.raises(PipelineError, match="set both or neither"):
        plan(_pipeline(tmp_path, "stages.sample.pixel_classes=[vasc]"))
    with pytest.raises(PipelineError, match="set both or neither"):
        plan(_pipeline(tmp_path, *PIXEL[:-1]))
    with pytest.raises(PipelineError, match=r"\['mel'\]: not in stages.pixel_diffusion"):
        plan(_pipeline(tmp_path, *PIXEL[:-1], "stages.sample.pixel_classes=[vasc, mel]"))


@pytest.mark.timeout(900)
def test_named_classes_are_drawn_by_the_pixel_generator_and_filtered_like_the_rest(tmp_path):
    cfg = _pipeline(tmp_path / "p", *PIXEL)
    run(cfg, ["sample"], progress=False, summary=False)
    stages = plan(cfg)
    folder, pixel, latent = (stages[s].path for s in ("sample", "pixel_diffusion", "diffusion"))
    manifest = pd.read_csv(folder / "manifest.csv")
    by_class = manifest.groupby("label")["generator_run"].unique()
    assert {c for c in by_class.index} >= {"vasc", "df", "mel"}
    for label, runs in by_class.items():
        expected = pixel if label in ("vasc", "df") else latent
        assert [str(r) for r in runs] == [str(expected)], label
    # Each class's row of the filter summary is its own generator's, totals add up.
    summary = json.loads((folder / "filter.json").read_text())
    for label, part in (("vasc", "named"), ("mel", "default")):
        own = json.loads((folder / part / "run" / "filter.json").read_text())
        assert summary["per_class"][label] == own["per_class"][label]
    assert summary["kept"] == int(manifest["kept"].sum()) > 0
    assert summary["drawn"] == len(manifest)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["filter"] == summary
    assert metrics["synthetic_images"] == len(manifest)
    sources = json.loads((folder / "sources.json").read_text())
    assert sources["vasc"] == str(pixel) and sources["mel"] == str(latent)
    assert (folder / "grid_vasc.png").exists() and (folder / "report.html").exists()
    # The pixel generator saw only its classes' images, and refuses to draw any other.
    trained = json.loads((pixel / "metrics.json").read_text())["train_images"]
    real = json.loads((pixel / "generator.json").read_text())["train_counts"]
    assert trained == real["vasc"] + real["df"] < sum(real.values())
    with pytest.raises(ConfigError, match=r"trained on \['vasc', 'df'\] only.*\['mel'\]"):
        run_sample(
            SampleConfig(
                generator=str(pixel),
                out_dir=str(tmp_path / "s"),
                balance=str(write_json_atomic(tmp_path / "t.json", {"generate": {"mel": 1}})),
            )
        )
    # A re-run finds every stage cached: nothing is drawn again.
    assert run(cfg, ["sample"], progress=False, summary=False).executed == []
