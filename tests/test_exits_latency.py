"""Early exits at batch 1: the SSM head's parallel scan, fused exit gates in the ONNX
segments, pruned exits, the latency profile and the latency objective."""

from __future__ import annotations

import pytest
import torch
from mambapy.mamba import Mamba, MambaConfig

from dermkit.exits.heads import SSMHead
from dermkit.exits.scan import mamba_forward, scan_all, scan_last, segment_sums


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
