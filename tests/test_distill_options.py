"""Distillation options: DeiT distillation token, feature/attention matching, ordinal KD."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.config import ConfigError, load_config
from dermkit.models.backbones import create_backbone
from dermkit.models.distilled import DistilledViT, create_distilled_vit, load_plain_vit_state
from dermkit.models.runs_io import load_run_model
from dermkit.tasks.ordinal import corn_class_probs, corn_loss
from dermkit.train.distill_student import (
    DistillStudent,
    attention_kl,
    cls_to_patch_attention,
    feature_matching_loss,
    last_block_attention,
    teacher_outputs,
)
from dermkit.train.kd import KDLoss, OrdinalKDLoss
from dermkit.train.settings import DistillRunConfig

runner = CliRunner()
ORDINAL_TASK = ["task.kind=ordinal", "task.column=thickness", "task.thresholds=[0, 0.8, 1, 2]"]
ORDINAL_CLASSES = ["<=0", "0-0.8", "0.8-1", "1-2", ">2"]


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _fails(*args) -> str:
    """Run a CLI command that must fail as bad input; its message, line wrapping undone."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    return " ".join(result.output.split())


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- token model


def test_distilled_vit_outputs_the_mean_of_its_two_heads():
    torch.manual_seed(0)
    model = create_distilled_vit("vit_nano_patch4_32", num_classes=7, img_size=32).eval()
    x = _images()
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 2 + 64, 64) and model.num_prefix_tokens == 2
    cls_logits, dist_logits = model.forward_heads(tokens)
    assert not torch.allclose(cls_logits, dist_logits, atol=1e-3)  # two different heads
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    # the CLS head reads token 0, the distillation head token 1
    torch.testing.assert_close(cls_logits, model.vit.head(tokens[:, 0]))
    torch.testing.assert_close(dist_logits, model.head_dist(tokens[:, 1]))
    keys = set(model.state_dict())
    assert {"vit.reg_token", "vit.cls_token", "head_dist.weight", "vit.head.weight"} <= keys
    # the optimiser factory keeps the tokens out of weight decay through the wrapper
    assert {"vit.cls_token", "vit.reg_token", "vit.pos_embed"} <= model.no_weight_decay()


def test_distilled_vit_is_a_backbone_for_early_exits():
    from dermkit.exits.model import EarlyExitModel

    torch.manual_seed(0)
    model = create_distilled_vit("vit_micro_patch4_32", num_classes=5, img_size=32).eval()
    exits = EarlyExitModel(model, [2], "linear").eval()
    x = _images()
    with torch.no_grad():
        per_exit = exits.forward_all(x)
        torch.testing.assert_close(per_exit[-1], model(x))  # last exit = the model itself
    assert per_exit[0].shape == (3, 5)


def test_plain_vit_weights_fill_the_distilled_vit():
    torch.manual_seed(0)
    plain = create_backbone("vit_nano_patch4_32", num_classes=7, img_size=32)
    model = create_distilled_vit("vit_nano_patch4_32", num_classes=7, img_size=32)
    token_before = model.vit.reg_token.detach().clone()
    load_plain_vit_state(model, plain.state_dict())
    pos, plain_pos = model.vit.pos_embed.detach(), plain.pos_embed.detach()
    torch.testing.assert_close(pos[:, 0], plain_pos[:, 0])
    torch.testing.assert_close(pos[:, 1], plain_pos[:, 0])  # CLS's position row, copied
    torch.testing.assert_close(pos[:, 2:], plain_pos[:, 1:])
    for key, value in plain.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(model.vit.state_dict()[key], value)
    torch.testing.assert_close(model.vit.reg_token.detach(), token_before)
    other = create_backbone("vit_micro_patch4_32", num_classes=7, img_size=32)
    with pytest.raises(ValueError, match="do not fit"):
        load_plain_vit_state(model, other.state_dict())


def test_dist_token_refuses_a_cnn_student():
    from dermkit.train.distill import build_student

    cfg = load_config(
        DistillRunConfig,
        "distill",
        "tiny",
        overrides=["model.name=resnet18_64", "distill.dist_token=true"],
    )
    with pytest.raises(ConfigError, match=r"dist_token=true needs a ViT student.*resnet18_64"):
        build_student(cfg, 7)
    vit = load_config(DistillRunConfig, "distill", "tiny", overrides=["distill.dist_token=true"])
    student, _ = build_student(vit, 7)
    assert isinstance(student, DistilledViT) and student.num_classes == 7


# ----------------------------------------------------------------------------- losses


