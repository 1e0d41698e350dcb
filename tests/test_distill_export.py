"""Distillation (KD loss, ``dermkit distill``), ONNX/INT8 export, model card, latency bench."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from dermkit.cli import app
from dermkit.core.onnx import cpu_session
from dermkit.deploy.export import export_onnx, run_onnx, torch_logits
from dermkit.deploy.model_card import ModelCard, validate_card_json
from dermkit.models.backbones import create_backbone
from dermkit.models.runs_io import load_run_model
from dermkit.train.kd import KDLoss

runner = CliRunner()
NO_AUGMENT = [
    "augment.flip=false",
    "augment.rot90=false",
    "augment.max_rotate_deg=0",
    "augment.max_scale=0",
    "augment.max_translate=0",
    "augment.brightness=0",
    "augment.contrast=0",
    "augment.saturation=0",
    "augment.hue=0",
]


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


# ----------------------------------------------------------------------------- KD loss


def test_kd_loss_is_cross_entropy_when_alpha_is_zero():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 7, generator=gen), torch.randn(16, 7, generator=gen)
    labels = torch.randint(0, 7, (16,), generator=gen)
    kd = KDLoss(alpha=0.0, temperature=4.0)
    assert torch.allclose(kd(student, teacher, labels), F.cross_entropy(student, labels))
    # the teacher plays no part at alpha 0
    assert torch.allclose(kd(student, teacher * 5 + 1, labels), kd(student, teacher, labels))
    smooth = KDLoss(alpha=0.0, temperature=2.0, label_smoothing=0.1)
    expected = F.cross_entropy(student, labels, label_smoothing=0.1)
    assert torch.allclose(smooth(student, teacher, labels), expected)
    soft_targets = F.one_hot(labels, 7).float() * 0.6 + 0.4 / 7  # mixup-style targets
    assert torch.allclose(
        kd(student, teacher, soft_targets), F.cross_entropy(student, soft_targets)
    )


def test_kd_loss_at_alpha_one_is_minimised_by_the_teacher_logits():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (8,), generator=gen)
    kd = KDLoss(alpha=1.0, temperature=3.0)

    same = teacher.clone().requires_grad_(True)
    loss = kd(same, teacher, labels)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert same.grad.abs().max().item() < 1e-6

    other = (teacher + torch.randn(8, 7, generator=gen)).requires_grad_(True)
    worse = kd(other, teacher, labels)
    worse.backward()
    assert worse.item() > 1e-2
    assert other.grad.abs().max().item() > 1e-4
    # the value is T^2 * KL(p_teacher || p_student), mean over the batch
    p_t = (teacher / 3).softmax(1)
    kl = (p_t * (p_t.log() - (other.detach() / 3).log_softmax(1))).sum(1).mean()
    assert torch.allclose(worse.detach(), 9 * kl, atol=1e-5)
    # a constant shift of the student's logits changes nothing (softmax is shift-invariant)
    assert kd(teacher + 2.5, teacher, labels).item() < 1e-6


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_distill_presets_build_their_student(preset):
    from dermkit.config import load_config
    from dermkit.train.distill import resolve_teacher_logits
    from dermkit.train.finetune import build_model
    from dermkit.train.settings import DistillRunConfig

    cfg = load_config(DistillRunConfig, "distill", preset)
    model, _ = build_model(cfg, n_classes=7)
    size = cfg.data.image_size
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, size, size)).shape == (1, 7)
    mode, reason = resolve_teacher_logits(cfg)
    assert mode == "online" and reason  # every preset augments


def test_model_cost_counts_flops_of_a_known_network():
    from dermkit.models.cost import model_cost

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16 * 16, 7),
    )
    cost = model_cost(net, 16)
    conv = 2 * (3 * 9) * 8 * 16 * 16  # multiply-adds per output value x outputs x 2
    linear = 2 * (8 * 16 * 16) * 7
    assert cost["gflops"] == pytest.approx((conv + linear) / 1e9)
    assert cost["params"] == (3 * 9 * 8 + 8) + (8 * 16 * 16 * 7 + 7)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def teacher_run(phantom_root, cache_dir, tmp_path_factory):
    """A tiny fine-tune run, trained long enough to predict several classes."""
    out = tmp_path_factory.mktemp("teacher")
    _invoke(
        "finetune",
        "--preset",
        "tiny",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=10",
        "train_eval_images=0",
        "eval.n_boot=20",
    )
    return out


@pytest.fixture(scope="module")
def student_run(teacher_run, phantom_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    result = _invoke(
        "distill",
        "--preset",
        "tiny",
        f"teacher={teacher_run}",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "eval.n_boot=20",
    )
    assert result.stdout.strip().endswith("report.html")
    return out


def test_distill_end_to_end_from_a_tiny_finetune_run(teacher_run, student_run):
    metrics = json.loads((student_run / "metrics.json").read_text())
    info = metrics["distillation"]
    # tiny preset trains with augmentation, so auto must have chosen online teacher logits
    assert info["teacher_logits"] == "online"
    assert "augmentation is on" in info["teacher_logits_reason"]
    assert info["student_model"] == "vit_nano_patch4_32"
    assert info["cost"]["student"]["params"] < info["cost"]["teacher"]["params"]
    # teacher metrics are recomputed on the same test images and match the teacher's run
    teacher_metrics = json.loads((teacher_run / "metrics.json").read_text())["metrics"]
    for name in ("macro_f1", "balanced_accuracy", "macro_auroc"):
        assert info["teacher_metrics"][name]["value"] == pytest.approx(
            teacher_metrics[name]["value"], abs=1e-6
        )
    html = (student_run / "report.html").read_text()
    assert "macro_f1: teacher | student" in html
    assert "online (auto: augmentation is on" in html
    assert (student_run / "teacher_vs_student.png").stat().st_size > 0
    # the student run folder is itself a loadable classifier run
    model, cfg, classes = load_run_model(student_run)
    assert cfg.model.name == "vit_nano_patch4_32"
    assert classes == json.loads((teacher_run / "classes.json").read_text())
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, len(classes))


def test_run_classes_fall_back_to_metrics_then_predictions(teacher_run, tmp_path):
    import shutil

    from dermkit.models.runs_io import read_run_classes

    expected = json.loads((teacher_run / "classes.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "classes.json").unlink()
    assert read_run_classes(run) == expected  # from metrics.json
    (run / "metrics.json").unlink()
    assert read_run_classes(run) == expected  # from predictions_test.csv
    assert load_run_model(run)[2] == expected
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_run_model(run)
    (run / "predictions_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"classes\.json"):
        read_run_classes(run)


def _distill_args(teacher_run, phantom_root, cache_dir, out, *extra):
    return [
        "distill",
        "--preset",
        "tiny",
        f"teacher={teacher_run}",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=1",
        "eval.n_boot=0",
        *extra,
    ]


def test_cached_teacher_logits_are_refused_with_augmentation(
    teacher_run, phantom_root, cache_dir, tmp_path
):
    # cached targets are the clean images' logits: wrong for augmented views, so refused
    args = _distill_args(
        teacher_run, phantom_root, cache_dir, tmp_path / "bad", "distill.teacher_logits=cached"
    )
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2
    assert "distill.teacher_logits=cached needs augmentation off" in bad.output
    assert not (tmp_path / "bad").exists()


ORDINAL_TASK = ["task.kind=ordinal", "task.column=thickness", "task.thresholds=[0, 0.8, 1, 2]"]


def _unwrapped(output: str) -> str:
    """The CLI's error message with the console's line wrapping turned back into spaces."""
    return " ".join(output.split())


def test_distill_refuses_an_ordinal_student_of_a_classification_teacher(
    teacher_run, phantom_root, cache_dir, tmp_path
):
    # softmax KD targets mean nothing to a CORN head: refused before any work
    args = _distill_args(teacher_run, phantom_root, cache_dir, tmp_path / "out", *ORDINAL_TASK)
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2, bad.output
    text = _unwrapped(bad.output)
    assert "task.kind differs" in text
    assert "task.kind=classification" in text and "task.kind=ordinal" in text
    assert str(teacher_run) in text.replace(" ", "")
    assert not (tmp_path / "out").exists()


def test_distill_refuses_an_ordinal_teacher_for_a_classification_student(
    phantom_root, cache_dir, tmp_path
):
    """A teacher trained with task.kind=ordinal (CORN head, K-1 outputs) teaches only an
    ordinal student (tests/test_distill_options.py); a classification student is refused by
    name, before the teacher's weights are loaded."""
    from dermkit.config import load_config, save_config
    from dermkit.train.settings import FinetuneRunConfig

    teacher = tmp_path / "ordinal_teacher"
    cfg = load_config(FinetuneRunConfig, "finetune", "tiny", overrides=ORDINAL_TASK)
    save_config(cfg, teacher / "config.yaml")
    (teacher / "run.json").write_text(json.dumps({"stage": "finetune"}))
    (teacher / "classes.json").write_text(json.dumps(["<=0", "0-0.8", "0.8-1", "1-2", ">2"]))
    model = create_backbone(cfg.model.name, num_classes=4, img_size=cfg.data.image_size)
    from safetensors.torch import save_file

    save_file(model.state_dict(), teacher / "model.safetensors")  # K-1 = 4 CORN outputs

    bad = runner.invoke(app, _distill_args(teacher, phantom_root, cache_dir, tmp_path / "out"))
    assert bad.exit_code == 2, bad.output
    text = _unwrapped(bad.output)
    assert "task.kind=ordinal" in text and str(teacher) in text.replace(" ", "")
    assert "task.kind differs" in text and "this run has task.kind=classification" in text
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_teacher_with_other_classes(
    teacher_run, phantom_root, cache_dir, tmp_path
):
    """Student data mapped to benign/malignant vs a 7-class teacher: a clear error naming the
    teacher run, both class lists and the fields to check."""
    import yaml

    malignant = {"mel", "bcc", "akiec"}
    teacher_classes = json.loads((teacher_run / "classes.json").read_text())
    label_map = tmp_path / "binary.yaml"
    label_map.write_text(
        yaml.safe_dump({c: "malignant" if c in malignant else "benign" for c in teacher_classes})
    )
    args = _distill_args(
        teacher_run, phantom_root, cache_dir, tmp_path / "out", f"data.label_map={label_map}"
    )
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2, bad.output
    text = _unwrapped(bad.output)
    assert "classes differ" in text and str(teacher_run) in text.replace(" ", "")
    assert "['benign', 'malignant']" in text and str(teacher_classes) in text
    assert "data.label_map" in text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_ensemble_folder_teaches_as_its_predictions_say(
    teacher_run, student_run, phantom_root, cache_dir, tmp_path
):
    """`dermkit ensemble A B` is a teacher: the distill run re-scores the ensemble on the
    test images and gets the ensemble's own test metrics (so the module reproduces the
    geometric mean of the members' decision-rule probabilities), and its cost is the sum
    of the members'. A broken member path is named with its field."""
    ens = tmp_path / "ens"
    _invoke("ensemble", teacher_run, student_run, "--out", ens, "--select", "all", "--n-boot", 20)
    out = tmp_path / "out"
    _invoke(*_distill_args(ens, phantom_root, cache_dir, out))
    info = json.loads((out / "metrics.json").read_text())["distillation"]
    assert info["teacher_model"].startswith("ensemble(") and " + " in info["teacher_model"]
    assert [m["weight"] for m in info["teacher_members"]] == [1, 1]
    ensemble_metrics = json.loads((ens / "metrics.json").read_text())["metrics"]
    for name in ("macro_f1", "balanced_accuracy", "accuracy"):
        assert info["teacher_metrics"][name]["value"] == pytest.approx(
            ensemble_metrics[name]["value"], abs=1e-6
        )
    single = json.loads((student_run / "metrics.json").read_text())["distillation"]["cost"]
    assert info["cost"]["teacher"]["gflops"] == pytest.approx(
        single["teacher"]["gflops"] + single["student"]["gflops"]
    )

    spec = json.loads((ens / "ensemble.json").read_text())
    spec["members"][1]["run"] = str(tmp_path / "gone")
    (ens / "ensemble.json").write_text(json.dumps(spec))
    bad = runner.invoke(app, _distill_args(ens, phantom_root, cache_dir, tmp_path / "out2"))
    assert bad.exit_code != 0
    text = _unwrapped(bad.output)
    assert "members[1].run" in text and "gone" in text


