"""Class-conditioned latent diffusion (dermkit.synth) at tiny scale on phantoms."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import ConfigError, load_config, save_config
from dermkit.synth.settings import (
    AutoencoderRunConfig,
    DiffusionRunConfig,
    QualityConfig,
    SampleConfig,
    SamplerConfig,
    UNetConfig,
)

CLASSES = {"nv": 1.0, "vasc": 1.0}  # two phantom classes: brown nevi, red vascular lesions


def _common(root: Path, cache: Path) -> list[str]:
    return [f"data.path={root}", f"data.cache_dir={cache}", "data.near_duplicate_distance=-1"]


@pytest.fixture(scope="module")
def two_class_root(tmp_path_factory) -> Path:
    """80 phantom lesions (~170 images) of two classes, small frames (cached at 32 px)."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms2")
    generate_phantoms(root, n_lesions=80, class_weights=CLASSES, image_size=(43, 32), seed=1)
    return root


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    """A dermkit run folder holding a (random) vit_nano encoder: a domain-encoder stand-in."""
    from dermkit.models.backbones import create_backbone
    from dermkit.models.settings import ModelConfig
    from dermkit.models.weights import save_weights
    from dermkit.train.settings import FinetuneRunConfig

    run = tmp_path_factory.mktemp("encoder_run")
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", num_classes=2, img_size=32)
    save_weights(model, run / "model.safetensors")
    cfg = FinetuneRunConfig(model=ModelConfig(name="vit_nano_patch4_32"))
    cfg.data.image_size = 32
    save_config(cfg, run / "config.yaml")
    (run / "classes.json").write_text(json.dumps(["nv", "vasc"]))  # also a classifier run
    return run


@pytest.fixture(scope="module")
def tiny_generator(two_class_root, tmp_path_factory) -> Path:
    """A briefly trained autoencoder + diffusion run (the real pipeline, a few steps)."""
    from dermkit.synth.autoencoder import train_autoencoder
    from dermkit.synth.diffusion import train_diffusion

    tmp = tmp_path_factory.mktemp("tiny_gen")
    common = _common(two_class_root, tmp / "cache")
    ae = load_config(
        AutoencoderRunConfig, "synth_autoencoder", "tiny", None,
        [*common, f"out_dir={tmp / 'ae'}", "max_steps=4", "val_images=16", "scaling_images=64"],
    )  # fmt: skip
    train_autoencoder(ae, progress=False)
    dm = load_config(
        DiffusionRunConfig, "synth_diffusion", "tiny", None,
        [*common, f"out_dir={tmp / 'dm'}", f"autoencoder={tmp / 'ae'}", "max_steps=6",
         "preview_per_class=2"],
    )  # fmt: skip
    train_diffusion(dm, progress=False)
    return tmp / "dm"


# ----------------------------------------------------------------------------- planner


@st.composite
def counts_and_target(draw):
    n = draw(st.integers(1, 7))
    classes = [f"c{i}" for i in range(n)]
    real = {c: draw(st.integers(0, 400)) for c in classes}
    kind = draw(st.sampled_from(["uniform", "totals", "shares", "wrapped_shares"]))
    if kind == "uniform":
        return real, "uniform"
    if kind == "totals":
        return real, {c: real[c] + draw(st.integers(0, 300)) for c in classes}
    weights = {c: draw(st.integers(1 if real[c] else 0, 20)) for c in classes}
    if sum(weights.values()) == 0:
        weights[classes[0]] = 1
    shares = {c: w / sum(weights.values()) for c, w in weights.items()}
    return real, ({"shares": shares} if kind == "wrapped_shares" else shares)


@settings(max_examples=150, deadline=None)
@given(counts_and_target())
def test_plan_counts_reaches_the_target_exactly(case):
    from dermkit.synth.sample import _largest_remainder, parse_target, plan_counts

    real, target = case
    plan = plan_counts(real, target)
    assert list(plan) == list(real)
    assert all(v >= 0 for v in plan.values())
    final = {c: real[c] + plan[c] for c in real}
    kind, values = parse_target(target)
    if kind == "uniform":
        assert set(final.values()) == {max(real.values())}
    elif kind == "totals":
        assert final == values
    else:
        total = sum(final.values())
        shares = {c: values.get(c, Fraction(0)) for c in real}
        for c in real:  # the apportionment of the total is exact up to rounding
            assert abs(final[c] - total * shares[c]) < 1
        assert final == _largest_remainder(total, shares)
        # and no (nearby) smaller total keeps every real image
        for smaller in range(max(sum(real.values()), total - 20), total):
            counts = _largest_remainder(smaller, shares)
            assert any(counts[c] < real[c] for c in real)


def test_plan_counts_examples_and_errors():
    from dermkit.synth.sample import plan_counts

    real = {"nv": 60, "mel": 10, "vasc": 3}
    assert plan_counts(real, "uniform") == {"nv": 0, "mel": 50, "vasc": 57}
    assert plan_counts(real, {"mel": 40}) == {"nv": 0, "mel": 30, "vasc": 0}
    # generate: the counts asked for, whatever the real ones (nv too; vasc left out: 0)
    assert plan_counts(real, {"generate": {"nv": 5, "mel": 7}}) == {"nv": 5, "mel": 7, "vasc": 0}
    # shares 1/2, 1/4, 1/4: nv's 60 real images force a total of 120
    assert plan_counts(real, {"nv": 0.5, "mel": 0.25, "vasc": 0.25}) == {
        "nv": 0,
        "mel": 20,
        "vasc": 27,
    }
    with pytest.raises(ConfigError, match="nv: 10 < 60"):
        plan_counts(real, {"nv": 10})
    with pytest.raises(ConfigError, match="bcc"):
        plan_counts(real, {"bcc": 10})
    with pytest.raises(ConfigError, match="shares are 0"):
        plan_counts(real, {"nv": 0.5, "mel": 0.5})
    with pytest.raises(ConfigError, match="sum to 1"):
        plan_counts(real, {"nv": 0.5, "mel": 0.2, "vasc": 0.2})


# ----------------------------------------------------------------------------- guidance


