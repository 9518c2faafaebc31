"""
Builds and loads the fused attention op in csrc/ and registers its Python side.

    o = v . softmax_keys(q^T k), no scale      q, k: (B, d, N)  v, o: (B, c, N)

The op lives in csrc/attention.cpp (schema, CPU kernel, CUDA glue) and csrc/attention.cu (CUDA
kernels). It is compiled with torch.utils.cpp_extension.load + ninja on first use, into
<repo>/build/unit_attn_<cpu|cuda_smXX>_<machine>/, and reused from there afterwards (ninja only
recompiles what changed). On a machine where torch sees a GPU and CUDA_HOME is set, the CUDA
variant (CPU + CUDA kernels) is built for that GPU's own architecture, unless cuda_build_problem()
finds a reason not to (a GPU older than sm_80, a TORCH_CUDA_ARCH_LIST below 8.0 or without this
GPU, an nvcc whose major version differs from torch's CUDA): then one warning names the versions
and the fix. If the CUDA variant is not built or fails, the CPU-only variant is built, so CPU
tensors still get the fused op (and CUDA tensors the fallback of unit/backends.py).

Public API:
    load(verbose=True) -> bool   builds/loads once per process; True if the op is usable
    fused_attention(q, k, v)     o (B, c, N), differentiable; RuntimeError if the op is unavailable
    load_error() -> str | None   why the build/load failed, if it did
    supports(device) -> bool     whether the loaded op has kernels for that device type
    cuda_unsupported(q, k, v) -> str | None   why the CUDA kernels cannot run this shape on q's GPU
    cuda_build_problem(...)      the checks made before building for CUDA (a pure function)

Registered on load: torch.ops.unit_attn.attention_fwd(q, k, v) -> (o, lse) and
torch.ops.unit_attn.attention_bwd(grad_o, q, k, v, o, lse) -> (dq, dk, dv), their fake kernels
(torch.compile, opcheck), autograd for attention_fwd (lse is not differentiable) and its autocast
rule (bf16 inputs on CUDA, fp32 on the CPU).
Which backend the model uses (fused or PyTorch) is decided in unit/backends.py, not here.
"""

import hashlib
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

_state = {"tried": False, "ok": False, "cuda": False, "error": None}


def _machine_tag():
    # the CPU code is compiled with -march=native, so a build is only valid on the CPU it was made
    # on: key the build folder by the CPU's model and feature flags (a shared home stays safe)
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        info += "".join(sorted(set(lines)))
    except OSError:
        info += platform.processor()
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def _arch(text):
    """'8.6', '8.6+PTX', '9.0a', 'sm_90', '90' -> (8, 6) / (9, 0); None if unreadable."""
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?[a-z]?(?:\+ptx)?", text.strip().lower())
    if not m:
        return None
    if m.group(2) is None:  # "90" -> 9.0, "120" -> 12.0
        return int(m.group(1)[:-1]), int(m.group(1)[-1])
    return int(m.group(1)), int(m.group(2))


