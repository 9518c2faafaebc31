"""
How attention() picks its backend (unit/backends.py) and how the fused op's CUDA build decides
(unit/ops.py), tested on the CPU: the self-check in a child process (a crashing, a wrong and a
raising op fail it, the real op passes), its cached verdict, the SDPA fallback, the per-shape CPU
choice, the CUDA branch of auto with the op's answers mocked, and the checks made before building
for CUDA (GPU architecture, TORCH_CUDA_ARCH_LIST, nvcc version).
"""
import json
import textwrap

import pytest
import torch

import unit.backends as A
from unit import ops


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """auto, a cache file of this test's own, and nothing decided yet in this process."""
    monkeypatch.delenv("UNIT_ATTN", raising=False)
    monkeypatch.setenv("UNIT_ATTN_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(A, "_choices", {})
    monkeypatch.setattr(A, "_verdicts", {})
    return tmp_path


def qkv(B=2, d=8, c=12, N=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, N, generator=g, dtype=dtype), torch.randn(B, d, N, generator=g, dtype=dtype),
            torch.randn(B, c, N, generator=g, dtype=dtype))


def test_backend_names(monkeypatch):
    for name in A.BACKENDS:
        monkeypatch.setenv("UNIT_ATTN", name)
        assert A.backend() == name
    monkeypatch.setenv("UNIT_ATTN", "torch")
    with pytest.raises(ValueError, match="now called 'naive'"):
        A.backend()


def test_sdpa_matches_the_reference():
    # scale 1, d_v != d_qk, forward and gradients, float64 (CPU SDPA runs its math path)
    q, k, v = (x.requires_grad_() for x in qkv())
    w = torch.randn(2, 12, 50, dtype=torch.float64)
    o1 = A.attention_sdpa(q, k, v)
    g1 = torch.autograd.grad((o1 * w).sum(), (q, k, v))
    o2 = A.attention_reference(q, k, v)
    g2 = torch.autograd.grad((o2 * w).sum(), (q, k, v))
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the self-check child process


FAKE_OPS = textwrap.dedent("""
    import ctypes, torch
    from unit.backends import attention_reference
    def crashing(q, k, v):
        ctypes.string_at(0)  # reads address 0: SIGSEGV, as an illegal address would end a CUDA process
    def wrong(q, k, v):
        return attention_reference(q, k, v) * 1.01
    def raising(q, k, v):
        raise RuntimeError("unit_attn (csrc/attention.cu): the forward kernel failed: misaligned address.")
    class NanGrad(torch.autograd.Function):  # the forward right, the gradients NaN
        @staticmethod
        def forward(ctx, o):
            return o.clone()
        @staticmethod
        def backward(ctx, g):
            return g * float("nan")
    def nan_grads(q, k, v):
        return NanGrad.apply(attention_reference(q, k, v))
""")


@pytest.fixture
def fake_ops(fresh, monkeypatch):
    (fresh / "fake_ops.py").write_text(FAKE_OPS)
    monkeypatch.setenv("PYTHONPATH", str(fresh))
    return fresh


@pytest.mark.parametrize("op, says", [("crashing", "died (signal 11)"), ("wrong", "relative error 1.0e-02"),
                                      ("raising", "misaligned address"), ("nan_grads", "relative error nan")])
def test_selfcheck_fails_a_bad_op_without_crashing_the_caller(fake_ops, op, says):
    verdict = A.run_selfcheck("cpu", op=f"fake_ops:{op}")
    assert verdict["ok"] is False and says in verdict["detail"], verdict


def test_selfcheck_passes_the_real_op():
    verdict = A.run_selfcheck("cpu")
    assert verdict["ok"] is True, verdict
    assert "10 cases" in verdict["detail"]  # 5 shapes x (fp32, bf16): all run on the CPU


def test_failed_verdict_falls_back_once_and_is_cached(fake_ops, monkeypatch):
    calls = []
    real = A.run_selfcheck

    def run(device, op=None):
        calls.append(device)
        return real(device, op="fake_ops:crashing")

    monkeypatch.setattr(A, "run_selfcheck", run)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="failed its self-check.*died.*using naive"):
        out = A.attention(q, k, v)
    assert torch.equal(out, A.attention_reference(q, k, v)) and A.used() == ["naive"]
    assert calls == ["cpu"]
    cached = json.loads((fake_ops / "cache.json").read_text())["selfcheck"]
    assert len(cached) == 1 and not next(iter(cached.values()))["ok"]
    # a later process: the verdict comes from the cache, no child runs
    monkeypatch.setattr(A, "_choices", {})
    monkeypatch.setattr(A, "_verdicts", {})
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        A.attention(q, k, v)
    assert calls == ["cpu"]


def test_a_cached_verdict_is_keyed_by_the_kernel_source(fresh, monkeypatch):
    key = A._device_key(torch.device("cpu"))
    assert "csrc " in key and torch.__version__ in key
    monkeypatch.setattr(A, "ROOT", fresh)  # other kernel sources -> another key
    (fresh / "csrc").mkdir()
    (fresh / "csrc" / "attention.cu").write_text("// changed\n")
    assert A._device_key(torch.device("cpu")) != key


# ---------------------------------------------------------------------------------------------
# auto on the CPU: the faster of fused and naive per shape


@pytest.fixture
def verified(fresh, monkeypatch):
    monkeypatch.setattr(A, "_verified", lambda device: True)
    return fresh


def fake_times(monkeypatch, ms, calls=None):
    def time_cpu(fns, q, k, v, grad):
        if calls is not None:
            calls.append(sorted(fns))
        return {name: ms[name] for name in fns}
    monkeypatch.setattr(A, "time_cpu", time_cpu)


