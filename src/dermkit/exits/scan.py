"""Parallel (log-space) evaluation of a mambapy Mamba's selective scan for inference.

Mamba's state follows the linear recurrence ``h_t = a_t * h_{t-1} + b_t`` with
``a_t = exp(delta_t * A) in (0, 1)`` and ``b_t = delta_t * B_t * x_t``, per channel and
state. Unrolled, ``h_t = sum_{s<=t} exp(sum_{k=s+1..t} log a_k) * b_s``: every state is a
weighted sum whose weights come from cumulative sums of ``log a`` (the "segment sum" of
Mamba-2's SSD form). Computing the weights with ``cumsum`` and one masked ``exp`` replaces
mambapy's eval-mode loop over tokens (one small op chain per token) with a handful of
tensor ops, and every one of them (CumSum, Where, Exp, MatMul) exports to ONNX.

Two forms:

* :func:`scan_all`: every position's state, ``O(L^2)`` weights; needed by every layer
  whose full output sequence feeds another layer.
* :func:`scan_last`: the last position's state only, ``O(L)``; an exit head reads only
  the last position of its last layer, so that layer needs nothing else.

Weights are exponentials of non-positive sums (``log a <= 0``), so they never overflow.
:func:`mamba_forward` re-runs mambapy's ``Mamba`` (residual blocks: RMSNorm, in_proj,
causal depthwise conv, SiLU, selective scan, gate, out_proj) with these scans, using the
module's own parameters; tests hold it to mambapy's sequential scan within 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mambapy.mamba import Mamba, MambaBlock


def segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): entry [t, s] = sum_{k=s+1..t} log_a[k] for s <= t, else -inf.

    Summing a masked copy per row (not differencing one cumulative sum) keeps entries near
    the diagonal exact however long the sequence.
    """
    L = log_a.shape[-1]
    terms = log_a.unsqueeze(-1).expand(*log_a.shape, L)  # [k, s] = log_a[k]
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=log_a.device), diagonal=-1)
    # [k, s] = log_a[k] * (k > s), summed over k <= t: sum_{k=s+1..t} log_a[k]
    sums = torch.cumsum(terms.masked_fill(~strict, 0.0), dim=-2)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=log_a.device))
    return sums.masked_fill(~causal, float("-inf"))


def scan_all(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """States of every position. log_a, b: (B, L, ED, N) -> h: (B, L, ED, N)."""
    la = log_a.permute(0, 2, 3, 1)  # (B, ED, N, L)
    weights = torch.exp(segment_sums(la))  # (B, ED, N, L, L): [t, s] = prod a_{s+1..t}
    h = weights @ b.permute(0, 2, 3, 1).unsqueeze(-1)  # (B, ED, N, L, 1)
    return h.squeeze(-1).permute(0, 3, 1, 2)


def scan_last(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State of the last position only. log_a, b: (B, L, ED, N) -> h_L: (B, ED, N)."""
    # suffix sums: after[s] = sum_{k=s+1..L} log_a[k] (inclusive reverse cumsum minus self)
    after = torch.flip(torch.cumsum(torch.flip(log_a, [1]), dim=1), [1]) - log_a
    return (torch.exp(after) * b).sum(dim=1)


def _ssm(mixer: MambaBlock, x: torch.Tensor, last_only: bool) -> torch.Tensor:
    """mambapy's ``MambaBlock.ssm`` with a parallel scan: x (B, L, ED) -> y (B, L or 1, ED)."""
    cfg = mixer.config
    A = -torch.exp(mixer.A_log.float())  # (ED, N)
    delta, B, C = torch.split(mixer.x_proj(x), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
    delta, B, C = mixer._apply_layernorms(delta, B, C)
    delta = F.softplus(mixer.dt_proj(delta))  # (B, L, ED)
    log_a = delta.unsqueeze(-1) * A  # (B, L, ED, N), <= 0
    b = (delta * x).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, ED, N)
    if last_only:
        h = scan_last(log_a, b)  # (B, ED, N)
        y = (h * C[:, -1].unsqueeze(1)).sum(-1) + mixer.D * x[:, -1]
        return y.unsqueeze(1)
    h = scan_all(log_a, b)  # (B, L, ED, N)
    return (h @ C.unsqueeze(-1)).squeeze(-1) + mixer.D * x


def _block(mixer: MambaBlock, x: torch.Tensor, last_only: bool) -> torch.Tensor:
    """mambapy's ``MambaBlock.forward`` (CPU path): (B, L, D) -> (B, L or 1, D)."""
    L = x.shape[1]
    u, z = mixer.in_proj(x).chunk(2, dim=-1)  # (B, L, ED) each
    u = F.silu(mixer.conv1d(u.transpose(1, 2))[:, :, :L].transpose(1, 2))
    y = _ssm(mixer, u, last_only)
    if last_only:
        z = z[:, -1:]
    return mixer.out_proj(y * F.silu(z))


def mamba_forward(mamba: Mamba, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """A mambapy ``Mamba`` on (B, L, D) with parallel scans -> (B, L, D), or (B, 1, D)
    (the last position) when ``last_only``: then the last layer scans for that one state."""
    n = len(mamba.layers)
    for i, layer in enumerate(mamba.layers):
        last = last_only and i == n - 1
        out = _block(layer.mixer, layer.norm(x), last)
        x = out + (x[:, -1:] if last else x)
    return x
