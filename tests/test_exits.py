"""Early exits: heads, the wrapper, the policy and its calibration, dropping inference, ONNX.

Model-level tests use tiny random ViTs on random 32 px tensors; the stage tests train a
2-block ViT on the phantom dataset, then exit heads, calibrate and bench them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from dermkit.exits.heads import HEAD_TYPES, MLPPooledHead, SSMHead
from dermkit.exits.infer import exit_gflops, predict_early_exit, predict_reference
from dermkit.exits.model import EarlyExitModel, default_exit_blocks
from dermkit.exits.policy import (
    NEVER,
    ExitPolicy,
    calibrate,
    confidence,
    macro_f1,
    parse_objective,
)
from dermkit.models.backbones import create_backbone

C = 7


def _vit(name="vit_micro_patch4_32", size=32, seed=0):
    torch.manual_seed(seed)
    return create_backbone(name, num_classes=C, img_size=size).eval()


def _model(head_type="linear", seed=0) -> EarlyExitModel:
    """vit_micro (4 blocks) with exits after blocks 2 and 3, random weights, eval mode."""
    model = EarlyExitModel(_vit(seed=seed), None, head_type, C, {"ssm_d_model": 16})
    torch.manual_seed(seed + 1)
    for p in model.heads.parameters():  # random heads: confident enough to differ per sample
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _images(n=24, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _mid_thresholds(model, x, measure="max_prob"):
    """Thresholds halfway between two neighbouring confidences: about half leave early."""
    with torch.no_grad():
        per_exit = [lg.numpy() for lg in model.forward_all(x)]
    out = []
    for lg in per_exit[:-1]:
        conf = np.sort(confidence(lg, measure)[0])
        k = len(conf) // 2
        out.append(float((conf[k - 1] + conf[k]) / 2))
    return out, per_exit


# ----------------------------------------------------------------------------- model


def test_default_exit_blocks_latter_half():
    assert default_exit_blocks(12) == [6, 8, 10]
    assert default_exit_blocks(6) == [3, 4, 5]
    assert default_exit_blocks(2) == [1]
    with pytest.raises(ValueError):
        default_exit_blocks(1)


@pytest.mark.parametrize(
    ("name", "size", "blocks"),
    [
        ("vit_nano_patch4_32", 32, (1,)),
        ("vit_tiny_patch8_64", 64, (6, 8, 10)),
        ("vit_student_patch8_64", 64, (3, 4, 5)),
    ],
)
def test_wrapper_final_exit_is_the_backbone_for_every_dermkit_vit(name, size, blocks):
    backbone = _vit(name, size)
    model = EarlyExitModel(backbone, head_type="linear").eval()
    assert model.exit_blocks == blocks
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        outs = model.forward_all(x)
        plain = backbone(x)
    assert len(outs) == len(blocks) + 1
    assert all(o.shape == (3, C) for o in outs)
    torch.testing.assert_close(outs[-1], plain)


def test_wrapper_rejects_unknown_backbones_and_bad_exits():
    with pytest.raises(TypeError, match="VisionTransformer"):
        EarlyExitModel(create_backbone("resnet18", num_classes=C, img_size=32))
    with pytest.raises(ValueError, match="exit_blocks"):
        EarlyExitModel(_vit(), exit_blocks=[4])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_every_head_type_maps_tokens_to_logits(head_type):
    model = _model(head_type)
    with torch.no_grad():
        outs = model.forward_all(_images(4))
    assert [tuple(o.shape) for o in outs] == [(4, C)] * 3
    assert all(torch.isfinite(o).all() for o in outs)


def test_gflops_per_exit():
    model = _model("mlp")
    g = exit_gflops(model, 32)
    cum = np.asarray(g["cumulative_gflops"])
    assert np.all(np.diff(cum) > 0)
    assert g["block_fraction"] == [0.5, 0.75, 1.0]
    # leaving at the end costs the plain model plus the early heads (a few % here)
    assert 1.0 < g["cost_fraction"][-1] < 1.05
    assert 0.45 < g["cost_fraction"][0] < 0.6


# ----------------------------------------------------------------------------- policy


def test_thresholds_zero_every_sample_leaves_at_the_first_exit():
    model, x = _model("attention"), _images()
    policy = ExitPolicy([0.0, 0.0])
    out = predict_early_exit(model, x, policy)
    with torch.no_grad():
        first = model.forward_all(x)[0]
    assert (out.exit_index == 0).all()
    assert (out.blocks_used == 2).all()
    torch.testing.assert_close(out.logits, first)


@pytest.mark.parametrize("measure", ["max_prob", "margin", "neg_entropy"])
def test_thresholds_above_one_every_sample_leaves_last_and_equals_plain(measure):
    model, x = _model("ssm"), _images()
    policy = ExitPolicy([1.01, NEVER], measure=measure, temperatures=[0.5, 2.0, 1.0])
    out = predict_early_exit(model, x, policy)
    with torch.no_grad():
        plain = model.backbone(x)
    assert (out.exit_index == 2).all()
    assert (out.blocks_used == 4).all()
    torch.testing.assert_close(out.logits, plain)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_dropping_batched_inference_equals_one_at_a_time_and_reference(head_type):
    model, x = _model(head_type), _images(32)
    thresholds, _ = _mid_thresholds(model, x)
    policy = ExitPolicy(thresholds, temperatures=[1.0, 1.0, 1.0])
    batched = predict_early_exit(model, x, policy)
    assert len(set(batched.exit_index.tolist())) == 3  # every exit is taken by someone
    single = [predict_early_exit(model, x[i : i + 1], policy) for i in range(len(x))]
    reference = predict_reference(model, x, policy)
    one_by_one = torch.cat([s.exit_index for s in single])
    assert torch.equal(batched.exit_index, one_by_one)
    assert torch.equal(batched.exit_index, reference.exit_index)
    assert torch.equal(batched.blocks_used, torch.cat([s.blocks_used for s in single]))
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]))
    torch.testing.assert_close(batched.logits, reference.logits)


def test_protected_classes_never_leave_early():
    model, x = _model("mlp"), _images(48)
    with torch.no_grad():
        per_exit = [lg.numpy() for lg in model.forward_all(x)]
    preds = [lg.argmax(1) for lg in per_exit]
    protected = int(np.bincount(preds[0]).argmax())  # the first exit's most common answer
    policy = ExitPolicy([0.0, 0.0], protected_classes=[protected])
    out = predict_early_exit(model, x, policy)
    exit_index = out.exit_index.numpy()
    assert (exit_index[preds[0] == protected] > 0).all()
    assert (exit_index[preds[0] != protected] == 0).all()
    for i, j in enumerate(exit_index):
        if j < 2:
            assert preds[j][i] != protected
    assert np.array_equal(exit_index, policy.assign(per_exit))


def test_confidence_measures_lie_in_unit_interval_and_order():
    logits = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [2.0, 2.0, -9.0]])
    for m in ("max_prob", "margin", "neg_entropy"):
        conf, _ = confidence(logits, m)
        assert ((conf >= 0) & (conf <= 1)).all()
        assert conf[1] > conf[0]  # a peaked row is more confident than a flat one
    assert confidence(logits, "margin")[0][2] == pytest.approx(0.0, abs=1e-9)
    assert confidence(logits, "neg_entropy")[0][0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="measure"):
        confidence(logits, "energy")


# ----------------------------------------------------------------------------- calibration


def _synthetic_exits(n=600, seed=0):
    """Three exits whose accuracy rises with depth; labels (n,) over 4 classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    per_exit = []
    for signal in (1.0, 1.8, 3.0):
        per_exit.append(signal * np.eye(4)[y] + rng.normal(0, 1.0, (n, 4)))
    return per_exit, y


