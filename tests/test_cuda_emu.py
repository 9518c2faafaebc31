"""
csrc/attention.cu executed on the CPU by the CUDA emulator in tests/cuda_emu/ (no GPU needed).

The kernels are compiled from the unmodified source with the host compiler against an emulation
of the CUDA runtime, warp collectives, ldmatrix, mma.sync (f16, bf16) and cp.async written from
the PTX ISA, and run one fiber per CUDA thread, with shared memory NaN-filled at block start, a
shared- and global-memory race detector, bounds/alignment/initialisation checks on every access
and launch-limit checks (tests/cuda_emu/emu.h says how). They are called through the C entry
points of csrc/attention_cuda.h exactly as csrc/attention.cpp calls them on a GPU, and compared
with the float64 reference of tests/test_attention_op.py at the tolerances of its CUDA tests.

Run alone:  python -m pytest -m cuda_emu            (about 2 minutes on 2 cores, build included)
Another kernel file:  UNIT_EMU_CU=path/to/attention.cu python -m pytest -m cuda_emu
"""
import ctypes
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cuda_emu"))
from build import build  # noqa: E402  (tests/cuda_emu/build.py)
from harness import EmuDevice, EmuError  # noqa: E402
from test_attention_op import make_inputs, reference, rel_err  # noqa: E402

pytestmark = [pytest.mark.cuda_emu,
              pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                 reason="the CUDA emulator's fiber switch is written for x86-64 only")]

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # as the real CUDA tests
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def dev():
    cu = os.environ.get("UNIT_EMU_CU", str(ROOT / "csrc" / "attention.cu"))
    return EmuDevice(build(cu))


@pytest.fixture
def gpu(dev):
    """The emulated device, back to an H100 (132 SMs) with no error pending after each test."""
    yield dev
    dev.use_device()
    dev.reset()


def check(dev, shape, dtype, scale=0.5, seed=0, offset=0):
    """Forward and backward on the emulated GPU against the float64 reference; -> the errors."""
    q, k, v, go = make_inputs(*shape, scale=scale, dtype=dtype, seed=seed)
    o, lse = dev.fwd(q, k, v, offset=offset)
    dq, dk, dv = dev.bwd(go, q, k, v, o, lse, offset=offset)
    errs = {n: rel_err(a, r) for n, a, r in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv),
                                                reference(q, k, v, go))}
    assert all(e < TOL[dtype] for e in errs.values()), f"(B, d, c, N) = {shape}, {dtype}: {errs}"
    return errs


