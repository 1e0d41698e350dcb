"""Early exits on a CNN (issue 22): EfficientNet-Lite stages as blocks, pooled heads, the
fused ONNX segments, per-stage latency parts and heads trained on cached pooled features.

Every test uses a random ``tf_efficientnet_lite0`` (the deployed Lite0's architecture,
TF "same" padding included) on 32 px inputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dermkit.data.transforms import to_float
from dermkit.exits.cached import exit_logits, pooled_features
from dermkit.exits.heads import PooledMapHead
from dermkit.exits.infer import predict_early_exit, predict_reference
from dermkit.exits.latency import latency_costs, measure_overhead
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.onnx_segments import OnnxEarlyExitRunner, export_segments
from dermkit.exits.policy import NEVER, ExitPolicy, confidence
from dermkit.models.backbones import create_backbone, input_stats

C, MEL = 7, 4


def _lite0(seed=0):
    torch.manual_seed(seed)
    return create_backbone(
        "tf_efficientnet_lite0", num_classes=C, img_size=32, input_norm="symmetric"
    ).eval()


def _model(blocks=(2, 4, 6), head_type="mlp", seed=0) -> EarlyExitModel:
    model = EarlyExitModel(_lite0(seed), list(blocks), head_type, C, {"mlp_hidden": 32})
    torch.manual_seed(seed + 1)
    for p in model.heads.parameters():  # random heads: confident enough to differ per sample
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _images(n=48, seed=0):
    """Noise with a colour cast per image: pooled features (and so the random heads'
    predictions) differ between images, as they do between photos."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen) + 2 * torch.randn(n, 3, 1, 1, generator=gen)


def test_stages_are_blocks_and_all_to_last_is_the_backbone():
    model, x = _model(), _images(6)
    assert model.depth == 7 and model.parts.family == "cnn"
    # the heads read the stage outputs' widths (Lite0: 16, 24, 40, 80, 112, 192, 320)
    assert [h.classifier[0].normalized_shape[0] for h in model.heads] == [24, 80, 192]
    with torch.no_grad():
        outs = model.forward_all(x)
        plain = model.backbone(x)
        never = predict_early_exit(model, x, ExitPolicy([NEVER] * 3))
    assert len(outs) == 4 and all(o.shape == (6, C) for o in outs)
    assert torch.equal(outs[-1], plain)  # the same ops in the same order: bit-identical
    assert torch.equal(never.logits, plain) and (never.blocks_used == 7).all()


def test_cnn_heads_are_pooled_and_token_heads_are_refused():
    model = _model(head_type="linear")
    assert all(isinstance(h, PooledMapHead) for h in model.heads)
    maps = torch.randn(3, 24, 8, 8)
    head = model.heads[0]
    # the head is its classifier on the global average: what cached training relies on
    torch.testing.assert_close(head(maps), head.classifier(maps.mean((2, 3))))
    with pytest.raises(ValueError, match="reads ViT tokens"):
        EarlyExitModel(_lite0(), [3], "attention")
    with pytest.raises(ValueError, match="exit_blocks"):
        EarlyExitModel(_lite0(), [7])


def test_fused_cnn_segments_match_pytorch_and_never_answer_melanoma_early(tmp_path):
    model, x = _model(), _images(64)
    with torch.no_grad():
        per_exit = [lg.numpy() for lg in model.forward_all(x)]
    conf0, pred0 = confidence(per_exit[0])
    first = float(np.median(conf0))
    # protect the second most common confident class: the rule bites, yet others leave
    counts = np.bincount(pred0[conf0 >= first], minlength=C)
    mel = int(np.argsort(counts)[-2])
    assert counts[mel] >= 3
    conf2 = confidence(per_exit[2])[0]
    policy = ExitPolicy([first, NEVER, float(np.median(conf2))], protected_classes=[mel])
    folder = export_segments(model, tmp_path / "fused", 32, policy=policy)
    # exporting must leave the model as it was: in eval mode, BatchNorm statistics untouched
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_all(x)[0].numpy(), per_exit[0])
    manifest = json.loads((folder / "segments.json").read_text())
    assert manifest["kept_exits"] == [0, 2] and manifest["exit_depths"] == [2, 6, 7]
    runner = OnnxEarlyExitRunner(folder, ExitPolicy.load(folder / "policy.json"), threads=2)
    logits, exit_index, blocks = runner.predict(x.numpy())
    ref = predict_reference(model, x, policy)
    np.testing.assert_array_equal(blocks, ref.blocks_used.numpy())
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    assert set(blocks.tolist()) == {2, 6, 7}  # every kept exit answers some images
    early = exit_index < 2
    assert not (logits[early].argmax(1) == mel).any()  # melanoma is never answered early
    one = [int(runner.predict(x[i : i + 1].numpy())[2][0]) for i in range(8)]  # batch 1
    assert one == blocks[:8].tolist()


