"""The training engine: 2 gloo processes train what 1 process trains, for every method family.

Each test runs a method's command twice on the phantoms, once as one process and once
under ``torchrun --nproc_per_node 2`` (DDP over gloo on CPU), with the same global batch,
and compares the saved weights. What may differ is only the order of floating-point sums
in the gradient all-reduce (and in per-process loss means), hence a small tolerance. The
supervised loop's own test is ``tests/test_train_loop.py::test_two_process_ddp_matches_
one_process``; these cover self-supervised pretraining, exit heads and the generative
models. Runs are tiny (a few steps) so each test takes seconds of training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dermkit.train.engine import Batch, EpochEnd, Rows, fit, make_accelerator, run_options
from dermkit.train.settings import OptimConfig

TOL = 1e-4


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DERMKIT_THREADS="1")
    return env


def _train(args: list[str], processes: int) -> None:
    """``dermkit <args>`` as one process, or under torchrun as ``processes`` processes."""
    if processes == 1:
        cmd = [sys.executable, "-m", "dermkit.cli", *args]
    else:
        port = str(29500 + (os.getpid() + len(args)) % 400)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(processes), "--master_port", port, "-m", "dermkit.cli", *args]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env())


def _one_and_two(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    _train([*args, f"out_dir={one}"], 1)
    _train([*args, f"out_dir={two}"], 2)
    return one, two


def _assert_same_weights(a: Path, b: Path) -> None:
    w1, w2 = load_file(a), load_file(b)
    assert w1.keys() == w2.keys()
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert diff < TOL, diff
    # and training did move them: the comparison is not of two untouched initialisations
    assert any(w1[k].float().abs().sum() > 0 for k in w1)


# ----------------------------------------------------------------------------- the engine


class _Regression:
    """A toy method: linear regression, per-row noise drawn for the global batch."""

    select = "val_neg_loss"

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def step(self, model, batch: Batch):
        noise = batch.once("noise", lambda: torch.randn(batch.size, 1, generator=batch.gen))
        rows = torch.from_numpy(batch.rows)
        xb = self.x[rows] + 0.01 * noise[batch.offset : batch.offset + len(rows)]
        loss = torch.nn.functional.mse_loss(model(xb), self.y[rows])
        return loss, {"mse": loss.item()}

    def evaluate(self, model, end: EpochEnd):
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(model(self.x), self.y).item()
        return {"val_neg_loss": -val, "train_mse": end.means["mse"]}


def _toy(tmp_path: Path, **optim) -> tuple[torch.nn.Module, dict, list[dict]]:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = torch.nn.Linear(4, 1)
    settings = {"epochs": 3, "batch_size": 16, "base_lr": 0.5, "warmup_epochs": 0.5}
    oc = OptimConfig(**(settings | optim))
    state, final = fit(
        _Regression(x, y), model, Rows.of(64), oc, tmp_path, seed=0,
        accelerator=make_accelerator("fp32"), progress=False, log_every=1, checkpoint_every=5,
    )  # fmt: skip
    return final, state, [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_fit_learns_selects_and_logs(tmp_path):
    _, state, rows = _toy(tmp_path)
    assert state.step == 12 and len(state.history) == 3
    assert state.history[-1]["val_neg_loss"] > state.history[0]["val_neg_loss"]
    assert state.best_epoch == int(np.argmax([r["val_neg_loss"] for r in state.history]))
    assert (tmp_path / "best.safetensors").exists()
    assert [r["kind"] for r in rows].count("epoch") == 3
    assert all("mse" in r and "lr" in r for r in rows if r["kind"] == "train")


def test_accumulation_equals_one_big_batch(tmp_path):
    """grad_accum=4 micro-batches of 4 rows step exactly as one batch of 16."""
    a, _, _ = _toy(tmp_path / "a")
    b, _, _ = _toy(tmp_path / "b", grad_accum=4)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_resume_replays_the_uninterrupted_run(tmp_path):
    """A run resumed from its step-5 checkpoint ends where the uninterrupted one ends."""
    import dermkit.train.engine as engine

    whole, _, _ = _toy(tmp_path / "whole")
    real = engine.save_checkpoint

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = real(ckpt_dir, step, *args, **kwargs)
        if step == 5:
            raise KeyboardInterrupt
        return path

    engine.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            _toy(tmp_path / "killed")
    finally:
        engine.save_checkpoint = real
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    oc = OptimConfig(epochs=3, batch_size=16, base_lr=0.5, warmup_epochs=0.5)
    _, resumed = fit(
        _Regression(x, y), torch.nn.Linear(4, 1), Rows.of(64), oc, tmp_path / "killed",
        seed=0, accelerator=make_accelerator("fp32"), resume=True, progress=False,
        log_every=1, checkpoint_every=5,
    )  # fmt: skip
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_checkpoints_come_as_asked_at_the_end_and_after_long_epochs(tmp_path, monkeypatch):
    """checkpoint_every=5: 4-step epochs get no checkpoint of their own (a run of tiny
    epochs would checkpoint every step or two), 8-step epochs do."""
    import dermkit.train.engine as engine

    steps, real = [], engine.save_checkpoint

    def record(ckpt_dir, step, *args, **kwargs):
        steps.append(step)
        return real(ckpt_dir, step, *args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", record)
    _toy(tmp_path / "short")  # 64 rows, batch 16: 4 steps per epoch, 12 in all
    assert steps == [5, 10, 12]
    steps.clear()
    _toy(tmp_path / "long", batch_size=8)  # 8 steps per epoch, 24 in all
    assert steps == [5, 8, 10, 15, 16, 20, 24]


def test_resuming_a_checkpoint_of_another_model_is_refused(tmp_path):
    from dermkit.train.engine import CheckpointMismatchError

    _toy(tmp_path)
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    oc = OptimConfig(epochs=1, batch_size=16)
    with pytest.raises(CheckpointMismatchError, match="does not fit this run"):
        fit(_Regression(x, y), torch.nn.Linear(4, 2), Rows.of(64), oc, tmp_path, seed=0,
            accelerator=make_accelerator("fp32"), resume=True, progress=False)  # fmt: skip


def test_settings_a_method_cannot_use_are_named(tmp_path):
    from dermkit.config import ConfigError

    class NoSelection(_Regression):
        select = None

    x, y = torch.randn(16, 4), torch.randn(16, 1)
    acc = make_accelerator("fp32")
    for optim, field in ((OptimConfig(patience=2), "patience"), (OptimConfig(layer_decay=0.7),
                         "layer_decay"), (OptimConfig(batch_size=32), "batch_size")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            fit(NoSelection(x, y), torch.nn.Linear(4, 1), Rows.of(16), optim, tmp_path, seed=0,
                accelerator=acc, progress=False)  # fmt: skip


def test_run_options_are_the_run_configs():
    """A command's fit keywords come from its run config; what it lacks keeps fit's default."""
    from dermkit.exits.settings import ExitsRunConfig
    from dermkit.synth.settings import DiffusionRunConfig

    diffusion = DiffusionRunConfig(seed=3, max_steps=7, log_every=5, checkpoint_every=9)
    assert run_options(diffusion, resume=True, progress=False) == {
        "seed": 3, "resume": True, "progress": False, "log_every": 5, "checkpoint_every": 9,
        "max_steps": 7,
    }  # fmt: skip
    exits = run_options(ExitsRunConfig(base_run="x", checkpoint_every=4))
    assert exits == {"seed": 0, "resume": False, "progress": True, "checkpoint_every": 4}


# ----------------------------------------------------------------------------- 2 vs 1 process


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "vae"])
def test_pretraining_two_processes_match_one(method, phantom_root, cache_dir, tmp_path):
    args = ["pretrain", method, "--preset", "tiny", f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}", "optim.epochs=1", "grid_every=100"]  # fmt: skip
    one, two = _one_and_two(tmp_path, args)
    _assert_same_weights(one / "model.safetensors", two / "model.safetensors")
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert h1[-1]["train_loss"] == pytest.approx(h2[-1]["train_loss"], abs=TOL)


def test_one_process_can_make_accelerators_of_different_precisions_in_turn():
    """accelerate's process-wide state refuses a second precision; a study that trains fold
    after fold, or this suite, asks for several (core.devices.make_accelerator)."""
    first = make_accelerator("fp32")
    assert first.mixed_precision == "no"
    second = make_accelerator("bf16")
    assert second.mixed_precision == "bf16"
    assert make_accelerator("fp32").mixed_precision == "no"


@pytest.mark.slow
def test_exit_heads_two_processes_match_one(tiny_classifier_run, cache_dir, tmp_path):
    args = ["exits", "train", str(tiny_classifier_run), "--preset", "tiny",
            f"cache_dir={cache_dir}", "optim.epochs=1", "exits.head_types=[linear,mlp]",
            "exits.distill_alpha=0.5"]  # fmt: skip
    one, two = _one_and_two(tmp_path, args)
    for head in ("linear", "mlp"):
        name = f"weights_{head}.safetensors"
        _assert_same_weights(one / name, two / name)


@pytest.mark.slow
def test_autoencoder_two_processes_match_one(phantom_root, cache_dir, tmp_path):
    args = ["synth", "autoencoder", "--preset", "tiny", f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}", "max_steps=3", "val_images=8",
            "scaling_images=32"]  # fmt: skip
    one, two = _one_and_two(tmp_path, args)
    _assert_same_weights(one / "autoencoder.safetensors", two / "autoencoder.safetensors")


@pytest.mark.slow
def test_diffusion_two_processes_match_one(phantom_root, cache_dir, tmp_path):
    args = ["synth", "diffusion", "--preset", "tiny", f"data.path={phantom_root}",
            f"data.cache_dir={cache_dir}", "autoencoder=null", "data.image_size=16",
            "max_steps=4", "dihedral_views=1", "preview_per_class=0"]  # fmt: skip
    one, two = _one_and_two(tmp_path, args)
    _assert_same_weights(one / "unet.safetensors", two / "unet.safetensors")
