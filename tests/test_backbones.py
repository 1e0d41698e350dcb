"""dermkit.models: backbone factory, variant registry, local weights with a key report."""

from __future__ import annotations

import argparse
import socket
import time

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dermkit.models.backbones import create_backbone, describe, feature_dim
from dermkit.models.registry import VARIANTS, list_variants
from dermkit.models.weights import WeightsError, load_pretrained, save_weights

MICRO = "vit_micro_patch4_32"  # width 96, 4 blocks, patch 4 at 32 px


def _micro(num_classes: int = 7, img_size: int = 32, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_backbone(MICRO, num_classes=num_classes, img_size=img_size, **kwargs).eval()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", [n for n in list_variants() if VARIANTS[n].preset != "gpu"])
def test_every_small_variant_builds_and_classifies_at_its_resolution(name):
    size = VARIANTS[name].img_size
    model = create_backbone(name, num_classes=5, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    assert pooled.shape == (2, feature_dim(model))
    info = describe(model)
    assert info["name"] == name and info["img_size"] == size and info["num_classes"] == 5
    assert info["timm_name"] == VARIANTS[name].timm_name


def test_registered_shapes_are_what_the_registry_promises():
    teacher = create_backbone("vit_tiny_patch8_64", num_classes=7, img_size=64)
    student = create_backbone("vit_student_patch8_64", num_classes=7, img_size=64)
    assert (teacher.embed_dim, len(teacher.blocks), teacher.blocks[0].attn.num_heads) == (
        192,
        12,
        3,
    )
    assert teacher.patch_embed.grid_size == (8, 8)
    assert (student.embed_dim, len(student.blocks)) == (128, 6)
    assert describe(student)["params"] < describe(teacher)["params"] / 3


def test_gpu_preset_vit_huge_builds_and_runs_one_forward_at_224():
    """ViT-H/14 at 224 px: built through the factory, one forward pass at batch 1 on CPU.

    Built on the meta device and materialised with zeros: torch's random init of 632 M
    weights alone takes ~13 s on 2 cores and is not what this test is about.
    """
    (name,) = list_variants("gpu")
    with torch.device("meta"):
        model = create_backbone(name, num_classes=7, img_size=224)
    info = describe(model)
    assert 625e6 < info["params"] < 640e6  # ViT-H/14 has 632 M parameters (Dosovitskiy et al.)
    assert (model.embed_dim, len(model.blocks), model.patch_embed.grid_size) == (1280, 32, (16, 16))
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
        start = time.perf_counter()
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert time.perf_counter() - start < 60  # ~3 s on 2 cores; far over means something broke


@pytest.mark.parametrize(
    ("name", "pooled_width"),
    [("vit_tiny_patch16_224", 192), ("efficientnet_b0", 1280), ("mobilenetv3_small_100", 1024)],
)
def test_any_timm_name_builds_at_a_small_resolution(name, pooled_width):
    model = create_backbone(name, num_classes=3, img_size=64, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, pooled_width) and feature_dim(model) == pooled_width
    if name.startswith("vit"):  # img_size reaches the ViT: 64 px / 16 = a 4x4 grid
        assert model.patch_embed.grid_size == (4, 4)


def test_forward_intermediates_for_vit_and_cnn():
    vit = _micro()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, blocks = vit.forward_intermediates(x)
    assert len(blocks) == VARIANTS[MICRO].kwargs["depth"]
    assert all(b.shape == (2, 96, 8, 8) for b in blocks)
    assert final.shape == (2, 65, 96)  # class token + 8x8 patches

    cnn = create_backbone("resnet18_64", num_classes=7, img_size=64).eval()
    plain = timm.create_model("resnet18", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, stages = cnn.forward_intermediates(x)
        _, plain_stages = plain.forward_intermediates(x)
    assert [s.shape[-1] for s in stages] == [32, 32, 16, 8, 4]  # stem pool removed
    assert [s.shape[-1] for s in plain_stages] == [32, 16, 8, 4, 2]  # timm's ImageNet stem
    assert [f["reduction"] for f in cnn.feature_info] == [2, 2, 4, 8, 16]


def test_bad_names_and_arguments_are_refused():
    with pytest.raises(ValueError, match="vit_tiny_patch8_64"):
        create_backbone("vit_tiny_patch8_46", num_classes=7, img_size=64)
    with pytest.raises(ValueError, match="never downloads"):
        create_backbone("hf-hub:timm/vit_tiny_patch16_224", num_classes=7, img_size=64)
    with pytest.raises(ValueError, match="never downloads"):
        create_backbone("vit_tiny_patch8_64", num_classes=7, img_size=64, pretrained=True)
    with pytest.raises(ValueError, match="multiple of its patch size"):
        create_backbone("vit_tiny_patch8_64", num_classes=7, img_size=60)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_reproduces_outputs_exactly(tmp_path):
    for name, size in [(MICRO, 32), ("resnet18_64", 64)]:
        torch.manual_seed(0)
        src = create_backbone(name, num_classes=7, img_size=size)
        with torch.no_grad():  # move BatchNorm running stats off their defaults
            src.train()(torch.randn(4, 3, size, size))
        src.eval()
        path = save_weights(src, tmp_path / f"{name}.safetensors")
        torch.manual_seed(1)
        dst = create_backbone(name, num_classes=7, img_size=size).eval()
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            assert not _same(src(x), dst(x))
            report = load_pretrained(dst, path)
            assert _same(src(x), dst(x))
        assert report.ok and not report.missing and not report.unexpected
        assert report.loaded == report.total == len(src.state_dict())
        assert "[ok]" in str(report)


def test_save_weights_is_safetensors_only_and_atomic(tmp_path, monkeypatch):
    model = _micro()
    path = save_weights(model, tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="safetensors"):
        save_weights(model, tmp_path / "w.pth")

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_weights(_micro(seed=3), path)
    assert path.read_bytes() == before  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp left


def test_save_weights_keeps_every_key_of_tied_tensors(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(4, 4, bias=False)
            self.decode = nn.Linear(4, 4, bias=False)
            self.decode.weight = self.encode.weight

    model = Tied()
    path = save_weights(model, tmp_path / "tied.safetensors")
    stored = safetensors.torch.load_file(str(path))
    assert set(stored) == {"encode.weight", "decode.weight"}
    assert _same(stored["decode.weight"], model.encode.weight.detach())


def test_mae_checkpoint_with_module_prefix_and_decoder(tmp_path):
    encoder = _micro(num_classes=0, seed=0)  # an MAE encoder has no classifier
    state = {f"module.{k}": v for k, v in encoder.state_dict().items()}
    decoder_keys = [
        "module.decoder_embed.weight",
        "module.decoder_pred.weight",
        "module.mask_token",
    ]
    decoder_keys += [f"module.decoder_blocks.{i}.mlp.fc1.weight" for i in range(8)]
    state.update({k: torch.randn(3, 3) for k in decoder_keys})
    ckpt = {"model": state, "epoch": 799, "args": argparse.Namespace(mask_ratio=0.75)}
    torch.save(ckpt, tmp_path / "mae.pth")

    model = _micro(num_classes=7, seed=1)
    report = load_pretrained(model, tmp_path / "mae.pth")

    assert sorted(report.dropped) == sorted(k.removeprefix("module.") for k in decoder_keys)
    assert report.unexpected == [] and report.shape_mismatch == []
    assert sorted(report.missing) == ["head.bias", "head.weight"] and report.ok
    text = str(report)
    assert "'model'" in text and "module." in text and "MAE" in text
    loaded = model.state_dict()
    for k, v in encoder.state_dict().items():
        assert _same(loaded[k], v), k


def test_encoder_prefix_is_stripped_even_with_a_larger_decoder(tmp_path):
    """dermkit-style MAE file: ``encoder.*`` next to a decoder with more blocks than the encoder."""
    encoder = _micro(num_classes=0, seed=0)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    # decoder blocks named like encoder blocks: stripping "decoder." would match model keys
    state.update({f"decoder.{k}": torch.zeros_like(v) for k, v in encoder.state_dict().items()})
    state.update({f"decoder.blocks.{i}.norm1.weight": torch.zeros(96) for i in range(4, 8)})
    safetensors.torch.save_file(state, str(tmp_path / "mae.safetensors"))

    model = _micro(num_classes=7, seed=1)
    report = load_pretrained(model, tmp_path / "mae.safetensors")
    assert report.ok and report.unexpected == []
    assert all(k.startswith("decoder.") for k in report.dropped)
    assert any("'encoder.'" in a for a in report.adapted)
    for k, v in encoder.state_dict().items():
        assert _same(model.state_dict()[k], v), k


def test_new_num_classes_drops_the_head_and_says_so(tmp_path):
    for name, size, head in [(MICRO, 32, "head"), ("resnet18_64", 64, "fc")]:
        torch.manual_seed(0)
        src = create_backbone(name, num_classes=7, img_size=size)
        path = save_weights(src, tmp_path / f"{name}.safetensors")
        dst = create_backbone(name, num_classes=3, img_size=size)
        report = load_pretrained(dst, path)
        assert sorted(report.missing) == [f"{head}.bias", f"{head}.weight"]
        assert sorted(report.dropped) == [f"{head}.bias", f"{head}.weight"]
        assert report.ok and any("num_classes" in a for a in report.adapted)
        assert dst.get_classifier().weight.shape[0] == 3
        for k, v in src.state_dict().items():
            if not k.startswith(head + "."):
                assert _same(dst.state_dict()[k], v), k


def test_new_img_size_resamples_pos_embed_and_reports_it(tmp_path):
    src = _micro(img_size=32)
    with torch.no_grad():  # a constant grid part: any real interpolation keeps it constant
        src.pos_embed[:, 1:] = 0.25
    path = save_weights(src, tmp_path / "w32.safetensors")
    dst = _micro(img_size=48, seed=1)
    report = load_pretrained(dst, path)

    assert report.ok and report.shape_mismatch == []
    assert any(a.startswith("pos_embed (1, 65, 96) -> (1, 145, 96)") for a in report.adapted)
    assert dst.pos_embed.shape == (1, 145, 96)
    assert _same(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class-token slot untouched
    assert torch.allclose(dst.pos_embed[:, 1:], torch.full((1, 144, 96), 0.25), atol=1e-5)
    assert _same(dst.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    with torch.no_grad():
        assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_new_patch_size_resamples_the_patch_kernel(tmp_path):
    """FlexiViT resize: a patch upsampled 4->8 px embeds like the original 4 px patch."""
    src = _micro(img_size=32)  # patch 4, 8x8 grid
    path = save_weights(src, tmp_path / "p4.safetensors")
    dst = _micro(img_size=64, patch_size=8, seed=1)  # patch 8, same 8x8 grid
    report = load_pretrained(dst, path)
    assert report.ok
    assert any(
        a.startswith("patch_embed.proj.weight (96, 3, 4, 4) -> (96, 3, 8, 8)")
        for a in report.adapted
    )

    x = torch.randn(2, 3, 32, 32)
    patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2).reshape(-1, 3, 4, 4)
    big = F.interpolate(patches, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    x_big = F.fold(big.reshape(2, 64, -1).transpose(1, 2), (64, 64), kernel_size=8, stride=8)
    with torch.no_grad():
        want, got = src.patch_embed(x), dst.patch_embed(x_big)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())


def test_grey_input_adapts_the_first_conv(tmp_path):
    torch.manual_seed(0)
    rgb = create_backbone("resnet18_64", num_classes=7, img_size=64).eval()
    path = save_weights(rgb, tmp_path / "rgb.safetensors")
    grey = create_backbone("resnet18_64", num_classes=7, img_size=64, in_chans=1).eval()
    report = load_pretrained(grey, path)
    assert report.ok and any("conv1.weight: 3 -> 1" in a for a in report.adapted)
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # summed RGB kernels: a grey image reads as grey in all 3 channels
        assert torch.allclose(grey(g), rgb(g.repeat(1, 3, 1, 1)), atol=1e-5)


def test_missing_block_is_reported_and_strict_refuses(tmp_path):
    src = _micro()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    safetensors.torch.save_file(state, str(tmp_path / "partial.safetensors"))
    removed = sorted(k for k in src.state_dict() if k.startswith("blocks.1."))

    dst = _micro(seed=1)
    untouched = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsError, match=r"blocks\.1\."):
        load_pretrained(dst, tmp_path / "partial.safetensors", strict=True)
    assert all(_same(dst.state_dict()[k], v) for k, v in untouched.items())

    report = load_pretrained(dst, tmp_path / "partial.safetensors")
    assert sorted(report.missing) == removed
    assert not report.ok and "INCOMPLETE" in str(report)
    assert _same(dst.blocks[1].attn.qkv.weight, untouched["blocks.1.attn.qkv.weight"])
    assert _same(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_strict_refuses_unexpected_keys(tmp_path):
    state = dict(_micro().state_dict())
    state["projector.weight"] = torch.zeros(2, 2)
    safetensors.torch.save_file(state, str(tmp_path / "extra.safetensors"))
    report = load_pretrained(_micro(seed=1), tmp_path / "extra.safetensors")
    assert report.unexpected == ["projector.weight"] and report.ok
    with pytest.raises(WeightsError, match=r"projector\.weight"):
        load_pretrained(_micro(seed=1), tmp_path / "extra.safetensors", strict=True)


# --------------------------------------------------------------------------- torch files


def test_pth_state_dict_loads_with_weights_only(tmp_path):
    src = _micro()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    x = torch.randn(2, 3, 32, 32)
    for name in ("w.pth", "wrapped.pt"):
        dst = _micro(seed=1)
        report = load_pretrained(dst, tmp_path / name)
        assert report.ok and report.loaded == report.total
        with torch.no_grad():
            assert _same(dst(x), src(x))


_CALLED: list[str] = []


def _side_effect(tag: str) -> str:
    _CALLED.append(tag)
    return tag


class _CodeOnUnpickle:
    def __reduce__(self):
        return (_side_effect, ("unpickled",))


def test_pickle_with_an_arbitrary_object_is_refused_without_running_it(tmp_path):
    torch.save({"state_dict": _micro().state_dict(), "hook": _CodeOnUnpickle()}, tmp_path / "x.pth")
    _CALLED.clear()
    with pytest.raises(WeightsError, match=r"weights_only=True") as err:
        load_pretrained(_micro(seed=1), tmp_path / "x.pth")
    assert "x.pth" in str(err.value) and "_side_effect" in str(err.value)
    assert _CALLED == []


# --------------------------------------------------------------------------- run folders, hub


def test_run_folder_prefers_encoder_safetensors(tmp_path):
    run = tmp_path / "run"
    encoder, classifier = _micro(seed=0), _micro(seed=5)
    save_weights(classifier, run / "model.safetensors")
    save_weights(encoder, run / "encoder.safetensors")
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name": MICRO}, "data": {"image_size": 32}})
    )
    dst = _micro(seed=9)
    report = load_pretrained(dst, run)
    assert report.source.endswith("encoder.safetensors")
    assert any("trained as vit_micro_patch4_32 at 32 px" in a for a in report.adapted)
    assert _same(dst.blocks[0].mlp.fc1.weight, encoder.blocks[0].mlp.fc1.weight)

    (run / "encoder.safetensors").unlink()
    load_pretrained(dst, run)
    assert _same(dst.blocks[0].mlp.fc1.weight, classifier.blocks[0].mlp.fc1.weight)

    (run / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="not a dermkit run folder"):
        load_pretrained(dst, run)


def test_weights_argument_of_the_factory_loads_a_run(tmp_path):
    src = _micro(seed=0)
    save_weights(src, tmp_path / "run" / "model.safetensors")
    dst = create_backbone(MICRO, num_classes=7, img_size=32, weights=tmp_path / "run").eval()
    assert dst.dermkit_weights_report.ok
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert _same(dst(x), src(x))


@pytest.mark.parametrize(
    "source",
    [
        "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
        "timm/vit_tiny_patch16_224.augreg_in21k",
        "vit_tiny_patch16_224",
        "https://example.org/vit_tiny.pth",
    ],
)
def test_hub_names_fail_at_once_without_network(source, monkeypatch):
    attempts = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    model = _micro()
    with pytest.raises(WeightsError, match="local file") as err:
        load_pretrained(model, source)
    assert "never downloads" in str(err.value) and "save_file" in str(err.value)
    with pytest.raises(WeightsError, match="local file"):
        create_backbone(MICRO, num_classes=7, img_size=32, weights=source)
    assert attempts == []


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.safetensors.*no such local file"):
        load_pretrained(_micro(), tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors"):
        load_pretrained(_micro(), tmp_path / "junk.safetensors")
