"""dermkit's backbone variants are timm architectures: ``timm.create_model`` builds them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from dermkit.models.backbones import create_backbone
from dermkit.models.registry import BackboneVariant, get_variant, list_variants, register_variant


@pytest.mark.parametrize("name", [n for n in list_variants() if n != "vit_huge_patch14_224"])
def test_timm_create_model_builds_the_same_model_as_create_backbone(name):
    variant = get_variant(name)
    torch.manual_seed(0)
    ours = timm.create_model(name, num_classes=7)
    reference = create_backbone(name, num_classes=7, img_size=variant.img_size)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    x = torch.zeros(2, 3, variant.img_size, variant.img_size)
    assert ours.eval()(x).shape == (2, 7)


def test_the_variant_changes_survive_timm_create_model():
    resnet = timm.create_model("resnet18d_64", num_classes=3)
    assert isinstance(resnet.maxpool, nn.Identity)  # stem max-pool removed (adapt)
    vit = timm.create_model("vit_tiny_patch8_64", num_classes=3)
    assert vit.patch_embed.patch_size == (8, 8) and vit.patch_embed.img_size == (64, 64)
    wider = timm.create_model("vit_tiny_patch8_64", num_classes=3, img_size=128)
    assert wider.patch_embed.grid_size == (16, 16)  # a caller's kwargs win


def test_listing_and_refusals():
    assert {"resnet18_64", "resnet18d_64", "vit_tiny_patch8_64"} <= set(timm.list_models("*_64"))
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("resnet18_64", pretrained=True)
    # timm's own architecture keeps timm's entrypoint (not replaced by dermkit's variant).
    assert timm.models.get_arch_name("vit_huge_patch14_224") == "vit_huge_patch14_224"
    assert "vision_transformer" in timm.models.model_entrypoint("vit_huge_patch14_224").__module__


def test_a_registered_variant_becomes_a_timm_model_too():
    name = "resnet18_test_variant_32"
    register_variant(name, BackboneVariant("resnet18", {}, 32, "tiny", "test only", adapt=None))
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=2).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_a_fresh_process_gets_the_variants_from_importing_the_registry_alone():
    code = (
        "import timm, dermkit.models.registry\n"
        "m = timm.create_model('vae_encoder_32')\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "VaeEncoder"
