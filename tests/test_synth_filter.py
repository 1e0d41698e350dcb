"""The synthetic-image filter (dermkit.synth.filtering): what it keeps, what it rejects and
why, the rounds that reach a count, and the readers that take kept rows only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import ConfigError, load_config, save_config
from dermkit.data.manifest import new_manifest, read_synthetic_rows, write_manifest
from dermkit.synth.filtering import (
    NearCopyCheck,
    judge,
    keep_first,
    load_real_classifier,
    next_draws,
    resize_images,
)

CLASSES = {"nv": 1.0, "vasc": 1.0}  # brown nevi and red vascular lesions: colour tells them


def _data(root: Path, cache: Path) -> list[str]:
    return [
        f"data.path={root}",
        f"data.cache_dir={cache}",
        "data.near_duplicate_distance=-1",
        "data.image_size=32",
    ]


@pytest.fixture(scope="module")
def two_class(tmp_path_factory) -> tuple[Path, Path]:
    """(phantom root of 60 nv/vasc lesions, image cache folder)."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms_nv_vasc")
    generate_phantoms(root, n_lesions=60, class_weights=CLASSES, image_size=(43, 32), seed=2)
    return root, tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline_run(two_class, tmp_path_factory) -> Path:
    """A finished ``dermkit baseline`` run on the two colour classes (seconds)."""
    from dermkit.train.baseline import run_baseline
    from dermkit.train.settings import BaselineRunConfig

    out = tmp_path_factory.mktemp("baseline")
    cfg = load_config(
        BaselineRunConfig,
        "baseline",
        "tiny",
        overrides=[*_data(*two_class), f"out_dir={out}", "eval.n_boot=0", "baseline.max_iter=30"],
    )
    run_baseline(cfg)
    return out


def _constant_classifier(folder: Path, bias: list[float]) -> Path:
    """A dermkit classifier run whose logits are ``bias`` whatever the image (nv, vasc)."""
    from dermkit.models.backbones import create_backbone
    from dermkit.models.settings import ModelConfig
    from dermkit.models.weights import save_weights
    from dermkit.train.settings import FinetuneRunConfig

    model = create_backbone("vit_nano_patch4_32", num_classes=2, img_size=32)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(bias))
    save_weights(model, folder / "model.safetensors")
    cfg = FinetuneRunConfig(model=ModelConfig(name="vit_nano_patch4_32"))
    cfg.data.image_size = 32
    save_config(cfg, folder / "config.yaml")
    (folder / "classes.json").write_text(json.dumps(["nv", "vasc"]))
    return folder


# ----------------------------------------------------------------------------- verdicts


def test_judge_keeps_agreement_and_names_each_rejection(tmp_path):
    # softmax([0, 0.5]) = (0.38, 0.62): "vasc" for every image, at p = 0.62
    classifier = load_real_classifier(_constant_classifier(tmp_path, [0.0, 0.5]))
    assert classifier.kind == "classifier"
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(40, 48, 48, 3), dtype=np.uint8)
    near = NearCopyCheck.of_train_split(real, [f"r{i}" for i in range(40)], np.arange(40), 1.0)
    fake = rng.integers(0, 256, size=(4, 48, 48, 3), dtype=np.uint8)
    fake[3] = real[7]  # a copy of train image r7
    requested = np.array(["vasc", "nv", "vasc", "vasc"])

    v = judge(classifier, fake, requested, min_prob=0.0, near=near)
    assert v["reason"].tolist() == ["", "disagrees:vasc", "", "near_copy:r7"]
    assert v["passed"].tolist() == [True, False, True, False]
    assert v["requested_prob"].tolist() == pytest.approx([0.62, 0.38, 0.62, 0.62], abs=0.005)
    strict = judge(classifier, fake, requested, min_prob=0.7, near=None)
    low = "low_prob:0.62"
    assert strict["reason"].tolist() == [low, "disagrees:vasc", low, low]
    # top_k = 2: the classifier's second choice passes too (nv here); the near-copy check and
    # min_prob still apply to it
    second = judge(classifier, fake, requested, near=near, top_k=2)
    assert second["reason"].tolist() == ["", "", "", "near_copy:r7"]
    second_sure = judge(classifier, fake, requested, min_prob=0.5, top_k=2)
    assert second_sure["reason"].tolist() == ["", "low_prob:0.38", "", ""]