def test_an_ensemble_fingerprint_follows_its_members_rules(teacher_run, student_run, tmp_path):
    """Cached teacher logits are keyed by the fingerprint: an ensemble's output goes through
    each member's decision rule, so a refitted rule must change it (stale logits otherwise)."""
    import shutil

    from dermkit.train.teacher import open_teacher

    members = [shutil.copytree(r, tmp_path / r.name) for r in (teacher_run, student_run)]
    ens = tmp_path / "ens"
    _invoke("ensemble", *members, "--out", ens, "--select", "all", "--n-boot", 20)
    before = open_teacher(ens).fingerprint()
    assert open_teacher(ens).fingerprint() == before  # deterministic
    rule_file = members[0] / "decision.json"
    rule = json.loads(rule_file.read_text())
    rule["temperature"] *= 2
    rule_file.write_text(json.dumps(rule))
    assert open_teacher(ens).fingerprint() != before


def test_an_ensemble_teacher_refuses_feature_matching(
    teacher_run, student_run, phantom_root, cache_dir, tmp_path
):
    ens = tmp_path / "ens"
    _invoke("ensemble", teacher_run, student_run, "--out", ens, "--select", "all", "--n-boot", 20)
    args = _distill_args(ens, phantom_root, cache_dir, tmp_path / "out", "distill.feature_weight=1")
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2, bad.output
    assert "is an ensemble" in _unwrapped(bad.output)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_dihedral_mean_teacher_is_the_same_for_every_flip_and_rotation(teacher_run):
    from dermkit.eval.inference import dihedral_views
    from dermkit.train.teacher import open_teacher

    teacher = open_teacher(teacher_run).module("imagenet").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([teacher(v) for v in dihedral_views(x)]).mean(0)
        for view in dihedral_views(x)[1:]:
            other = torch.stack([teacher(v) for v in dihedral_views(view)]).mean(0)
            torch.testing.assert_close(other, mean, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(teacher(x), mean, atol=1e-3)  # the mean is not one view


def test_cached_dihedral_logits_train_with_flips_and_refuse_other_augmentation(
    teacher_run, phantom_root, cache_dir, tmp_path
):
    """The run's once-per-run check compares the cache with the live dihedral mean of a
    flipped/rotated batch, so a wrong table fails the run; colour jitter is refused."""
    dihedral_only = [a for a in NO_AUGMENT if not a.startswith(("augment.flip", "augment.rot90"))]
    mode = "distill.teacher_logits=cached-dihedral"
    out = tmp_path / "dihedral"
    _invoke(*_distill_args(teacher_run, phantom_root, cache_dir, out, *dihedral_only, mode))
    info = json.loads((out / "metrics.json").read_text())["distillation"]
    assert info["teacher_logits"] == "cached-dihedral"
    assert Path(info["teacher_logits_file"]).exists()
    assert Path(info["teacher_logits_file"]).parent == Path(cache_dir) / "teacher_logits"
    jitter = [a for a in dihedral_only if not a.startswith("augment.brightness")]
    bad = runner.invoke(
        app, _distill_args(teacher_run, phantom_root, cache_dir, tmp_path / "bad", *jitter, mode)
    )
    assert bad.exit_code == 2
    assert "brightness" in _unwrapped(bad.output) and "flip/rot90" in _unwrapped(bad.output)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cached_teacher_logits_train_the_same_student_as_online(
    teacher_run, phantom_root, cache_dir, tmp_path
):
    auto, online = tmp_path / "auto", tmp_path / "online"
    _invoke(*_distill_args(teacher_run, phantom_root, cache_dir, auto, *NO_AUGMENT))
    _invoke(
        *_distill_args(
            teacher_run,
            phantom_root,
            cache_dir,
            online,
            *NO_AUGMENT,
            "distill.teacher_logits=online",
        )
    )
    info = json.loads((auto / "metrics.json").read_text())["distillation"]
    assert info["teacher_logits"] == "cached"  # auto, since augmentation is off
    assert Path(info["teacher_logits_file"]).exists()  # beside the image cache, shared
    assert "teacher logits" in (auto / "report.html").read_text()
    cached, live = load_file(auto / "model.safetensors"), load_file(online / "model.safetensors")
    for key, value in cached.items():
        torch.testing.assert_close(value, live[key], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "resnet18_64"])