def test_kd_loss_with_a_distillation_head_and_hard_teacher_targets():
    gen = torch.Generator().manual_seed(2)
    cls_logits, dist_logits, teacher = (torch.randn(8, 5, generator=gen) for _ in range(3))
    labels = torch.randint(0, 5, (8,), generator=gen)
    soft = KDLoss(alpha=0.6, temperature=2.0)
    expected = 0.6 * soft.soft_term(dist_logits, teacher) + 0.4 * F.cross_entropy(
        cls_logits, labels
    )
    torch.testing.assert_close(
        soft(cls_logits, teacher, labels, student_dist=dist_logits), expected
    )
    # DeiT's hard distillation: cross-entropy on the teacher's argmax
    hard = KDLoss(alpha=0.5, temperature=2.0, teacher_target="hard")
    expected = 0.5 * F.cross_entropy(dist_logits, teacher.argmax(1)) + 0.5 * F.cross_entropy(
        cls_logits, labels
    )
    torch.testing.assert_close(
        hard(cls_logits, teacher, labels, student_dist=dist_logits), expected
    )
    with pytest.raises(ValueError, match="teacher_target"):
        KDLoss(0.5, 2.0, teacher_target="argmax")


def test_ordinal_kd_loss_is_minimised_at_the_teachers_conditional_probabilities():
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(16, 4, generator=gen) * 2  # K-1 = 4 conditional logits
    labels = torch.randint(0, 5, (16,), generator=gen)
    kd = OrdinalKDLoss(alpha=1.0, temperature=2.0)

    same = teacher.clone().requires_grad_(True)
    best = kd(same, teacher, labels)
    best.backward()
    assert same.grad.abs().max().item() < 1e-7  # stationary at the teacher's logits
    p = torch.sigmoid(teacher / 2)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(best.detach(), 4 * entropy)  # T^2 * mean BCE, BCE = entropy here
    for scale in (0.1, 0.5, 2.0):  # every other student costs more
        other = teacher + scale * torch.randn(16, 4, generator=gen)
        assert kd(other, teacher, labels).item() > best.item() + 1e-6
    moved = (teacher + 1.0).requires_grad_(True)
    kd(moved, teacher, labels).backward()
    assert moved.grad.abs().min().item() > 1e-4

    # alpha 0: plain CORN on the labels; hard teacher target: CORN on the teacher's class
    torch.testing.assert_close(
        OrdinalKDLoss(0.0, 2.0)(moved.detach(), teacher, labels), corn_loss(moved.detach(), labels)
    )
    hard = OrdinalKDLoss(1.0, 2.0, teacher_target="hard")
    teacher_class = corn_class_probs(teacher).argmax(1)
    torch.testing.assert_close(
        hard(moved.detach(), teacher, labels), corn_loss(moved.detach(), teacher_class)
    )


def test_feature_and_attention_matching_are_zero_only_for_the_teachers_own_outputs():
    torch.manual_seed(0)
    student = create_backbone("vit_nano_patch4_32", num_classes=7, img_size=32)
    trainee = DistillStudent(student, teacher_features=64, attention=True).train()
    with torch.no_grad():  # identity projection between equal widths
        trainee.projection.weight.copy_(torch.eye(64))
        trainee.projection.bias.zero_()
    x = _images(4)
    out = trainee(x)
    assert set(out) == {"logits", "features", "attention"}
    assert out["attention"].shape == (4, 64)
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(4))

    same = teacher_outputs(copy.deepcopy(student).eval(), x, features=True, attention=True)
    torch.testing.assert_close(out["logits"], same["logits"])
    assert feature_matching_loss(out["features"], same["features"]).item() < 1e-12
    assert abs(attention_kl(out["attention"], same["attention"]).item()) < 1e-6

    torch.manual_seed(1)
    other = create_backbone("vit_nano_patch4_32", num_classes=7, img_size=32).eval()
    different = teacher_outputs(other, x, features=True, attention=True)
    f_loss = feature_matching_loss(out["features"], different["features"])
    a_loss = attention_kl(out["attention"], different["attention"])
    assert f_loss.item() > 1e-4 and a_loss.item() > 1e-6
    (f_loss + a_loss).backward()  # both reach the student and the projection
    assert trainee.projection.weight.grad.abs().max() > 0
    assert student.blocks[-1].attn.qkv.weight.grad.abs().max() > 0
    # eval mode: the plain student's logits; the projection is not part of the student
    trainee.eval()
    torch.testing.assert_close(trainee(x), student.eval()(x))
    assert not any("projection" in k for k in student.state_dict())