def test_a_judge_sees_images_normalised_and_sized_as_its_run_was_trained(tmp_path):
    """An ImageNet-Lite-style run ([-1, 1] inputs) must not be fed ImageNet mean/std; a
    64 px synthetic image is resized to the 96 px the judge was trained at."""
    from dermkit.data.transforms import normalize
    from dermkit.models.backbones import create_backbone
    from dermkit.models.packaged import INPUT_NORMS
    from dermkit.models.settings import ModelConfig
    from dermkit.models.weights import save_weights
    from dermkit.train.settings import FinetuneRunConfig

    torch.manual_seed(0)
    model = create_backbone("resnet18_64", num_classes=2, img_size=96).eval()
    save_weights(model, tmp_path / "model.safetensors")
    cfg = FinetuneRunConfig(model=ModelConfig(name="resnet18_64", input_norm="symmetric"))
    cfg.data.image_size = 96
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "classes.json").write_text(json.dumps(["nv", "vasc"]))

    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    x = resize_images(images, 96)
    assert x.shape == (3, 3, 96, 96)
    with torch.no_grad():
        right = model(normalize(x.clone(), *INPUT_NORMS["symmetric"])).softmax(1).numpy()
        wrong = model(normalize(x.clone())).softmax(1).numpy()
    got = load_real_classifier(tmp_path).probabilities(images)
    np.testing.assert_allclose(got, right, atol=1e-5)
    assert np.abs(got - wrong).max() > 1e-3


def test_rounds_keep_the_first_passes_and_stop_at_the_cap():
    judged = pd.DataFrame(
        {
            "label": ["nv"] * 3 + ["vasc"] * 4,
            "passed": [False, True, True, True, False, True, True],
            "reason": ["disagrees:vasc", "", "", "", "near_copy:r1", "", ""],
        }
    )
    rows = keep_first(judged, {"nv": 1, "vasc": 2})
    assert rows["kept"].tolist() == [False, True, False, True, False, True, False]
    assert rows["reject_reason"].tolist()[2] == "surplus" and rows["reject_reason"].iloc[6]
    # nv: 1 of 4 passed, 3 short -> 3 / 0.25 = 12, capped at 4 x 4 - 4 = 12; vasc done
    assert next_draws({"nv": 4, "vasc": 4}, {"nv": 1, "vasc": 4}, {"nv": 4, "vasc": 4}, 4) == {
        "nv": 12,
        "vasc": 0,
    }
    # nothing passed: the rate floor 1/factor; the cap ends it
    assert next_draws({"df": 2}, {}, {"df": 2}, 2.0) == {"df": 2}
    assert next_draws({"df": 4}, {}, {"df": 2}, 2.0) == {"df": 0}


# ----------------------------------------------------------------------------- readers


def test_manifest_readers_take_kept_rows_only(phantom_root, cache_dir, tmp_path):
    from PIL import Image

    from dermkit.train.finetune import load_training_data
    from dermkit.train.settings import FinetuneRunConfig

    rows = []
    for i, kept in enumerate([True, False, True, False, False]):
        path = tmp_path / f"s{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(path)
        rows.append(
            {
                "image_id": f"syn-{i}",
                "path": str(path),
                "label": "df",
                "source": "synthetic:test",
                "synthetic": True,
                "kept": kept,
                "reject_reason": "" if kept else "disagrees:nv",
            }
        )
    manifest = write_manifest(new_manifest(rows), tmp_path / "manifest.csv")
    assert read_synthetic_rows(manifest)["image_id"].tolist() == ["syn-0", "syn-2"]

    cfg = FinetuneRunConfig(synthetic_manifest=str(manifest), synthetic_ratio=0.5)
    cfg.data.path, cfg.data.cache_dir, cfg.data.image_size = str(phantom_root), str(cache_dir), 32
    data, synthetic = load_training_data(cfg, tmp_path)
    train = data.part("train")
    assert sorted(train.loc[synthetic, "image_id"]) == ["syn-0", "syn-2"]  # MAE reads this too


# ----------------------------------------------------------------------------- end to end