# (B, d, c, N). N: 1, 63, 65 take the element-wise tile loads (N not a multiple of the 16-byte
# vector), 64, 136, 200 the cp.async path; 64 is one whole tile, 136 and 200 end in a partial one.
# d: 8, 16 (the d <= 32 kernels), 64, 128, each kernel size with both load paths. c: 8, 130 (a
# partial second c-split), 256 (two), 1024 (eight c-splits, sixteen dP chunks). B: 1..3.
SHAPES = [
    (1, 8, 8, 1),
    (2, 16, 130, 63),
    (3, 64, 8, 64),
    (2, 64, 256, 63),
    (1, 128, 256, 65),
    (2, 8, 1024, 136),
    (1, 128, 130, 136),
    (1, 64, 130, 200),
    (3, 16, 256, 200),
    (1, 128, 1024, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_d%d_c%d_N%d" % s)
def test_matches_float64_reference(gpu, shape, dtype):
    check(gpu, shape, dtype)


@pytest.mark.parametrize("sms", [1, 2, 132])
def test_backward_key_splits(gpu, sms):
    # The dq/dk kernel splits the key tiles so that (query tiles x B x splits) fills the GPU:
    # 1 SM -> one split, 2 SMs -> 2 splits of 2 key tiles, 132 SMs -> one split per key tile (4).
    # dq and dk then gather contributions of several blocks through fp32 atomics.
    gpu.use_device(sms=sms)
    for dtype in (torch.float32, torch.bfloat16):
        check(gpu, (1, 64, 64, 256), dtype, seed=sms)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_misaligned_pointers_take_the_element_path(gpu, dtype):
    # N is a multiple of the vector width, but q, k, v (and grad_o, o) start one element after a
    # 16-byte boundary (a contiguous slice of a bigger tensor can): the kernels must not use
    # cp.async then, and the emulator would report a misaligned 16-byte copy if they did.
    check(gpu, (2, 16, 40, 128), dtype, offset=torch.empty(0, dtype=dtype).element_size())


def test_large_logits_are_stable(gpu):
    # |s_ij| in the hundreds: as test_attention_op's CUDA test, on the emulated kernels
    q, k, v, go = make_inputs(2, 16, 24, 136, scale=5.0, dtype=torch.float32)
    o, lse = gpu.fwd(q, k, v)
    dq, dk, dv = gpu.bwd(go, q, k, v, o, lse)
    ro, rlse, rdq, rdk, rdv = reference(q, k, v, go)
    assert rlse.abs().max() > 200
    assert rel_err(o, ro) < 1e-5 and rel_err(lse, rlse) < 1e-6 and rel_err(dv, rdv) < 1e-5
    assert rel_err(dq, rdq) < 1e-3 and rel_err(dk, rdk) < 1e-3


@pytest.mark.parametrize("B, d, c", [(1, 129, 8), (1, 8, 1025), (65536, 8, 8)])
def test_sizes_beyond_the_kernels_are_refused(gpu, B, d, c):
    # the C entry points answer cudaErrorInvalidValue (1) before launching anything
    code, vp = 0, ctypes.c_void_p(0x1000)
    rc = gpu.lib.unit_attn_fwd(code, vp, vp, vp, vp, vp, B, d, c, 16, ctypes.c_void_p(0x5EA5))
    assert rc == 1 and gpu.stat("launches") == 0


def test_launch_attributes_are_queried_once_per_device(gpu):
    # cudaFuncSetAttribute, the occupancy query and the device attributes: on the first calls on a
    # device only, never again (the same shape, and another one)
    gpu.use_device(sms=100)
    q, k, v, go = make_inputs(1, 64, 32, 136, dtype=torch.bfloat16)
    o, lse = gpu.fwd(q, k, v)
    gpu.bwd(go, q, k, v, o, lse)
    counts = {n: gpu.stat(n) for n in ("set_attribute", "occupancy", "device_attribute")}
    assert counts["set_attribute"] == 3 and counts["device_attribute"] == 4, counts  # fwd, dq/dk, dV kernels
    for shape in ((1, 64, 32, 136), (2, 40, 100, 70)):  # d = 40 and 64 use the same kernels
        q, k, v, go = make_inputs(*shape, dtype=torch.bfloat16)
        o, lse = gpu.fwd(q, k, v)
        gpu.bwd(go, q, k, v, o, lse)
    assert {n: gpu.stat(n) for n in counts} == counts


def test_supported_says_why_not(gpu):
    assert gpu.supported(torch.float32, 8, 64, 512, 4864) is None        # the UNIT shapes on an H100
    assert gpu.supported(torch.bfloat16, 8, 32, 256, 19456) is None
    assert gpu.supported(torch.float32, 8, 128, 1024, 4864) is None
    assert "d > 128" in gpu.supported(torch.float32, 1, 129, 8, 10)
    assert "c > 1024" in gpu.supported(torch.float32, 1, 8, 1025, 10)
    assert "65535" in gpu.supported(torch.float32, 65536, 8, 8, 10)
    assert "int32" in gpu.supported(torch.float32, 64, 8, 1024, 40000)
    gpu.use_device(cc=(8, 6), smem_block_optin=99 * 1024, smem_sm=100 * 1024)  # an RTX 3090 / A40
    assert gpu.supported(torch.float32, 1, 64, 256, 100) is None  # 85 KB per block
    assert "shared memory" in gpu.supported(torch.float32, 1, 65, 256, 100)  # 119 KB
    assert gpu.supported(torch.bfloat16, 1, 64, 512, 100) is None
    assert "99 KB" in gpu.supported(torch.bfloat16, 1, 128, 512, 100)  # the dV kernel: 99.5 KB
    gpu.use_device(cc=(7, 5))  # a T4
    assert "compute capability 7.5" in gpu.supported(torch.bfloat16, 1, 64, 512, 100)


def test_sm86_shared_memory_limit_is_reported(gpu):
    # sm_86/sm_89 give a block at most 99 KB: the fp32 d=128 forward needs more, and the launcher
    # must return cudaFuncSetAttribute's error, not launch
    gpu.use_device(cc=(8, 6), smem_block_optin=99 * 1024, smem_sm=100 * 1024)
    q, k, v, _ = make_inputs(1, 128, 8, 64, dtype=torch.float32)
    with pytest.raises(EmuError, match="CUDA error 1"):
        gpu.fwd(q, k, v)
    assert gpu.stat("launches") == 0


# ---------------------------------------------------------------------------------------------
# the emulator's own detectors, on small kernels with one known bug each (tests/cuda_emu/selftest.cu)


class Selftest:
    def __init__(self):
        self.dev = EmuDevice(build(ROOT / "tests" / "cuda_emu" / "selftest.cu"), stream_check=False)

    def run(self, name, *args, out_len=128):
        """Call st_<name>(out, *args); -> (return code, out as a float tensor, emulator message)."""
        out = self.dev.alloc(out_len * 4, "out")
        fn = getattr(self.dev.lib, "st_" + name)
        fn.restype = ctypes.c_int
        rc = fn(ctypes.c_void_p(out), *args)
        msg = self.dev.error()
        res = self.dev.download(out, (out_len,), torch.float32) if rc == 0 else None
        self.dev.reset()
        self.dev.free_all()
        return rc, res, msg

    def upload(self, t, name="in"):
        return ctypes.c_void_p(self.dev.upload(t, name))


@pytest.fixture(scope="module")
def st():
    return Selftest()


def test_emulator_detects_a_missing_syncthreads(st):
    rc, out, _ = st.run("race", 1)
    assert rc == 0 and torch.equal(out, (torch.arange(128.) + 32) % 128)
    rc, _, msg = st.run("race", 0)
    assert rc != 0 and "shared-memory race" in msg and "__syncthreads" in msg


def test_emulator_detects_a_missing_syncwarp(st):
    rc, out, _ = st.run("syncwarp", 1, out_len=32)
    assert rc == 0 and torch.equal(out, (torch.arange(32) ^ 1).float())
    rc, _, msg = st.run("syncwarp", 0, out_len=32)
    assert rc != 0 and "shared-memory race" in msg and "__syncwarp" in msg


def test_emulator_cp_async_lands_at_its_wait(st):
    x = torch.arange(32.) + 1
    rc, out, _ = st.run("cp_async", st.upload(x), 0, out_len=32)  # waited: the data
    assert rc == 0 and torch.equal(out, x)
    for mode in (1, 2):  # no wait / a wait one group too weak: NaN (the copy has not landed)
        rc, out, msg = st.run("cp_async", st.upload(x), mode, out_len=32)
        assert (rc == 0 and torch.isnan(out).all()) or "race" in msg, (mode, out, msg)
    rc, out, _ = st.run("cp_async", st.upload(x), 3, out_len=32)  # src-size 8: zero-filled tail
    assert rc == 0 and torch.equal(out, torch.where(torch.arange(32) % 4 < 2, x, torch.zeros(32)))


def test_emulator_bounds_alignment_and_initialisation(st):
    x = torch.arange(33.)
    rc, out, _ = st.run("read", st.upload(x), 32, 1, out_len=32)
    assert rc == 0 and torch.equal(out, x[1:])
    rc, _, msg = st.run("read", st.upload(x[:32]), 32, 1, out_len=32)  # one past the end
    assert rc == 700 and "past the end of in" in msg
    rc, _, msg = st.run("float2", st.upload(x), 1, out_len=32)  # 8-byte load at a 4-byte offset
    assert rc == 716 and "misaligned float2" in msg
    fresh = ctypes.c_void_p(st.dev.alloc(64 * 4, "fresh"))  # allocated, never written
    rc, _, msg = st.run("read", fresh, 32, 0, out_len=32)
    assert rc == 700 and "uninitialised" in msg


def test_emulator_detects_read_modify_write_between_blocks(st):
    zero = torch.zeros(1)
    out = st.dev.upload(zero, "out")
    fn = st.dev.lib.st_add
    assert fn(ctypes.c_void_p(out), 8, 1) == 0  # atomicAdd: fine, and sums to 8
    assert st.dev.download(out, (1,), torch.float32).item() == 8
    assert fn(ctypes.c_void_p(out), 8, 0) != 0  # plain +=: a race between blocks
    assert "global-memory race" in st.dev.error()
    st.dev.reset()
    st.dev.free_all()


def test_emulator_shared_memory_over_48k_needs_the_attribute(st):
    rc, _, msg = st.run("smem", 0, out_len=32)
    assert rc == 1 and "cudaFuncSetAttribute" in msg
    rc, out, _ = st.run("smem", 1, out_len=32)
    assert rc == 0 and torch.equal(out, torch.ones(32))


def test_emulator_detects_divergent_collectives(st):
    rc, _, msg = st.run("divergent", out_len=32)
    assert rc != 0 and ("__syncthreads while other lanes" in msg or "divergence" in msg)


def test_emulated_conversions_round_as_the_hardware_does(st):
    # __float2half_rn / __float2bfloat16_rn: round to nearest even, subnormals, overflow to inf,
    # NaN stays NaN; bit for bit against torch's conversions (which round the same way)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-9, 6, (4000,), generator=g),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, 2.0 ** -24, 2.0 ** -25,
                                 1.5 * 2.0 ** -25, 2.0 ** -26, 6.1e-5, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                                 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.4e38, float("inf"), float("-inf")])])
    n = x.numel()
    d = st.dev
    pin, ph, pb, pback = st.upload(x), d.alloc(2 * n, "h"), d.alloc(2 * n, "b"), d.alloc(8 * n, "back")
    assert d.lib.st_convert(pin, ctypes.c_void_p(ph), ctypes.c_void_p(pb), ctypes.c_void_p(pback), n) == 0, d.error()
    h, b = d.download(ph, (n,), torch.float16), d.download(pb, (n,), torch.bfloat16)
    back = d.download(pback, (2, n), torch.float32)
    d.free_all()
    assert torch.equal(h.view(torch.int16), x.half().view(torch.int16))
    assert torch.equal(b.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(back[0], x.half().float()) and torch.equal(back[1], x.bfloat16().float())
    nan = torch.tensor([float("nan")])
    assert torch.isnan(nan.half()).all() and torch.isnan(nan.bfloat16()).all()


@pytest.mark.parametrize("trans", [0, 1], ids=["ldmatrix", "ldmatrix.trans"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_emulated_ldmatrix_and_mma_multiply(st, dtype, trans):
    # the textbook fragment usage (selftest.cu) must give the matrix product, checked in float64
    g = torch.Generator().manual_seed(trans)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    rc, out, msg = st.run("mma", st.upload(a, "a"), st.upload(b, "b"), trans, int(dtype == torch.bfloat16),
                          out_len=256)
    assert rc == 0, msg
    ref = a.double() @ b.double()
    assert rel_err(out.view(16, 16), ref) < 1e-6
