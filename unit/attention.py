"""SAGAN self-attention (Zhang et al. 2018) and the one op it runs on.

attention(q, k, v) is the op of DESIGN.md: o = v . softmax_keys(q^T k), no 1/sqrt(d) scale.
    q, k: (B, d, N)   v: (B, c, N)   ->   o: (B, c, N)
It runs on the fused C++/CUDA op from csrc/ (unit/ops.py) when that builds and loads, and on
attention_reference() otherwise. UNIT_ATTN=torch forces the reference, UNIT_ATTN=fused forces the
fused op (and fails loudly if it cannot load). The reference is the readable definition; the fused
op must match it (tests/test_attention_op.py).
"""
import os
import warnings

import torch
import torch.nn as nn


def attention_reference(q, k, v):
    """Plain PyTorch: holds the full (B, N, N) attention matrix. The definition, not the fast path."""
    s = torch.bmm(q.transpose(1, 2), k)            # (B, N, N): s[b, i, j] = q_i . k_j
    p = torch.softmax(s, dim=-1)                   # softmax over keys j, for each query i
    return torch.bmm(v, p.transpose(1, 2))         # (B, c, N): o_i = sum_j p_ij v_j


_backend = None  # resolved once: "fused" or "torch"


def backend():
    """Which implementation attention() uses: 'fused' or 'torch' (decided on first call)."""
    global _backend
    if _backend is None:
        want = os.environ.get("UNIT_ATTN", "auto").strip().lower()
        if want not in ("auto", "torch", "fused"):
            raise ValueError(f"UNIT_ATTN={want!r} is not one of auto, torch, fused")
        if want == "torch":
            _backend = "torch"
        else:
            from unit import ops
            ok = ops.load(verbose=True)
            if not ok and want == "fused":
                raise RuntimeError(f"UNIT_ATTN=fused but the fused attention op could not be "
                                   f"loaded: {ops.load_error()}")
            _backend = "fused" if ok else "torch"  # ops.load() already warned once on failure
    return _backend


_checked = {}  # device type -> did the fused op pass its self-check there


def _fused_ok(device):
    """Once per process and device type: the fused op must match the reference (forward and
    gradients, float32, an odd-sized case) before the model trusts it; otherwise one warning and
    the reference is used. A cheap guard for kernels validated on other hardware than yours."""
    from unit import ops
    kind = torch.device(device).type
    if kind not in _checked:
        ok = ops.supports(device)  # a CPU-only build (its CUDA variant failed) has no CUDA kernels
        if ok:
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k = (torch.randn(2, 16, 131, generator=g) * 0.5 for _ in range(2))
            v, w = torch.randn(2, 40, 131, generator=g), torch.randn(2, 40, 131, generator=g)
            ins = [t.to(device).requires_grad_() for t in (q, k, v)]
            ref = [t.detach().clone().requires_grad_() for t in ins]
            with torch.enable_grad():
                o_fused, o_ref = ops.fused_attention(*ins), attention_reference(*ref)
                (o_fused * w.to(device)).sum().backward()
                (o_ref * w.to(device)).sum().backward()
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
            err = max([rel(o_fused, o_ref)] + [rel(a.grad, b.grad) for a, b in zip(ins, ref)])
            ok = err < 1e-4
            if not ok:
                warnings.warn(f"unit/attention.py: the fused attention op disagrees with the PyTorch "
                              f"reference on {kind} (relative error {err:.1e}); using the reference. "
                              f"Please report this with your GPU and torch version.", RuntimeWarning)
        _checked[kind] = ok
    return _checked[kind]


def attention(q, k, v):
    """o = v . softmax_keys(q^T k). q, k: (B, d, N), v: (B, c, N) -> (B, c, N)."""
    if backend() == "fused":
        from unit import ops
        if os.environ.get("UNIT_ATTN", "").lower() == "fused" or _fused_ok(q.device):
            return ops.fused_attention(q, k, v)   # forced: errors say why if it cannot run here
    return attention_reference(q, k, v)


class SelfAttention(nn.Module):
    """SAGAN block: f = W_f x, g = W_g x (C/8 channels), h = W_h x (C channels),
    beta = softmax over positions, o = beta h, y = gamma * o + x with gamma initialised to 0,
    so the block starts as the identity and the network learns how much attention to use."""

    def __init__(self, channels):
        super().__init__()
        d = max(channels // 8, 1)
        self.f = nn.Conv2d(channels, d, 1)           # f(x_i): keys
        self.g = nn.Conv2d(channels, d, 1)           # g(x_j): queries
        self.h = nn.Conv2d(channels, channels, 1)    # h(x_i): values
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):                            # x: (B, C, H, W)
        B, C, H, W = x.shape
        # SAGAN: s_ij = f(x_i)^T g(x_j), beta_ji = softmax over i, o_j = sum_i beta_ji h(x_i);
        # output position j is the op's query, summed position i its key.
        q = self.g(x).flatten(2)                     # (B, C/8, N), N = H*W
        k = self.f(x).flatten(2)                     # (B, C/8, N)
        v = self.h(x).flatten(2)                     # (B, C, N)
        o = attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.gamma * o.view(B, C, H, W) + x
