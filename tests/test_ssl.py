"""Self-supervised pretraining: MAE masking and loss, VAE, export to a backbone, CLI, resume."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import load_config
from dermkit.data.dataset import CachedImageDataset
from dermkit.data.prepare import prepare_data
from dermkit.data.settings import DataConfig
from dermkit.data.transforms import to_float
from dermkit.models.backbones import create_backbone
from dermkit.models.weights import load_pretrained
from dermkit.ssl.mae import MaskedAutoencoder, random_masking
from dermkit.ssl.settings import MaePretrainRunConfig, VaePretrainRunConfig
from dermkit.ssl.vae import ConvVAE, kl_weight
from dermkit.train.finetune import build_model
from dermkit.train.settings import FinetuneRunConfig

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _tiny_overrides(phantom_root, cache_dir, out):
    return [f"data.path={phantom_root}", f"data.cache_dir={cache_dir}", f"out_dir={out}"]


@pytest.fixture(scope="module")
def mae_run(phantom_root, cache_dir, tmp_path_factory):
    """A finished `dermkit pretrain mae --preset tiny` run folder on the phantoms."""
    out = tmp_path_factory.mktemp("mae") / "run"
    result = _invoke(
        "pretrain", "mae", "--preset", "tiny", *_tiny_overrides(phantom_root, cache_dir, out)
    )
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- MAE model


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 80),
    ratio=st.floats(0.0, 0.95, allow_nan=False),
)
def test_masking_keeps_exactly_the_requested_share_per_sample(batch, tokens, ratio):
    keep = round(tokens * (1 - ratio))
    # tokens whose features are their own index, so gathered rows show which were kept
    x = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1).repeat(batch, 1, 3)
    if keep < 1:
        with pytest.raises(ValueError, match="no visible patch"):
            random_masking(x, ratio)
        return
    visible, mask, ids_restore = random_masking(x, ratio)
    assert visible.shape == (batch, keep, 3)
    assert (mask.sum(1) == tokens - keep).all()  # per sample, not on average
    for b in range(batch):
        kept = visible[b, :, 0].long()
        assert sorted(kept.tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
        assert sorted(ids_restore[b].tolist()) == list(range(tokens))


def test_masks_differ_between_samples():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(8, 64, 4), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    mae = MaskedAutoencoder("vit_nano_patch4_32", 32, decoder_dim=32, decoder_heads=2)
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = mae(imgs)
    assert pred.shape == (3, 64, 4 * 4 * 3) and mask.shape == (3, 64)
    base = mae.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(base, loss)
    visible = (mask == 0).unsqueeze(-1)
    at_visible = pred + 5.0 * visible
    at_hidden = pred + 5.0 * ~visible
    torch.testing.assert_close(mae.forward_loss(imgs, at_visible, mask), base)
    assert mae.forward_loss(imgs, at_hidden, mask) > base + 1.0
    # without norm_pix_loss the target is the raw patch: a perfect prediction scores 0
    mae.norm_pix_loss = False
    assert mae.forward_loss(imgs, mae.patchify(imgs), mask) == 0


def test_encoder_sees_only_visible_patches_and_matches_timm():
    torch.manual_seed(0)
    mae = MaskedAutoencoder("vit_nano_patch4_32", 32, decoder_dim=32, decoder_heads=2).eval()
    imgs = torch.randn(2, 3, 32, 32)
    latent, _, _ = mae.forward_encoder(imgs, 0.75)
    assert latent.shape == (2, 1 + 16, 64)  # class token + 25% of 64 patches
    torch.testing.assert_close(mae.unpatchify(mae.patchify(imgs)), imgs)
    # With nothing masked the tokens are only shuffled, and attention does not care about
    # order: the class token must equal timm's own forward_features.
    latent, _, _ = mae.forward_encoder(imgs, 0.0)
    reference = mae.encoder.forward_features(imgs)
    torch.testing.assert_close(latent[:, 0], reference[:, 0], atol=1e-5, rtol=1e-4)


def test_visible_only_patch_embedding_equals_embedding_everything():
    torch.manual_seed(0)
    mae = MaskedAutoencoder("vit_nano_patch4_32", 32, decoder_dim=32, decoder_heads=2)
    assert mae.embed_visible_only  # timm's conv PatchEmbed qualifies
    imgs = torch.randn(3, 3, 32, 32)
    ids_keep = torch.stack([torch.randperm(64)[:16] for _ in range(3)])
    full = mae.encoder.patch_embed(imgs)  # (3, 64, D)
    expected = torch.stack([full[b, ids_keep[b]] for b in range(3)])
    torch.testing.assert_close(mae.embed_patches(imgs, ids_keep), expected, atol=1e-5, rtol=1e-5)
    # the whole step (same masks): loss and every gradient as with the full conv
    results = []
    for visible_only in (True, False):
        mae.embed_visible_only = visible_only
        mae.zero_grad()
        torch.manual_seed(1)
        loss = mae(imgs)[0]
        loss.backward()
        grad = mae.encoder.patch_embed.proj.weight.grad.clone()
        results.append((loss.detach(), grad, mae.encoder.blocks[0].attn.qkv.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- MAE run


def test_pretrain_mae_cli_writes_grid_weights_and_probe(mae_run):
    assert sorted(p.name for p in (mae_run / "grids").glob("*.png")) == [
        "epoch-001.png",
        "epoch-002.png",
    ]
    assert (mae_run / "grids" / "epoch-001.png").read_bytes().startswith(b"\x89PNG")
    metrics = json.loads((mae_run / "metrics.json").read_text())
    probe = metrics["probe"]
    for key in ("linear_val_macro_f1", "knn_val_macro_f1"):
        assert 0 <= probe[key] <= 1
    assert probe["feature_dim"] == 64 and probe["k"] == 20
    info = json.loads((mae_run / "encoder.json").read_text())
    assert info["backbone"] == "vit_nano_patch4_32" and info["img_size"] == 32
    history = json.loads((mae_run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) for r in history)
    report = (mae_run / "report.html").read_text()
    assert "Frozen-feature probes" in report and report.count("data:image/png;base64") >= 3
    # only the encoder, with timm keys
    keys = set(load_file(mae_run / "model.safetensors"))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= keys
    assert not any(k.startswith(("decoder", "mask_token", "encoder.")) for k in keys)


def test_exported_mae_encoder_loads_into_finetune_model(mae_run):
    cfg = FinetuneRunConfig.model_validate(
        {
            "data": {"image_size": 32},
            "model": {"name": "vit_nano_patch4_32", "weights": str(mae_run)},
        }
    )
    model, text = build_model(cfg, n_classes=7)
    report = load_pretrained(model, mae_run)
    assert report.ok and not report.unexpected and not report.shape_mismatch
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert "pos_embed" not in " ".join(report.adapted)  # same grid: nothing resampled
    # the encoder tensors are exactly those of the MAE's final training checkpoint
    ckpt = sorted((mae_run / "checkpoints").glob("step-*"))[-1]
    trained = load_file(ckpt / "model.safetensors")
    state = model.state_dict()
    for key, value in trained.items():
        if key.startswith("encoder."):
            torch.testing.assert_close(state[key.removeprefix("encoder.")], value, rtol=0, atol=0)
    assert "weights from" in text


def test_resume_of_a_finished_run_does_not_retrain(mae_run, phantom_root, cache_dir):
    ckpt_dir = mae_run / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*") if p.is_file()}
    log_before = (mae_run / "log.jsonl").read_text()
    weights_before = load_file(mae_run / "model.safetensors")
    result = _invoke(
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--resume",
        *_tiny_overrides(phantom_root, cache_dir, mae_run),
    )
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*") if p.is_file()} == before
    assert (mae_run / "log.jsonl").read_text() == log_before
    after = load_file(mae_run / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_resume_after_kill_matches_uninterrupted_run(
    phantom_root, cache_dir, tmp_path, monkeypatch
):
    import dermkit.ssl.pretrain as pretrain
    import dermkit.train.engine as engine

    def config(out):
        return load_config(
            MaePretrainRunConfig,
            "pretrain_mae",
            "tiny",
            overrides=[*_tiny_overrides(phantom_root, cache_dir, out), "checkpoint_every=3"],
        )

    pretrain.run_pretrain_mae(config(tmp_path / "whole"), progress=False)

    class KilledError(Exception):
        pass

    real_save = engine.save_checkpoint  # the engine writes every method's checkpoints

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real_save(ckpt_dir, step, *args, **kwargs)
        if step == 3:  # mid-epoch 0 (5 steps per epoch)
            raise KilledError("simulated kill")
        return path

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KilledError):
        pretrain.run_pretrain_mae(config(tmp_path / "killed"), progress=False)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    pretrain.run_pretrain_mae(config(tmp_path / "killed"), resume=True, progress=False)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)
    h1 = json.loads((tmp_path / "whole" / "history.json").read_text())
    h2 = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [r["train_loss"] for r in h2] == pytest.approx([r["train_loss"] for r in h1], abs=1e-6)


def test_probe_cli_reports_val_and_test(mae_run, phantom_root, cache_dir):
    result = _invoke(
        "probe",
        "--weights",
        mae_run,
        "--preset",
        "tiny",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["model"] == "vit_nano_patch4_32" and out["weights_ok"]
    for key in ("linear_val_macro_f1", "linear_test_macro_f1", "knn_test_macro_f1"):
        assert 0 <= out[key] <= 1
    assert out["n_test"] > 0
    missing_model = _invoke("probe", "--weights", mae_run / "model.safetensors", "--preset", "tiny")
    assert missing_model.exit_code == 2 and "--model" in missing_model.output


def test_bench_mae_cli_reports_the_ratio(phantom_root, cache_dir):
    result = _invoke(
        "bench",
        "mae",
        "--preset",
        "tiny",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        "--steps",
        1,
        "--rounds",
        1,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    assert out["patches"] == 64 and out["visible_patches"] == 16
    assert out["mae_images_per_s"] > 0 and out["supervised_images_per_s"] > 0
    ratio = out["mae_images_per_s"] / out["supervised_images_per_s"]
    assert out["ratio_mae_over_supervised"] == pytest.approx(ratio, rel=0.01)


# ----------------------------------------------------------------------------- VAE


def test_kl_warmup_is_linear():
    assert [kl_weight(s, 2.0, 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight(0, 2.0, 0) == 2.0


def test_vae_reconstruction_beats_the_mean_image(phantom_root, cache_dir):
    data = prepare_data(DataConfig(path=str(phantom_root), image_size=32, cache_dir=str(cache_dir)))
    train = CachedImageDataset(data.cache, data.part("train"), data.classes)
    val = CachedImageDataset(data.cache, data.part("val"), data.classes)
    x_train = to_float(train.__getitems__(np.arange(len(train)))[0])
    x_val = to_float(val.__getitems__(np.arange(len(val)))[0])
    baseline = (x_val - x_train.mean(0, keepdim=True)).pow(2).mean().item()

    torch.manual_seed(0)
    vae = ConvVAE("vae_encoder_32", 32, beta=1.0, kl_warmup_steps=20)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)

    def val_mse() -> float:
        vae.eval()
        with torch.no_grad():
            return (vae(x_val)[2] - x_val).pow(2).mean().item()

    assert val_mse() > baseline  # untrained: worse than predicting the mean image
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        vae.train()
        loss, logs, _ = vae(x_train[torch.randint(0, len(x_train), (32,), generator=gen)], step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert logs["kl"] > 0 and logs["beta"] == 1.0
    assert val_mse() < 0.7 * baseline
    assert vae.sample(3).shape == (3, 3, 32, 32)


def test_pretrain_vae_encoder_loads_into_the_backbone(phantom_root, cache_dir, tmp_path):
    from dermkit.ssl.pretrain import run_pretrain_vae

    out = tmp_path / "vae"
    cfg = load_config(
        VaePretrainRunConfig,
        "pretrain_vae",
        "tiny",
        overrides=_tiny_overrides(phantom_root, cache_dir, out),
    )
    run_pretrain_vae(cfg, progress=False)
    assert (out / "grids" / "epoch-002.png").exists()
    assert 0 <= json.loads((out / "metrics.json").read_text())["probe"]["linear_val_macro_f1"] <= 1
    model = create_backbone("vae_encoder_32", num_classes=7, img_size=32)
    report = load_pretrained(model, out)
    assert report.ok and not report.unexpected
    assert set(report.missing) == {"head.weight", "head.bias"}
    saved = load_file(out / "model.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    # features are the pooled posterior mean
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    mu = model.forward_features(x)
    assert mu.shape == (2, 16, 8, 8)
    torch.testing.assert_close(model.forward_head(mu, pre_logits=True), mu.mean((2, 3)))
    assert model(x).shape == (2, 7)


def test_vae_encoder_variants_are_timm_like_backbones():
    model = create_backbone("vae_encoder_64", num_classes=7, img_size=64, drop_path_rate=0.1)
    assert model.num_features == 64 and model.num_classes == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3) and model.num_classes == 3
    with pytest.raises(ValueError, match="dermkit_vae_encoder variant"):
        ConvVAE("vit_nano_patch4_32", 32)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_presets_resolve_with_the_mae_recipe(preset):
    mae = load_config(MaePretrainRunConfig, "pretrain_mae", preset)
    assert mae.optim.betas == (0.9, 0.95) and mae.optim.weight_decay == 0.05
    assert mae.mae.mask_ratio == 0.75
    vae = load_config(VaePretrainRunConfig, "pretrain_vae", preset)
    assert vae.model.name.startswith("vae_encoder_")
    if preset == "gpu":
        assert mae.model.name == "vit_huge_patch14_224" and mae.data.image_size == 224
        assert (mae.mae.decoder_depth, mae.mae.decoder_dim) == (8, 512)
        assert mae.optim.base_lr == 1.5e-4


@pytest.mark.slow
def test_gpu_preset_mae_one_step_on_cpu():
    """Paper scale: ViT-H/14 MAE at 224 px, one AdamW step at batch 1; prints peak RSS."""
    from timm.optim import create_optimizer_v2

    cfg = load_config(MaePretrainRunConfig, "pretrain_mae", "gpu")
    torch.manual_seed(0)
    mae = MaskedAutoencoder.from_config(cfg)
    encoder_params = sum(p.numel() for p in mae.encoder.parameters())
    assert 630e6 < encoder_params < 634e6
    opt = create_optimizer_v2(
        mae, "adamw", lr=1e-4, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
    )
    loss, _, mask = mae(torch.randn(1, 3, 224, 224))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and mask.sum() == 256 - 64
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\nViT-H/14 MAE step, batch 1, fp32 AdamW: peak RSS {peak_gib:.2f} GiB per sample")
    assert peak_gib < 16
