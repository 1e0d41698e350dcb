"""The training engine: learning, schedule, checkpoints, resume after SIGKILL, DDP = 1 process."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dermkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dermkit.train.loop import lr_at, plan_epoch
from dermkit.train.losses import ClassificationLoss, class_weights, sampling_weights


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_epoch_plan_deterministic_and_mixes_synthetic_at_ratio():
    real, syn = np.arange(100), np.arange(100, 140)
    a = plan_epoch(real, syn, 20, seed=1, epoch=3, synthetic_ratio=0.25)
    b = plan_epoch(real, syn, 20, seed=1, epoch=3, synthetic_ratio=0.25)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 20)  # 100 real rows / 15 real per batch
    assert ((a >= 100).sum(1) == 5).all()
    assert len(set(a[a < 100].tolist())) == 90  # real rows without replacement
    assert not np.array_equal(a, plan_epoch(real, syn, 20, seed=1, epoch=4, synthetic_ratio=0.25))


def test_class_balanced_sampler_balances():
    labels = torch.tensor([0] * 900 + [1] * 100)
    w = sampling_weights(labels, "class_balanced", 2).numpy()
    plan = plan_epoch(np.arange(1000), np.array([], int), 100, 0, 0, weights=w)
    share = (labels.numpy()[plan.ravel()] == 1).mean()
    assert 0.4 < share < 0.6
    assert sampling_weights(labels, "random", 2) is None


def test_losses():
    counts = torch.tensor([90, 10])
    w = class_weights(counts, power=1.0)
    assert w[1] / w[0] == pytest.approx(9.0)
    logits = torch.randn(16, 2)
    y = torch.randint(0, 2, (16,))
    ce = ClassificationLoss("ce", counts)(logits, y)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, y))
    # focal with gamma 0 is cross-entropy; with gamma > 0 it is smaller
    f0 = ClassificationLoss("focal", counts, focal_gamma=0.0)(logits, y)
    torch.testing.assert_close(f0, ce)
    assert ClassificationLoss("focal", counts, focal_gamma=2.0)(logits, y) < ce
    # logit adjustment: the loss of predicting the rare class is larger at equal logits
    la = ClassificationLoss("logit_adjusted", counts)
    zero = torch.zeros(1, 2)
    assert la(zero, torch.tensor([1])) > la(zero, torch.tensor([0]))
    # weighted CE up-weights mistakes on the rare class
    wce = ClassificationLoss("weighted_ce", counts, weight_power=1.0)
    assert wce(zero, torch.tensor([1])) > wce(zero, torch.tensor([0]))


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    save_checkpoint(tmp_path, 7, model, opt, extra={"train_state": {"step": 7}})
    expected_next = torch.rand(3)
    ref = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-0000007"
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.pkl"))  # no pickles
    state = load_checkpoint(ckpt, model2, opt2)
    assert state["train_state"]["step"] == 7
    torch.testing.assert_close(model2.weight, model.weight)
    for k, v in ref.items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][k], v)
    assert opt2.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(torch.rand(3), expected_next)


def test_half_written_checkpoint_is_ignored(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model)
    (tmp_path / ".tmp-step-0000002-123").mkdir()  # a killed writer leaves this behind
    assert latest_checkpoint(tmp_path).name == "step-0000001"


# ----------------------------------------------------------------- end-to-end, tiny scale


def _cli(*args, env=None):
    return [sys.executable, "-m", "dermkit.cli", *args]


def _finetune_args(phantom_root, cache_dir, out, *extra):
    return [
        "finetune",
        "--preset",
        "tiny",
        f"data.path={phantom_root}",
        f"data.cache_dir={cache_dir}",
        f"out_dir={out}",
        "optim.epochs=10",
        "eval.n_boot=50",
        *extra,
    ]


def _env(threads=1):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DERMKIT_THREADS=str(threads)
    )
    return env


def _metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    return {k: v["value"] for k, v in m["metrics"].items()}, m


@pytest.mark.slow
def test_finetune_learns_and_resume_after_sigkill_is_identical(phantom_root, cache_dir, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cli(*_finetune_args(phantom_root, cache_dir, ref)), check=True, env=_env())
    ref_metrics, ref_all = _metrics(ref)
    # learned something: clearly above chance on the phantom test split
    assert ref_metrics["balanced_accuracy"] > 1.5 / 7

    # same run, killed with SIGKILL once a mid-run checkpoint exists, then resumed
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_finetune_args(phantom_root, cache_dir, run)), env=_env())
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = latest_checkpoint(run / "checkpoints")
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 5:
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed; lower checkpoint_every")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists()  # it really died before the end
    subprocess.run(
        _cli(*_finetune_args(phantom_root, cache_dir, run), "--resume"), check=True, env=_env()
    )
    metrics, all_ = _metrics(run)
    assert metrics == ref_metrics
    assert all_["history"] == ref_all["history"]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(phantom_root, cache_dir, tmp_path):
    """2 gloo processes with the same global batch train the same model as 1 process.

    Tolerance: weights within 1e-4 and val loss within 1e-4 after 3 epochs; the only
    difference is the order of floating-point sums in the gradient all-reduce.
    """
    from safetensors.torch import load_file

    args = ["optim.epochs=3", "augment.mixup_alpha=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        _cli(*_finetune_args(phantom_root, cache_dir, one, *args)), check=True, env=_env()
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 400),
        "-m",
        "dermkit.cli",
    ]
    subprocess.run(
        [*torchrun, *_finetune_args(phantom_root, cache_dir, two, *args)], check=True, env=_env()
    )
    run_info = json.loads((two / "metrics.json").read_text())["training"]
    assert run_info["processes"] == 2
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-4
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    for a, b in zip(h1, h2, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
