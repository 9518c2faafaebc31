"""csrc/attention.cu compiles on its own with nvcc for sm_80 and sm_90 (no GPU needed), and the CUDA
glue of csrc/attention.cpp (-DWITH_CUDA) compiles against torch's headers and the toolkit's.

One nvcc call builds both architectures (1-1.5 min on 2 busy cores), with the defines that
torch.utils.cpp_extension adds (no implicit half/bf16 conversions). Besides success it
checks what the compiler reports: no warnings (host -Wall included), no register spills or stack
frames in any kernel (local memory would make the kernels much slower), and the three C entry
points of csrc/attention_cuda.h exported with C linkage. Whether the kernels compute the right
numbers is tests/test_cuda_emu.py's job on the CPU, and tests/test_attention_op.py's on a GPU.
"""
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


def torch_nvcc_flags():
    """The flags torch.utils.cpp_extension adds to every .cu (no implicit half/bf16 conversions...),
    so that this test sees what unit/ops.py's build sees."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        return list(COMMON_NVCC_FLAGS)
    except Exception:  # torch missing or moved: the flags of torch 2.x
        return ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                "--expt-relaxed-constexpr"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to compile csrc/attention.cu")
    obj = tmp_path_factory.mktemp("nvcc") / "attention.o"
    cmd = [NVCC, "-c", "-std=c++20", "-O3",
           "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90",
           "-Xcompiler", "-Wall", "-Xptxas", "-v", *torch_nvcc_flags(),
           str(ROOT / "csrc" / "attention.cu"), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return proc, obj


def test_compiles_for_sm80_and_sm90(build):
    proc, obj = build
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-5000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    log = proc.stdout + proc.stderr
    assert "for 'sm_80'" in log and "for 'sm_90'" in log


def test_no_warnings(build):
    proc, _ = build
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings[:20])


def test_no_spills_or_stack(build):
    proc, _ = build
    log = proc.stdout + proc.stderr
    # ptxas -v: "... 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", one per kernel/arch
    rows = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    # 3 forward + 3 dq/dk + 3 dv + dot + convert kernels per dtype (3) and arch (2)
    assert len(rows) == 2 * 3 * (3 + 3 + 3 + 2), f"unexpected ptxas report:\n{log[-3000:]}"
    bad = [r for r in rows if any(int(x) for x in r)]
    assert not bad, f"kernels with local memory (stack, spill stores, spill loads): {bad}"


def test_c_entry_points_exported(build):
    proc, obj = build
    assert proc.returncode == 0
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not on PATH, cannot list the object's symbols")
    out = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True).stdout
    defined = set(re.findall(r" T (\w+)$", out, flags=re.M))
    for name in ("unit_attn_fwd", "unit_attn_bwd", "unit_attn_bwd_workspace_bytes"):
        assert name in defined, f"{name} is not exported with C linkage from csrc/attention.cu"


def cuda_include_dir():
    """The CUDA toolkit's include folder (cuda_runtime.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    roots += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    return next((os.path.join(r, "include") for r in roots
                 if r and os.path.exists(os.path.join(r, "include", "cuda_runtime.h"))), None)


def test_cuda_glue_compiles(tmp_path):
    # csrc/attention.cpp with -DWITH_CUDA is only ever built on a GPU machine by unit/ops.py; check
    # here that it compiles (syntax and types, no object) against this torch's headers and the
    # toolkit's. CPU-only torch wheels lack one generated header, c10/cuda/impl/cuda_cmake_macros.h
    # (a few build-time macros): an empty stand-in is enough for a syntax check.
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime.h) found: set CUDA_HOME")
    torch_inc = Path(__import__("torch").__file__).parent / "include"
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("// empty stand-in for a syntax check\n")
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DWITH_CUDA", "-I", str(tmp_path), "-I", str(torch_inc),
           "-I", str(torch_inc / "torch" / "csrc" / "api" / "include"), "-I", inc, "-I", str(ROOT / "csrc"),
           str(ROOT / "csrc" / "attention.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-5000:]}"
    ours = [l for l in proc.stderr.splitlines() if "attention.cpp" in l and "warning" in l]
    assert not ours, "\n".join(ours)