def cuda_build_problem(gpu, cc, arch_list, nvcc_version, torch_cuda):
    """Why the CUDA variant should not be built for this GPU, as one sentence, or None.

    gpu: its name; cc: its compute capability (major, minor); arch_list: TORCH_CUDA_ARCH_LIST or
    None; nvcc_version: 'X.Y' of CUDA_HOME's nvcc or None; torch_cuda: torch.version.cuda."""
    if cc < (8, 0):
        return (f"{gpu} has compute capability {cc[0]}.{cc[1]}; the fused CUDA kernels need 8.0 or newer "
                f"(cp.async, bf16 mma.sync), so the fallback (SDPA) runs on it")
    if arch_list:
        entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
        archs = [_arch(e) for e in entries]
        if None in archs:
            bad = entries[archs.index(None)]
            return f"TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot read {bad!r}; use e.g. '{cc[0]}.{cc[1]}'"
        old = [e for e, a in zip(entries, archs) if a < (8, 0)]
        if old:
            return (f"TORCH_CUDA_ARCH_LIST={arch_list!r} includes {', '.join(old)}, below the 8.0 that cp.async "
                    f"and bf16 mma.sync need: set TORCH_CUDA_ARCH_LIST={cc[0]}.{cc[1]} (or unset it to build for "
                    f"this GPU)")
        # machine code runs on its own major version with a minor <= the GPU's; PTX is JIT-compiled
        runs = [a for e, a in zip(entries, archs) if a == cc or (a[0] == cc[0] and a[1] <= cc[1])
                or ("ptx" in e.lower() and a <= cc)]
        if not runs:
            return (f"TORCH_CUDA_ARCH_LIST={arch_list!r} has no code for {gpu} (sm_{cc[0]}{cc[1]}): add "
                    f"{cc[0]}.{cc[1]} (or unset it to build for this GPU)")
    if nvcc_version is None:
        return "nvcc was not found under CUDA_HOME: install the CUDA toolkit or set CUDA_HOME"
    if torch_cuda and nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc {nvcc_version} (CUDA_HOME) and torch's CUDA {torch_cuda} differ in major version, and "
                f"an extension built with one does not load in the other: install CUDA toolkit "
                f"{torch_cuda.split('.')[0]}.x and point CUDA_HOME at it")
    return None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_target():
    """(arch list to build for, None) or (None, why not), for the current GPU."""
    from torch.utils.cpp_extension import CUDA_HOME

    dev = torch.cuda.current_device()
    gpu, cc = torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or None
    why = cuda_build_problem(gpu, cc, arch_list, _nvcc_version(CUDA_HOME), torch.version.cuda)
    return (None, why) if why else (arch_list or f"{cc[0]}.{cc[1]}", None)


def _build(with_cuda, verbose, arch_list=None):
    from torch.utils.cpp_extension import load as cpp_load

    name = "unit_attn_cuda" if with_cuda else "unit_attn_cpu"
    folder = name
    if with_cuda:  # a folder per list of target architectures: unit_attn_cuda_sm90, ..._sm80_90
        folder += "_sm" + "_".join(re.sub(r"[^0-9a-zA-Z]", "", a) for a in re.split(r"[;\s]+", arch_list.strip()))
    build_dir = ROOT / "build" / f"{folder}_{_machine_tag()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "attention.cpp"] + ([CSRC / "attention.cu"] if with_cuda else [])
    # -ffp-contract=fast: allow fused multiply-add (off by default in the ISO -std=c++ modes)
    cflags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
    if with_cuda:
        cflags.append("-DWITH_CUDA")
    lock = build_dir / "lock"  # held by cpp_extension while it builds; a killed build leaves it
    if lock.exists():
        if time.time() - lock.stat().st_mtime > 1800:
            lock.unlink(missing_ok=True)  # no build takes 30 min: stale
        elif verbose:
            print(f"waiting for another build of the attention op to finish (if none is running, "
                  f"delete {lock})...", file=sys.stderr, flush=True)
    so = build_dir / f"{name}.so"
    deps = sources + [CSRC / "attention_cuda.h"]
    if verbose and (not so.exists() or any(p.stat().st_mtime > so.stat().st_mtime for p in deps)):
        print("building the fused attention op (first use only, ~1 min)...", file=sys.stderr, flush=True)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:  # cpp_extension reads the target architectures from here
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        cpp_load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            is_python_module=False,  # a TORCH_LIBRARY: loaded with torch.ops.load_library
            verbose=False,
        )
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _register_python_side():
    def check(q, k, v):
        torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3,
                     lambda: "unit_attn: q, k, v must be 3-D (B, d, N), (B, d, N), (B, c, N)")
        torch._check(q.shape == k.shape, lambda: "unit_attn: q and k must have the same shape")
        torch._check(v.shape[0] == q.shape[0] and v.shape[2] == q.shape[2],
                     lambda: "unit_attn: v must be (B, c, N) with the B and N of q")
        return q.shape[0], q.shape[1], v.shape[1], q.shape[2]

    @torch.library.register_fake("unit_attn::attention_fwd")
    def _fwd_fake(q, k, v):
        B, d, c, N = check(q, k, v)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return v.new_empty((B, c, N)), q.new_empty((B, N), dtype=lse_dtype)

    @torch.library.register_fake("unit_attn::attention_bwd")
    def _bwd_fake(grad_o, q, k, v, o, lse):
        check(q, k, v)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.unit_attn.attention_bwd(grad_o.to(o.dtype), q, k, v, o, lse)
        return dq, dk, dv

    torch.library.register_autograd("unit_attn::attention_fwd", backward, setup_context=setup_context)

    # Under torch.autocast: the CUDA kernels get bfloat16 inputs (their bf16 mma.sync path; also under
    # an fp16 autocast, whose range the unscaled logits q.k could overflow), the CPU kernel float32
    # (it has no faster low-precision path). The statistics (max, sum, lse) are fp32 either way.
    torch.library.register_autocast("unit_attn::attention_fwd", "cuda", torch.bfloat16)
    torch.library.register_autocast("unit_attn::attention_fwd", "cpu", torch.float32)


