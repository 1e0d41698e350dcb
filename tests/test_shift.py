"""The shift benchmark: shifts (``eval/shifts.py``) and ``dermkit bench shift RUN``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.eval.shifts import SHIFTS, apply_shift, to_uint8

runner = CliRunner()


def _images(b: int = 2, h: int = 60, w: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 0.8 + 0.1


def _disc(h: int = 60, w: int = 80, radius: float = 10.0) -> torch.Tensor:
    """A dark centred disc on light skin: (1, 3, h, w)."""
    yy, xx = torch.meshgrid(
        torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij"
    )
    inside = (yy**2 + xx**2).sqrt() <= radius
    x = torch.full((1, 3, h, w), 0.8)
    x[:, :, inside] = 0.2
    return x


def _disc_area(x: torch.Tensor) -> float:
    return float((x[0].mean(0) < 0.5).float().sum())


@pytest.mark.parametrize("name", list(SHIFTS))
def test_severity_zero_is_identity(name):
    x = _images()
    assert torch.equal(apply_shift(x, name, 0), x)


def _scene(h: int = 60, w: int = 80) -> torch.Tensor:
    """A smooth scene: a colour gradient with a dark disc, (2, 3, h, w)."""
    ramp = torch.linspace(0.3, 0.9, w).view(1, 1, 1, w) * torch.linspace(0.6, 1.0, h).view(
        1, 1, h, 1
    )
    tone = torch.tensor([1.0, 0.8, 0.7]).view(1, 3, 1, 1)
    x = (ramp * tone).expand(2, 3, h, w).clone()
    return torch.where(_disc(h, w) < 0.5, _disc(h, w), x)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shifts_keep_shape_range_and_grow_with_severity(name):
    x = _scene()
    changes = []
    for severity in (1, 2, 3):
        y = apply_shift(x, name, severity)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert torch.equal(y, apply_shift(x, name, severity))  # deterministic
        changes.append(float((y - x).abs().mean()))
    assert 0 < changes[0] < changes[2], changes


def test_zoom_in_makes_a_centred_disc_bigger_and_zoom_out_smaller():
    x = _disc()
    area = _disc_area(x)
    assert _disc_area(apply_shift(x, "zoom_in", 2)) > 1.5 * area  # 0.7 crop: x 2 in area
    assert _disc_area(apply_shift(x, "zoom_in", 3)) > _disc_area(apply_shift(x, "zoom_in", 2))
    small = _disc_area(apply_shift(x, "zoom_out", 2))
    assert small < 0.7 * area
    # the frame is skin-coloured (the border's median): no mirrored lesion in it
    y = apply_shift(x, "zoom_out", 3)
    assert float(y[..., 0, :].mean()) > 0.7 and float(y[..., :, 0].mean()) > 0.7


def test_vignetting_darkens_corners_not_the_centre():
    x = torch.full((1, 3, 60, 80), 0.7)
    for severity in (1, 2, 3):
        y = apply_shift(x, "vignette", severity)
        assert float(y[..., 30, 40].min()) == pytest.approx(0.7)
        assert float(y[..., 0, 0].max()) < 0.05
    # the high severity reaches the sides; the low one only the corners
    assert float(apply_shift(x, "vignette", 3)[..., 30, 0].max()) < 0.35
    assert float(apply_shift(x, "vignette", 1)[..., 30, 0].min()) == pytest.approx(0.7)


def test_colour_and_exposure_shifts_move_the_documented_way():
    x = torch.full((1, 3, 8, 8), 0.5)
    warm, cool = apply_shift(x, "warm", 2)[0, :, 0, 0], apply_shift(x, "cool", 2)[0, :, 0, 0]
    assert warm[0] > 0.5 > warm[2] and warm[1] == pytest.approx(0.5)
    assert cool[2] > 0.5 > cool[0]
    assert float(apply_shift(x, "dark", 2).max()) == pytest.approx(0.35)
    y = _images()
    assert float(apply_shift(y, "low_contrast", 3).std()) < 0.6 * float(y.std())
    # the clinical profile saturates colour
    c = torch.tensor([0.6, 0.4, 0.3]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    out = apply_shift(c, "clinical", 3)[0, :, 0, 0]
    assert float(out[0] - out[2]) > 0.3


def test_blur_and_jpeg_remove_detail():
    x = _images(h=64, w=64)
    detail = float((x[..., 1:] - x[..., :-1]).abs().mean())
    blurred = apply_shift(x, "blur", 2)
    assert float((blurred[..., 1:] - blurred[..., :-1]).abs().mean()) < 0.5 * detail
    assert float(blurred.mean()) == pytest.approx(float(x.mean()), abs=0.02)
    jpeg = apply_shift(x, "jpeg", 3)
    assert float((jpeg - x).abs().mean()) > 0.02
    assert torch.equal(to_uint8(apply_shift(x, "jpeg", 0)), to_uint8(x))


def test_unknown_shift_or_severity_is_an_error():
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(_images(), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        apply_shift(_images(), "blur", 4)


def test_bench_shift_end_to_end(tiny_classifier_run, tmp_path):
    out = tmp_path / "shift"
    result = runner.invoke(
        app,
        [
            "bench",
            "shift",
            str(tiny_classifier_run),
            "--out",
            str(out),
            "--shifts",
            "zoom_in,jpeg",
            "--severities",
            "1,2",
            "--n-boot",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "shift.json").read_text())
    assert (out / "shift.png").stat().st_size > 1000
    examples = Image.open(out / "shift_examples.png")
    assert examples.size == (4 * 160, 2 * 120)  # clean, low, middle, high x 2 shifts
    md = (out / "shift.md").read_text()
    assert "Worst shift" in md and "| zoom_in | middle |" in md
    assert len(report["results"]) == 4
    # per-condition predictions files, readable by `dermkit evaluate --against`
    from dermkit.core.predictions import read_predictions

    _, y, clean, _ = read_predictions(out / "predictions" / "clean.csv")
    _, _, zoomed, _ = read_predictions(out / "predictions" / "zoom_in-2.csv")
    assert len(y) == report["n_images"] and clean.shape == zoomed.shape
    # clean vs clean: a paired difference of exactly 0 with a [0, 0] interval
    for entry in report["clean_vs_clean"].values():
        assert entry["delta"] == 0.0
        assert entry["ci_low"] == 0.0 and entry["ci_high"] == 0.0
    # the clean images go through the run's own preprocessing: its test predictions again
    agreement = report["clean_vs_run_predictions"]
    assert agreement["n_images"] == report["n_images"]
    assert agreement["max_abs_prob_diff"] < 1e-3
    for row in report["results"]:
        bal = row["metrics"]["balanced_accuracy"]
        assert bal["ci_low"] <= bal["delta"] <= bal["ci_high"]
        assert bal["clean"] == report["clean"]["balanced_accuracy"]
        assert "mel_recall" in row["metrics"]
    worst = report["worst"]
    assert worst["severity"] == 2 and worst["shift"] in {"zoom_in", "jpeg"}
    middle = [r for r in report["results"] if r["severity"] == 2]
    assert worst["balanced_accuracy_delta"] == min(
        r["metrics"]["balanced_accuracy"]["delta"] for r in middle
    )


def test_shift_compare_pairs_two_benches(tiny_classifier_run, tmp_path):
    """Run A - run B per condition; here B is A's bench with one condition's answers
    replaced by a constant class, so only that row differs."""
    import shutil

    import pandas as pd

    a = tmp_path / "a"
    args = ["bench", "shift", str(tiny_classifier_run), "--out", str(a), "--shifts", "blur"]
    result = runner.invoke(app, [*args, "--severities", "2", "--n-boot", "0"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    path = b / "predictions" / "blur-2.csv"
    df = pd.read_csv(path)
    columns = [c for c in df.columns if c.startswith("prob_")]
    df[columns] = 0.0
    df[columns[0]] = 1.0
    df.to_csv(path, index=False)
    result = runner.invoke(app, ["bench", "shift-compare", str(a), str(b), "--n-boot", "30"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((a / "compare-vs-b" / "shift_compare.json").read_text())
    rows = {r["condition"]: r for r in report["rows"]}
    assert list(rows) == ["clean", "blur-2"]
    assert rows["clean"]["metrics"]["balanced_accuracy"]["delta"] == 0.0
    blurred = rows["blur-2"]["metrics"]["balanced_accuracy"]
    assert blurred["delta"] != 0.0 and blurred["b"] == pytest.approx(1 / len(columns), abs=0.2)
    assert "| blur-2 |" in (a / "compare-vs-b" / "shift_compare.md").read_text()
    missing = runner.invoke(app, ["bench", "shift-compare", str(a), str(tmp_path / "none")])
    assert missing.exit_code == 2 and "bench shift" in missing.output


def test_bench_shift_refuses_unknown_shifts(tiny_classifier_run, tmp_path):
    result = runner.invoke(
        app, ["bench", "shift", str(tiny_classifier_run), "--out", str(tmp_path), "--shifts", "fog"]
    )
    assert result.exit_code == 2
    assert "unknown shifts" in result.output


def test_shifted_sources_keep_mixed_sizes_apart():
    from dermkit.bench.shift import shifted_sources

    rng = np.random.default_rng(0)
    sources = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (30, 30), (40, 50))
    ]
    out = shifted_sources(sources, "vignette", 2)
    assert [o.shape for o in out] == [s.shape for s in sources]
    assert np.array_equal(shifted_sources(sources, "blur", 0)[1], sources[1])