def test_onnx_fp32_parity_with_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=7, img_size=32).eval()
    path = export_onnx(model, 32, tmp_path / "model.onnx")
    session = cpu_session(path)
    for batch in (1, 5):  # exported with batch 2: the batch axis must be dynamic
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        diff = np.abs(run_onnx(session, x) - torch_logits(model, x)).max()
        assert diff < 1e-4, (name, batch, diff)


@pytest.fixture(scope="module")
def teacher_export(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    _invoke("export", teacher_run, "--out", out, "--int8", "both")
    return out


def test_export_parity_int8_agreement_and_sizes(teacher_run, teacher_export, cache_dir):
    from dermkit.data.dataset import CachedImageDataset
    from dermkit.data.prepare import prepare_data
    from dermkit.data.transforms import to_float

    report = json.loads((teacher_export / "export.json").read_text())
    files = report["files"]
    assert set(files) == {"fp32", "dynamic", "static"}
    metrics = json.loads((teacher_export / "metrics.json").read_text())  # as the pipeline's
    assert metrics["files"] == files and (teacher_export / "report.html").is_file()
    assert files["fp32"]["max_abs_logit_diff"] < 1e-4
    assert files["fp32"]["prediction_agreement"] == 1.0
    for mode in ("dynamic", "static"):
        assert files[mode]["size_bytes"] < files["fp32"]["size_bytes"] / 2.5
        assert files[mode]["prediction_agreement"] >= 0.98

    # INT8 agreement on every phantom image (val alone is ~20 images): a real check only if
    # the FP32 model predicts several classes and INT8 actually changes the logits.
    model, cfg, _ = load_run_model(teacher_run)
    data = prepare_data(cfg.data)
    ds = CachedImageDataset(data.cache, data.manifest, data.classes)
    x = to_float(ds.__getitems__(np.arange(len(ds)))[0]).numpy()
    reference = torch_logits(model, x)
    assert len(np.unique(reference.argmax(1))) >= 3
    for mode in ("dynamic", "static"):
        logits = run_onnx(cpu_session(teacher_export / files[mode]["file"]), x)
        assert np.abs(logits - reference).max() > 1e-3  # really quantised
        agreement = (logits.argmax(1) == reference.argmax(1)).mean()
        assert agreement >= 0.98, (mode, agreement)


def test_model_card_validates_and_a_missing_field_fails(teacher_export):
    card = json.loads((teacher_export / "model_card.json").read_text())
    schema = json.loads((teacher_export / "model_card.schema.json").read_text())
    validate_card_json(card, schema)
    ModelCard.model_validate(card)
    assert card["preprocessing"]["input_layout"] == "NCHW"
    assert card["preprocessing"]["image_size"] == 32
    assert "does not diagnose" in card["not_a_diagnosis"]
    assert {f["format"] for f in card["files"]} == {
        "onnx-fp32",
        "onnx-int8-dynamic",
        "onnx-int8-static-qdq",
    }
    assert set(card["evaluation"]["metrics"]) >= {"macro_f1", "balanced_accuracy"}
    assert card["evaluation"]["metrics"]["macro_f1"]["ci_low"] is not None
    broken = {k: v for k, v in card.items() if k != "not_a_diagnosis"}
    with pytest.raises(jsonschema.ValidationError, match="not_a_diagnosis"):
        validate_card_json(broken, schema)
    with pytest.raises(ValidationError, match="not_a_diagnosis"):
        ModelCard.model_validate(broken)
    nested = json.loads(json.dumps(card))
    del nested["preprocessing"]["std"]
    with pytest.raises(jsonschema.ValidationError, match="std"):
        validate_card_json(nested, schema)


# ----------------------------------------------------------------------------- latency


def test_bench_latency_times_an_ensemble_teacher_as_all_its_members(
    teacher_run, student_run, tmp_path
):
    ens = tmp_path / "ens"
    _invoke("ensemble", teacher_run, student_run, "--out", ens, "--select", "all", "--n-boot", 20)
    out = tmp_path / "latency"
    args = ["--teacher", ens, "--student", student_run, "--out", out, "--rounds", 1, "--calls", 1]
    _invoke("bench", "latency", *args)
    teacher, student = json.loads((out / "latency.json").read_text())["rows"][:2]
    single = json.loads((student_run / "metrics.json").read_text())["distillation"]["cost"]
    assert teacher["architecture"].startswith("ensemble(")
    assert teacher["params"] == single["teacher"]["params"] + single["student"]["params"]
    assert teacher["params"] > student["params"]


def test_bench_latency_has_all_four_rows(teacher_run, student_run, tmp_path):
    out = tmp_path / "latency"
    result = _invoke(
        "bench",
        "latency",
        "--teacher",
        teacher_run,
        "--student",
        student_run,
        "--out",
        out,
        "--rounds",
        "2",
        "--calls",
        "2",
    )
    rows = json.loads((out / "latency.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "teacher PyTorch FP32",
        "student PyTorch FP32",
        "student ONNX FP32",
        "student ONNX INT8 (dynamic)",
    ]
    teacher, student, onnx_fp32, onnx_int8 = rows
    assert teacher["params"] > student["params"] == onnx_fp32["params"]
    assert teacher["gflops_per_image"] > student["gflops_per_image"] > 0
    assert onnx_int8["size_mb"] < onnx_fp32["size_mb"]
    for row in rows:
        assert 0 < row["latency_b1_p50_ms"] <= row["latency_b1_p90_ms"]
        assert row["throughput_b32_img_s"] > 0
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 5  # header + four rows
    assert (out / "latency.md").read_text().startswith("| model |")