def test_cnn_latency_profile_times_every_stage_and_gate():
    model = _model(blocks=(3, 5))
    result = measure_overhead(model, 32, rounds=3, eager=False)  # what calibration reads
    onnx = result["onnx"]
    assert result["eager"] is None
    assert {f"block_{i}" for i in range(7)} | {"head_gate_0", "head_gate_1"} <= set(onnx)
    assert "block" not in onnx and "head_gate" not in onnx
    costs = latency_costs(onnx, model.exit_depths, [0, 1])
    assert 0 < costs[0] < costs[1] < 1 < costs[2]  # later exits cost more; all kept: > plain


def test_latency_costs_sum_each_stage_own_time():
    profile = {"call": 0.0, "embed": 1.0, "final": 1.0, "head_gate_0": 0.5, "head_gate_1": 9.0}
    profile |= {f"block_{i}": float(i + 1) for i in range(4)}  # 1, 2, 3, 4 ms
    plain = 1 + 10 + 1
    np.testing.assert_allclose(
        latency_costs(profile, [1, 3, 4], [0]), [(1 + 1 + 0.5) / plain, (plain + 0.5) / plain]
    )
    np.testing.assert_allclose(latency_costs(profile, [1, 3, 4], [1])[0], (1 + 6 + 9) / plain)


class _Images:
    """A dataset stand-in: uint8 images (N, 3, S, S) by index, as ``CachedImageDataset``."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitems__(self, idx):
        return self.images[torch.as_tensor(idx)], torch.zeros(len(idx), dtype=torch.long)


def test_cached_pooled_features_give_the_model_logits():
    model = _model()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    feats = pooled_features(model, _Images(images), list(model.exit_blocks), batch_size=8)
    assert sorted(feats) == ["block_2", "block_4", "block_6", "final"]
    assert feats["block_4"].shape == (20, 80)
    with torch.no_grad():  # the model's symmetric input norm, not ImageNet's
        want = torch.stack(model.forward_all(to_float(images, *input_stats(model.backbone))))
    np.testing.assert_allclose(exit_logits(model, feats), want.numpy(), atol=1e-4, rtol=1e-4)


def _separable_features(blocks, dims, n, gen, means):
    """Pooled features of n rows whose class shifts each exit's mean; random final logits."""
    y = np.arange(n) % C
    feats = {
        f"block_{b}": (means[b][y] + gen.normal(size=(n, d))).astype(np.float32)
        for b, d in zip(blocks, dims)
    }
    feats["final"] = gen.normal(size=(n, C)).astype(np.float32)
    return feats, y


def test_pooled_heads_train_on_the_engine_keep_each_best_epoch_and_resume(tmp_path):
    from dermkit.exits.cached import train_pooled_heads
    from dermkit.exits.policy import macro_f1
    from dermkit.exits.settings import ExitsRunConfig
    from dermkit.train.engine import make_accelerator
    from dermkit.train.settings import LossConfig

    heads = ("linear", "mlp")
    models = {h: _model(head_type=h) for h in heads}
    blocks = list(models["linear"].exit_blocks)
    dims = [head.classifier[0].normalized_shape[0] for head in models["linear"].heads]
    gen = np.random.default_rng(0)
    means = {b: 3 * gen.normal(size=(C, d)) for b, d in zip(blocks, dims)}
    feats, labels = {}, {}
    for split, n in (("train", 280), ("val", 70), ("test", 70)):
        feats[split], labels[split] = _separable_features(blocks, dims, n, gen, means)
    cfg = ExitsRunConfig(
        base_run="unused",
        exits={"head_types": list(heads), "exit_blocks": blocks, "features": "cached"},
        optim={"epochs": 3, "batch_size": 14, "base_lr": 0.2, "warmup_epochs": 0},
    )

    def train(resume=False):
        fresh = {h: _model(head_type=h) for h in heads}
        history, best = train_pooled_heads(
            fresh, cfg, feats, labels, LossConfig(loss="ce"), make_accelerator("fp32"),
            tmp_path, progress=False, resume=resume,
        )  # fmt: skip
        return fresh, history, best

    trained, history, best = train()
    assert [r["epoch"] for r in history] == [0, 1, 2]
    for h, m in trained.items():
        means_by_epoch = [r[h]["val_mean_macro_f1"] for r in history]
        assert history[best[h]][h]["val_mean_macro_f1"] == max(means_by_epoch)
        # the heads are the best epoch's: their val logits give that epoch's scores
        early = exit_logits(m, feats["val"])[:-1]
        scores = [macro_f1(labels["val"], lg.argmax(1), C) for lg in early]
        assert scores == pytest.approx(history[best[h]][h]["val_macro_f1"][:-1])
        assert min(scores) > 0.6  # the class shifts are learnt (chance: 1/7)
    assert any((tmp_path / "checkpoints").iterdir())
    # resuming the finished run trains nothing and restores each head type's best heads
    resumed, again, best_again = train(resume=True)
    assert (again, best_again) == (history, best)
    for h in heads:
        np.testing.assert_array_equal(
            exit_logits(resumed[h], feats["test"]), exit_logits(trained[h], feats["test"])
        )
