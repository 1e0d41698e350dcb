"""Early exits at batch 1: the SSM head's parallel scan, fused exit gates in the ONNX
segments, pruned exits, the latency profile and the latency objective."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mambapy.mamba import Mamba, MambaConfig

from dermkit.config import ConfigError
from dermkit.exits.calibrate import parse_latency_objective
from dermkit.exits.gate import ExitGate, prune_exits
from dermkit.exits.heads import SSMHead
from dermkit.exits.infer import predict_early_exit, predict_reference
from dermkit.exits.latency import calibrate_latency, latency_costs, measure_overhead
from dermkit.exits.model import EarlyExitModel
from dermkit.exits.onnx_segments import OnnxEarlyExitRunner, export_segments
from dermkit.exits.policy import MEASURES, NEVER, ExitPolicy, confidence
from dermkit.exits.scan import mamba_forward, scan_all, scan_last, segment_sums
from dermkit.models.backbones import create_backbone

C = 7


def _sequential(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recurrence h_t = a_t h_{t-1} + b_t one token at a time: (B, L, ED, N) -> same."""
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = torch.exp(log_a[:, t]) * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- parallel scan


def test_segment_sums_are_the_partial_sums_of_log_a():
    x = torch.tensor([-0.5, -1.0, -2.0, -0.25])
    s = segment_sums(x)
    assert s[2, 0] == pytest.approx(-3.0) and s[3, 1] == pytest.approx(-2.25)
    assert torch.all(s.diagonal() == 0) and torch.isneginf(s[0, 1]) and torch.isneginf(s[1, 3])


@pytest.mark.parametrize("length", [1, 17, 65])
def test_parallel_scan_matches_the_token_by_token_recurrence(length):
    gen = torch.Generator().manual_seed(length)
    # decays from nearly 1 (long memory) to nearly 0 (forgets at once): both ends matter
    log_a = -torch.rand(2, length, 6, 4, generator=gen) * torch.logspace(-3, 1, 4)
    b = torch.randn(2, length, 6, 4, generator=gen)
    ref = _sequential(log_a, b)
    torch.testing.assert_close(scan_all(log_a, b), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(scan_last(log_a, b), ref[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_parallel_mamba_matches_mambapy_sequential_scan(n_layers):
    torch.manual_seed(n_layers)
    mamba = Mamba(MambaConfig(d_model=32, n_layers=n_layers, d_state=8, pscan=False)).eval()
    with torch.no_grad():  # larger output projections: the scan, not the residual, dominates
        for layer in mamba.layers:
            layer.mixer.out_proj.weight.mul_(20)
        x = torch.randn(3, 17, 32)
        ref = mamba(x)
        full, last = mamba_forward(mamba, x), mamba_forward(mamba, x, last_only=True)
    assert (ref - x).abs().max() > 0.5  # the layers change the sequence
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, ref[:, -1:], atol=1e-5, rtol=1e-5)


def test_ssm_head_eval_uses_the_parallel_scan_and_agrees_with_the_sequential_one():
    torch.manual_seed(0)
    head = SSMHead(48, 7, 1, grid=8, d_model=32, d_state=8).eval()
    tokens = torch.randn(4, 65, 48)
    with torch.no_grad():
        parallel = head(tokens)
        head.eval_scan = "sequential"
        sequential = head(tokens)
    torch.testing.assert_close(parallel, sequential, atol=1e-5, rtol=0)
    # the eval forward goes through the parallel form: breaking it changes the logits
    head.eval_scan = "parallel"
    import dermkit.exits.heads as heads

    real = heads.mamba_forward
    heads.mamba_forward = lambda m, x, last_only=False: real(m, x.flip(1), last_only)
    try:
        with torch.no_grad():
            assert (head(tokens) - sequential).abs().max() > 1e-3
    finally:
        heads.mamba_forward = real


# ----------------------------------------------------------------------------- fused gates


def _model(head_type="ssm", seed=0) -> EarlyExitModel:
    """vit_micro (4 blocks) with exits after blocks 1, 2 and 3, random weights."""
    torch.manual_seed(seed)
    backbone = create_backbone("vit_micro_patch4_32", num_classes=C, img_size=32)
    model = EarlyExitModel(backbone, [1, 2, 3], head_type, C, {"ssm_d_model": 16})
    for p in model.heads.parameters():  # confident enough to differ per sample
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize("measure", MEASURES)
def test_exit_gate_decides_like_the_numpy_policy(measure):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (400, C)).astype(np.float32)
    for protected in ([], [4]):
        policy = ExitPolicy([0.3, 0.6], measure, [0.8, 1.3, 1.0], protected)
        for j in range(2):
            want = policy.exits_now(logits, j)
            got = ExitGate(policy, j)(torch.from_numpy(logits)).numpy()
            assert 0 < want.sum() < len(want)
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not an early exit"):
        ExitGate(policy, 2)


def test_prune_exits_drops_never_firing_exits_and_keeps_predictions():
    model, x = _model("linear"), torch.randn(40, 3, 32, 32)
    with torch.no_grad():
        per_exit = [lg.numpy() for lg in model.forward_all(x)]
    t1 = float(np.median(confidence(per_exit[1])[0]))
    policy = ExitPolicy([NEVER, t1, NEVER], temperatures=[1.0, 1.0, 1.0, 1.0])
    pruned, small = prune_exits(model, policy)
    assert pruned.exit_depths == (2, 4) and small.thresholds == [t1]
    full = predict_reference(model, x, policy)
    out = predict_early_exit(pruned, x, small)
    np.testing.assert_array_equal(out.blocks_used.numpy(), full.blocks_used.numpy())
    torch.testing.assert_close(out.logits, full.logits)
    plain, none = prune_exits(model, ExitPolicy([NEVER] * 3))
    assert plain.exit_depths == (4,) and none.thresholds == []
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_all(x)[0], model.backbone(x))