def load(verbose: bool = True) -> bool:
    """Build (first use) and load the fused op once per process. True if it is usable."""
    if _state["tried"]:
        return _state["ok"]
    _state["tried"] = True
    from torch.utils.cpp_extension import CUDA_HOME

    variants, arch_list, errors = [False], None, []
    if torch.cuda.is_available() and torch.version.cuda:
        if CUDA_HOME is None:
            why = "CUDA_HOME is not set and nvcc is not on PATH: install the CUDA toolkit to build the CUDA kernels"
        else:
            arch_list, why = _cuda_target()
        if why is None:
            variants = [True, False]  # CUDA + CPU kernels; CPU only if that fails
        elif verbose:
            warnings.warn(f"unit/ops.py: not building the fused CUDA attention kernels: {why}.", RuntimeWarning,
                          stacklevel=2)
    for with_cuda in variants:
        try:
            _build(with_cuda, verbose, arch_list)  # compiles if needed and loads the library
        except Exception as e:  # compiler errors, missing ninja/compiler, load failures
            errors.append(f"[{'cuda' if with_cuda else 'cpu'} build] {type(e).__name__}: {e}")
            continue
        try:  # a loaded library cannot be unloaded: no second variant after this point
            _register_python_side()
            _state.update(ok=True, cuda=with_cuda)
        except Exception as e:
            errors.append(f"[registration] {type(e).__name__}: {e}")
        break
    if errors:
        _state["error"] = "\n".join(errors)
        if verbose:
            what = ("the CUDA variant failed, using the CPU-only op" if _state["ok"]
                    else "falling back to PyTorch attention")
            lines = errors[0].strip().splitlines()
            first = next((l for l in lines if "error" in l.lower() and "Error building" not in l), lines[0])
            first = first.strip()[:300]
            warnings.warn(f"unit/ops.py: could not build/load the fused attention op in csrc/ "
                          f"({what}): {first} -- see unit.ops.load_error() for the full log.",
                          RuntimeWarning, stacklevel=2)
    return _state["ok"]


def load_error():
    """Why building or loading the op failed (compiler output included), or None."""
    return _state["error"]


def supports(device) -> bool:
    """True if the loaded op has kernels for tensors on `device` (cpu always, cuda if built)."""
    kind = torch.device(device).type
    return load(verbose=False) and (kind == "cpu" or (kind == "cuda" and _state["cuda"]))


def cuda_unsupported(q, k, v):
    """None if the CUDA kernels can run this shape and dtype on q's GPU, else why not (one
    sentence): the answer of csrc/attention.cu's unit_attn_supported (sizes, compute capability,
    shared memory per block). Requires the CUDA variant (supports('cuda'))."""
    why = torch.ops.unit_attn.cuda_supported(q.dtype, q.shape[0], q.shape[1], v.shape[1], q.shape[2], q.device)
    return why or None


def fused_attention(q, k, v):
    """o = v . softmax_keys(q^T k) with the fused op: q, k (B, d, N), v (B, c, N) -> o (B, c, N)."""
    if not load():
        raise RuntimeError("unit/ops.py: the fused attention op (csrc/attention.cpp) could not be "
                           "built or loaded; see unit.ops.load_error() for the compiler output, or "
                           "use another backend (UNIT_ATTN=sdpa or naive).")
    if not supports(q.device):
        raise RuntimeError(f"unit/ops.py: the fused attention op was built without {q.device.type} "
                           f"kernels; see unit.ops.load_error(), or use UNIT_ATTN=sdpa or naive.")
    o, _ = torch.ops.unit_attn.attention_fwd(q, k, v)
    return o