def test_cpu_choice_is_measured_once_and_kept(verified, monkeypatch, capsys):
    calls = []
    fake_times(monkeypatch, {"fused": 10.0, "naive": 5.0, "sdpa": 7.0}, calls)
    q, k, v = qkv(dtype=torch.float32)
    torch.testing.assert_close(A.attention(q, k, v), A.attention_reference(q, k, v))
    assert A.used() == ["naive"] and calls == [["fused", "naive", "sdpa"]]
    assert "fused 10.00 ms, naive 5.00 ms, sdpa 7.00 ms -> naive" in capsys.readouterr().err
    A.attention(q, k, v)
    monkeypatch.setattr(A, "_choices", {})  # a later process reads the cached choice
    A.attention(q, k, v)
    assert len(calls) == 1 and A.used() == ["naive"]


@pytest.mark.parametrize("ms, picks", [({"fused": 10.0, "naive": 9.5, "sdpa": 9.2}, "fused"),  # within 10%
                                       ({"fused": 10.0, "naive": 9.5, "sdpa": 8.0}, "sdpa"),
                                       ({"fused": 5.0, "naive": 9.5, "sdpa": 8.0}, "fused")])
def test_cpu_choice_rule(verified, monkeypatch, ms, picks):
    fake_times(monkeypatch, ms)
    q, k, v = qkv(dtype=torch.float32)
    A.attention(q, k, v)
    assert A.used() == [picks]


def test_cpu_never_times_naive_where_its_matrix_is_huge(verified, monkeypatch):
    monkeypatch.setattr(A, "time_cpu", lambda *a: pytest.fail("timed"))
    q, k, v = (x[..., :1] for x in qkv(B=1, d=4, c=4, N=1, dtype=torch.float32))
    big = 16384  # 3 * 16384^2 * 4 bytes = 3 GiB of naive scores
    q, k, v = (x.expand(-1, -1, big) for x in (q, k, v))
    assert A._cpu_choice(q, k, v) == "fused"


def test_cpu_timing_runs_every_path():
    q, k, v = qkv(B=1, d=4, c=6, N=40, dtype=torch.float32)
    ms = A.time_cpu(A._IMPLS, q, k, v, grad=True)
    assert sorted(ms) == ["fused", "naive", "sdpa"] and all(t > 0 for t in ms.values())


def test_a_forced_backend_is_used_as_it_is(fresh, monkeypatch):
    monkeypatch.setenv("UNIT_ATTN", "sdpa")
    monkeypatch.setattr(A, "_choose_auto", lambda *a, **k: pytest.fail("auto consulted"))
    q, k, v = qkv()
    torch.testing.assert_close(A.attention(q, k, v), A.attention_reference(q, k, v))
    assert A.used() == ["sdpa"]


# ---------------------------------------------------------------------------------------------
# auto on CUDA, with the op's answers mocked (no GPU here)


def test_cuda_auto_uses_fused_only_where_verified_and_supported(fresh, monkeypatch):
    monkeypatch.setattr(ops, "load", lambda verbose=True: True)
    monkeypatch.setattr(ops, "supports", lambda kind: True)
    q, k, v = qkv(dtype=torch.float32)
    state = {"verified": True, "why": None}
    monkeypatch.setattr(A, "_verified", lambda device: state["verified"])
    monkeypatch.setattr(ops, "cuda_unsupported", lambda q, k, v: state["why"])
    assert A._choose_auto(q, k, v, kind="cuda") == "fused"
    state["why"] = "d > 128 (q and k tiles hold at most 128 features)"
    assert A._choose_auto(q, k, v, kind="cuda") == "sdpa"
    state.update(why=None, verified=False)
    assert A._choose_auto(q, k, v, kind="cuda") == "sdpa"
    monkeypatch.setattr(ops, "supports", lambda kind: kind == "cpu")  # the CUDA variant did not build
    state["verified"] = True
    assert A._choose_auto(q, k, v, kind="cuda") == "sdpa"


# ---------------------------------------------------------------------------------------------
# unit/ops.py: what is checked before building the CUDA variant


@pytest.mark.parametrize("gpu, cc, arch_list, nvcc, torch_cuda, says", [
    ("H100", (9, 0), None, "13.0", "13.0", None),
    ("A100", (8, 0), "8.0;9.0", "12.8", "12.6", None),
    ("A10", (8, 6), "8.0", "13.0", "13.0", None),           # sm_80 code runs on sm_86
    ("H100", (9, 0), "8.0+PTX", "13.0", "13.0", None),      # PTX is compiled at load
    ("T4", (7, 5), None, "13.0", "13.0", "compute capability 7.5"),
    ("H100", (9, 0), "7.0;8.0;9.0", "13.0", "13.0", "includes 7.0, below the 8.0"),
    ("H100", (9, 0), "8.0;8.6", "13.0", "13.0", "has no code for H100 (sm_90)"),
    ("H100", (9, 0), "hopper", "13.0", "13.0", "cannot read 'hopper'"),
    ("H100", (9, 0), None, "12.4", "13.0", "nvcc 12.4 (CUDA_HOME) and torch's CUDA 13.0 differ"),
    ("H100", (9, 0), None, None, "13.0", "nvcc was not found"),
])
def test_cuda_build_problem(gpu, cc, arch_list, nvcc, torch_cuda, says):
    why = ops.cuda_build_problem(gpu, cc, arch_list, nvcc, torch_cuda)
    assert (why is None) if says is None else (says in why), why
