"""
Tests of the fused attention op (csrc/attention.cpp, csrc/attention.cu, unit/ops.py).

    o = v . softmax_keys(q^T k), no scale      q, k: (B, d, N)  v, o: (B, c, N)

Everything is compared with a float64 PyTorch reference written here (dense N x N, autograd for
the gradients). Error measure: relative error = max|a - ref| / max|ref| over the whole tensor.
The CPU op must build: if it does not, these tests fail (they do not skip). CUDA tests skip when
torch sees no GPU.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unit import ops  # the repository root is on sys.path (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]

# N around T = 64: partial row blocks of the CPU kernel (16-row granularity), SIMD remainders (8 or 16
# lanes), and the CUDA kernels' 64-position tiles
T = 64


@pytest.fixture(scope="module")
def op():
    assert ops.load(verbose=True), f"the fused attention op did not build/load:\n{ops.load_error()}"
    return torch.ops.unit_attn


def make_inputs(B, d, c, N, scale=0.5, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, N, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, d, N, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, c, N, generator=g, dtype=torch.float64)
    go = torch.randn(B, c, N, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, go)]


def reference(q, k, v, go):
    """float64 dense attention: o, lse and the gradients of <o, go> w.r.t. q, k, v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.bmm(q.transpose(1, 2), k)  # (B, N, N): s[b, i, j] = q_i . k_j
    o = torch.bmm(v, torch.softmax(s, dim=-1).transpose(1, 2))  # (B, c, N)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), go.double())
    return o.detach(), torch.logsumexp(s, dim=-1).detach(), dq, dk, dv


def rel_err(a, ref):
    """max|a - ref| / max|ref| (the absolute error where ref is identically zero)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def fused_all(op, q, k, v, go):
    """o, lse from the forward op and dq, dk, dv through autograd (attention_bwd)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = op.attention_fwd(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), go)
    return o, lse, dq, dk, dv


def check_all(op, shape, dtype, device, tol, scale=0.5, seed=0):
    q, k, v, go = make_inputs(*shape, scale=scale, dtype=dtype, device=device, seed=seed)
    got = fused_all(op, q, k, v, go)
    ref = reference(q, k, v, go)  # from the same (rounded) inputs: measures the kernel only
    errs = {name: rel_err(a, r) for name, a, r in zip(("o", "lse", "dq", "dk", "dv"), got, ref)}
    assert got[0].dtype == dtype and got[2].dtype == dtype
    assert all(e < tol for e in errs.values()), f"shape (B, d, c, N) = {shape}: {errs}"
    return errs


# (B, d, c, N): N around the tile edges, d = 8..128, c = 8..512, B = 1..4
SHAPES = [
    (1, 8, 8, 1),
    (2, 16, 24, 7),
    (1, 64, 32, T - 1),
    (3, 32, 16, T),
    (2, 128, 8, T + 1),
    (4, 8, 512, 2 * T + 5),
    (1, 13, 40, 3 * T - 1),
    (2, 64, 256, 300),
]


# ---------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_d%d_c%d_N%d" % s)
def test_cpu_float32_matches_float64_reference(op, shape):
    check_all(op, shape, torch.float32, "cpu", tol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_any_thread_count(op, threads):
    # the backward splits key tiles into groups by thread count and batch size (1 group at
    # B = 4 on one thread, several otherwise); every split must give the same numbers
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in ((4, 16, 24, 3 * T + 1), (1, 16, 24, 5 * T - 2)):
            check_all(op, shape, torch.float32, "cpu", tol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_cpu_float32_encoder_size(op):
    # the encoder's N (304 x 256 / 16) once, with small B and c to keep the float64 reference cheap
    check_all(op, (1, 64, 64, 4864), torch.float32, "cpu", tol=1e-5)


def test_cpu_float64_is_exact(op):
    errs = check_all(op, (2, 16, 12, T + 9), torch.float64, "cpu", tol=1e-12)
    assert max(errs.values()) < 1e-12


def test_cpu_large_logits_are_stable(op):
    # |s_ij| up to several hundred: exp overflows without the running max; softmax nearly one-hot.
    # o, lse, dv are well conditioned; dq, dk come from dS = P (dP - D), nearly all cancellation,
    # so they get the float32 cancellation error of dP - D relative to their own tiny size.
    q, k, v, go = make_inputs(2, 16, 24, 2 * T + 3, scale=5.0, dtype=torch.float32)
    o, lse, dq, dk, dv = fused_all(op, q, k, v, go)
    ro, rlse, rdq, rdk, rdv = reference(q, k, v, go)
    assert rlse.abs().max() > 200  # really large logits
    for a in (o, lse, dq, dk, dv):
        assert torch.isfinite(a).all()
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rlse) < 1e-6 and rel_err(dv, rdv) < 1e-5
    assert rel_err(dq, rdq) < 1e-3 and rel_err(dk, rdk) < 1e-3


def test_cpu_softmax_is_neither_uniform_nor_one_hot():
    # guards the test inputs above: with scale 0.5 the attention weights are informative
    q, k, _, _ = make_inputs(1, 64, 8, 500)
    p = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)
    assert 3 / 500 < p.max(dim=-1).values.median() < 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_is_computed_in_float32(op, dtype):
    check_all(op, (2, 32, 48, T + 5), dtype, "cpu", tol=1e-2)