@pytest.mark.parametrize("head_type", ["ssm", "attention"])
def test_fused_segments_return_the_exit_flag_and_match_pytorch(head_type, tmp_path):
    model, x = _model(head_type), torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        per_exit = [lg.numpy() for lg in model.forward_all(x)]
    first = float(np.median(confidence(per_exit[0])[0]))
    stay = confidence(per_exit[0])[0] < first
    third = float(np.median(confidence(per_exit[2][stay])[0]))  # half of those left
    early = np.concatenate([per_exit[0].argmax(1), per_exit[2].argmax(1)])
    rare = int(np.bincount(early, minlength=C).argmin())  # protected, yet exits still fire
    policy = ExitPolicy([first, NEVER, third], protected_classes=[rare])
    folder = export_segments(model, tmp_path / "fused", 32, policy=policy)
    manifest = json.loads((folder / "segments.json").read_text())
    assert manifest["fused"] and manifest["kept_exits"] == [0, 2]
    assert manifest["exit_depths"] == [1, 3, 4]
    small = ExitPolicy.load(folder / "policy.json")
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "segment_0.onnx"))
    assert [o.name for o in session.get_outputs()] == ["tokens_out", "logits", "exit"]
    runner = OnnxEarlyExitRunner(folder, small, threads=2)
    logits, _, blocks = runner.predict(x.numpy())
    ref = predict_reference(model, x, policy)
    assert len(set(blocks.tolist())) == 3  # every kept exit answers some images
    np.testing.assert_array_equal(blocks, ref.blocks_used.numpy())
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    one = [runner.predict(x[i : i + 1].numpy())[2][0] for i in range(8)]  # batch 1
    assert one == blocks[:8].tolist()
    with pytest.raises(ValueError, match="decide with the policy exported"):
        OnnxEarlyExitRunner(folder, ExitPolicy([0.1, 0.2], protected_classes=[rare]))


# ----------------------------------------------------------------------------- latency

PROFILE = {"call": 0.02, "embed": 0.1, "block": 1.0, "head_gate": 0.3, "final": 0.05}