def test_attention_kl_and_the_hooked_attention_maps():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(5, 16, generator=gen)
    b = torch.rand(5, 16, generator=gen)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    assert abs(attention_kl(a, a).item()) < 1e-7
    expected = (b * (b.log() - a.log())).sum(1).mean()  # KL(teacher b || student a)
    torch.testing.assert_close(attention_kl(a, b), expected)

    # the hook reads timm's softmax, and leaves the model's output and kernel unchanged
    torch.manual_seed(0)
    model = create_distilled_vit("vit_nano_patch4_32", num_classes=3, img_size=32).eval()
    x = _images(2)
    attn = model.blocks[-1].attn
    fused = attn.fused_attn
    with torch.no_grad():
        reference = model(x)
        with last_block_attention(model) as maps:
            hooked = model(x)
    torch.testing.assert_close(hooked, reference)
    assert len(maps) == 1 and maps[0].shape == (2, 2, 66, 66)  # heads 2, CLS + dist + 64
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 66))
    assert attn.fused_attn == fused and not attn.attn_drop._forward_hooks  # restored
    row = cls_to_patch_attention(maps[0], model.num_prefix_tokens)
    manual = maps[0][:, :, 0, 2:].mean(1)
    torch.testing.assert_close(row, manual / manual.sum(1, keepdim=True))


def test_feature_matching_needs_online_teacher_logits():
    from dermkit.train.distill import resolve_teacher_logits

    cfg = load_config(DistillRunConfig, "distill", "tiny", overrides=["distill.feature_weight=1"])
    mode, reason = resolve_teacher_logits(cfg)
    assert mode == "online" and "distill.feature_weight=1.0" in reason
    no_augment = ["augment.flip=false", "augment.rot90=false", "augment.max_rotate_deg=0"]
    no_augment += ["augment.max_scale=0", "augment.max_translate=0"]
    no_augment += [f"augment.{n}=0" for n in ("brightness", "contrast", "saturation", "hue")]
    overrides = ["distill.attention_weight=1", "distill.teacher_logits=cached", *no_augment]
    cfg = load_config(DistillRunConfig, "distill", "tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=r"stores logits only.*attention_weight=1\.0"):
        resolve_teacher_logits(cfg)
    cfg.distill.attention_weight = 0  # without matching, clean images allow cached logits
    assert resolve_teacher_logits(cfg)[0] == "cached"


# ----------------------------------------------------------------------------- runs


def _distill(teacher, phantom_root, cache_dir, out, *extra):
    return [
        "distill",
        "--preset",
        "tiny",
        f"teacher={teacher}",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=1",
        "eval.n_boot=0",
        "train_eval_images=0",
        *extra,
    ]


def test_dist_token_student_with_matching_trains_loads_and_exports(
    tiny_classifier_run, phantom_root, cache_dir, tmp_path
):
    """One tiny run with every option: token, feature and attention matching."""
    from dermkit.deploy.export import export_run

    out = tmp_path / "student"
    options = ["distill.dist_token=true", "distill.feature_weight=0.5"]
    options.append("distill.attention_weight=0.5")
    _invoke(*_distill(tiny_classifier_run, phantom_root, cache_dir, out, *options))

    info = json.loads((out / "metrics.json").read_text())["distillation"]
    assert (
        info["dist_token"] and info["feature_weight"] == 0.5 and info["teacher_logits"] == "online"
    )
    weights = load_file(out / "model.safetensors")
    assert "head_dist.weight" in weights and "vit.reg_token" in weights
    assert not any("projection" in k for k in weights)  # training-only
    trained = load_file(out / "best.safetensors")  # the loop's selection: wrapper + projection
    assert "projection.weight" in trained and trained["projection.weight"].shape == (96, 64)

    model, cfg, _ = load_run_model(out)
    assert isinstance(model, DistilledViT) and cfg.distill.dist_token
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value)
    x = _images(4)
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(model.forward_features(x))
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)

    report = export_run(out, tmp_path / "export", int8=None, n_parity=16, n_calibration=0)
    fp32 = report["files"]["fp32"]
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["prediction_agreement"] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["distill.dist_token=true", "model.name=resnet18_64"],
            "distill.dist_token=true needs a ViT student",
        ),
        (
            ["distill.attention_weight=1", "data.image_size=16"],
            "needs the same number of patch tokens: the teacher vit_micro_patch4_32 has 64",
        ),
    ],
)
def test_options_that_cannot_apply_are_refused_before_any_work(
    tiny_classifier_run, phantom_root, cache_dir, tmp_path, extra, message
):
    out = tmp_path / "out"
    text = _fails(*_distill(tiny_classifier_run, phantom_root, cache_dir, out, *extra))
    assert message in text
    assert not out.exists()