def test_cpu_non_contiguous_inputs(op):
    q, k, v, go = make_inputs(2, 16, 8, 70, dtype=torch.float32)
    # same values, other strides: (B, N, d) storage viewed as (B, d, N), and a sliced batch
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    vn = torch.stack([v, -v], dim=1)[:, 0]
    assert not qn.is_contiguous() and not vn.is_contiguous()
    o1, _ = op.attention_fwd(q, k, v)
    o2, _ = op.attention_fwd(qn, k, vn)
    assert torch.equal(o1, o2)
    g1 = fused_all(op, q, k, v, go)[2:]
    g2 = fused_all(op, qn, k, vn, go.transpose(1, 2).contiguous().transpose(1, 2))[2:]
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_cpu_fused_attention_api(op):
    q, k, v, go = make_inputs(2, 8, 16, 40, dtype=torch.float32)
    q.requires_grad_()
    o = ops.fused_attention(q, k, v)
    assert o.shape == (2, 16, 40) and o.requires_grad
    ro, _, rdq, _, _ = reference(q, k, v, go)
    (o * go).sum().backward()
    assert rel_err(o, ro) < 1e-5 and rel_err(q.grad, rdq) < 1e-5
    assert ops.supports("cpu")


def test_cpu_empty_inputs(op):
    o, lse = op.attention_fwd(torch.zeros(2, 4, 0), torch.zeros(2, 4, 0), torch.zeros(2, 3, 0))
    assert o.shape == (2, 3, 0) and lse.shape == (2, 0)
    o, lse = op.attention_fwd(torch.zeros(0, 4, 5), torch.zeros(0, 4, 5), torch.zeros(0, 3, 5))
    assert o.shape == (0, 3, 5) and lse.shape == (0, 5)


@pytest.mark.parametrize(
    "shapes, dtype, match",
    [
        (((2, 8, 10), (2, 8, 11), (2, 4, 10)), torch.float32, "same shape"),
        (((2, 8, 10), (2, 8, 10), (1, 4, 10)), torch.float32, "v must be shaped"),
        (((8, 10), (8, 10), (4, 10)), torch.float32, "3-D"),
        (((2, 0, 10), (2, 0, 10), (2, 4, 10)), torch.float32, "at least 1"),
        (((2, 8, 10), (2, 8, 10), (2, 4, 10)), torch.int32, "float32"),
    ],
)
def test_cpu_bad_inputs_raise_clear_errors(op, shapes, dtype, match):
    q, k, v = (torch.ones(s, dtype=dtype) for s in shapes)
    with pytest.raises(RuntimeError, match=match) as e:
        op.attention_fwd(q, k, v)
    assert "csrc/attention.cpp" in str(e.value)


def test_cpu_bwd_rejects_wrong_lse(op):
    q, k, v, go = make_inputs(1, 4, 3, 9, dtype=torch.float32)
    o, lse = op.attention_fwd(q, k, v)
    with pytest.raises(RuntimeError, match="lse must be"):
        op.attention_bwd(go, q, k, v, o, lse[:, :5])