def _recompute(policy, per_exit, y, costs):
    logits, exit_index = policy.select(per_exit)
    f1 = f1_score(y, logits.argmax(1), average="macro")
    return f1, float(np.asarray(costs)[exit_index].mean()), exit_index


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    assert macro_f1(y, pred, 6) == pytest.approx(
        f1_score(y, pred, average="macro", labels=range(6), zero_division=0)
    )


@pytest.mark.parametrize("objective", ["f1-drop=0.02", "compute=0.6"])
def test_calibrated_operating_point_meets_its_constraint_on_val(objective):
    per_exit, y = _synthetic_exits()
    costs = [0.4, 0.7, 1.0]
    result = calibrate(per_exit, y, costs, objective, grid=30)
    f1, compute, _ = _recompute(result.policy, per_exit, y, costs)
    final_f1 = f1_score(y, per_exit[-1].argmax(1), average="macro")
    assert f1 == pytest.approx(result.macro_f1)
    assert compute == pytest.approx(result.compute)
    if objective.startswith("f1"):
        assert f1 >= final_f1 - 0.02
        assert compute < 0.9  # a real saving, not the trivial all-final policy
    else:
        assert compute <= 0.6
        # better than sending everyone to the first exit (cost 0.4), which also fits
        first_only = f1_score(y, per_exit[0].argmax(1), average="macro")
        assert f1 > first_only + 0.05