class HeldOutGenerator:
    """A stand-in generator that draws held-out vasc phantoms whatever class is asked for,
    and an exact copy of a training image for the first vasc image: a real-trained
    classifier must reject every nv image, and the filter must catch the copy."""

    def __init__(self, run: Path, pool: np.ndarray, copy: np.ndarray, train_counts: dict):
        self.run, self.pool, self.copy = run, pool, copy
        self.classes = ["nv", "vasc"]
        self.train_counts, self.unconditional, self.device = train_counts, False, "cpu"
        self.latent_shape = (3, 4, 4)
        self.trained_classes = None  # trained on every class (as Generator without the option)
        self.copied = False

    def labels_for(self, names):
        return torch.tensor([self.classes.index(n) for n in names])

    def guidance_for(self, guidance, names):
        return guidance

    def sample(self, noise, labels, guidance, sampler, steps, precision):
        out = []
        for z, label in zip(noise, labels.tolist()):
            if self.classes[label] == "vasc" and not self.copied:
                self.copied = True
                out.append(self.copy)
            else:  # the image's own seed picks it: the same image in every batch
                out.append(self.pool[int(z.abs().sum() * 1000) % len(self.pool)])
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_filtered_sampling_with_a_baseline_run(two_class, baseline_run, tmp_path, caplog):
    import dermkit.synth.diffusion as diffusion
    from dermkit.data.prepare import images_for, prepare_data
    from dermkit.synth.settings import DiffusionRunConfig

    # The generator's run folder: its config names the train split of the near-copy check.
    gen_run = tmp_path / "generator"
    gen_run.mkdir()
    gen_cfg = load_config(DiffusionRunConfig, "synth_diffusion", "tiny", None, _data(*two_class))
    save_config(gen_cfg, gen_run / "config.yaml")
    data = prepare_data(gen_cfg.data)
    train, held = data.part("train"), data.manifest[data.manifest["split"] != "train"]
    vasc = held[held["label"] == "vasc"]
    classifier = load_real_classifier(baseline_run)
    assert classifier.kind == "baseline"
    pool = images_for(data, vasc)
    assert (classifier.predict(pool) == "vasc").all()  # the judge reads the colour classes
    copied = train[train["label"] == "vasc"].iloc[0]
    generator = HeldOutGenerator(
        gen_run,
        pool,
        images_for(data, copied.to_frame().T)[0],
        train["label"].value_counts().to_dict(),
    )
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"generate": {"nv": 3, "vasc": 4}}))
    out = tmp_path / "samples"

    mp = pytest.MonkeyPatch()
    mp.setattr(diffusion, "load_generator", lambda run, device="cpu": generator)
    try:
        with caplog.at_level(logging.WARNING, logger="dermkit.synth.filtering"):
            result = CliRunner().invoke(
                app,
                ["synth", "sample", str(gen_run), "--out", str(out), "--balance", str(target),
                 "--filter", str(baseline_run), "filter.max_draw_factor=2",
                 "sampler.batch_size=3"],
                catch_exceptions=False,
            )  # fmt: skip
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output

    rows = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    nv, vs = rows[rows["label"] == "nv"], rows[rows["label"] == "vasc"]
    # nv: every image is a vasc phantom, rejected; 2 x 3 drawn, then the cap
    assert len(nv) == 6 and set(nv["reject_reason"]) == {"disagrees:vasc"} and not nv["kept"].any()
    # vasc: round 1 draws 4, the copy is caught: 3 pass; round 2 draws ceil(1 / 0.75) = 2
    assert len(vs) == 6 and vs["kept"].sum() == 4
    copy_reason = f"near_copy:{copied['image_id']}"
    assert vs["reject_reason"].tolist() == [copy_reason, "", "", "", "", "surplus"]
    kept = read_synthetic_rows(out / "manifest.csv")
    assert kept["image_id"].tolist() == vs.loc[vs["kept"].astype(bool), "image_id"].tolist()
    assert sorted(p.stem for p in out.glob("grid_*.png")) == ["grid_vasc"]  # kept images only

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic_counts"] == {"nv": 0, "vasc": 4}
    per_class = metrics["filter"]["per_class"]
    assert per_class["nv"] | {"reasons": None} == {
        "requested": 3, "drawn": 6, "kept": 0, "kept_share": 0.0, "short": 3, "reasons": None
    }  # fmt: skip
    assert per_class["nv"]["reasons"] == {"disagrees:vasc": 6}
    assert per_class["vasc"]["reasons"] == {"near_copy": 1, "surplus": 1}
    assert metrics["filter"]["short_classes"] == ["nv"] and metrics["filter"]["drawn"] == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("class nv kept 0 of the 3" in w for w in warnings)
    assert not any("class vasc" in w for w in warnings)
    assert "rejected because" in (out / "report.html").read_text()
    assert not (out / "drawn.csv").exists()


def test_baseline_refit_must_reproduce_the_run(baseline_run, tmp_path):
    import shutil

    from dermkit.train.baseline import refit_baseline_run

    copy = tmp_path / "baseline"
    shutil.copytree(baseline_run, copy)
    preds = pd.read_csv(copy / "predictions_val.csv")
    preds["prob_nv"], preds["prob_vasc"] = preds["prob_vasc"], preds["prob_nv"]
    preds.to_csv(copy / "predictions_val.csv", index=False)
    with pytest.raises(ConfigError, match="does not reproduce"):
        refit_baseline_run(copy)
    with pytest.raises(ConfigError, match="classifier run folder"):
        load_real_classifier(tmp_path)  # neither kind