def test_cpu_gradcheck_float64(op):
    q, k, v, _ = make_inputs(2, 3, 4, 5)
    assert torch.autograd.gradcheck(ops.fused_attention, [t.requires_grad_() for t in (q, k, v)])
    # across a tile boundary (fast mode: a random projection of the Jacobian)
    q, k, v, _ = make_inputs(1, 2, 3, T + 3, seed=1)
    assert torch.autograd.gradcheck(ops.fused_attention, [t.requires_grad_() for t in (q, k, v)],
                                    fast_mode=True)


def test_cpu_opcheck(op):
    q, k, v, go = make_inputs(2, 8, 6, T + 2, dtype=torch.float32)
    torch.library.opcheck(op.attention_fwd.default, (q, k, v))
    torch.library.opcheck(op.attention_fwd.default, tuple(t.requires_grad_() for t in (q, k, v)))
    o, lse = op.attention_fwd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(op.attention_bwd.default, (go, q.detach(), k.detach(), v.detach(), o, lse))


def test_cpu_autocast_runs_the_op_in_float32(op):
    # the op's autocast rule (unit/ops.py): on the CPU its inputs are cast to float32, so under a bf16
    # autocast it gives exactly its float32 result, also for the bf16 tensors an autocast conv returns
    q, k, v, go = make_inputs(2, 8, 16, T + 5, dtype=torch.float32)
    want = ops.fused_attention(q, k, v)
    for dtype in (torch.float32, torch.bfloat16):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", torch.bfloat16):
            o = ops.fused_attention(*ins)
        assert o.dtype == torch.float32
        ref = want if dtype == torch.float32 else ops.fused_attention(*(t.detach().float() for t in ins))
        assert torch.equal(o, ref)
        o.backward(go)                                 # gradients arrive in the inputs' dtype
        assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in ins)
    assert rel_err(o, reference(q, k, v, go)[0]) < 1e-2  # bf16-rounded inputs: bf16 tolerance


def test_reference_softmax_is_float32_under_autocast():
    # unit.attention.attention_reference under a CPU bf16 autocast: bmm in bf16 (autocast's choice),
    # the softmax statistics in float32; the result is within bf16 tolerance of float64
    from unit.backends import attention_reference
    q, k, v, go = make_inputs(2, 8, 16, 3 * T, dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        o = attention_reference(q, k, v)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, reference(q, k, v, go)[0]) < 2e-2


def test_cpu_never_allocates_n_by_n(op):
    # The generator's N = 19456: one float32 N x N matrix would be 1.5 GB. In a fresh process,
    # run forward + backward and check the peak resident memory grows by far less than that.
    # (ru_maxrss is the process's peak RSS; the inputs here are only ~0.6 MB each.)
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from unit import ops
        assert ops.load(verbose=False), ops.load_error()
        def run(N):
            q, k = (torch.randn(1, 8, N) * 0.5 for _ in range(2))
            v = torch.randn(1, 8, N)
            q.requires_grad_()
            ops.fused_attention(q, k, v).sum().backward()
        run(300)  # warm up: thread pool, allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(19456)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)  # MiB (ru_maxrss is in KiB on Linux)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mib = float(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 100, f"peak memory grew by {grew_mib:.0f} MiB during attention at N = 19456"