def test_latency_costs_charge_kept_heads_and_switches_only():
    depths = [2, 4, 6, 8]
    plain = 0.02 + 0.1 + 8 * 1.0 + 0.05
    costs = latency_costs(PROFILE, depths, [1])
    np.testing.assert_allclose(costs, [(0.32 + 0.1 + 4) / plain, (plain + 0.32) / plain])
    assert latency_costs(PROFILE, depths, []).tolist() == [1.0]
    two = latency_costs(PROFILE, depths, [0, 2])
    assert two[1] == pytest.approx((2 * 0.32 + 0.1 + 6) / plain)


def _easy_exits(n=800, seed=0):
    """Exit 0 is right and confident on 70% of samples, exit 1 adds nothing, exit 2 final."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    onehot = np.eye(C)[y]
    easy = rng.random(n) < 0.7
    e0 = np.where(easy[:, None], 6 * onehot, rng.normal(0, 0.3, (n, C)))
    e1 = e0 + rng.normal(0, 0.01, (n, C))
    final = 4 * onehot + rng.normal(0, 1, (n, C))
    return [e0, e1, final], y


def test_latency_objective_meets_its_budget_and_prunes_useless_exits():
    per_exit, y = _easy_exits()
    cal = calibrate_latency(per_exit, y, [2, 4, 8], PROFILE, 0.6, temperatures=[1, 1, 1])
    assert cal.compute <= 0.6 and cal.objective == "latency=0.6"
    assert cal.policy.thresholds[1] == NEVER  # exit 1 costs a head and saves nothing
    assert cal.policy.thresholds[0] <= 1.0 and cal.exit_fractions[0] > 0.5
    # the reported latency is the pruned model's: recompute it from the exit fractions
    costs = latency_costs(PROFILE, [2, 4, 8], [0])
    assert cal.compute == pytest.approx(
        cal.exit_fractions[0] * costs[0] + cal.exit_fractions[2] * costs[1]
    )
    with pytest.raises(ValueError, match="no exits and thresholds reach"):
        calibrate_latency(per_exit, y, [2, 4, 8], PROFILE, 0.1, temperatures=[1, 1, 1])


def test_median_latency_objective_bounds_the_typical_image_not_the_average():
    """70% of images are easy at exit 0 (0.30 of the plain model), the rest need the final
    exit (1.04). A MEAN of 0.4 forces hard images out early too; a MEDIAN of 0.4 only needs
    half the images to leave at exit 0, so the hard ones can run to the end."""
    per_exit, y = _easy_exits()
    args = (per_exit, y, [2, 4, 8], PROFILE, 0.4)
    mean = calibrate_latency(*args, temperatures=[1, 1, 1])
    median = calibrate_latency(*args, temperatures=[1, 1, 1], statistic="median")
    assert median.objective == "median-latency=0.4"
    costs = latency_costs(PROFILE, [2, 4, 8], [0])
    assert median.policy.thresholds[1] == NEVER and median.exit_fractions[0] > 0.5
    assert median.compute == pytest.approx(costs[0])  # the median image leaves at exit 0
    mean_cost_of_median_policy = (
        median.exit_fractions[0] * costs[0] + median.exit_fractions[2] * costs[1]
    )
    assert mean_cost_of_median_policy > 0.4 >= mean.compute
    assert median.exit_fractions[2] > mean.exit_fractions[2]
    assert median.macro_f1 > mean.macro_f1 + 0.05


def test_median_latency_objective_parses_from_the_command_line_form():
    assert parse_latency_objective("median-latency=0.7") == (0.7, "median")
    assert parse_latency_objective("latency=0.7") == (0.7, "mean")
    assert parse_latency_objective("compute=0.7") is None
    with pytest.raises(ConfigError, match="must be positive"):
        parse_latency_objective("median-latency=0")


def test_measure_overhead_reports_every_part_for_both_backends():
    result = measure_overhead(_model("ssm"), 32, rounds=5)
    parts = {"embed", "block", "head", "head_gate", "final", "call"}
    assert parts | {"scan_sequential", "scan_parallel"} <= set(result["onnx"])
    assert parts | {"check_numpy", "check_torch", "scan_sequential"} <= set(result["eager"])
    assert all(v > 0 for backend in ("onnx", "eager") for v in result[backend].values())