def test_calibration_respects_protected_classes_and_reports_unreachable_budgets():
    per_exit, y = _synthetic_exits()
    costs = [0.4, 0.7, 1.0]
    result = calibrate(per_exit, y, costs, "f1-drop=0.05", protected_classes=[2])
    _, _, exit_index = _recompute(result.policy, per_exit, y, costs)
    early = exit_index < 2
    preds = np.stack([lg.argmax(1) for lg in per_exit], 1)[np.arange(len(y)), exit_index]
    assert early.any() and not (preds[early] == 2).any()
    with pytest.raises(ValueError, match="least average compute"):
        calibrate(per_exit, y, costs, "compute=0.41", protected_classes=[2])


def test_parse_objective():
    assert parse_objective("f1-drop=0.01").kind == "f1_drop"
    assert parse_objective("compute=0.5").value == 0.5
    for bad in ("speed=2", "compute=0", "f1-drop"):
        with pytest.raises(ValueError):
            parse_objective(bad)


def test_policy_json_round_trip(tmp_path):
    policy = ExitPolicy([0.3, 0.9], "margin", [1.2, 0.8, 1.0], [4])
    path = policy.save(tmp_path / "p.json", ["a", "b", "c", "d", "mel", "f", "g"])
    assert json.loads(path.read_text())["protected_class_names"] == ["mel"]
    assert ExitPolicy.load(path) == policy


# ----------------------------------------------------------------------------- SSM head


def test_ssm_head_depends_on_token_order_unlike_mean_pooling():
    torch.manual_seed(0)
    ssm = SSMHead(16, 3, 1, grid=4, d_model=16, d_state=4, grid_pool=1).eval()
    mlp = MLPPooledHead(16, 3, 1, hidden=16).eval()
    tokens = torch.randn(2, 17, 16)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(16)])
    with torch.no_grad():
        assert (ssm(tokens) - ssm(tokens[:, perm])).abs().max() > 1e-3
        torch.testing.assert_close(mlp(tokens), mlp(tokens[:, perm]))