def _random_unet(n_classes: int = 3, shape=(4, 8, 8)):
    from dermkit.synth.diffusion import build_unet

    torch.manual_seed(0)
    u = UNetConfig(
        block_out_channels=[16, 32],
        attention=[False, True],
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet = build_unet(u, shape, n_classes).eval()
    # A fresh class embedding is random but small next to the time embedding; scale it up so
    # that the labels visibly change the output.
    with torch.no_grad():
        unet.class_embedding.weight.mul_(5)
    return unet


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_guidance_zero_and_null_class_equal_the_unconditional_path(sampler):
    from dermkit.synth.autoencoder import load_codec
    from dermkit.synth.diffusion import Generator, training_scheduler

    unet = _random_unet(3, (3, 8, 8))
    sched = {k: v for k, v in dict(training_scheduler(1000, "scaled_linear").config).items()}
    gen = Generator(unet, load_codec(None, 8), ["a", "b", "c"], {}, sched, False, Path("."))
    noise = torch.randn((6, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    unconditional = gen.sample(noise, None, 3.0, sampler, 6)
    assert torch.equal(gen.sample(noise, labels, 0.0, sampler, 6), unconditional)
    null = torch.full((6,), gen.null_label)
    assert torch.equal(gen.sample(noise, null, 3.0, sampler, 6), unconditional)
    gen.unconditional = True  # the ablation's generator ignores labels
    assert torch.equal(gen.sample(noise, labels, 3.0, sampler, 6), unconditional)
    gen.unconditional = False
    guided = gen.sample(noise, labels, 3.0, sampler, 6)
    assert not torch.equal(guided, unconditional)  # the labels do reach the UNet
    # a mixed batch: null rows stay exactly unconditional, class rows are guided
    mixed = gen.sample(noise, torch.tensor([0, 3, 2, 3, 1, 3]), 3.0, sampler, 6)
    assert torch.equal(mixed[1::2], unconditional[1::2])
    assert torch.equal(mixed[0::2], guided[0::2])


def test_batched_guidance_matches_the_two_call_loop():
    from dermkit.bench.sampling import two_call_latents
    from dermkit.synth.diffusion import make_sampler, sample_latents, training_scheduler

    unet = _random_unet()
    cfg = dict(training_scheduler(1000, "scaled_linear").config)
    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    out = {}
    for g in (1.5, 4.0):
        out[g] = sample_latents(unet, make_sampler("ddim", cfg, 5), noise, labels, g, 3)
        reference = two_call_latents(unet, make_sampler("ddim", cfg, 5), noise, labels, g, 3)
        torch.testing.assert_close(out[g], reference, rtol=1e-4, atol=1e-4)
    assert (out[1.5] - out[4.0]).abs().max() > 1e-3  # the guidance scale matters


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_per_row_guidance_equals_single_scale_runs_row_by_row(precision):
    """One batch with a scale per row draws, row by row, what single-scale runs draw
    (1.3 is no bf16 number: the per-row scales are rounded as a Python scale is)."""
    from dermkit.synth.diffusion import make_sampler, sample_latents, training_scheduler

    unet = _random_unet()
    cfg = dict(training_scheduler(1000, "scaled_linear").config)
    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])  # the last row is the null class

    def run(g):
        return sample_latents(unet, make_sampler("ddim", cfg, 2), noise, labels, g, 3, precision)

    mixed = run(torch.tensor([1.3, 4.0, 1.3, 4.0]))
    low, high = run(1.3), run(4.0)
    assert torch.equal(mixed[0::2], low[0::2]) and torch.equal(mixed[1::2], high[1::2])
    assert not torch.equal(low[0], high[0])  # the scale matters
    assert torch.equal(run(torch.tensor([4.0] * 4)), high)  # one scale in a tensor: as a float


def test_class_guidance_resolves_per_class_scales_and_names_bad_ones():
    from dermkit.synth.diffusion import class_guidance

    classes = ["mel", "nv", "df"]
    assert class_guidance(3, classes) == {"mel": 3.0, "nv": 3.0, "df": 3.0}
    assert class_guidance({"df": 4}, classes) == {"mel": 2.0, "nv": 2.0, "df": 4.0}
    assert class_guidance({"df": 4, "default": 1}, classes) == {"mel": 1, "nv": 1, "df": 4}
    with pytest.raises(ConfigError, match=r"\['vsac'\]"):
        class_guidance({"vsac": 4}, classes)
    with pytest.raises(ConfigError, match=r"sampler\.guidance"):
        load_config(SampleConfig, "synth_sample", None, None, ["sampler.guidance={df: -1}"])
    cfg = load_config(SampleConfig, "synth_sample", None, None, ["sampler.guidance={df: 4}"])
    assert cfg.sampler.guidance == {"df": 4.0}


# ----------------------------------------------------------------------------- autoencoder


def test_vgg16_perceptual_loss_from_a_local_file(tmp_path):
    from torchvision.models import vgg16

    from dermkit.synth.perceptual import PerceptualLoss

    torch.manual_seed(0)
    features = vgg16(weights=None).features
    state = {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}
    save_file(state, tmp_path / "vgg.safetensors")  # the whole-vgg16 key layout
    loss = PerceptualLoss(vgg_file=tmp_path / "vgg.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(y, x)
    value.backward()
    assert value.item() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())  # the VGG stays frozen
    bad = tmp_path / "bad.safetensors"
    save_file({"0.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        PerceptualLoss(vgg_file=bad)


@pytest.mark.parametrize("loss", ["mse", "mse+perceptual"])
def test_autoencoder_trains_with_mse_and_mse_perceptual(
    loss, two_class_root, encoder_run, tmp_path
):
    from dermkit.synth.autoencoder import load_codec, train_autoencoder

    out = tmp_path / "ae"
    cfg = load_config(
        AutoencoderRunConfig, "synth_autoencoder", "tiny", None,
        [*_common(two_class_root, tmp_path / "cache"), f"out_dir={out}", "max_steps=8",
         f"loss.loss={loss}", f"loss.perceptual_encoder={encoder_run}", "val_images=16",
         "scaling_images=64", "log_every=1", "optim.base_lr=0.024"],
    )  # fmt: skip
    if loss == "mse":
        cfg.loss.perceptual_encoder = None
        cfg.class_sampling = "class_balanced"  # the codec's batches balance the classes
        cfg.loss.colour_weight = 10.0  # and its tile colours weigh more
    report = train_autoencoder(cfg, progress=False)
    assert report.exists() and (out / "reconstructions.png").exists()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    mse = [r["mse"] for r in rows if r["kind"] == "train"]
    assert len(mse) == 8 and np.mean(mse[-3:]) < np.mean(mse[:3])  # it learns
    if loss == "mse+perceptual":
        assert all(r["perceptual"] > 0 for r in rows if r["kind"] == "train")
        assert all("colour" not in r for r in rows)
    else:
        assert all("perceptual" not in r for r in rows)
        colour = [r["colour"] for r in rows if r["kind"] == "train"]
        assert all(0 < c <= m for c, m in zip(colour, mse))  # tile means: part of the error
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["val"]["psnr"]) and 0 < metrics["val"]["ssim"] <= 1
    assert metrics["latent_shape"] == [4, 8, 8] and metrics["downsample_factor"] == 4
    per_class = {r["class"]: r for r in metrics["val_per_class"]}
    assert set(per_class) == {"nv", "vasc"}  # the two-class set, every val image
    assert all(math.isfinite(r["psnr"]) and r["colour_shift"] >= 0 for r in per_class.values())
    codec = load_codec(out)  # the weights file alone restores the codec and its scale
    assert codec.scaling_factor == pytest.approx(metrics["scaling_factor"])
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean, std = codec.moments(images)
    assert mean.shape == std.shape == (3, 4, 8, 8) and codec.decode(mean).shape == (3, 3, 32, 32)


def test_per_class_reconstruction_sees_a_colour_shift_psnr_alone_would_hide():
    """A codec that returns every image exactly but drains red from one class's pixels:
    that class's colour shift is the drained amount, the other class's is 0."""
    from types import SimpleNamespace

    from dermkit.synth.autoencoder import per_class_reconstruction

    class DrainRed(torch.nn.Module):  # encode/decode as diffusers' AutoencoderKL names them
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            z = z.clone()
            red = z[:, 0] > 0.2  # only the red images of the test set below
            z[:, 0][red] -= 40 / 127.5  # 40 levels of 255 less red
            return SimpleNamespace(sample=z)

    class Images:
        def __init__(self):
            self.class_names = ["red", "grey"]
            red = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
            red[:, 0] = 200
            grey = torch.full((4, 3, 16, 16), 100, dtype=torch.uint8)
            self.images, self.labels = torch.cat([red, grey]), torch.tensor([0] * 4 + [1] * 4)

        def __len__(self):
            return len(self.images)

        def __getitems__(self, idx):
            return self.images[idx], self.labels[idx]

    rows = {r["class"]: r for r in per_class_reconstruction(DrainRed(), Images(), batch_size=3)}
    assert rows["red"]["images"] == rows["grey"]["images"] == 4
    assert rows["red"]["colour_shift"] == pytest.approx(40, abs=1)
    assert rows["grey"]["colour_shift"] == pytest.approx(0, abs=0.6)
    assert rows["red"]["psnr"] < rows["grey"]["psnr"] == float("inf")  # grey is exact


def test_tile_colour_loss_sees_colour_and_ignores_detail_within_a_tile():
    from dermkit.synth.autoencoder import tile_colour_loss

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 0.2 - 0.1  # mean 0
    assert tile_colour_loss(x + checker, x) == pytest.approx(0, abs=1e-12)  # detail only
    shifted = x.clone()
    shifted[:, 2] -= 0.3  # less blue everywhere: every tile's mean moves by 0.3 in 1 of 3
    assert tile_colour_loss(shifted, x) == pytest.approx(0.3**2 / 3)
    with pytest.raises(ConfigError, match="not divisible by 8"):
        from dermkit.synth.autoencoder import check_autoencoder_config

        cfg = load_config(
            AutoencoderRunConfig, "synth_autoencoder", "tiny", None,
            ["loss.colour_weight=1", "data.image_size=36", "model.block_out_channels=[32,64]"],
        )  # fmt: skip
        check_autoencoder_config(cfg)


def test_autoencoder_colour_weight_at_its_default_keeps_the_stage_key():
    from dermkit.pipeline.runner import stage_key

    _, material = stage_key("autoencoder", AutoencoderRunConfig(), {}, {})
    cfg = AutoencoderRunConfig()
    cfg.loss.colour_weight = 10.0
    _, material_set = stage_key("autoencoder", cfg, {}, {})
    assert "colour_weight" not in material["config"]["loss"]
    assert material_set["config"]["loss"].pop("colour_weight") == 10.0
    assert material_set["config"] == material["config"]


def test_autoencoder_config_errors_name_the_fields(two_class_root, tmp_path):
    from dermkit.synth.autoencoder import check_autoencoder_config

    cfg = load_config(
        AutoencoderRunConfig, "synth_autoencoder", "tiny", None, ["loss.loss=mse+perceptual"]
    )
    with pytest.raises(ConfigError, match="perceptual_encoder"):
        check_autoencoder_config(cfg)
    cfg = load_config(
        AutoencoderRunConfig, "synth_autoencoder", "tiny", None, ["model.norm_num_groups=24"]
    )
    with pytest.raises(ConfigError, match="norm_num_groups"):
        check_autoencoder_config(cfg)


def test_adversarial_autoencoder_trains_the_discriminator(two_class_root, tmp_path):
    from dermkit.synth.autoencoder import train_autoencoder

    out = tmp_path / "ae_adv"
    cfg = load_config(
        AutoencoderRunConfig, "synth_autoencoder", "tiny", None,
        [*_common(two_class_root, tmp_path / "cache"), f"out_dir={out}", "max_steps=3",
         "loss.adversarial_weight=0.1", "loss.discriminator_channels=8",
         "loss.discriminator_layers=2", "val_images=8", "scaling_images=32", "log_every=1"],
    )  # fmt: skip
    train_autoencoder(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all("d_loss" in r and "g_adv" in r for r in rows if r["kind"] == "train")
    ckpt = load_file(out / "checkpoints" / "step-0000003" / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in ckpt)


# ----------------------------------------------------------------------------- diffusion


def test_diffusion_run_folder_and_resume_replays_exactly(two_class_root, tmp_path, monkeypatch):
    """Killed after its step-4 checkpoint and resumed, a run ends with the same weights."""
    import dermkit.synth.diffusion as diffusion
    import dermkit.train.engine as engine

    gen_run = tmp_path / "gen"
    common = _common(two_class_root, tmp_path / "cache")
    base = [*common, "autoencoder=null", "data.image_size=16", "max_steps=8",
            "checkpoint_every=4", "preview_per_class=1", "dihedral_views=1"]  # fmt: skip
    full = load_config(
        DiffusionRunConfig, "synth_diffusion", "tiny", None, [*base, f"out_dir={gen_run}"]
    )
    diffusion.train_diffusion(full, progress=False)
    meta = json.loads((gen_run / "generator.json").read_text())
    assert meta["classes"] == ["nv", "vasc"] and meta["null_label"] == 2
    assert meta["latent_shape"] == [3, 16, 16]  # pixel space when autoencoder is null
    assert sum(meta["train_counts"].values()) > 0 and (gen_run / "samples.png").exists()
    unet = diffusion.load_unet(gen_run / "unet.safetensors")
    assert unet.config.num_class_embeds == 3  # n_classes + the null class

    real_save = engine.save_checkpoint  # the engine writes every method's checkpoints

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real_save(ckpt_dir, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt("killed")
        return path

    resumed = tmp_path / "resumed"
    cfg = load_config(
        DiffusionRunConfig, "synth_diffusion", "tiny", None, [*base, f"out_dir={resumed}"]
    )
    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        diffusion.train_diffusion(cfg, progress=False)
    assert not (resumed / "unet.safetensors").exists()
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    diffusion.train_diffusion(cfg, resume=True, progress=False)
    a, b = load_file(gen_run / "unet.safetensors"), load_file(resumed / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def imbalanced_root(tmp_path_factory) -> Path:
    """~100 phantom images, about 5 nv to 1 vasc (one view per lesion)."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms_imbalanced")
    generate_phantoms(
        root, n_lesions=100, views_per_lesion=(1, 1), class_weights={"nv": 5.0, "vasc": 1.0},
        image_size=(24, 16), seed=2,
    )  # fmt: skip
    return root


@pytest.mark.parametrize("mode", ["random", "sqrt_balanced", "class_balanced"])
def test_diffusion_class_sampling_balances_the_classes_the_model_sees(
    mode, imbalanced_root, tmp_path, monkeypatch
):
    """One epoch's training labels, read at the UNet: shuffled they follow the data,
    class_balanced they are about uniform, sqrt_balanced in between (~ sqrt(count))."""
    import dermkit.synth.diffusion as diffusion

    seen: list[torch.Tensor] = []
    real_build = diffusion.build_unet

    def spied_unet(*args, **kwargs):
        unet = real_build(*args, **kwargs)
        hook = lambda module, a, kw: seen.append(kw["class_labels"].cpu())  # noqa: E731
        unet.register_forward_pre_hook(hook, with_kwargs=True)
        return unet

    monkeypatch.setattr(diffusion, "build_unet", spied_unet)
    cfg = load_config(
        DiffusionRunConfig, "synth_diffusion", "tiny", None,
        [*_common(imbalanced_root, tmp_path / "cache"), f"out_dir={tmp_path / 'dm'}",
         "autoencoder=null", "data.image_size=16", "dihedral_views=1", "label_dropout=0",
         "optim.batch_size=8", "preview_per_class=0", f"class_sampling={mode}",
         "unet.block_out_channels=[8]", "unet.attention=[false]", "unet.norm_num_groups=4",
         "unet.attention_head_dim=8"],
    )  # fmt: skip
    cfg.optim.epochs = 1
    diffusion.train_diffusion(cfg, progress=False)
    real = json.loads((tmp_path / "dm" / "generator.json").read_text())["train_counts"]
    n_vasc, n = real["vasc"], sum(real.values())
    drawn = torch.cat(seen)
    assert len(drawn) == n // 8 * 8  # one epoch: one pass's worth of rows
    share = float((drawn == 1).float().mean())  # class 1: vasc (the rarer class)
    expected = {
        "random": n_vasc / n,
        "sqrt_balanced": n_vasc**0.5 / (n_vasc**0.5 + (n - n_vasc) ** 0.5),
        "class_balanced": 0.5,
    }[mode]
    assert n_vasc / n < 0.25  # the toy set is imbalanced
    if mode == "random":  # a shuffle: every row once, less the dropped partial batch
        assert abs(share * len(drawn) - n_vasc) <= 8
    else:  # drawn with replacement: binomial noise, sd <= 0.5 / sqrt(len(drawn))
        assert abs(share - expected) < 3 * 0.5 / len(drawn) ** 0.5


@pytest.mark.parametrize(
    "schema, field, value",
    [
        (DiffusionRunConfig, "class_sampling", "class_balanced"),
        (SampleConfig, "from_real", 0.5),
        (SampleConfig, "filter", {"classifier": "runs/finetune", "min_prob": 0.0,
                                  "memorisation": True, "memorisation_percentile": 1.0,
                                  "max_draw_factor": 4.0}),
    ],
)  # fmt: skip
def test_new_options_at_their_default_keep_the_pipeline_stage_keys(schema, field, value):
    """Options added after pipelines cached their stages: left at the default they are not
    hashed (the cached stages of old configs stay valid); set, they change the key."""
    from dermkit.pipeline.runner import stage_key

    key, material = stage_key("stage", schema(), {}, {})
    key_set, material_set = stage_key("stage", schema(**{field: value}), {}, {})
    assert field not in material["config"] and key != key_set
    assert material_set["config"].pop(field) == value
    assert material_set["config"] == material["config"]  # the old configs' material


# ----------------------------------------------------------------------------- sampling


def _sample_cfg(generator: Path, out: Path, **kw) -> SampleConfig:
    return SampleConfig(
        generator=str(generator),
        out_dir=str(out),
        balance=kw.pop("balance", "uniform"),
        sampler=SamplerConfig(steps=3, guidance=2.0, batch_size=kw.pop("batch_size", 4)),
        grid_per_class=4,
        **kw,
    )


def test_sampling_interrupted_and_rerun_gives_the_same_set(tiny_generator, tmp_path, monkeypatch):
    import dermkit.synth.sample as sample
    from dermkit.data.manifest import read_manifest

    target = tmp_path / "target.json"
    gen_meta = json.loads((tiny_generator / "generator.json").read_text())
    real = gen_meta["train_counts"]
    target.write_text(json.dumps({"nv": real["nv"] + 5, "vasc": real["vasc"] + 4}))

    once = sample.run_sample(_sample_cfg(tiny_generator, tmp_path / "once", balance=str(target)))
    reference = read_manifest(once)
    assert reference["label"].value_counts().to_dict() == {"nv": 5, "vasc": 4}

    real_write, calls = sample.write_png, {"n": 0}

    def write_then_die(image, path):
        calls["n"] += 1
        if calls["n"] == 6:  # dies inside the second batch of 4
            raise KeyboardInterrupt("killed")
        return real_write(image, path)

    cfg = _sample_cfg(tiny_generator, tmp_path / "twice", balance=str(target))
    monkeypatch.setattr(sample, "write_png", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        sample.run_sample(cfg)
    partial = read_manifest(tmp_path / "twice" / "manifest.csv")
    assert len(partial) == 4  # the first batch, listed once
    monkeypatch.setattr(sample, "write_png", real_write)
    second = read_manifest(sample.run_sample(cfg))
    sample.run_sample(cfg)  # a third run has nothing left to do and changes nothing
    third = read_manifest(tmp_path / "twice" / "manifest.csv")

    for m in (second, third):
        assert m["image_id"].is_unique and m["image_id"].tolist() == reference["image_id"].tolist()
        assert m["seed"].tolist() == reference["seed"].tolist()
    pngs = sorted(p.name for p in (tmp_path / "twice" / "images").rglob("*.png"))
    assert pngs == sorted(f"{i}.png" for i in reference["image_id"])  # no strays, no temp files
    from PIL import Image

    for a, b in zip(reference["path"], second["path"]):
        x, y = np.asarray(Image.open(a), np.int16), np.asarray(Image.open(b), np.int16)
        assert np.abs(x - y).max() <= 1  # same seed -> same image, whatever its batch
    row = second.iloc[0]
    assert row["synthetic"] and row["split"] == "" and row["lesion_id"] == row["image_id"]
    assert row["source"] == f"synthetic:{tiny_generator.name}" and row["guidance"] == 2.0
    assert (tmp_path / "twice" / "grid_nv.png").exists()
    settings = json.loads((tmp_path / "twice" / "sample.json").read_text())
    assert settings["precision"] in ("bf16", "no")  # "auto", resolved and recorded
    plan = json.loads((tmp_path / "twice" / "plan.json").read_text())
    assert plan["final_counts"] == {"nv": real["nv"] + 5, "vasc": real["vasc"] + 4}
    with pytest.raises(ConfigError, match="guidance"):  # one folder, one setting
        other = _sample_cfg(tiny_generator, tmp_path / "twice", balance=str(target))
        other.sampler.guidance = 5.0
        sample.run_sample(other)


def test_guidance_per_class_draws_each_class_as_its_single_scale_run(tiny_generator, tmp_path):
    """{nv: 1.5, vasc: 3}: every nv image is the guidance-1.5 run's, every vasc image the
    guidance-3 run's (images are keyed by (seed, class, index)); the scales are recorded."""
    import dermkit.synth.sample as sample
    from dermkit.data.manifest import read_manifest

    target = tmp_path / "target.json"
    target.write_text(json.dumps({"generate": {"nv": 3, "vasc": 3}}))

    def run(name, guidance):
        cfg = _sample_cfg(tiny_generator, tmp_path / name, balance=str(target), batch_size=4)
        cfg.sampler.guidance = guidance
        return read_manifest(sample.run_sample(cfg, progress=False))

    per_class = run("per_class", {"nv": 1.5, "vasc": 3})
    low, high = run("low", 1.5), run("high", 3.0)
    settings = json.loads((tmp_path / "per_class" / "sample.json").read_text())
    assert settings["guidance"] == {"nv": 1.5, "vasc": 3.0}
    assert per_class.groupby("label")["guidance"].unique().to_dict() == {
        "nv": [1.5],
        "vasc": [3.0],
    }
    from PIL import Image

    def pixels(manifest, label):
        return [np.asarray(Image.open(p)) for p in manifest.loc[manifest.label == label, "path"]]

    for label, single in (("nv", low), ("vasc", high)):
        for a, b in zip(pixels(per_class, label), pixels(single, label), strict=True):
            assert np.array_equal(a, b)
    assert not np.array_equal(pixels(low, "vasc")[0], pixels(high, "vasc")[0])


def test_cli_synth_sample_guidance_from_a_json_file_or_inline(tiny_generator, tmp_path):
    runner = CliRunner()
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"generate": {"nv": 1, "vasc": 1}}))
    scales = tmp_path / "guidance.json"
    scales.write_text(json.dumps({"vasc": 4, "default": 1.5}))
    out = tmp_path / "out"
    args = ["synth", "sample", str(tiny_generator), "--balance", str(target), "sampler.steps=2"]
    result = runner.invoke(app, [*args, "--out", str(out), "--guidance", str(scales)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sample.json").read_text())["guidance"] == {"nv": 1.5, "vasc": 4.0}
    saved = load_config(SampleConfig, "synth_sample", None, out / "config.yaml")
    assert saved.sampler.guidance == {"vasc": 4.0, "default": 1.5}  # the scales, not a path
    manifest = pd.read_csv(out / "manifest.csv").set_index("label")
    assert manifest.loc["vasc", "guidance"] == 4.0 and manifest.loc["nv", "guidance"] == 1.5
    for bad, message in (
        (tmp_path / "missing.json", "not found"),
        ("{vsac: 3}", "vsac"),
        (target, "sampler.guidance"),  # a JSON file of something else
    ):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--guidance", str(bad)])
        assert result.exit_code == 2 and message in result.output.replace("\n", ""), result.output


def test_cli_synth_sample_and_bench_sampling(tiny_generator, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_samples"
    result = runner.invoke(
        app,
        ["synth", "sample", str(tiny_generator), "--out", str(out), "sampler.steps=2",
         "sampler.batch_size=64"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(out / "manifest.csv")
    counts = manifest["label"].value_counts()
    real = json.loads((tiny_generator / "generator.json").read_text())["train_counts"]
    assert {c: real[c] + counts.get(c, 0) for c in real} == dict.fromkeys(real, max(real.values()))
    metrics = json.loads((out / "metrics.json").read_text())  # the pipeline stage's files too
    assert metrics["synthetic_images"] == len(manifest) and (out / "report.html").is_file()
    assert metrics["final_counts"] == dict.fromkeys(real, max(real.values()))
    bad = runner.invoke(app, ["synth", "sample", str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code == 2 and "generator.json" in bad.output.replace("\n", "")

    for precision in ("fp32", "bf16"):
        result = runner.invoke(
            app,
            ["bench", "sampling", "--preset", "tiny", "--batch-size", "4", "--steps", "3",
             "--rounds", "1", "--precision", precision],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        bench = json.loads(result.stdout[result.stdout.index("{") :])
        assert bench["ratio_dermkit_over_plain"] > 0 and bench["steps"] == 3
        # batching the two guidance halves changes nothing but float rounding
        assert bench["max_abs_latent_difference_fp32"] < 1e-3
        if precision == "fp32":
            assert set(bench["images_per_s"]) == {"dermkit", "plain"}
            assert bench["relative_rms_latent_difference_dermkit"] < 1e-4
        else:  # bf16 autocast: close to the fp32 reference, not equal
            assert set(bench["images_per_s"]) == {"dermkit", "batched_fp32", "plain"}
            assert 0 < bench["relative_rms_latent_difference_dermkit"] < 0.1


# ----------------------------------------------------------------------------- quality


def test_distribution_metrics_behave():
    from dermkit.synth.metrics import (
        frechet_distance,
        kernel_inception_distance,
        precision_recall,
    )

    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    shifted = same + 3.0
    collapsed = real[:1] + 0.01 * rng.normal(size=(400, 8))  # one mode only
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, same) < 1.0 < frechet_distance(real, shifted)
    assert frechet_distance(real, shifted) == pytest.approx(9 * 8, rel=0.15)
    assert abs(kernel_inception_distance(real, same, 200, 10)[0]) < 0.05
    assert kernel_inception_distance(real, shifted, 200, 10)[0] > 0.5
    p, r = precision_recall(real, same, k=3)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(real, shifted, k=3)
    assert p < 0.1 and r < 0.1
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.1  # faithful but not diverse


def test_memorisation_flags_copies_only():
    from dermkit.synth.quality import memorisation

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    lesions = np.arange(200) // 2
    real[1::2] = real[0::2] + 0.01 * rng.normal(size=(100, 16))  # two views per lesion
    novel = rng.normal(size=(20, 16)) + 3.0  # away from every real image
    fake = np.concatenate([real[[3, 50, 77]] + 1e-4, novel])
    table, threshold = memorisation(real, lesions, fake, 1.0)
    assert threshold > 0.5  # same-lesion views do not count as real-to-real neighbours
    assert table["flagged"].tolist() == [True] * 3 + [False] * 20
    assert table["nearest"].tolist()[:3] == [3, 50, 77]


def test_class_agreement_reads_the_classifier_per_class(tmp_path):
    from dermkit.models.backbones import create_backbone
    from dermkit.models.settings import ModelConfig
    from dermkit.models.weights import save_weights
    from dermkit.synth.quality import class_agreement, is_classifier_run
    from dermkit.train.settings import FinetuneRunConfig

    model = create_backbone("vit_nano_patch4_32", num_classes=2, img_size=32)
    with torch.no_grad():  # a classifier that says "vasc" (index 1) whatever the image
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 10.0]))
    save_weights(model, tmp_path / "model.safetensors")
    cfg = FinetuneRunConfig(model=ModelConfig(name="vit_nano_patch4_32"))
    cfg.data.image_size = 32
    save_config(cfg, tmp_path / "config.yaml")
    assert not is_classifier_run(tmp_path)  # no classes.json yet
    (tmp_path / "classes.json").write_text(json.dumps(["nv", "vasc"]))
    assert is_classifier_run(tmp_path)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 48, 48, 3), dtype=np.uint8)  # resized to 32
    syn_labels = np.array(["nv"] * 4 + ["vasc"] * 6)
    real_labels = np.array(["nv"] * 5 + ["vasc"] * 5)
    rows = class_agreement(tmp_path, ["nv", "vasc"], images, syn_labels, images, real_labels)
    assert rows == [
        {"class": "nv", "n_synthetic": 4, "synthetic_agreement": 0.0, "real_recall": 0.0},
        {"class": "vasc", "n_synthetic": 6, "synthetic_agreement": 1.0, "real_recall": 1.0},
    ]
    with pytest.raises(ConfigError, match="differ"):
        class_agreement(tmp_path, ["vasc", "nv"], images, syn_labels, images, real_labels)


def test_quality_end_to_end(tiny_generator, two_class_root, encoder_run, tmp_path):
    from dermkit.synth.quality import run_quality
    from dermkit.synth.sample import run_sample

    real = json.loads((tiny_generator / "generator.json").read_text())["train_counts"]
    target = tmp_path / "target.json"  # both classes, so that TSTR has two to learn
    target.write_text(json.dumps({"totals": {c: n + 12 for c, n in real.items()}}))
    manifest = run_sample(
        _sample_cfg(tiny_generator, tmp_path / "s", batch_size=64, balance=str(target))
    )
    cfg = load_config(
        QualityConfig, "synth_quality", None, None,
        [*_common(two_class_root, tmp_path / "cache"), "data.image_size=32",
         f"synthetic_manifest={manifest}", f"encoder={encoder_run}", f"out_dir={tmp_path / 'q'}",
         "kid_subset_size=20", "kid_subsets=3", "eval.n_boot=10", "tstr.baseline.max_iter=20",
         "tstr.baseline.lbp_radii=[1]"],
    )  # fmt: skip
    report = run_quality(cfg, progress=False)
    assert report.exists()
    q = json.loads((tmp_path / "q" / "quality.json").read_text())
    overall = q["metrics"][0]
    assert overall["class"] == "all" and overall["fd"] > 0 and 0 <= overall["precision"] <= 1
    assert {row["class"] for row in q["metrics"]} == {"all", "nv", "vasc"}
    assert q["tstr"]["method"] == "classical"
    for name in ("tstr", "trtr"):
        assert 0 <= q["tstr"][name]["macro_f1"]["value"] <= 1
    agreement = {row["class"]: row for row in q["class_agreement"]}
    assert set(agreement) == {"nv", "vasc"}
    assert all(0 <= row["synthetic_agreement"] <= 1 for row in agreement.values())
    mem = pd.read_csv(tmp_path / "q" / "memorisation.csv")
    assert len(mem) == q["memorisation"]["checked"] == len(pd.read_csv(manifest))
    assert {"feature_flagged", "pixel_flagged", "flagged"} <= set(mem.columns)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_presets_validate_and_fit_together(preset):
    from dermkit.synth.autoencoder import check_autoencoder_config, downsample_factor
    from dermkit.synth.diffusion import check_unet_config

    ae = load_config(AutoencoderRunConfig, "synth_autoencoder", preset)
    dm = load_config(DiffusionRunConfig, "synth_diffusion", preset)
    check_autoencoder_config(ae)
    assert ae.data.image_size == dm.data.image_size
    check_unet_config(dm.unet, ae.data.image_size // downsample_factor(ae.model))
    if preset == "cpu":
        assert ae.data.image_size == 64 and downsample_factor(ae.model) == 4


@pytest.mark.slow
def test_gpu_preset_builds_and_runs_one_forward_pass():
    from dermkit.synth.autoencoder import build_autoencoder, downsample_factor
    from dermkit.synth.diffusion import build_unet

    ae_cfg = load_config(AutoencoderRunConfig, "synth_autoencoder", "gpu")
    dm_cfg = load_config(DiffusionRunConfig, "synth_diffusion", "gpu")
    s = ae_cfg.data.image_size
    side = s // downsample_factor(ae_cfg.model)
    with torch.no_grad():
        vae = build_autoencoder(ae_cfg.model, s)
        z = vae.encode(torch.zeros(1, 3, s, s)).latent_dist.mode()
        assert z.shape == (1, ae_cfg.model.latent_channels, side, side)
        unet = build_unet(dm_cfg.unet, tuple(z.shape[1:]), 7)
        assert unet(z, torch.tensor([10]), class_labels=torch.tensor([7])).sample.shape == z.shape


# ----------------------------------------------------------------------------- conditioning


def _colour_features(images: np.ndarray) -> np.ndarray:
    """Mean colour of the centre disc (the lesion) and of the outer ring (skin): (N, 6)."""
    x = images.astype(np.float32) / 255
    s = x.shape[1]
    yy, xx = np.mgrid[:s, :s]
    r = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2) / (s / 2)
    return np.concatenate([x[:, r < 0.5].mean(1), x[:, r > 0.8].mean(1)], 1)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 min on a free core; far longer on a shared, busy machine
def test_class_conditioning_generates_the_requested_class(two_class_root, tmp_path):
    """Two phantom classes: samples of each class are recognised as that class.

    The diffusion model runs in pixel space at 16 px here: an autoencoder trained for the
    seconds a test allows renders lesion colours too loosely for a judge to read the class
    from its reconstructions (the latent path is exercised by the other tests). The judge
    is a colour classifier trained on the real phantoms.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dermkit.data.prepare import images_for, prepare_data
    from dermkit.synth.diffusion import load_generator, train_diffusion

    dm = load_config(
        DiffusionRunConfig, "synth_diffusion", "tiny", None,
        [*_common(two_class_root, tmp_path / "cache"), f"out_dir={tmp_path / 'dm'}",
         "autoencoder=null", "data.image_size=16", "dihedral_views=8", "optim.epochs=1000",
         "max_steps=400", "preview_per_class=0", "checkpoint_every=1000"],
    )  # fmt: skip
    train_diffusion(dm, progress=False)
    gen = load_generator(tmp_path / "dm")
    assert gen.latent_shape == (3, 16, 16)

    data = prepare_data(dm.data)
    train, held_out = data.part("train"), data.manifest[data.manifest["split"] != "train"]
    judge = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    judge.fit(_colour_features(images_for(data, train)), train["label"])
    held_out_acc = judge.score(_colour_features(images_for(data, held_out)), held_out["label"])
    assert held_out_acc > 0.9  # the judge itself tells the classes apart

    names = ["nv"] * 32 + ["vasc"] * 32
    noise = torch.randn((64, *gen.latent_shape), generator=torch.Generator().manual_seed(0))
    accuracy = {}
    for g in (0.0, 3.0):
        images = gen.sample(noise, gen.labels_for(names), g, "ddim", 20)
        pred = judge.predict(_colour_features(images.permute(0, 2, 3, 1).numpy()))
        accuracy[g] = float((pred == np.array(names)).mean())
    print(f"held-out judge accuracy {held_out_acc:.2f}; conditioning accuracy {accuracy}")
    assert accuracy[3.0] >= 0.75  # chance is 0.5 (seen: 0.875)
    assert accuracy[0.0] < accuracy[3.0]  # guidance 0 ignores the requested class (seen: 0.52)


# ----------------------------------------------------------------------------- variations


def test_strength_schedule_starts_near_strength_times_t():
    from dermkit.synth.diffusion import make_sampler, training_scheduler
    from dermkit.synth.variations import strength_schedule

    cfg = dict(training_scheduler(1000, "scaled_linear").config)
    assert strength_schedule(25, 1.0, cfg) == (25, 25)  # plain sampling
    assert strength_schedule(25, 0.4, cfg) == (25, 10)
    assert strength_schedule(3, 0.0001, cfg) == (1000, 1)  # capped at T
    for kind in ("ddim", "dpm_solver"):
        for steps, s in ((25, 0.9), (25, 0.3), (10, 0.05), (3, 0.02)):
            total, run = strength_schedule(steps, s, cfg)
            assert run == max(1, round(steps * s))  # the budget scales with the noise left
            t0 = int(make_sampler(kind, cfg, total).timesteps[total - run])
            assert abs((t0 + 1) / 1000 - s) < 0.02, (kind, steps, s, t0)
    with pytest.raises(ValueError, match="strength"):
        strength_schedule(25, 0.0, cfg)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_variations_keep_the_start_at_small_strength_and_ignore_it_at_one(sampler):
    """Pixel space, a random UNet: at strength 0.02 the output is its start image up to a
    little noise; at strength 1 the start image changes nothing (plain sampling)."""
    from dermkit.synth.autoencoder import load_codec
    from dermkit.synth.diffusion import Generator, training_scheduler

    unet = _random_unet(3, (3, 8, 8))
    sched = dict(training_scheduler(1000, "scaled_linear").config)
    gen = Generator(unet, load_codec(None, 8), ["a", "b", "c"], {}, sched, False, Path("."))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((4, 3, 8, 8), generator=g)
    start = torch.rand((4, 3, 8, 8), generator=g) * 2 - 1  # four different images
    labels = torch.tensor([0, 1, 2, 0])
    near = gen.sample(noise, labels, 2.0, sampler, 10, init=start, strength=0.02).float()
    source = gen.codec.decode(start).float()
    own = ((near - source) ** 2).mean((1, 2, 3))
    other = ((near - source.roll(1, 0)) ** 2).mean((1, 2, 3))
    assert (own < 0.05 * other).all(), (own, other)
    plain = gen.sample(noise, labels, 2.0, sampler, 10)
    assert torch.equal(gen.sample(noise, labels, 2.0, sampler, 10, init=start), plain)
    with pytest.raises(ValueError, match="latents"):
        gen.sample(noise, labels, 2.0, sampler, 10, strength=0.5)


def test_from_real_variations_start_from_train_images_of_their_class(tiny_generator, tmp_path):
    import dermkit.synth.sample as sample
    from dermkit.data.manifest import read_manifest
    from dermkit.synth.diffusion import generator_train_split, load_generator

    target = tmp_path / "target.json"
    target.write_text(json.dumps({"generate": {"nv": 3, "vasc": 2}}))

    def run(name, strength):
        cfg = _sample_cfg(tiny_generator, tmp_path / name, balance=str(target), batch_size=4)
        cfg.from_real = strength
        return read_manifest(sample.run_sample(cfg, progress=False))

    plain, full, near = run("plain", None), run("full", 1.0), run("near", 0.02)
    assert "source_image_id" not in plain.columns  # no new columns without the option
    assert "from_real" not in json.loads((tmp_path / "plain" / "sample.json").read_text())
    data, train = generator_train_split(tiny_generator)
    train = train.set_index("image_id")
    for m, s in ((full, 1.0), (near, 0.02)):
        assert (m["strength"] == s).all()
        assert (train.loc[m["source_image_id"], "label"].to_numpy() == m["label"]).all()
        # each class's sources cycle through its images: no repeat before all are used
        assert (m.groupby("label")["source_image_id"].nunique() == m["label"].value_counts()).all()
    assert near["source_image_id"].tolist() == full["source_image_id"].tolist()
    assert json.loads((tmp_path / "near" / "sample.json").read_text())["from_real"] == 0.02

    from PIL import Image

    def pixels(paths):
        return np.stack([np.asarray(Image.open(p), np.float32) for p in paths])

    # strength 1 is plain sampling: the same images, whatever their sources
    assert np.array_equal(pixels(full["path"]), pixels(plain["path"]))
    # strength 0.02: each image is close to its source's autoencoder reconstruction
    gen = load_generator(tiny_generator)
    ids = train.index.tolist()
    real = torch.from_numpy(data.cache.load(ids)).permute(0, 3, 1, 2)
    recon = gen.codec.decode(gen.codec.moments(real)[0]).permute(0, 2, 3, 1).float().numpy()
    mse = ((pixels(near["path"])[:, None] - recon[None]) ** 2).mean((2, 3, 4))  # (M, N)
    own = mse[np.arange(len(near)), [ids.index(i) for i in near["source_image_id"]]]
    assert (own < 0.25 * np.median(mse, axis=1)).all(), (own, np.median(mse, axis=1))

    with pytest.raises(ConfigError, match="from_real"):  # one folder, one setting
        run("near", 0.5)
    with pytest.raises(ConfigError, match="from_real"):  # the schema names the field
        load_config(SampleConfig, "synth_sample", None, None, ["from_real=1.5"])
    with pytest.raises(ConfigError, match="from_real"):
        load_config(SampleConfig, "synth_sample", None, None, ["from_real=0"])
    result = CliRunner().invoke(app, ["synth", "sample", str(tiny_generator), "--from-real", "2"])
    assert result.exit_code == 2 and "from_real" in result.output


# ----------------------------------------------------------------------------- codec check


def test_codec_versions_swap_the_colour_and_detail_bands():
    """A codec that only moves colour: its colour on real detail is the reconstruction, and
    its detail on real colour is the real image (up to uint8 rounding)."""
    from dermkit.synth.codec_check import VERSIONS, codec_versions

    torch.manual_seed(0)
    real = torch.randint(40, 200, (3, 3, 32, 32), dtype=torch.uint8)
    recolour = real.clone()
    recolour[:, 2] -= 30  # 30 levels less blue everywhere: a pure colour change
    versions = codec_versions(real, recolour)
    assert tuple(versions) == VERSIONS and all(v.dtype == torch.uint8 for v in versions.values())
    diff = lambda a, b: (a.int() - b.int()).abs().max().item()  # noqa: E731
    assert diff(versions["real detail + reconstruction colour"], recolour) <= 1
    assert diff(versions["reconstruction detail + real colour"], real) <= 1
    assert diff(versions["reconstruction"], real) == 30
    assert diff(versions["blurred (2x down, up)"], real) > 0


def test_codec_check_judges_every_version_per_class(tiny_generator, encoder_run, tmp_path):
    from dermkit.synth.codec_check import VERSIONS
    from dermkit.synth.filtering import load_real_classifier

    autoencoder = tiny_generator.parent / "ae"
    result = CliRunner().invoke(
        app,
        ["synth", "codec", str(autoencoder), "--judge", str(encoder_run), "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "codec.json").read_text())
    assert [r["version"] for r in report["rows"]] == list(VERSIONS)
    for row in report["rows"]:
        assert set(row["recall"]) == {"nv", "vasc"}
        assert all(0 <= v <= 1 for v in row["recall"].values())
    # the "real" row is the judge's own recall on the real val images
    import yaml

    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.prepare import prepare_data
    from dermkit.data.settings import DataConfig

    data = prepare_data(
        DataConfig(**yaml.safe_load((autoencoder / "config.yaml").read_text())["data"])
    )
    val = CachedImageDataset(data.cache, data.part("val"), data.classes)
    images = val.__getitems__(np.arange(len(val)))[0].permute(0, 2, 3, 1).numpy()
    labels = np.asarray(data.classes)[val.labels.numpy()]
    assert report["images"] == {c: int((labels == c).sum()) for c in ("nv", "vasc")}
    predicted = load_real_classifier(encoder_run).predict(images)
    for c in ("nv", "vasc"):
        assert report["rows"][0]["recall"][c] == pytest.approx((predicted[labels == c] == c).mean())
    assert "| reconstruction |" in (tmp_path / "codec.md").read_text()
    bad = CliRunner().invoke(app, ["synth", "codec", str(tmp_path), "--judge", str(encoder_run)])
    assert bad.exit_code == 2 and "synth autoencoder run folder" in bad.output