def test_build_failure_warns_once_and_reports(tmp_path):
    # unit/ops.py pointed at a broken csrc/ (in a fresh process, build folder under tmp_path):
    # load() warns once and returns False, load_error() has the compiler's message, and
    # fused_attention raises a RuntimeError that says what to do
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "attention.cpp").write_text('#error "deliberately broken"\n')
    (tmp_path / "csrc" / "attention_cuda.h").write_text("")
    script = textwrap.dedent(f"""
        import sys, warnings
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(ROOT)!r})
        from unit import ops
        ops.ROOT = Path({str(tmp_path)!r})
        ops.CSRC = ops.ROOT / "csrc"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert ops.load() is False and ops.load() is False
        assert len(w) == 1 and "falling back to PyTorch" in str(w[0].message), [str(x.message) for x in w]
        assert "deliberately broken" in ops.load_error()
        try:
            ops.fused_attention(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 3))
        except RuntimeError as e:
            assert "could not be built" in str(e) and "UNIT_ATTN=sdpa" in str(e)
        else:
            raise AssertionError("fused_attention did not raise")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available to torch")


@pytest.fixture(scope="module")
def cuda_op(op):
    assert ops.supports("cuda"), f"the CUDA kernels did not build/load:\n{ops.load_error()}"
    return op


CUDA_SHAPES = SHAPES + [(2, 64, 512, 4864), (1, 32, 256, 19456 // 4), (1, 128, 1024, 257)]


@cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "B%d_d%d_c%d_N%d" % s)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)],
                         ids=["f32", "f16", "bf16"])
def test_cuda_matches_float64_reference(cuda_op, shape, dtype, tol):
    check_all(cuda_op, shape, dtype, "cuda", tol=tol)


@cuda
def test_cuda_large_logits_are_stable(cuda_op):
    q, k, v, go = make_inputs(2, 16, 24, 300, scale=5.0, dtype=torch.float32, device="cuda")
    o, lse, dq, dk, dv = fused_all(cuda_op, q, k, v, go)
    ro, rlse, rdq, rdk, rdv = reference(q, k, v, go)
    for a in (o, lse, dq, dk, dv):
        assert torch.isfinite(a).all()
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rlse) < 1e-6 and rel_err(dv, rdv) < 1e-5
    assert rel_err(dq, rdq) < 1e-3 and rel_err(dk, rdk) < 1e-3


@cuda
def test_cuda_never_allocates_n_by_n(cuda_op):
    # the generator's attention at full size; one N x N float32 matrix would be 1.5 GB
    q, k, v, go = make_inputs(1, 32, 256, 19456, dtype=torch.float32, device="cuda")
    q.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.fused_attention(q, k, v).backward(go)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 256 * 2**20, f"attention at N = 19456 allocated {extra / 2**20:.0f} MiB at peak"


@cuda
def test_cuda_opcheck(cuda_op):
    q, k, v, go = make_inputs(2, 8, 6, 70, dtype=torch.float32, device="cuda")
    torch.library.opcheck(cuda_op.attention_fwd.default, tuple(t.requires_grad_() for t in (q, k, v)))
    o, lse = cuda_op.attention_fwd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(cuda_op.attention_bwd.default, (go, q.detach(), k.detach(), v.detach(), o, lse))


@cuda
def test_cuda_autocast_gives_the_op_bf16_inputs(cuda_op):
    # the op's CUDA autocast rule: float32 inputs are cast to bf16 (its bf16 kernels run), under a bf16
    # and an fp16 autocast alike; the result matches the float32 op within bf16 tolerance
    q, k, v, go = make_inputs(2, 64, 512, 1000, dtype=torch.float32, device="cuda")
    want = ops.fused_attention(q, k, v)
    for amp in (torch.bfloat16, torch.float16):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cuda", amp):
            o = ops.fused_attention(*ins)
        assert o.dtype == torch.bfloat16
        assert rel_err(o, want) < 1e-2
        o.backward(go.to(o.dtype))
        assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in ins)


@cuda
def test_cuda_rejects_sizes_beyond_the_kernels(cuda_op):
    # the op raises with the reason; ops.cuda_unsupported gives the same reason, so that
    # UNIT_ATTN=auto sends such shapes to SDPA instead
    for d, c, says in ((129, 8, "d > 128"), (8, 1025, "c > 1024")):
        q, k, v, _ = make_inputs(1, d, c, 10, dtype=torch.float32, device="cuda")
        assert says in ops.cuda_unsupported(q, k, v)
        with pytest.raises(RuntimeError, match=says):
            cuda_op.attention_fwd(q, k, v)
    q, k, v, _ = make_inputs(1, 8, 8, 10, dtype=torch.float64, device="cuda")
    assert "float32, float16 and bfloat16" in ops.cuda_unsupported(q, k, v)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        cuda_op.attention_fwd(q, k, v)
    q, k, v, _ = make_inputs(8, 64, 512, 4864, dtype=torch.bfloat16, device="cuda")
    assert ops.cuda_unsupported(q, k, v) is None  # the encoder's shape runs on every sm_80+ GPU