def _order_task(n, gen):
    """Label 1 when a marker token sits in the first half of the 4x4 patch grid."""
    x = 0.1 * torch.randn(n, 17, 16, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    first = torch.randint(0, 8, (n,), generator=gen)
    pos = torch.where(y == 1, first, first + 8)
    x[torch.arange(n), 1 + pos, 0] += 3.0
    return x, y


def test_ssm_head_trains_on_an_order_task_mean_pooling_cannot_solve():
    results = {}
    for name in ("ssm", "mlp"):
        torch.manual_seed(0)  # before construction: the initialisation is part of the recipe
        if name == "ssm":
            head = SSMHead(16, 2, 1, grid=4, d_model=16, d_state=4, grid_pool=1)
        else:
            head = MLPPooledHead(16, 2, 1, hidden=32)
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        losses = []
        for _ in range(150):
            x, y = _order_task(64, gen)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        head.eval()
        x, y = _order_task(512, gen)
        with torch.no_grad():
            acc = (head(x).argmax(1) == y).float().mean().item()
        results[name] = (np.mean(losses[:5]), np.mean(losses[-5:]), acc)
    first, last, acc = results["ssm"]
    assert last < 0.3 * first and acc > 0.9
    assert results["mlp"][2] < 0.65  # the order is invisible to a mean


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_onnx_segment_runner_matches_pytorch_policy(head_type, tmp_path):
    from dermkit.exits.onnx_segments import OnnxEarlyExitRunner, export_segments

    model, x = _model(head_type), _images(32)
    thresholds, _ = _mid_thresholds(model, x)
    policy = ExitPolicy(thresholds, temperatures=[0.9, 1.1, 1.0])
    folder = export_segments(model, tmp_path / "segments", 32)
    assert sorted(p.name for p in folder.glob("*.onnx")) == [f"segment_{j}.onnx" for j in range(3)]
    runner = OnnxEarlyExitRunner(folder, policy)
    logits, exit_index, blocks = runner.predict(x.numpy())
    torch_out = predict_early_exit(model, x, policy)
    assert len(set(exit_index.tolist())) == 3
    np.testing.assert_array_equal(exit_index, torch_out.exit_index.numpy())
    np.testing.assert_array_equal(blocks, torch_out.blocks_used.numpy())
    np.testing.assert_allclose(logits, torch_out.logits.numpy(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def base_run(phantom_root, cache_dir, tmp_path_factory):
    """A 2-block ViT fine-tuned for a few epochs on the phantoms (32 px)."""
    from dermkit.config import load_config
    from dermkit.train.finetune import run_finetune
    from dermkit.train.settings import FinetuneRunConfig

    out = tmp_path_factory.mktemp("exits") / "finetune"
    cfg = load_config(
        FinetuneRunConfig,
        "finetune",
        "tiny",
        overrides=[
            f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}",
            f"out_dir={out}",
            "model.name=vit_nano_patch4_32",
            "optim.epochs=3",
            "eval.n_boot=0",
        ],
    )
    run_finetune(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def exit_run(base_run, cache_dir):
    from dermkit.config import load_config
    from dermkit.exits.settings import ExitsRunConfig
    from dermkit.exits.train import run_exits_train

    cfg = load_config(
        ExitsRunConfig,
        "exits",
        "tiny",
        overrides=[
            f"base_run={base_run}",
            f"cache_dir={cache_dir}",
            f"out_dir={base_run.parent / 'exits'}",
            "optim.epochs=2",
            "exits.distill_alpha=0.5",
        ],
    )
    return run_exits_train(cfg, progress=False)


def test_exits_train_writes_a_loadable_run(exit_run):
    from dermkit.exits.run_io import ExitRun

    run = ExitRun.open(exit_run)
    assert run.head_types == list(HEAD_TYPES)
    assert run.info["exit_depths"] == [1, 2]
    for head in HEAD_TYPES:
        logits = run.logits(head)
        assert logits["val"].shape[:1] == (2,) and logits["val"].shape[2] == len(run.classes)
        model = run.model(head)
        # the saved val logits are what the loaded model computes
        data = run.data()
        from dermkit.data.dataset import CachedImageDataset
        from dermkit.data.transforms import to_float

        ds = CachedImageDataset(data.cache, data.part("val"), run.classes)
        x = to_float(ds.__getitems__(np.arange(8))[0])
        with torch.no_grad():
            outs = torch.stack(model.forward_all(x)).numpy()
        np.testing.assert_allclose(outs, logits["val"][:, :8], atol=1e-4)


def test_exits_calibrate_and_bench(exit_run):
    from dermkit.cli import app
    from dermkit.exits.bench import run_exits_bench
    from dermkit.exits.run_io import ExitRun

    runner = CliRunner()
    res = runner.invoke(
        app,
        ["exits", "calibrate", str(exit_run), "--objective", "f1-drop=0.02", "--protect", "mel"],
    )
    assert res.exit_code == 0, res.output
    run = ExitRun.open(exit_run)
    mel = run.classes.index("mel")
    for head in run.head_types:
        policy = run.policy(head)
        assert policy.protected_classes == [mel]
        lg = run.logits(head)
        y = lg["val_labels"].astype(int)
        logits, exit_index = policy.select(list(lg["val"]))
        final = macro_f1(y, lg["val"][-1].argmax(1), len(run.classes))
        assert macro_f1(y, logits.argmax(1), len(run.classes)) >= final - 0.02 - 1e-9
        early_preds = lg["val"][0].argmax(1)[exit_index == 0]
        assert not (early_preds == mel).any()

    res = runner.invoke(app, ["exits", "calibrate", str(exit_run), "--objective", "compute=0.8"])
    assert res.exit_code == 0, res.output
    summary = json.loads((exit_run / "calibration.json").read_text())
    assert summary["objective"] == "compute=0.8"
    assert sum("error" not in h for h in summary["heads"].values()) >= 2
    for head in run.head_types:
        if "error" in summary["heads"][head]:
            continue
        lg, policy = run.logits(head), run.policy(head)
        _, exit_index = policy.select(list(lg["val"]))
        assert run.costs(head)[exit_index].mean() <= 0.8 + 1e-9

    bad = runner.invoke(app, ["exits", "calibrate", str(exit_run), "--objective", "speed=2"])
    assert bad.exit_code == 2

    # the exported ONNX segments + policy.json reproduce the PyTorch early-exit answers
    from dermkit.exits.onnx_segments import OnnxEarlyExitRunner

    head = next(h for h in run.head_types if "error" not in summary["heads"][h])
    out = exit_run / "onnx"
    res = runner.invoke(app, ["exits", "export", str(exit_run), "--head", head, "--out", str(out)])
    assert res.exit_code == 0, res.output
    policy = ExitPolicy.load(out / "policy.json")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits, exit_index, _ = OnnxEarlyExitRunner(out, policy).predict(x.numpy())
    ref = predict_early_exit(run.model(head), x, policy)
    np.testing.assert_array_equal(exit_index, ref.exit_index.numpy())
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)

    report = run_exits_bench(exit_run, rounds=1, max_images=32)
    bench = json.loads((exit_run / "bench.json").read_text())
    assert report.exists() and (exit_run / "curves.png").exists()
    assert sum("error" not in h for h in bench["heads"].values()) >= 2
    metrics = json.loads((exit_run / "metrics.json").read_text())
    assert metrics["plain"] == bench["plain"]["test_metrics"]
    assert set(metrics["heads"]) == {h for h, v in bench["heads"].items() if "error" not in v}
    for head, h in bench["heads"].items():
        if "error" in h:
            continue
        assert h["online_offline_exit_agreement"] == 1.0
        assert h["wall_ms_per_image"] > 0
        assert sum(h["exit_fractions"]) == pytest.approx(1.0)
        assert len(bench["curves"][head]) == 21
    assert bench["timing"]["plain_ms_per_image"] > 0


def test_joint_mode_trains_the_backbone_too(base_run, cache_dir):
    from safetensors.torch import load_file

    from dermkit.cli import app
    from dermkit.exits.run_io import ExitRun

    out = base_run.parent / "joint"
    args = [
        "exits",
        "train",
        str(base_run),
        "--preset",
        "tiny",
        f"cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=1",
        "exits.mode=joint",
        "exits.head_types=[linear]",
        "exits.exit_loss_weights=[1.0, 2.0]",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = load_file(out / "weights_linear.safetensors")
    base = load_file(base_run / "model.safetensors")
    key = "backbone.blocks.0.attn.qkv.weight"
    assert key in saved and not torch.equal(saved[key], base["blocks.0.attn.qkv.weight"])
    run = ExitRun.open(out)
    model = run.model("linear")
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, saved[key])


def _exits_train_cmd(base_run, cache_dir, out, *extra):
    import sys

    return [
        sys.executable,
        "-m",
        "dermkit.cli",
        "exits",
        "train",
        str(base_run),
        "--preset",
        "tiny",
        f"cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=4",
        "exits.head_types=[linear, ssm]",
        "exits.distill_alpha=0.5",
        "checkpoint_every=3",  # ~4 steps per epoch: mid-epoch checkpoints too
        *extra,
    ]


@pytest.mark.slow
def test_exits_train_resume_after_sigkill_is_identical(base_run, cache_dir, tmp_path):
    """Killed with SIGKILL after a mid-run checkpoint and resumed with --resume, an exits
    run ends with bit-identical head weights, logits, history and exits.json."""
    import os
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from dermkit.cli import app
    from dermkit.train.checkpoint import latest_checkpoint

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run(_exits_train_cmd(base_run, cache_dir, ref), check=True, env=env)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_exits_train_cmd(base_run, cache_dir, run), env=env)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline:
        ckpt = latest_checkpoint(run / "checkpoints")
        if ckpt is not None:
            killed_at = int(ckpt.name.split("-")[1])
            break
        if proc.poll() is not None:
            pytest.fail("exits training finished before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_at is not None
    assert not (run / "exits.json").exists()  # it really died before the end
    state = json.loads((latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    total_steps = json.loads((ref / "history.json").read_text())[-1]["step"]
    assert 0 < state["step"] < total_steps  # the resumed run has steps left to do
    resumed = subprocess.run(
        [*_exits_train_cmd(base_run, cache_dir, run), "--resume"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert f"(step {state['step']})" in resumed.stderr  # continued, not restarted

    info, ref_info = (json.loads((d / "exits.json").read_text()) for d in (run, ref))
    assert info == ref_info
    assert json.loads((run / "history.json").read_text()) == json.loads(
        (ref / "history.json").read_text()
    )
    for head in ref_info["head_types"]:
        for name in (f"weights_{head}.safetensors", f"logits_{head}.safetensors"):
            a, b = load_file(run / name), load_file(ref / name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), name

    # a checkpoint of other head types is refused with a message naming the field
    res = CliRunner().invoke(
        app,
        [*_exits_train_cmd(base_run, cache_dir, run)[3:], "--resume", "exits.head_types=[linear]"],
    )
    assert res.exit_code == 2
    assert "exits.head_types" in res.output