# ----------------------------------------------------------------------------- ordinal


@pytest.fixture(scope="module")
def melanoma_root(tmp_path_factory):
    """Melanoma-only phantoms (the shared set has ~13 melanomas, too few Breslow depths)."""
    from dermkit.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("melanoma")
    generate_phantoms(
        root,
        n_lesions=160,
        views_per_lesion=(1, 2),
        image_size=(64, 48),
        class_weights={"mel": 1.0},
        seed=2,
    )
    return root


NO_COLOUR_JITTER = ["augment.brightness=0", "augment.contrast=0", "augment.saturation=0"]
NO_COLOUR_JITTER.append("augment.hue=0")  # the phantoms encode depth mostly in colour


@pytest.fixture(scope="module")
def ordinal_teacher(melanoma_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ordinal-teacher")
    _invoke(
        "finetune",
        "--preset",
        "tiny",
        f"data.path={melanoma_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "data.near_duplicate_distance=-1",
        "optim.epochs=4",
        "optim.base_lr=0.01",
        "train_eval_images=0",
        "eval.n_boot=0",
        *NO_COLOUR_JITTER,
        *ORDINAL_TASK,
    )
    return out


def test_ordinal_distill_on_phantom_thickness(ordinal_teacher, melanoma_root, cache_dir, tmp_path):
    out = tmp_path / "student"
    _invoke(
        *_distill(ordinal_teacher, melanoma_root, cache_dir, out, *ORDINAL_TASK),
        "data.near_duplicate_distance=-1",
        "optim.epochs=3",
        "optim.base_lr=0.01",
        "eval.n_boot=20",
        *NO_COLOUR_JITTER,
    )
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    for name in ("qwk", "spearman", "mae_classes"):
        assert m[name]["value"] is not None and m[name]["ci_low"] is not None, (name, m)
    teacher = result["distillation"]["teacher_metrics"]
    assert set(teacher) == set(m) and teacher["qwk"]["value"] is not None
    # the teacher's numbers are recomputed on the same test images as its own run's
    own = json.loads((ordinal_teacher / "metrics.json").read_text())["metrics"]
    assert teacher["qwk"]["value"] == pytest.approx(own["qwk"]["value"], abs=1e-6)
    # selection on val QWK of the CORN probabilities
    history = result["history"]
    best = max(range(len(history)), key=lambda i: history[i]["val_qwk"])
    assert result["best epoch (val QWK)"] == history[best]["epoch"]

    assert json.loads((out / "classes.json").read_text()) == ORDINAL_CLASSES
    assert load_file(out / "model.safetensors")["head.weight"].shape[0] == 4  # K-1 outputs
    preds = pd.read_csv(out / "predictions_test.csv")
    probs = preds[[f"prob_{c}" for c in ORDINAL_CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert "ordinal_truth" in preds and (out / "ordinal.json").exists()
    evaluated = _invoke("evaluate", out, "--n-boot", "0")  # the evaluate command reads it
    assert "qwk" in evaluated.output


def test_ordinal_distill_refuses_other_task_definitions(
    ordinal_teacher, tiny_classifier_run, melanoma_root, phantom_root, cache_dir, tmp_path
):
    out = tmp_path / "out"
    other = ["task.kind=ordinal", "task.column=thickness", "task.thresholds=[0, 1, 2]"]
    text = _fails(*_distill(ordinal_teacher, melanoma_root, cache_dir, out, *other))
    assert "ordinal definitions differ" in text and "task.thresholds" in text
    assert "[0.0, 0.8, 1.0, 2.0]" in text and "[0.0, 1.0, 2.0]" in text
    assert str(ordinal_teacher) in text.replace(" ", "")
    other = ["task.kind=ordinal", "task.column=age", "task.thresholds=[0, 0.8, 1, 2]"]
    text = _fails(*_distill(ordinal_teacher, melanoma_root, cache_dir, out, *other))
    assert "task.column: teacher 'thickness', this run 'age'" in text
    # kinds differ, in both directions
    text = _fails(*_distill(ordinal_teacher, melanoma_root, cache_dir, out))
    assert "task.kind differs" in text and "task.kind=ordinal" in text
    text = _fails(*_distill(tiny_classifier_run, phantom_root, cache_dir, out, *ORDINAL_TASK))
    assert "task.kind differs" in text and "task.kind=classification" in text
    assert not out.exists()
